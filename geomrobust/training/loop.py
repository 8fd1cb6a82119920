"""The training loop: compiled epochs over a data mesh, checkpoints, resume.

A method supplies phases (loss + which parameters train); this module does the
rest. Each epoch is one jitted call: the batch plan (a permutation of stored
examples, or per-step keys of a generator), the batch gathers or draws on the
device and all optimiser steps run under ``lax.scan``, so there is no host
round trip per step. A step-counted phase (``Phase.steps``) runs the same way
in chunks of ``train.steps_per_log`` steps. The host sees the per-step losses
once per epoch (chunk), which is when a non-finite loss is detected (and
named by step).

The data is a source (``geomrobust.data.source``): stored uint8 images
(scaled by 1/255 in the step), stored float32 inputs of any shape, or a
generator; ``train`` also takes the old ``(images, labels)`` arrays.

Phases, resume, checkpoints (every phase end is kept), metrics and progress
lines are the shared skeleton in ``training.phases`` (also used by the vmapped
sweep). Epoch e's randomness is ``fold_in(train_key, e)``, so a run resumed
from a checkpoint reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from geomrobust import parallel
from geomrobust.data import source as source_lib
from geomrobust.methods import base
from geomrobust.parallel import batching
from geomrobust.training import augment as augment_lib
from geomrobust.training import phases as phases_lib
from geomrobust.training.phases import NonFiniteLoss, TrainingError

__all__ = ['NonFiniteLoss', 'TrainState', 'TrainResult', 'TrainingError', 'compile_epoch', 'make_accuracy_fn',
           'make_chunk', 'make_epoch', 'make_optimizer', 'make_train_step', 'phase_optimizer', 'restore_params', 'train']


# --------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------


def make_optimizer(train: ml_collections.ConfigDict, lr: float, steps_per_epoch: int) -> optax.GradientTransformation:
  """Optimiser from ``config.train`` with a step-decay schedule in epochs."""
  milestones = tuple(train.get('lr_milestones') or ())
  if milestones:
    schedule = optax.piecewise_constant_schedule(
        lr, {int(m) * steps_per_epoch: float(train.lr_decay) for m in milestones})
  else:
    schedule = lr
  name, wd = train.optimizer, float(train.weight_decay)
  if name == 'adam':
    # PyTorch-style Adam weight_decay: an L2 term added to the gradient.
    return optax.chain(optax.add_decayed_weights(wd), optax.adam(schedule)) if wd else optax.adam(schedule)
  if name == 'adamw':
    return optax.adamw(schedule, weight_decay=wd)
  if name == 'sgd':
    sgd = optax.sgd(schedule, momentum=float(train.momentum) or None, nesterov=bool(train.get('nesterov', False)))
    return optax.chain(optax.add_decayed_weights(wd), sgd) if wd else sgd
  raise ValueError(f'unknown train.optimizer {name!r}; available: adam, adamw, sgd')


def phase_optimizer(phase: base.Phase, params, train, steps_per_epoch) -> optax.GradientTransformation:
  """The configured optimiser on trainable params, exact zeros on frozen ones.

  ``params['model_state']`` (BatchNorm statistics) is always frozen: the train
  step writes it from the loss, and e.g. weight decay must not shrink it.
  ``params['constants']`` (e.g. a noise level) is never trained either.
  """
  tx = make_optimizer(train, phase.lr if phase.lr is not None else float(train.lr), steps_per_epoch)
  fixed = (base.MODEL_STATE, base.CONSTANTS)
  has_fixed = isinstance(params, dict) and any(k in params for k in fixed)
  if phase.trainable is None and not has_fixed:
    return tx

  def label(path, _):
    names = base.path_names(path)
    if names[0] in fixed:
      return 'freeze'
    return 'train' if phase.trainable is None or phase.trainable(names) else 'freeze'

  labels = jax.tree_util.tree_map_with_path(label, params)
  if 'train' not in jax.tree.leaves(labels):
    raise ValueError(f'phase {phase.name!r} has no trainable parameters')
  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------
# The compiled epoch
# --------------------------------------------------------------------------


@chex.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: optimiser steps taken in all phases.
  params: Any
  opt_state: Any
  hparams: dict        # traced float hyperparameters (vmappable in sweeps).


def make_train_step(loss_fn: base.LossFn, tx: optax.GradientTransformation):
  """``(state, batch, rng) -> (state, metrics)`` for one optimiser step.

  A model with state (BatchNorm): the loss returns the new running statistics
  as ``metrics['model_state']``; they replace ``params['model_state']`` after
  the optimiser update and are not logged.
  """

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    # The loss also sees the global step (hparams['step'], int32) for schedules.
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng, dict(state.hparams, step=state.step))
    metrics = dict(metrics)
    model_state = metrics.pop(base.MODEL_STATE, None)
    has_state = isinstance(state.params, dict) and base.MODEL_STATE in state.params
    if has_state and model_state is None:
      raise TrainingError(
          'the model has BatchNorm statistics but the loss did not return them: compute the forward pass with '
          "Method.apply_with_state and return its state in the metrics (metrics['model_state'])")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if model_state is not None:
      params = dict(params, **{base.MODEL_STATE: model_state})
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new, dict(metrics, loss=loss)

  return train_step


# Stored arrays (uint8 scaled by 1/255, float used as is): the default source kind.
_STORED = source_lib.StoredSource


def make_epoch(train_step, batch_size: int, steps_per_epoch: int, mesh=None,
               augment: augment_lib.Augment | None = None, source: source_lib.TrainSource | None = None):
  """A pure epoch ``(state, *source.arrays, rng) -> (state, metrics {name: [steps]})``:
  plan, gather (or draw), convert and step, all in one scan.

  With stored data (``source`` None or a StoredSource) that is
  ``(state, images [N, ...], labels [N], rng)``: a permutation of the N
  examples, uint8 scaled by 1/255, float32 used as is. A GeneratorSource
  has no arrays: ``(state, rng)``, step i draws ``sample(fold_in(k, i), B)``.
  ``augment(rng, images float [B, ...]) -> images`` (optional, see
  ``training.augment``) transforms each batch inside the scan.
  Un-jitted so callers can ``vmap`` it (sweeps) before compiling.
  """
  src = source if source is not None else _STORED

  def epoch(state, *args):
    *arrays, rng = args
    perm_rng, step_rng = jax.random.split(rng)
    plan = src.epoch_plan(arrays, perm_rng, batch_size, steps_per_epoch)

    def body(state, inputs):
      row, i = inputs
      x, y = src.batch(arrays, row, batch_size)
      batch = {'image': x, 'label': y}
      if mesh is not None:
        batch = parallel.shard_batch(batch, mesh)
      if augment is not None:
        # fold_in(rng, 2) is independent of split(rng); non-augmented runs never draw it.
        batch['image'] = augment(jax.random.fold_in(jax.random.fold_in(rng, 2), i), batch['image'])
      return train_step(state, batch, jax.random.fold_in(step_rng, i))

    return jax.lax.scan(body, state, (plan, jnp.arange(steps_per_epoch)))

  return epoch


def make_chunk(train_step, batch_size: int, chunk_steps: int, steps_per_epoch: int, mesh=None,
               augment: augment_lib.Augment | None = None, source: source_lib.TrainSource | None = None):
  """A pure chunk of a step-counted phase ``(state, *source.arrays, key, start) ->
  (state, metrics {name: [chunk_steps]})``: steps ``start .. start + chunk_steps - 1``
  of the phase's endless stream.

  ``key`` is the phase's key; ``start`` (int32, traced: one program for
  every chunk) the steps of the phase already done. Step t of the phase uses
  the data of stream step t (``source.stream_plan`` with ``fold_in(key, 0)``),
  the step key ``fold_in(fold_in(key, 1), t)`` and the augmentation key
  ``fold_in(fold_in(key, 2), t)``: the result does not depend on the chunking.
  """
  src = source if source is not None else _STORED

  def chunk(state, *args):
    *arrays, key, start = args
    data_key, step_key, aug_key = (jax.random.fold_in(key, j) for j in range(3))
    plan = src.stream_plan(arrays, data_key, start, chunk_steps, batch_size, steps_per_epoch)

    def body(state, inputs):
      row, i = inputs
      t = start + i
      x, y = src.batch(arrays, row, batch_size)
      batch = {'image': x, 'label': y}
      if mesh is not None:
        batch = parallel.shard_batch(batch, mesh)
      if augment is not None:
        batch['image'] = augment(jax.random.fold_in(aug_key, t), batch['image'])
      return train_step(state, batch, jax.random.fold_in(step_key, t))

    return jax.lax.scan(body, state, (plan, jnp.arange(chunk_steps)))

  return chunk


def counted(fn: Callable, note_trace: Callable[[], None] | None) -> Callable:
  """``fn`` that calls ``note_trace()`` each time it is traced (under jit: once
  per compiled program), so compilations are counted without private JAX API."""
  if note_trace is None:
    return fn

  def traced(*args):
    note_trace()
    return fn(*args)

  return traced


def compile_epoch(epoch_fn, mesh, note_trace: Callable[[], None] | None = None):
  """jit over the mesh: state and data replicated, state donated (any number
  of arguments: an epoch or a chunk, of any source)."""
  rep = parallel.replicated(mesh)
  return jax.jit(counted(epoch_fn, note_trace), in_shardings=rep, out_shardings=(rep, rep), donate_argnums=(0,))


def per_example_logits(method: base.Method, params, x: jax.Array, key: jax.Array, index: jax.Array) -> jax.Array:
  """Logits of a stochastic model, example ``j`` (global index ``index[j]``)
  drawn with ``fold_in(key, index[j])``: independent of batching and devices."""
  keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(index)
  return jax.vmap(lambda xi, ki: method.logits(params, xi[None], ki)[0])(x, keys)


def accuracy_of(method: base.Method, params, inputs, labels, key, batch_size: int, mesh=None) -> jax.Array:
  """Clean accuracy (traceable) of ``method.logits(params, x, key)`` over
  ``inputs`` (uint8 scaled by 1/255, float as is) in chunks of ``batch_size``.
  A stochastic method (``method.stochastic``) is applied per example with
  ``fold_in(key, example index)``; a deterministic one in batches."""
  stochastic = bool(getattr(method, 'stochastic', False))

  def chunk(xs):
    x, y = xs[0], xs[1]
    x = source_lib.to_model_input(x)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh))
    if stochastic:
      logits = per_example_logits(method, params, x, key, xs[2])
    else:
      logits = method.logits(params, x, key)
    return (jnp.argmax(logits, -1) == y).astype(jnp.float32)

  xs = (inputs, labels, jnp.arange(inputs.shape[0])) if stochastic else (inputs, labels)
  return batching.map_batches(chunk, xs, batch_size).mean()


def make_accuracy_fn(method: base.Method, mesh, batch_size: int):
  """Jitted clean accuracy ``(params, inputs, labels, key) -> float`` (see :func:`accuracy_of`)."""
  rep = parallel.replicated(mesh)
  return jax.jit(lambda p, x, y, k: accuracy_of(method, p, x, y, k, batch_size, mesh),
                 in_shardings=rep, out_shardings=rep)


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def _as_tree(state: TrainState, with_opt: bool = True) -> dict:
  tree = {'step': state.step, 'params': state.params}
  if with_opt:
    tree['opt_state'] = state.opt_state
  tree['hparams'] = state.hparams
  return tree


def restore_params(workdir: pathlib.Path, epoch: int | None = None, *, phase: str | None = None):
  """``(params as numpy, round)`` of the latest checkpoint, of round (epoch)
  ``epoch``, or of the end of phase ``phase`` (kept after the run), without a
  template."""
  tree, step = phases_lib.restore_tree(workdir, epoch, phase)
  return tree['params'], step


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
  params: Any
  epochs: int               # rounds (= epochs when no phase counts steps)
  seconds: float            # wall time of the epochs run in this process
  examples_per_second: float
  resumed_from: int         # epochs already done when this process started
  compilations: dict        # phase -> number of compiled epoch programs (1 = no retrace)
  phase_ends: dict = dataclasses.field(default_factory=dict)  # phase -> round of its end checkpoint
  steps: int = 0            # optimiser steps of the whole run


_fmt_time = phases_lib.fmt_time


class _Single:
  """The one-model trainer for ``phases.run_phases``."""

  noun = ''
  keep_last = 2
  nan_remedy = ''

  def __init__(self, method, source, test, config, mesh, workdir, init_params):
    self.method, self.source, self.mesh, self.workdir = method, source, mesh, workdir
    self.tcfg = tcfg = config.train
    self.bs = bs = int(tcfg.batch_size)
    parallel.check_batch_size(bs, mesh)
    self.spe = source.steps_per_epoch(bs)
    if self.spe == 0:
      raise ValueError(f'train.batch_size={bs} is larger than the {source.num_examples} training examples')
    self.augment = augment_lib.get_augment(str(tcfg.get('augment', '') or ''))
    self.rep = rep = parallel.replicated(mesh)
    self.arrays = tuple(jax.device_put(tuple(source.arrays), rep))
    self.test = tuple(jax.device_put(tuple(test), rep)) if test is not None else None
    self.seed_key = jax.random.key(int(config.seed))
    self.init_rng, self.train_rng = jax.random.split(self.seed_key)
    self.init_params = None
    self.eval_every = int(tcfg.get('eval_every', 1) or 0)
    self.acc_fn = (make_accuracy_fn(method, mesh, int(config.eval.batch_size))
                   if self.eval_every and self.test is not None else None)
    # The params' structure (for the optimiser's labels), without computing them.
    self.like = jax.eval_shape(method.init_params, self.init_rng, self._example())
    if init_params is not None:
      self.init_params = phases_lib.check_init_params(init_params, self.like)

  def _example(self):
    return jnp.zeros((1,) + tuple(self.source.example_shape), jnp.float32)

  def initial(self):
    if self.init_params is not None:
      params = jax.tree.map(jnp.copy, self.init_params)  # the caller's arrays are not donated
    else:
      params = self.method.init_params(self.init_rng, self._example())
    return params, self.method.hparams()

  def hparams(self):
    return self.method.hparams()

  def optimizer(self, seg):
    return phase_optimizer(seg.phase, self.like, self.tcfg, self.spe)

  def fresh_state(self, params, hparams, tx, step):
    # A new phase starts with fresh optimiser state (and only its own params trainable).
    return jax.device_put(TrainState(step=jnp.int32(step), params=params, opt_state=tx.init(params),
                                     hparams=hparams), self.rep)

  def restore_template(self, tx):
    params, hparams = self.method.init_params(self.init_rng, self._example()), self.method.hparams()
    template = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), hparams=hparams)
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(template))

  def from_tree(self, tree):
    return jax.device_put(TrainState(**tree), self.rep)

  def load_extras(self, tree):
    del tree

  def tree(self, state, with_opt):
    return _as_tree(state, with_opt)

  def compile(self, seg, tx, length, note_trace):
    step = make_train_step(seg.phase.loss_fn, tx)
    if seg.by_steps:
      fn = make_chunk(step, self.bs, length, self.spe, self.mesh, augment=self.augment, source=self.source)
    else:
      fn = make_epoch(step, self.bs, self.spe, self.mesh, augment=self.augment, source=self.source)
    return compile_epoch(fn, self.mesh, note_trace)

  def round_args(self, seg, r):
    if seg.by_steps:
      key = phases_lib.step_phase_key(self.train_rng, seg)
      return self.arrays + tuple(jax.device_put((key, np.int32(seg.offset(r))), self.rep))
    return self.arrays + (jax.device_put(jax.random.fold_in(self.train_rng, r), self.rep),)

  def fetch(self, metrics):
    return jax.device_get(metrics)

  def first_bad(self, losses):
    bad = np.flatnonzero(~np.isfinite(losses))
    return None if not bad.size else ((), int(bad[0]))

  def nan_message(self, value, member, step, at, seg):
    return f'non-finite loss ({value}) at step {step} ({at}, phase {seg.name!r})'

  def report(self, seg, r, state, metrics, dt, total):
    done, n = r + 1, seg.length(r)
    record = {'epoch': done, 'step': int(state.step), 'phase': seg.name,
              **{k: float(np.mean(v)) for k, v in metrics.items()}}
    if seg.by_steps:
      record.update(phase_step=seg.offset(r) + n, seconds=dt, examples_per_second=n * self.bs / dt)
    else:
      record.update(epoch_seconds=dt, examples_per_second=n * self.bs / dt)
    if self.acc_fn is not None and (done % self.eval_every == 0 or done == total):
      key = jax.device_put(phases_lib.accuracy_key(self.seed_key, r), self.rep)
      record['test_accuracy'] = float(self.acc_fn(state.params, *self.test, key))
    return record

  def progress(self, seg, r, record, metrics, dt, total, eta):
    n = seg.length(r)
    acc_txt = f' test_acc {record["test_accuracy"]:.4f}' if 'test_accuracy' in record else ''
    return (f'{phases_lib.position(seg, r + 1, total)} loss {record["loss"]:.4f}{acc_txt} | '
            f'{n / dt:.1f} steps/s {record["examples_per_second"]:.0f} ex/s | ETA {_fmt_time(eta)}')

  def final(self, state):
    return state.params

  def final_from_tree(self, tree):
    return jax.tree.map(jnp.asarray, tree['params'])


def train(method: base.Method, train_images, train_labels, test_images, test_labels,
          config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh, *,
          log: Callable[[str], None] = print, tag: str = '',
          after_epoch: Callable[[int], None] | None = None, init_params=None,
          transfer_guard: str | None = None) -> TrainResult:
  """Trains ``method`` on device-resident (or generated) data; resumes from ``workdir``.

  Args:
    method: the objective (phases, params init).
    train_images: uint8 ``[N, H, W, C]`` (or float32 ``[N, ...]``) with
      train_labels int32 ``[N]``; or a ``data.source.TrainSource`` with
      ``train_labels=None``.
    test_images, test_labels: for the per-epoch clean accuracy (uint8 scaled
      by 1/255, float as is); ``None`` with a source that has its own test
      split (a generator's fixed test set) uses that, else no accuracy.
    config: the experiment config (``train``, ``seed``, ``eval.batch_size``;
      ``train.steps_per_log`` for step-counted phases, default 100).
    workdir: the run folder (``checkpoints/``, ``metrics.jsonl``).
    mesh: a ``('data',)`` mesh (``parallel.make_mesh``).
    log: where progress lines go.
    tag: prefix for progress lines (member name).
    after_epoch: called with the number of completed rounds (epochs) after
      each round's log row and checkpoint (tests use it to simulate a kill).
    init_params: start the first phase from these parameters instead of the
      init (same tree and shapes as ``method.init_params``); ignored when
      resuming from a checkpoint.
    transfer_guard: run each compiled epoch/chunk under
      ``jax.transfer_guard(transfer_guard)`` (e.g. ``'disallow'``).
  """
  workdir = pathlib.Path(workdir)
  source = source_lib.as_source(train_images, train_labels)
  test = None
  if test_images is not None:
    test = (test_images, test_labels)
  elif source.test is not None:
    test = source.test
  trainer = _Single(method, source, test, config, mesh, workdir, init_params)
  segments = phases_lib.plan(method.phases(), trainer.spe, int(config.train.get('steps_per_log', 100)))
  run = phases_lib.run_phases(trainer, segments, workdir=workdir, checkpoint_every=int(config.train.checkpoint_every),
                              log=log, tag=tag, after_round=after_epoch, transfer_guard=transfer_guard)
  return TrainResult(params=run.params, epochs=run.total, seconds=run.seconds,
                     examples_per_second=run.steps_run * trainer.bs / run.seconds if run.seconds else 0.0,
                     resumed_from=run.resumed_from, compilations=run.compilations, phase_ends=run.phase_ends,
                     steps=sum(s.steps for s in segments))
