"""A hyperparameter sweep as one compiled program: vmap over the config axis.

A sweep trains S seeds x V values of one *traced* hyperparameter of a method
(``method.hparams()``, e.g. the local-contrastive target distance ``d_f``), or
of a model field the model keeps as a constant (``hparam='model.noise_scale'``,
``models.traced_fields``: set per member in ``params['constants']``).
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

Chunks: ``sweep.chunk_size`` = 0 (the default) chooses them
(:func:`auto_chunk_size`); ``sweep.chunk_size`` > 0 splits the values into chunks that a
``lax.map`` inside the same program runs one after another (a chunked vmap),
so peak activation and gradient memory is that of one chunk. On several
devices the value axis is sharded over the mesh's 'data' axis: members are
independent, so each device trains its own members with no communication.
The value axis is padded (repeating the last value) to fit chunks and
devices; padded members are trained and dropped.

Checkpoints (orbax, like ``loop.py``) hold the stacked state; a killed sweep
resumes from the last one and reproduces the uninterrupted numbers. The phase
skeleton (resume, NaN stop, checkpoints with every phase end kept, metrics,
progress) is ``training.phases.run_phases``, shared with ``loop.train``;
step-counted phases and generated data work here as there. The clean test
accuracy is measured (for all members at once) after each of the last
``mean_last`` rounds (epochs) of the final phase: a paper's "mean of the last
K epochs" number comes from the sweep itself.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from geomrobust import models
from geomrobust import parallel
from geomrobust.data import source as source_lib
from geomrobust.methods import base
from geomrobust.training import augment as augment_lib
from geomrobust.training import loop
from geomrobust.training import phases as phases_lib


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
  phase_ends: dict = dataclasses.field(default_factory=dict)  # phase -> round of its end checkpoint


def auto_chunk_size(values: int, mesh) -> int:
  """The chunk a sweep of ``values`` members runs in when ``sweep.chunk_size`` is 0.

  CPU: one member per device at a time. XLA:CPU already spreads one member's
  GEMMs over every core, so vmapping more members adds no parallelism and
  only grows the working set past the caches: measured on a 2-core CPU (the
  local-contrastive recipe, ``geomrobust.bench --sections=sweep``), 50
  members all at once cost 0.82 of the time of 50 separate runs, one at a
  time 0.60 (an earlier run: 1.70 and 1.02).
  Accelerators: all members at once (the most parallel work per step); set
  ``sweep.chunk_size`` to bound memory when they do not fit.
  """
  devices = mesh.devices.size
  if mesh.devices.flat[0].platform == 'cpu':
    return min(values, devices)
  return values


def member_sharding(mesh) -> NamedSharding:
  """Stacked ``[S, V, ...]`` leaves: the value axis split over 'data'."""
  return NamedSharding(mesh, P(None, parallel.DATA_AXIS))


def stack_hparams(method: base.Method, grid: Grid, layout: Layout) -> dict:
  """``method.hparams()`` as ``[S, V_padded]`` float32 arrays, ``grid.hparam`` varying."""
  base_hp = {k: np.float32(v) for k, v in method.hparams().items()}
  if grid.hparam and grid.hparam not in base_hp and not model_field(grid.hparam):
    raise ValueError(f'sweep.hparam={grid.hparam!r} is not a traced hyperparameter of method '
                     f'{method.config.method.name!r}; it has: {", ".join(base_hp) or "none"}')
  s, vp = len(grid.seeds), layout.padded
  out = {k: np.full((s, vp), v, np.float32) for k, v in base_hp.items()}
  if grid.hparam and not model_field(grid.hparam):
    out[grid.hparam] = grid_values(grid, layout)
  return out


def grid_values(grid: Grid, layout: Layout) -> np.ndarray:
  """The swept values as a float32 ``[S, V_padded]`` array (padded with the last value)."""
  vals = [float(v) for v in grid.values] + [float(grid.values[-1])] * (layout.padded - layout.values)
  return np.broadcast_to(np.asarray(vals, np.float32), (len(grid.seeds), layout.padded)).copy()


def model_field(hparam: str) -> str:
  """``'noise_scale'`` for a swept model field ``'model.noise_scale'`` (a constant the
  model keeps in ``params['constants']``, see ``models.traced_fields``), else ''."""
  return hparam[len('model.'):] if hparam.startswith('model.') else ''


def stack_members(fn: Callable, layout: Layout, seed_axes: tuple) -> Callable:
  """One member's ``fn(state, *rest)`` -> the same over stacked ``state [S, Vp, ...]``:
  vmap over seeds (``rest`` mapped with ``seed_axes``), (chunked) vmap over
  values (``rest`` unbatched: every value of a seed sees the same data)."""
  inner = jax.vmap(fn, in_axes=(0,) + (None,) * len(seed_axes))
  w, c, vp = layout.width, layout.n_chunks, layout.padded

  def per_seed(state, *rest):
    if c == 1:
      return inner(state, *rest)
    split = lambda a: jnp.swapaxes(a.reshape((w, c) + a.shape[1:]), 0, 1)   # [c, w, ...]
    merge = lambda a: jnp.swapaxes(a, 0, 1).reshape((vp,) + a.shape[2:])
    out = jax.lax.map(lambda st: inner(st, *rest), jax.tree.map(split, state))
    return jax.tree.map(merge, out)

  return jax.vmap(per_seed, in_axes=(0,) + tuple(seed_axes))


def make_sweep_epoch(epoch_fn: Callable, layout: Layout, n_arrays: int = 2) -> Callable:
  """``epoch_fn`` (one member) -> ``(state [S, Vp, ...], *arrays, rngs [S])
  -> (state, metrics [S, Vp, steps])``: vmap over seeds, (chunked) vmap over values.

  ``n_arrays``: the source's data arrays (2 for stored images and labels, 0
  for a generator). The data-order key is per seed and unbatched over values,
  so within a seed every value trains on the same batches (and shares the
  first matmul).
  """
  return stack_members(epoch_fn, layout, (None,) * n_arrays + (0,))


def make_sweep_accuracy_fn(method: base.Method, batch_size: int, mesh) -> Callable:
  """Jitted ``(params [S, Vp, ...], inputs [N, ...], labels [N], keys [S]) -> accuracy [S, Vp]``
  (``loop.accuracy_of`` per member; seed s's members use ``keys[s]``)."""

  def one(params, inputs, labels, key):
    return loop.accuracy_of(method, params, inputs, labels, key, batch_size)

  fn = jax.vmap(jax.vmap(one, (0, None, None, None)), (0, None, None, 0))
  rep, msh = parallel.replicated(mesh), member_sharding(mesh)
  return jax.jit(fn, in_shardings=(msh, rep, rep, rep), out_shardings=msh)


def _stack_init(method: base.Method, init_rngs, example, layout: Layout):
  """Per-seed init (vmapped over the seed keys), broadcast over the value axis."""
  per_seed = jax.jit(jax.vmap(lambda k: method.init_params(k, example)))(init_rngs)
  return jax.tree.map(lambda a: jnp.broadcast_to(a[:, None], (a.shape[0], layout.padded) + a.shape[1:]),
                      per_seed)


def _tree(state: loop.TrainState, acc: np.ndarray, with_opt: bool) -> dict:
  """The checkpointed tree; the end of a phase that another phase follows
  carries no optimiser state (that phase starts a fresh one)."""
  tree = {'step': state.step, 'params': state.params, 'hparams': state.hparams, 'acc': acc}
  if with_opt:
    tree['opt_state'] = state.opt_state
  return tree


def checkpoint_manager(workdir: pathlib.Path) -> ocp.CheckpointManager:
  """The sweep's manager: the newest checkpoint and every phase end survive
  (phase ends as recorded by the last ``train_sweep`` in ``checkpoints/phases.json``)."""
  try:
    ends = [row['end'] for row in phases_lib.read_layout(workdir)]
  except FileNotFoundError:
    ends = []
  return phases_lib.checkpoint_manager(workdir, keep_last=1, keep_rounds=ends)


def restore_stacked_params(workdir: pathlib.Path, epoch: int | None = None, *, phase: str | None = None):
  """``(params [S, V_padded, ...] as numpy, round)`` of a sweep's last
  checkpoint, of round ``epoch``, or of the end of phase ``phase``."""
  tree, step = phases_lib.restore_tree(workdir, epoch, phase)
  return tree['params'], step


class _Stacked:
  """The stacked-members trainer for ``phases.run_phases``."""

  noun = 'sweep '
  keep_last = 1
  nan_remedy = ' or without that value in --config.sweep.grid'

  def __init__(self, method, grid, source, test, config, mesh, workdir, chunk_size, mean_last, init_params):
    self.method, self.grid, self.source, self.workdir, self.mesh = method, grid, source, workdir, mesh
    self.tcfg = tcfg = config.train
    self.bs = bs = int(tcfg.batch_size)
    self.spe = source.steps_per_epoch(bs)
    if self.spe == 0:
      raise ValueError(f'train.batch_size={bs} is larger than the {source.num_examples} training examples')
    self.augment = augment_lib.get_augment(str(tcfg.get('augment', '') or ''))
    self.s_count, self.v_count = grid.shape
    self.layout = Layout.make(self.v_count, int(chunk_size) or auto_chunk_size(self.v_count, mesh),
                              mesh.devices.size)
    self.rep, self.msh = parallel.replicated(mesh), member_sharding(mesh)
    self.arrays = tuple(jax.device_put(tuple(source.arrays), self.rep))
    self.test = tuple(jax.device_put(tuple(test), self.rep)) if test is not None else None
    seed_keys = [jax.random.key(int(s)) for s in grid.seeds]
    keys = jnp.stack([jnp.stack(jax.random.split(k)) for k in seed_keys])  # [S, 2]
    self.init_rngs, self.train_rngs = keys[:, 0], keys[:, 1]
    self.seed_keys = seed_keys
    self.example = jnp.zeros((1,) + tuple(source.example_shape), jnp.float32)
    self.mean_last = int(mean_last)
    self.eval_batch = int(config.eval.batch_size)
    self._hparams = jax.tree.map(jnp.asarray, stack_hparams(method, grid, self.layout))
    self.members = self.s_count * self.v_count
    # One member's params structure (for the optimiser's labels), without computing them.
    self.like = jax.eval_shape(method.init_params, self.init_rngs[0], self.example)
    self.init_params = (phases_lib.check_init_params(init_params, self.like, 'init_params')
                        if init_params is not None else None)

  def set_segments(self, segments):
    total = segments[-1].end if segments else 0
    first = segments[-1].start if segments else 0
    self.acc_epochs = (list(range(max(first, total - self.mean_last) + 1, total + 1))
                       if self.mean_last else [])
    self.acc = np.zeros((self.s_count, self.layout.padded, len(self.acc_epochs)), np.float32)
    self.acc_fn = (make_sweep_accuracy_fn(self.method, self.eval_batch, self.mesh)
                   if self.acc_epochs and self.test is not None else None)

  def _init(self):
    if self.init_params is not None:
      lead = (self.s_count, self.layout.padded)
      params = jax.tree.map(lambda a: jnp.broadcast_to(a, lead + a.shape), self.init_params)
    else:
      params = _stack_init(self.method, self.init_rngs, self.example, self.layout)
    field = model_field(self.grid.hparam)
    if field:   # a swept model constant: each member gets its own value, as its own init would
      leaf = models.traced_fields(self.method.config.model.name)[field]
      params = self.method.set_constant(params, leaf, jnp.asarray(grid_values(self.grid, self.layout)))
    return params

  def initial(self):
    return self._init(), self.hparams()

  def hparams(self):
    return jax.tree.map(jnp.copy, self._hparams)  # new arrays: the first compiled call donates them

  def optimizer(self, seg):
    return loop.phase_optimizer(seg.phase, self.like, self.tcfg, self.spe)

  def fresh_state(self, params, hparams, tx, step):
    return jax.device_put(
        loop.TrainState(step=jnp.full((self.s_count, self.layout.padded), step, jnp.int32), params=params,
                        opt_state=jax.vmap(jax.vmap(tx.init))(params), hparams=hparams), self.msh)

  def restore_template(self, tx):
    fresh = self.fresh_state(self._init(), self.hparams(), tx, 0)
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, _tree(fresh, self.acc, True))

  def from_tree(self, tree):
    self.load_extras(tree)
    return jax.device_put(loop.TrainState(step=tree['step'], params=tree['params'], opt_state=tree['opt_state'],
                                          hparams=tree['hparams']), self.msh)

  def load_extras(self, tree):
    self.acc = np.asarray(tree['acc'])

  def tree(self, state, with_opt):
    return _tree(state, self.acc, with_opt)

  def compile(self, seg, tx, length, note_trace):
    step = loop.make_train_step(seg.phase.loss_fn, tx)
    n = len(self.arrays)
    if seg.by_steps:
      fn = loop.make_chunk(step, self.bs, length, self.spe, None, augment=self.augment, source=self.source)
      members = stack_members(fn, self.layout, (None,) * n + (0, None))
    else:
      fn = loop.make_epoch(step, self.bs, self.spe, None, augment=self.augment, source=self.source)
      members = make_sweep_epoch(fn, self.layout, n)
    rest = (self.rep,) * (n + (2 if seg.by_steps else 1))
    return jax.jit(loop.counted(members, note_trace), in_shardings=(self.msh,) + rest,
                   out_shardings=(self.msh, self.msh), donate_argnums=(0,))

  def round_args(self, seg, r):
    if seg.by_steps:
      keys = jax.vmap(lambda k: phases_lib.step_phase_key(k, seg))(self.train_rngs)
      return self.arrays + tuple(jax.device_put((keys, np.int32(seg.offset(r))), self.rep))
    rngs = jax.vmap(lambda k: jax.random.fold_in(k, r))(self.train_rngs)
    return self.arrays + (jax.device_put(rngs, self.rep),)

  def fetch(self, metrics):
    return {k: np.asarray(v)[:, :self.v_count] for k, v in jax.device_get(metrics).items()}

  def first_bad(self, losses):
    bad = np.argwhere(~np.isfinite(losses))  # [S, V, steps]
    if not bad.size:
      return None
    si, vi, i = (int(t) for t in bad[0])
    return (si, vi), i

  def nan_message(self, value, member, step, at, seg):
    si, vi = member
    g = self.grid
    what = f'seed {g.seeds[si]}' + (f', {g.hparam}={g.values[vi]}' if g.hparam else '')
    return f'non-finite loss ({value}) for the sweep member {what} at step {step} ({at}, phase {seg.name!r})'

  def report(self, seg, r, state, metrics, dt, total):
    done, n, v = r + 1, seg.length(r), self.v_count
    losses = metrics['loss']
    record = {'epoch': done, 'phase': seg.name, **{k: float(np.mean(x)) for k, x in metrics.items()},
              'loss_members': np.mean(losses, axis=-1).tolist()}
    if seg.by_steps:
      record.update(step=seg.first_step + seg.offset(r) + n, phase_step=seg.offset(r) + n, seconds=dt)
    else:
      record['epoch_seconds'] = dt
    record['member_examples_per_second'] = self.members * n * self.bs / dt
    if done in self.acc_epochs and self.acc_fn is not None:
      slot = self.acc_epochs.index(done)
      keys = jax.device_put(jnp.stack([phases_lib.accuracy_key(k, r) for k in self.seed_keys]), self.rep)
      self.acc[:, :, slot] = np.asarray(self.acc_fn(state.params, *self.test, keys))
      record['test_accuracy'] = float(np.mean(self.acc[:, :v, slot]))
      record['test_accuracy_members'] = self.acc[:, :v, slot].tolist()
    return record

  def progress(self, seg, r, record, metrics, dt, total, eta):
    member_loss = np.mean(metrics['loss'], axis=-1)
    acc_txt = f' test_acc {record["test_accuracy"]:.4f}' if 'test_accuracy' in record else ''
    return (f'{phases_lib.position(seg, r + 1, total)} loss {record["loss"]:.4f} (members {member_loss.min():.4f}'
            f'..{member_loss.max():.4f}){acc_txt} | {self.members} members, '
            f'{record["member_examples_per_second"]:,.0f} member-examples/s | ETA {phases_lib.fmt_time(eta)}')

  def final(self, state):
    return state.params

  def final_from_tree(self, tree):
    self.acc = np.asarray(tree['acc'])
    return jax.tree.map(jnp.asarray, tree['params'])


def train_sweep(method: base.Method, grid: Grid, train_images, train_labels, test_images, test_labels,
                config: ml_collections.ConfigDict, workdir: pathlib.Path | None, mesh, *,
                chunk_size: int = 0, mean_last: int = 10, log: Callable[[str], None] = print, tag: str = '',
                after_epoch: Callable[[int], None] | None = None, init_params=None,
                transfer_guard: str | None = None) -> SweepResult:
  """Trains every member of ``grid`` in one vmapped program per phase.

  Args:
    method: the objective, built from the base config (its non-swept
      hyperparameters and phases are every member's).
    grid: seeds x values of ``grid.hparam``.
    train_images: uint8 ``[N, H, W, C]`` (or float32 ``[N, ...]``) with
      train_labels int32 ``[N]``; or a ``data.source.TrainSource`` with
      ``train_labels=None``.
    test_images, test_labels: the split whose clean accuracy is measured
      after each of the last ``mean_last`` rounds of the final phase (``None``:
      the source's own test split, if any).
    config: the base config (``train``, ``eval.batch_size``).
    workdir: folder for ``checkpoints/`` and ``metrics.jsonl`` (``None``: no
      checkpoints, e.g. benchmarks).
    mesh: a ``('data',)`` mesh; members are sharded over it.
    chunk_size: values per vmapped chunk (0: :func:`auto_chunk_size`; the number of values or more: all at once).
    mean_last: how many final rounds get a test-accuracy measurement.
    log, tag: progress lines.
    after_epoch: called with the number of completed rounds (tests simulate a
      kill with it).
    init_params: one member's parameters (the tree of ``method.init_params``)
      every member starts from instead of its init; ignored on resume.
    transfer_guard: run each compiled round under ``jax.transfer_guard``.
  """
  source = source_lib.as_source(train_images, train_labels)
  test = (test_images, test_labels) if test_images is not None else source.test
  trainer = _Stacked(method, grid, source, test, config, mesh, workdir, chunk_size, mean_last, init_params)
  segments = phases_lib.plan(method.phases(), trainer.spe, int(config.train.get('steps_per_log', 100)))
  trainer.set_segments(segments)
  run = phases_lib.run_phases(trainer, segments, workdir=workdir, checkpoint_every=int(config.train.checkpoint_every),
                              log=log, tag=tag, after_round=after_epoch, transfer_guard=transfer_guard)
  v = trainer.v_count
  return SweepResult(params=jax.tree.map(lambda a: a[:, :v], run.params), accuracy=trainer.acc[:, :v],
                     accuracy_epochs=trainer.acc_epochs, epochs=run.total, seconds=run.seconds,
                     resumed_from=run.resumed_from, compilations=run.compilations, phase_seconds=run.phase_seconds,
                     first_epoch_seconds=run.first_round_seconds, phase_ends=run.phase_ends)
