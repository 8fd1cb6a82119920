"""Benchmarks: ``python -m geomrobust.bench``. Prints numbers; asserts nothing.

Training throughput of the compiled epoch (lax.scan over all steps, data on
the device, one dispatch per epoch) for the isometric MLP and a wide MLP
(784-1000-1000-10, batch 128), the FLOP/s the wide MLP's train step achieves,
and the FLOP/s of plain jitted matmuls of the *same GEMM shapes* (the forward
and backward products of that MLP, nothing else) measured in the same run:
their ratio says how close the whole step (gather, activations, loss, Adam)
comes to the matmul roofline of this machine. Report the ratio, not absolute
times: machines here are shared.

Attack throughput: PGD-40, APGD-CE-40, APGD-T-40 (9 targets) and Square
(500 queries), one restart each, L-inf, on the MNIST CNN of
``standard_mnist`` / ``madry_mnist``, in attacked examples per second and in
gradient steps (or, for Square, queries: forward passes) per second, through
the shared evaluation's own compiled attack (so a slowdown of the evaluation
shows up here). A profile's cost per example follows: gradient steps /
(gradient steps/s) + queries / (queries/s), per eps, for each example an
attack faces.

Side by side (``--sections=compare``): the same PGD-40 / APGD-CE-40 (MNIST
CNN, batch 500, L-inf eps 0.3) and wide-MLP training (784-1000-1000-10,
batch 128, Adam) workloads in PyTorch + torchattacks (``torch_side.py``),
timed in interleaved rounds in this one run (PyTorch at 1 thread and at one
per core, the better kept), with the ratios. Without torch and torchattacks
it prints how to install them.

Compilation cache (``--sections=cache``): a ``standard_mnist --smoke`` run
(on generated MNIST-shaped files) in a fresh process with an empty
compilation cache, then again with the cache it filled: cold vs warm
seconds (``geomrobust/runtime.py``).

Sweep cost: the local-contrastive reference recipe (784-1000-10, 1,000
training images, batch 50) trained as a 1-point and as a 50-point vmapped
d_F sweep (``training.sweep``), all members vmapped at once and chunked one
by one inside the same program: seconds per epoch of each phase after
compilation, the full 100 + 100-epoch run those imply, and the sweep's cost
relative to 50 separate runs, and the chunk size ``sweep.chunk_size=0``
now chooses on this machine (``training.sweep.auto_chunk_size``).

Like ``launch.py``, the benchmark runs on the CPU host split into XLA devices
(``geomrobust/runtime.py``): the evaluation's attacks use all of them,
training one.

MFTMA: the reference implementation's README case (100 manifolds, each
``randn(5000, 50)`` after ``np.random.seed(0)``, kappa 0, n_t 200) through
``geometry.mftma.analyze``: the first call (compilation included), the best
warm call, the values beside the reference's, and the speed-up over the
reference's 292 s on this CPU (numpy + cvxopt, one QP per t in a Python loop).
The data dimension (participation ratio, 90% dimension) of its 5,000 points
is timed on its own: an eigendecomposition of a 5000 x 5000 matrix.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from geomrobust import config as config_lib
from geomrobust import models
from geomrobust import parallel
from geomrobust import runtime
from geomrobust.bench import torch_side
from geomrobust.methods import build_method
from geomrobust.training import loop


def _best_time(fn, repeats: int) -> float:
  """Minimum wall time of ``fn()`` (which must block) over ``repeats`` calls."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def _mlp_config(hidden, batch, method, activation):
  cfg = config_lib.default_config()
  cfg.model = ml_collections.ConfigDict(dict(name='mlp', hidden=tuple(hidden), activation=activation,
                                             weight_init='torch', use_bias=True))
  cfg.method = ml_collections.ConfigDict(dict(name=method, beta=0.1, k=1.0, levels=(), depth_per_level=1,
                                              min_sq_dist=1e-12))
  cfg.train.batch_size = batch
  return cfg


def train_epoch_workload(hidden, batch, method='standard', activation='relu', n_train=60000):
  """``(run, steps)``: ``run()`` trains one compiled epoch on random MNIST-shaped data (blocking)."""
  cfg = _mlp_config(hidden, batch, method, activation)
  mesh = parallel.make_mesh(0, training=True)
  m = build_method(cfg, models.build_model(cfg.model, 10), 10)
  (phase,) = m.phases()
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(n_train, 28, 28, 1), dtype=np.uint8)
  y = rng.integers(0, 10, size=(n_train,)).astype(np.int32)
  steps = n_train // batch
  params = m.init_params(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  tx = loop.phase_optimizer(phase, params, cfg.train, steps)
  epoch = loop.compile_epoch(loop.make_epoch(loop.make_train_step(phase.loss_fn, tx), batch, steps, mesh), mesh)
  rep = parallel.replicated(mesh)
  state = jax.device_put(loop.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                                         hparams=m.hparams()), rep)
  x, y = jax.device_put((x, y), rep)
  holder = {'state': state, 'i': 0}

  def run():
    holder['state'], metrics = epoch(holder['state'], x, y, jax.random.key(holder['i']))
    holder['i'] += 1
    jax.block_until_ready(metrics)

  run()  # compile
  return run, steps


def train_epoch_benchmark(hidden, batch, method='standard', activation='relu', n_train=60000, repeats=3):
  """Seconds per compiled epoch on random MNIST-shaped data (best of ``repeats``)."""
  run, steps = train_epoch_workload(hidden, batch, method, activation, n_train)
  return _best_time(run, repeats), steps


def mlp_train_flops(sizes, batch) -> float:
  """Matmul FLOPs of one train step: forward (2BKN) + two backward GEMMs per
  layer (dX: 2BKN, dW: 2BKN), the first layer's dX excluded (no gradient to x)."""
  total = 0.0
  for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
    total += 2 * batch * k * n * (3 if i else 2)
  return total


def matmul_roofline(sizes, batch, steps, repeats=3) -> float:
  """FLOP/s of a jitted scan doing exactly the train step's GEMMs, ``steps``
  times, with fresh operands per step (so nothing is hoisted)."""
  key = jax.random.key(1)
  ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n)) / np.sqrt(k)
        for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:]))]
  xs = jax.random.normal(key, (steps, batch, sizes[0]))

  @jax.jit
  def gemms(ws, xs):
    def body(acc, x):
      h, hs = x, []
      for w in ws:                      # forward: [B,K] @ [K,N]
        hs.append(h)
        h = h @ w
      g = h
      for i in reversed(range(len(ws))):
        acc = acc + (hs[i].T @ g).sum()  # dW: [K,B] @ [B,N]
        if i:
          g = g @ ws[i].T                # dX: [B,N] @ [N,K]
      return acc, None
    return jax.lax.scan(body, jnp.float32(0), xs)[0]

  jax.block_until_ready(gemms(ws, xs))
  t = _best_time(lambda: jax.block_until_ready(gemms(ws, xs)), repeats)
  return mlp_train_flops(sizes, batch) * steps / t


def attack_workloads(n=1000, batch=500, steps=40, eps=0.3, names=('pgd', 'apgd_ce'), targets=9,
                     queries=500) -> dict:
  """``{name: run}`` for the recipes ``names`` (one restart, L-inf; ``apgd_t`` with
  ``targets`` targets, ``square`` with ``queries`` queries) on ``n`` inputs of the
  MNIST CNN through the shared evaluation's own compiled attack, compiled
  already (random weights and inputs: an attack's cost does not depend on
  them; labels are the model's predictions, as on the PyTorch side). Square
  runs at eps 0: it stops early once a whole chunk is misclassified, and at
  eps 0 nothing is, so every query runs (a query's cost does not depend on eps).
  """
  from geomrobust import evaluation
  from geomrobust.evaluation import suite
  cfg = config_lib.load_experiment('standard_mnist')
  method = build_method(cfg, models.build_model(cfg.model, 10), 10)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(n, 28, 28, 1)), jnp.float32)
  y = jnp.argmax(method.logits(params, x, None), -1).astype(jnp.int32)
  ev = cfg.eval
  with ev.unlocked():
    ev.pgd_steps, ev.pgd_restarts, ev.apgd_steps, ev.apgd_restarts = steps, 1, steps, 1
    ev.apgd_targets, ev.square_queries = targets, queries
  mesh = parallel.make_mesh(0)
  rep = parallel.replicated(mesh)
  params, x, y = jax.device_put((params, x, y), rep)
  available = evaluation.recipes.available(ev)
  out = {}
  for name in names:
    fn = suite.correct_fn(method.logits, available[name], batch, mesh)
    args = (params, x, y, jnp.arange(n), jax.random.key(0), jnp.float32(0.0 if name == 'square' else eps), None)
    out[name] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    out[name]()  # compile
  return out


ATTACK_LABELS = {'pgd': 'PGD-{steps} (CE)', 'apgd_ce': 'APGD-CE-{steps}',
                 'apgd_t': 'APGD-T-{steps} x {targets} targets', 'square': 'Square, {queries} queries'}


def attack_benchmark(n=1000, batch=500, steps=40, repeats=3, targets=9, queries=500) -> list[tuple[str, float, float]]:
  """``[(label, examples/s, gradient steps or queries per second)]`` for PGD-CE,
  APGD-CE, APGD-T and Square on the MNIST CNN (a gradient step or a query is
  one example's model evaluation: ``steps + 1`` of them per APGD restart and
  target, ``queries`` per Square run)."""
  work = {'pgd': steps + 1, 'apgd_ce': steps + 1, 'apgd_t': targets * (steps + 1), 'square': queries}
  runs = attack_workloads(n, batch, steps, names=tuple(work), targets=targets, queries=queries)
  out = []
  for name, run in runs.items():
    rate = n / _best_time(run, repeats)
    out.append((ATTACK_LABELS[name].format(steps=steps, targets=targets, queries=queries), rate, rate * work[name]))
  return out


def interleaved(workloads: dict, repeats: int) -> dict:
  """Best seconds of each ``workloads[name]()`` over ``repeats`` rounds, every round
  running each workload once in turn (so a busy spell of a shared machine
  slows all of them, not one)."""
  times = {name: [] for name in workloads}
  for _ in range(repeats):
    for name, run in workloads.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  return {name: min(t) for name, t in times.items()}


def compare(repeats=3, n=500, batch=500, steps=40, n_train=20000, log=print) -> dict | None:
  """The side-by-side section: geomrobust vs PyTorch (+ torchattacks) on the same
  workloads, interleaved; returns ``{workload: (ours ex/s, theirs ex/s, threads)}``,
  or None (and says how to enable it) when torch or torchattacks is missing."""
  absent = torch_side.missing()
  if absent:
    log(f'side by side with PyTorch: skipped ({absent} not installed); enable it with: {torch_side.INSTALL_HINT}')
    return None
  import torch
  ours = attack_workloads(n, batch, steps)
  theirs = torch_side.attack_workloads(n, batch, steps)
  mlp_batch = 128
  ours['mlp'], mlp_steps = train_epoch_workload((1000, 1000), mlp_batch, n_train=n_train)
  theirs['mlp'] = torch_side.mlp_train_workload(n_train, mlp_batch)
  examples = {'pgd': n, 'apgd_ce': n, 'mlp': mlp_steps * mlp_batch}
  best = {}
  for threads in sorted({1, runtime.usable_cores()}):
    torch_side.set_threads(threads)
    for name, run in theirs.items():
      run()  # warm-up at this thread count
    runs = {('ours', k): v for k, v in ours.items()}
    runs.update({('torch', k): v for k, v in theirs.items()})
    for (side, name), t in interleaved(runs, repeats).items():
      key = (side, name)
      rate = examples[name] / t
      if key not in best or rate > best[key][0]:
        best[key] = (rate, threads if side == 'torch' else None)
  labels = {'pgd': f'PGD-{steps} (CE), MNIST CNN, batch {batch}', 'apgd_ce': f'APGD-CE-{steps}, MNIST CNN, batch {batch}',
            'mlp': f'wide MLP 784-1000-1000-10 training, batch {mlp_batch}'}
  out = {}
  log(f'side by side, interleaved rounds (best of {repeats}), PyTorch {torch.__version__} CPU at its better of '
      f'1 / {runtime.usable_cores()} threads:')
  for name, label in labels.items():
    (mine, _), (other, threads) = best['ours', name], best['torch', name]
    out[name] = (mine, other, threads)
    log(f'  {label}: geomrobust {mine:,.0f} ex/s, PyTorch {other:,.0f} ex/s ({threads} thread'
        f'{"s" if threads > 1 else ""}) -> {mine / other:.2f}x')
  return out


def smoke_cold_warm(log=print) -> tuple[float, float]:
  """Wall seconds of ``launch.py --experiment=standard_mnist --smoke`` (generated
  MNIST-shaped files) in a fresh process with an empty compilation cache, then
  again with the cache the first run filled."""
  from geomrobust.data import testing
  repo = pathlib.Path(__file__).resolve().parents[2]
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    testing.write_idx_dataset(tmp / 'data' / 'mnist', n_train=256, n_test=128, seed=0)
    env = dict(os.environ, GEOMROBUST_CACHE_DIR=str(tmp / 'cache'))
    env.pop('JAX_COMPILATION_CACHE_DIR', None)  # (it would win over the empty cache)
    times = []
    for i in range(2):
      cmd = [sys.executable, str(repo / 'launch.py'), '--experiment=standard_mnist', '--smoke',
             f'--data_dir={tmp / "data"}', '--config.data.verify=False', f'--workdir={tmp / f"run{i}"}']
      t0 = time.perf_counter()
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=repo)
      times.append(time.perf_counter() - t0)
      if proc.returncode:
        raise RuntimeError(f'smoke run failed: {proc.stderr[-2000:]}')
  return times[0], times[1]


def sweep_epoch_seconds(points: int, epochs: int = 3, chunk_size: int = 0) -> dict[str, float]:
  """Steady-state seconds per epoch of each phase of a ``points``-value d_F sweep
  (one seed) on the local-contrastive reference recipe, compilation excluded."""
  from geomrobust.training import sweep as sweep_lib
  cfg = config_lib.load_experiment('local_contrastive_mnist')
  with cfg.unlocked():
    cfg.train.epochs = epochs
    cfg.method.readout_epochs = epochs
  method = build_method(cfg, models.build_model(cfg.model, 10), 10)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(1000, 28, 28, 1), dtype=np.uint8)
  y = (np.arange(1000) % 10).astype(np.int32)
  grid = sweep_lib.Grid('d_f', tuple(float(v) for v in np.linspace(0, 1.2, points)), (0,))
  res = sweep_lib.train_sweep(method, grid, x, y, x[:100], y[:100], cfg, None, parallel.make_mesh(0, training=True),
                              chunk_size=chunk_size, mean_last=0, log=lambda s: None)
  return {k: (res.phase_seconds[k] - res.first_epoch_seconds[k]) / (epochs - 1) for k in res.phase_seconds}


# The reference implementation (neural_manifolds_replicaMFT) on its README
# case on this CPU, and the values its README gives.
MFTMA_REFERENCE_SECONDS = 292.0
MFTMA_REFERENCE_VALUES = {'capacity': 0.040, 'radius': 1.47, 'dimension': 36.17, 'center_correlation': 0.01, 'K': 1}


def mftma_benchmark(repeats=3) -> dict:
  """Times ``mftma.analyze`` on the reference README case; returns times and values."""
  from geomrobust.geometry import mftma
  np.random.seed(0)  # The reference README's data, drawn the same way.
  x = [np.random.randn(5000, 50) for _ in range(100)]
  t0 = time.perf_counter()
  out = mftma.analyze(x, kappa=0.0, n_t=200, data_dimensions=False)
  first = time.perf_counter() - t0
  warm = _best_time(lambda: mftma.analyze(x, kappa=0.0, n_t=200, data_dimensions=False), repeats)
  t0 = time.perf_counter()
  dims = mftma.data_dimension(np.concatenate(x, axis=1))
  return dict(out, first=first, warm=warm, data_dimension_seconds=time.perf_counter() - t0, **dims)


SECTIONS = ('train', 'attack', 'compare', 'cache', 'sweep', 'mftma')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=3, help='timed repetitions (best is reported)')
  parser.add_argument('--n_train', type=int, default=60000, help='examples per benchmark epoch')
  parser.add_argument('--sections', default=','.join(SECTIONS),
                      help=f'comma-separated subset of: {", ".join(SECTIONS)}')
  parser.add_argument('--cpu_devices', type=int, default=0, help='XLA devices on a CPU host (0: automatic; '
                      'see geomrobust/runtime.py)')
  parser.add_argument('--smoke', action='store_true', help='tiny workloads (checks that every section runs; '
                      'the numbers mean nothing)')
  args = parser.parse_args(argv)
  sections = set(args.sections.split(','))
  unknown = sections - set(SECTIONS)
  if unknown:
    parser.error(f'unknown section(s) {", ".join(sorted(unknown))}; choose from {", ".join(SECTIONS)}')
  # No persistent cache here: the benchmark times compilation where it reports it.
  runtime.configure(args.cpu_devices, compilation_cache=False)
  dev = jax.devices()
  print(f'devices: {len(dev)} x {dev[0].platform} ({dev[0].device_kind}); host cores: {runtime.usable_cores()}')

  if 'compare' in sections:
    if args.smoke:
      compare(repeats=1, n=8, batch=8, steps=2, n_train=256)
    else:
      compare(repeats=args.repeats)

  if 'cache' in sections:
    cold, warm = smoke_cold_warm()
    print(f'standard_mnist --smoke in a fresh process: {cold:.1f} s with an empty compilation cache, {warm:.1f} s '
          f'with the cache it filled ({100 * (1 - warm / cold):.0f}% less)')

  if 'train' in sections:
    t, steps = train_epoch_benchmark((100,) * 5, 100, method='isometric', activation='tanh',
                                     n_train=args.n_train, repeats=args.repeats)
    print(f'isometric MLP 784-100x5-10 (tanh, beta>0), batch 100: {steps * 100 / t:,.0f} examples/s '
          f'({t:.2f} s per epoch of {steps} steps, one dispatch per epoch)')

    sizes, batch = (784, 1000, 1000, 10), 128
    t, steps = train_epoch_benchmark(sizes[1:-1], batch, method='standard', activation='relu',
                                     n_train=args.n_train, repeats=args.repeats)
    step_flops = mlp_train_flops(sizes, batch) * steps / t
    print(f'wide MLP 784-1000-1000-10 (relu, CE, Adam), batch 128: {steps * batch / t:,.0f} examples/s '
          f'({t:.2f} s per epoch of {steps} steps)')
    roof = matmul_roofline(sizes, batch, steps, repeats=args.repeats)
    print(f'wide MLP train step: {step_flops / 1e9:.1f} GFLOP/s (matmul FLOPs)')
    print(f'plain jitted matmuls, same GEMM shapes: {roof / 1e9:.1f} GFLOP/s')
    print(f'ratio train step / matmul roofline: {step_flops / roof:.3f} (target >= 0.90)')

  if 'attack' in sections:
    n, queries = (16, 20) if args.smoke else (1000, 500)
    batch = min(n, 500)
    for label, ex_s, work_s in attack_benchmark(n=n, batch=batch, repeats=args.repeats, queries=queries):
      unit = 'queries' if 'Square' in label else 'gradient steps'
      print(f'{label} on the MNIST CNN (conv16-conv32-fc256), batch {batch}: {ex_s:,.1f} examples/s, '
            f'{work_s:,.0f} {unit}/s')

  if 'sweep' in sections:
    # (points, chunk_size): one run; 50 points vmapped at once; 50 points one after another in one program.
    cases = {(1, 1): '1 d_F point', (50, 50): '50 d_F points, all vmapped', (50, 1): '50 d_F points, chunk_size=1'}
    full = {}
    for (points, chunk), label in cases.items():
      phases = sweep_epoch_seconds(points, chunk_size=chunk)
      full[points, chunk] = 100 * sum(phases.values())
      print(f'local-contrastive sweep, {label}: ' + ', '.join(f'{k} {t:.3f} s/epoch' for k, t in phases.items()) +
            f' -> {full[points, chunk]:.0f} s for the 100 + 100-epoch recipe')
    for chunk in (50, 1):
      ratio = full[50, chunk] / full[1, 1]
      print(f'50-point sweep (chunk_size={chunk}) / 1-point run: {ratio:.1f}x the time for 50x the models '
            f'({ratio / 50:.2f} of 50 separate runs)')
    from geomrobust.training import sweep as sweep_lib
    auto = sweep_lib.auto_chunk_size(50, parallel.make_mesh(0, training=True))
    cost = f'{full[50, auto] / full[1, 1] / 50:.2f} of 50 separate runs' if (50, auto) in full else 'not timed here'
    print(f'sweep.chunk_size=0 (automatic) chooses chunk_size={auto} for 50 points on this machine ({cost})')

  if 'mftma' in sections:
    r = mftma_benchmark(repeats=args.repeats)
    ref = MFTMA_REFERENCE_VALUES
    print('MFTMA, reference README case (100 manifolds of randn(5000, 50), kappa 0, n_t 200): ' +
          ', '.join(f'{k} {r[k]:.4g} (reference {ref[k]:g})' for k in ref))
    print(f'MFTMA time: {r["warm"]:.2f} s warm (best of {args.repeats}), first call {r["first"]:.2f} s '
          f'(compilation {r["first"] - r["warm"]:.2f} s); reference {MFTMA_REFERENCE_SECONDS:.0f} s on this CPU -> '
          f'{MFTMA_REFERENCE_SECONDS / r["warm"]:.0f}x warm, {MFTMA_REFERENCE_SECONDS / r["first"]:.0f}x cold '
          f'(target <= 10 s, >= 30x); {r["exact_fallback"]} of 20,000 anchor problems needed the active-set fallback')
    print(f'data dimension of the 5,000 points: participation ratio {r["participation_ratio"]:.0f}, '
          f'90% dimension {r["dimension_90"]} (reference 2499, 2548), {r["data_dimension_seconds"]:.1f} s')


if __name__ == '__main__':
  main()
