"""A hyperparameter sweep as one compiled program: vmap over the config axis.

A sweep trains S seeds x V values of one *traced* hyperparameter of a method
(``method.hparams()``, e.g. the local-contrastive target distance ``d_f``).
Every member has the same shapes, so instead of S*V runs the sweep stacks the
members' training states along two leading axes ``[S, V, ...]`` and vmaps the
training loop's own epoch (``loop.make_epoch``, deliberately un-jitted) over
them: one jitted program per phase runs one epoch of *every* member.

Members are the runs one would have started by hand: member (s, v) uses
``config.seed = seeds[s]`` and ``method.<hparam> = values[v]`` and gets exactly
the init, data order and per-step keys that ``loop.train`` gives that config
(``init_rng, train_rng = split(key(seed))``, epoch e uses
``fold_in(train_rng, e)``), so one sweep point equals the same config run
alone (tested). A consequence worth knowing: all values of a seed share their
init and batch order (common random numbers across the grid). The vmaps are
nested (seeds outside, values inside) so that inside a seed the batch is
*unbatched* over values: the first layer's ``x @ W`` of all V members is then
a single ``[B, D] x [D, V * N]`` matmul instead of V small ones.

Memory: ``sweep.chunk_size`` > 0 splits the values into chunks that a
``lax.map`` inside the same program runs one after another (a chunked vmap),
so peak activation and gradient memory is that of one chunk. On several
devices the value axis is sharded over the mesh's 'data' axis: members are
independent, so each device trains its own members with no communication.
The value axis is padded (repeating the last value) to fit chunks and
devices; padded members are trained and dropped.

Checkpoints (orbax, like ``loop.py``) hold the stacked state; a killed sweep
resumes from the last one and reproduces the uninterrupted numbers. The clean
test accuracy is measured (for all members at once) after each of the last
``mean_last`` epochs of the final phase: a paper's "mean of the last K epochs"
number comes from the sweep itself.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from geomrobust import parallel
from geomrobust.methods import base
from geomrobust.parallel import batching
from geomrobust.runio import MetricsWriter
from geomrobust.training import augment as augment_lib
from geomrobust.training import loop


@dataclasses.dataclass(frozen=True)
class Grid:
  """The members of a sweep: ``seeds x values`` of ``method.hparams()[hparam]``.

  ``hparam=''`` sweeps seeds only (``values`` must then be ``(None,)``), e.g.
  a baseline trained over the same seeds as the method.
  """

  hparam: str
  values: tuple
  seeds: tuple[int, ...]

  def __post_init__(self):
    if not self.seeds:
      raise ValueError('a sweep needs at least one seed')
    if not self.values:
      raise ValueError('a sweep needs at least one value')
    if not self.hparam and self.values != (None,):
      raise ValueError('a seeds-only sweep (no hparam) has values=(None,)')

  @property
  def shape(self) -> tuple[int, int]:
    return len(self.seeds), len(self.values)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the V values sit on the padded member axis of length ``padded``.

  Chunk c holds positions ``c, c + n_chunks, c + 2 n_chunks, ...`` (``width``
  of them): reshaping the axis to ``[width, n_chunks]`` and mapping over the
  second keeps each device's contiguous block of positions inside every chunk.
  """

  values: int
  n_chunks: int
  width: int

  @property
  def padded(self) -> int:
    return self.n_chunks * self.width

  @classmethod
  def make(cls, values: int, chunk_size: int, devices: int) -> 'Layout':
    chunk = chunk_size if 0 < chunk_size < values else values
    n_chunks = math.ceil(values / chunk)
    width = math.ceil(math.ceil(values / n_chunks) / devices) * devices
    return cls(values, n_chunks, width)


@dataclasses.dataclass
class SweepResult:
  params: Any               # stacked [S, V, ...] (padding dropped)
  accuracy: np.ndarray      # [S, V, K]: test accuracy after each of the last K epochs
  accuracy_epochs: list     # the K epochs (1-based) those accuracies were taken after
  epochs: int
  seconds: float            # wall time of the epochs run in this process (compilation included)
  resumed_from: int
  compilations: dict        # phase -> compiled epoch programs (1 = no retrace)
  phase_seconds: dict       # phase -> wall seconds in this process
  first_epoch_seconds: dict  # phase -> first epoch's wall time (includes compilation)


def member_sharding(mesh) -> NamedSharding:
  """Stacked ``[S, V, ...]`` leaves: the value axis split over 'data'."""
  return NamedSharding(mesh, P(None, parallel.DATA_AXIS))


def stack_hparams(method: base.Method, grid: Grid, layout: Layout) -> dict:
  """``method.hparams()`` as ``[S, V_padded]`` float32 arrays, ``grid.hparam`` varying."""
  base_hp = {k: np.float32(v) for k, v in method.hparams().items()}
  if grid.hparam and grid.hparam not in base_hp:
    raise ValueError(f'sweep.hparam={grid.hparam!r} is not a traced hyperparameter of method '
                     f'{method.config.method.name!r}; it has: {", ".join(base_hp) or "none"}')
  s, vp = len(grid.seeds), layout.padded
  out = {k: np.full((s, vp), v, np.float32) for k, v in base_hp.items()}
  if grid.hparam:
    vals = [float(v) for v in grid.values] + [float(grid.values[-1])] * (vp - layout.values)
    out[grid.hparam] = np.broadcast_to(np.asarray(vals, np.float32), (s, vp)).copy()
  return out


def make_sweep_epoch(epoch_fn: Callable, layout: Layout) -> Callable:
  """``epoch_fn`` (one member) -> ``(state [S, Vp, ...], images, labels, rngs [S])
  -> (state, metrics [S, Vp, steps])``: vmap over seeds, (chunked) vmap over values.

  The data-order key is per seed and unbatched over values, so within a seed
  every value trains on the same batches (and shares the first matmul).
  """
  inner = jax.vmap(epoch_fn, in_axes=(0, None, None, None))
  w, c, vp = layout.width, layout.n_chunks, layout.padded

  def per_seed(state, images, labels, rng):
    if c == 1:
      return inner(state, images, labels, rng)
    split = lambda a: jnp.swapaxes(a.reshape((w, c) + a.shape[1:]), 0, 1)   # [c, w, ...]
    merge = lambda a: jnp.swapaxes(a, 0, 1).reshape((vp,) + a.shape[2:])
    out = jax.lax.map(lambda st: inner(st, images, labels, rng), jax.tree.map(split, state))
    return jax.tree.map(merge, out)

  return jax.vmap(per_seed, in_axes=(0, None, None, 0))


def make_sweep_accuracy_fn(method: base.Method, batch_size: int, mesh) -> Callable:
  """Jitted ``(params [S, Vp, ...], images uint8 [N, ...], labels [N]) -> accuracy [S, Vp]``."""

  def one(params, images, labels):
    def chunk(xy):
      x, y = xy
      return (jnp.argmax(method.logits(params, x.astype(jnp.float32) / 255.0), -1) == y).astype(jnp.float32)
    return batching.map_batches(chunk, (images, labels), batch_size).mean()

  fn = jax.vmap(jax.vmap(one, (0, None, None)), (0, None, None))
  rep, msh = parallel.replicated(mesh), member_sharding(mesh)
  return jax.jit(fn, in_shardings=(msh, rep, rep), out_shardings=msh)


def _stack_init(method: base.Method, init_rngs, example, layout: Layout):
  """Per-seed init (vmapped over the seed keys), broadcast over the value axis."""
  per_seed = jax.jit(jax.vmap(lambda k: method.init_params(k, example)))(init_rngs)
  return jax.tree.map(lambda a: jnp.broadcast_to(a[:, None], (a.shape[0], layout.padded) + a.shape[1:]),
                      per_seed)


def _tree(state: loop.TrainState, acc: np.ndarray, with_opt: bool) -> dict:
  """The checkpointed tree; phase-end checkpoints carry no optimiser state (a
  new phase starts a fresh one), which halves the size of the final one."""
  tree = {'step': state.step, 'params': state.params, 'hparams': state.hparams, 'acc': acc}
  if with_opt:
    tree['opt_state'] = state.opt_state
  return tree


def checkpoint_manager(workdir: pathlib.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      (pathlib.Path(workdir) / 'checkpoints').absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False))


def restore_stacked_params(workdir: pathlib.Path):
  """``(params [S, V_padded, ...] as numpy, epoch)`` of a sweep's last checkpoint."""
  mngr = checkpoint_manager(workdir)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {pathlib.Path(workdir) / "checkpoints"}')
  tree = mngr.restore(step, args=ocp.args.StandardRestore())
  mngr.close()
  return tree['params'], step


def train_sweep(method: base.Method, grid: Grid, train_images, train_labels, test_images, test_labels,
                config: ml_collections.ConfigDict, workdir: pathlib.Path | None, mesh, *,
                chunk_size: int = 0, mean_last: int = 10, log: Callable[[str], None] = print, tag: str = '',
                after_epoch: Callable[[int], None] | None = None) -> SweepResult:
  """Trains every member of ``grid`` in one vmapped program per phase.

  Args:
    method: the objective, built from the base config (its non-swept
      hyperparameters and phases are every member's).
    grid: seeds x values of ``grid.hparam``.
    train_images: uint8 ``[N, H, W, C]``; train_labels: int32 ``[N]``.
    test_images, test_labels: the split whose clean accuracy is measured
      after each of the last ``mean_last`` epochs of the final phase.
    config: the base config (``train``, ``eval.batch_size``).
    workdir: folder for ``checkpoints/`` and ``metrics.jsonl`` (``None``: no
      checkpoints, e.g. benchmarks).
    mesh: a ``('data',)`` mesh; members are sharded over it.
    chunk_size: values per vmapped chunk (0: all at once).
    mean_last: how many final epochs get a test-accuracy measurement.
    log, tag: progress lines.
    after_epoch: called with the number of completed epochs (tests simulate a
      kill with it).
  """
  tcfg = config.train
  bs = int(tcfg.batch_size)
  n = int(train_images.shape[0])
  steps = n // bs
  if steps == 0:
    raise ValueError(f'train.batch_size={bs} is larger than the {n} training examples')
  phases = [p for p in method.phases()]
  total = sum(p.epochs for p in phases)
  boundaries = np.cumsum([0] + [p.epochs for p in phases])
  last = max(i for i, p in enumerate(phases) if p.epochs > 0)
  acc_epochs = list(range(max(int(boundaries[last]), total - int(mean_last)) + 1, total + 1)) if mean_last else []
  augment = augment_lib.get_augment(str(tcfg.get('augment', '') or ''))
  epoch_kwargs = {'augment': augment} if augment is not None else {}

  s_count, v_count = grid.shape
  layout = Layout.make(v_count, int(chunk_size), mesh.devices.size)
  rep, msh = parallel.replicated(mesh), member_sharding(mesh)
  train_images, train_labels, test_images, test_labels = jax.device_put(
      (train_images, train_labels, test_images, test_labels), rep)

  keys = jnp.stack([jnp.stack(jax.random.split(jax.random.key(int(s)))) for s in grid.seeds])  # [S, 2]
  init_rngs, train_rngs = keys[:, 0], keys[:, 1]
  example = jnp.zeros((1,) + tuple(train_images.shape[1:]), jnp.float32)
  params = _stack_init(method, init_rngs, example, layout)
  hparams = jax.tree.map(jnp.asarray, stack_hparams(method, grid, layout))
  one_params = jax.tree.map(lambda a: a[0, 0], params)  # structure for the optimiser's labels
  acc = np.zeros((s_count, layout.padded, len(acc_epochs)), np.float32)
  acc_fn = make_sweep_accuracy_fn(method, int(config.eval.batch_size), mesh) if acc_epochs else None

  mngr = checkpoint_manager(workdir) if workdir is not None else None
  metrics_log = MetricsWriter(pathlib.Path(workdir) / 'metrics.jsonl') if workdir is not None else None
  start = (mngr.latest_step() or 0) if mngr is not None else 0
  if start > total:
    raise loop.TrainingError(f'{workdir} has a sweep checkpoint at epoch {start} but this config trains {total} '
                             'epochs; use a fresh --workdir')
  if metrics_log is not None:
    metrics_log.truncate_after(start)

  members = s_count * v_count
  state = None
  run_seconds, epoch_times = 0.0, []
  compilations, phase_seconds, first_epoch = {}, {}, {}
  for pi, phase in enumerate(phases):
    p_start, p_end = int(boundaries[pi]), int(boundaries[pi + 1])
    if p_end <= start or phase.epochs == 0:
      continue
    tx = loop.phase_optimizer(phase, one_params, tcfg, steps)
    init_opt = lambda p: jax.vmap(jax.vmap(tx.init))(p)
    if state is not None:
      params, hparams = state.params, state.hparams
      state = loop.TrainState(step=state.step, params=params, opt_state=init_opt(params), hparams=hparams)
    elif start > p_start:
      # Resuming inside this phase: the checkpoint holds its optimiser state.
      fresh = jax.device_put(loop.TrainState(step=jnp.zeros((s_count, layout.padded), jnp.int32), params=params,
                                             opt_state=init_opt(params), hparams=hparams), msh)
      template = jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(fresh, acc, True))
      tree = mngr.restore(start, args=ocp.args.StandardRestore(template))
      state = loop.TrainState(step=tree['step'], params=tree['params'], opt_state=tree['opt_state'],
                              hparams=tree['hparams'])
      acc = np.asarray(tree['acc'])
      log(f'{tag}resumed the sweep from {pathlib.Path(workdir) / "checkpoints"} at epoch {start}/{total}')
    else:
      if start > 0:
        # Resuming at a phase boundary: parameters (and accuracies) only.
        tree = mngr.restore(start, args=ocp.args.StandardRestore())
        params = jax.tree.map(jnp.asarray, tree['params'])
        acc = np.asarray(tree['acc'])
        log(f'{tag}resumed the sweep from {pathlib.Path(workdir) / "checkpoints"} at epoch {start}/{total}')
      step0 = max(start, p_start) * steps
      state = loop.TrainState(step=jnp.full((s_count, layout.padded), step0, jnp.int32), params=params,
                              opt_state=init_opt(params), hparams=hparams)
    state = jax.device_put(state, msh)
    epoch = loop.make_epoch(loop.make_train_step(phase.loss_fn, tx), bs, steps, None, **epoch_kwargs)
    epoch_fn = jax.jit(make_sweep_epoch(epoch, layout), in_shardings=(msh, rep, rep, rep),
                       out_shardings=(msh, msh), donate_argnums=(0,))

    phase_t0 = time.perf_counter()
    for e in range(max(p_start, start), p_end):
      t0 = time.perf_counter()
      rngs = jax.vmap(lambda k: jax.random.fold_in(k, e))(train_rngs)
      new_state, metrics = epoch_fn(state, train_images, train_labels, rngs)
      metrics = {k: np.asarray(v)[:, :v_count] for k, v in jax.device_get(metrics).items()}
      dt = time.perf_counter() - t0
      losses = metrics['loss']  # [S, V, steps]
      bad = np.argwhere(~np.isfinite(losses))
      if bad.size:
        si, vi, i = (int(t) for t in bad[0])
        last_ckpt = mngr.latest_step() if mngr is not None else None
        what = f'seed {grid.seeds[si]}' + (f', {grid.hparam}={grid.values[vi]}' if grid.hparam else '')
        raise loop.TrainingError(
            f'non-finite loss ({losses[si, vi, i]}) for the sweep member {what} at step '
            f'{e * steps + i + 1} (epoch {e + 1}, phase {phase.name!r}); last good sweep checkpoint: epoch '
            f'{last_ckpt or 0}. Drop that value or lower --config.train.lr; rerunning resumes from there.')
      state = new_state
      done = e + 1
      record = {'epoch': done, 'phase': phase.name,
                **{k: float(np.mean(v)) for k, v in metrics.items()},
                'loss_members': np.mean(losses, axis=-1).tolist(),
                'epoch_seconds': dt, 'member_examples_per_second': members * steps * bs / dt}
      if done in acc_epochs:
        slot = acc_epochs.index(done)
        acc[:, :, slot] = np.asarray(acc_fn(state.params, test_images, test_labels))
        record['test_accuracy'] = float(np.mean(acc[:, :v_count, slot]))
        record['test_accuracy_members'] = acc[:, :v_count, slot].tolist()
      if mngr is not None and (done % int(tcfg.checkpoint_every) == 0 or done == p_end):
        mngr.save(done, args=ocp.args.StandardSave(_tree(state, acc, with_opt=done != p_end)))
        mngr.wait_until_finished()
      if metrics_log is not None:
        metrics_log.write(record)
      if e == max(p_start, start):
        first_epoch[phase.name] = dt
      epoch_times.append(dt)
      run_seconds += dt
      eta = float(np.median(epoch_times)) * (total - done)
      member_loss = np.mean(losses, axis=-1)
      acc_txt = f' test_acc {record["test_accuracy"]:.4f}' if 'test_accuracy' in record else ''
      log(f'{tag}epoch {done}/{total} [{phase.name}] loss {record["loss"]:.4f} (members {member_loss.min():.4f}'
          f'..{member_loss.max():.4f}){acc_txt} | {members} members, {record["member_examples_per_second"]:,.0f} '
          f'member-examples/s | ETA {loop._fmt_time(eta)}')
      if after_epoch is not None:
        after_epoch(done)
    phase_seconds[phase.name] = time.perf_counter() - phase_t0
    compilations[phase.name] = epoch_fn._cache_size()

  if state is None:
    # Everything was already trained: the final checkpoint has the parameters.
    tree = mngr.restore(total, args=ocp.args.StandardRestore())
    params, acc = jax.tree.map(jnp.asarray, tree['params']), np.asarray(tree['acc'])
    log(f'{tag}sweep training already complete ({total} epochs) in {workdir}')
  else:
    params = state.params
  if mngr is not None:
    mngr.close()
  return SweepResult(params=jax.tree.map(lambda a: a[:, :v_count], params), accuracy=acc[:, :v_count],
                     accuracy_epochs=acc_epochs, epochs=total, seconds=run_seconds, resumed_from=start,
                     compilations=compilations, phase_seconds=phase_seconds, first_epoch_seconds=first_epoch)
