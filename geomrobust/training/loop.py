"""The training loop: compiled epochs over a data mesh, checkpoints, resume.

A method supplies phases (loss + which parameters train); this module does the
rest. Each epoch is one jitted call: the permutation, the batch gathers from
the on-device dataset and all optimiser steps run under ``lax.scan``, so there
is no host round trip per step. The host sees the per-step losses once per
epoch, which is when a non-finite loss is detected (and named by step).

Resume: a checkpoint is written every ``train.checkpoint_every`` epochs (and
at every phase end). Epoch e's randomness is ``fold_in(train_key, e)``, so a
run resumed from a checkpoint reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from geomrobust import parallel
from geomrobust.methods import base
from geomrobust.parallel import batching
from geomrobust.training import augment as augment_lib
from geomrobust.runio import MetricsWriter


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message says why."""


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
  """
  tx = make_optimizer(train, phase.lr if phase.lr is not None else float(train.lr), steps_per_epoch)
  has_state = isinstance(params, dict) and base.MODEL_STATE in params
  if phase.trainable is None and not has_state:
    return tx

  def label(path, _):
    names = base.path_names(path)
    if names[0] == base.MODEL_STATE:
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


def make_epoch(train_step, batch_size: int, steps_per_epoch: int, mesh=None,
               augment: augment_lib.Augment | None = None):
  """A pure epoch ``(state, images uint8 [N,...], labels [N], rng) -> (state,
  metrics {name: [steps]})``: shuffle, gather, convert and step, all in one scan.

  ``augment(rng, images float [B, ...]) -> images`` (optional, see
  ``training.augment``) transforms each gathered batch inside the scan.
  Un-jitted so callers can ``vmap`` it (sweeps) before compiling.
  """

  def epoch(state, images, labels, rng):
    perm_rng, step_rng = jax.random.split(rng)
    n = images.shape[0]
    order = jax.random.permutation(perm_rng, n)[:steps_per_epoch * batch_size]
    order = order.reshape(steps_per_epoch, batch_size)

    def body(state, inputs):
      idx, i = inputs
      batch = {'image': images[idx].astype(jnp.float32) / 255.0, 'label': labels[idx]}
      if mesh is not None:
        batch = parallel.shard_batch(batch, mesh)
      if augment is not None:
        # fold_in(rng, 2) is independent of split(rng); non-augmented runs never draw it.
        batch['image'] = augment(jax.random.fold_in(jax.random.fold_in(rng, 2), i), batch['image'])
      return train_step(state, batch, jax.random.fold_in(step_rng, i))

    return jax.lax.scan(body, state, (order, jnp.arange(steps_per_epoch)))

  return epoch


def compile_epoch(epoch_fn, mesh):
  """jit over the mesh: state and data replicated, state donated."""
  rep = parallel.replicated(mesh)
  return jax.jit(epoch_fn, in_shardings=(rep, rep, rep, rep),
                 out_shardings=(rep, rep), donate_argnums=(0,))


def make_accuracy_fn(method: base.Method, mesh, batch_size: int):
  """Jitted clean accuracy ``(params, images uint8, labels) -> float``."""

  def acc(params, images, labels):
    def chunk(xy):
      x, y = xy
      x = x.astype(jnp.float32) / 255.0
      x = jax.lax.with_sharding_constraint(x, parallel.batch_sharded(mesh))
      return (jnp.argmax(method.logits(params, x), -1) == y).astype(jnp.float32)
    return batching.map_batches(chunk, (images, labels), batch_size).mean()

  rep = parallel.replicated(mesh)
  return jax.jit(acc, in_shardings=(rep, rep, rep), out_shardings=rep)


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def _checkpoint_manager(workdir: pathlib.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      (workdir / 'checkpoints').absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False))


def _as_tree(state: TrainState) -> dict:
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state, 'hparams': state.hparams}


def restore_params(workdir: pathlib.Path, epoch: int | None = None):
  """Parameters of the latest (or given) checkpoint, without a template."""
  mngr = _checkpoint_manager(workdir)
  step = mngr.latest_step() if epoch is None else epoch
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir / "checkpoints"}')
  tree = mngr.restore(step, args=ocp.args.StandardRestore())
  return tree['params'], step


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
  params: Any
  epochs: int
  seconds: float            # wall time of the epochs run in this process
  examples_per_second: float
  resumed_from: int         # epochs already done when this process started
  compilations: dict        # phase -> number of compiled epoch programs (1 = no retrace)


def _fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def train(method: base.Method, train_images, train_labels, test_images, test_labels,
          config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh, *,
          log: Callable[[str], None] = print, tag: str = '',
          after_epoch: Callable[[int], None] | None = None) -> TrainResult:
  """Trains ``method`` on device-resident data; resumes from ``workdir``.

  Args:
    method: the objective (phases, params init).
    train_images: uint8 ``[N, H, W, C]``; train_labels: int32 ``[N]``.
    test_images, test_labels: for the per-epoch clean accuracy log line.
    config: the experiment config (``train``, ``seed``, ``eval.batch_size``).
    workdir: the run folder (``checkpoints/``, ``metrics.jsonl``).
    mesh: a ``('data',)`` mesh (``parallel.make_mesh``).
    log: where progress lines go.
    tag: prefix for progress lines (member name).
    after_epoch: called with the number of completed epochs after each epoch's
      checkpoint and log line (tests use it to simulate a kill).
  """
  workdir = pathlib.Path(workdir)
  tcfg = config.train
  bs = int(tcfg.batch_size)
  parallel.check_batch_size(bs, mesh)
  n = int(train_images.shape[0])
  steps_per_epoch = n // bs
  if steps_per_epoch == 0:
    raise ValueError(f'train.batch_size={bs} is larger than the {n} training examples')
  phases = method.phases()
  total = sum(p.epochs for p in phases)
  augment = augment_lib.get_augment(str(tcfg.get('augment', '') or ''))

  rep = parallel.replicated(mesh)
  train_images, train_labels, test_images, test_labels = jax.device_put(
      (train_images, train_labels, test_images, test_labels), rep)
  init_rng, train_rng = jax.random.split(jax.random.key(int(config.seed)))
  params = method.init_params(init_rng, jnp.zeros((1,) + tuple(train_images.shape[1:]), jnp.float32))
  hparams = method.hparams()

  mngr = _checkpoint_manager(workdir)
  metrics_log = MetricsWriter(workdir / 'metrics.jsonl')
  start = mngr.latest_step() or 0
  if start > total:
    raise TrainingError(f'{workdir} has a checkpoint at epoch {start} but this config trains {total} epochs; '
                        'use a fresh --workdir')
  metrics_log.truncate_after(start)
  acc_fn = make_accuracy_fn(method, mesh, int(config.eval.batch_size)) if tcfg.get('eval_every', 1) else None

  state = None
  boundaries = np.cumsum([0] + [p.epochs for p in phases])
  run_seconds, run_examples, epoch_times = 0.0, 0, []
  compilations = {}
  for pi, phase in enumerate(phases):
    p_start, p_end = int(boundaries[pi]), int(boundaries[pi + 1])
    if p_end <= start or phase.epochs == 0:
      continue
    if state is not None:
      # Take the live arrays of the last epoch's output (its inputs were donated).
      params, hparams = state.params, state.hparams
    elif start > p_start:
      # Resuming inside this phase: the checkpoint holds its optimiser state.
      tx = phase_optimizer(phase, params, tcfg, steps_per_epoch)
      template = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), hparams=hparams)
      tree = mngr.restore(start, args=ocp.args.StandardRestore(
          jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(template))))
      log(f'{tag}resumed from {workdir / "checkpoints"} at epoch {start}/{total}')
    elif start > 0:
      # Resuming at a phase boundary: parameters only, fresh optimiser state.
      params = jax.tree.map(jnp.asarray, restore_params(workdir, start)[0])
      log(f'{tag}resumed from {workdir / "checkpoints"} at epoch {start}/{total}')
    tx = phase_optimizer(phase, params, tcfg, steps_per_epoch)
    if state is None and start > p_start:
      state = TrainState(**tree)
    else:
      # A new phase starts with fresh optimiser state (and only its own params trainable).
      state = TrainState(step=jnp.int32(max(start, p_start) * steps_per_epoch), params=params,
                         opt_state=tx.init(params), hparams=hparams)
    state = jax.device_put(state, rep)
    epoch_fn = compile_epoch(make_epoch(make_train_step(phase.loss_fn, tx), bs, steps_per_epoch, mesh,
                                        augment=augment), mesh)

    for e in range(max(p_start, start), p_end):
      t0 = time.perf_counter()
      new_state, metrics = epoch_fn(state, train_images, train_labels, jax.random.fold_in(train_rng, e))
      metrics = jax.device_get(metrics)  # The one host transfer of the epoch.
      dt = time.perf_counter() - t0
      losses = np.asarray(metrics['loss'])
      bad = np.flatnonzero(~np.isfinite(losses))
      if bad.size:
        i = int(bad[0])
        last = mngr.latest_step()
        raise TrainingError(
            f'non-finite loss ({losses[i]}) at step {e * steps_per_epoch + i + 1} (epoch {e + 1}, phase '
            f'{phase.name!r}); last good checkpoint: epoch {last or 0} in {workdir / "checkpoints"}. '
            'Lower --config.train.lr or check the data; rerunning resumes from that checkpoint.')
      state = new_state
      done = e + 1
      if done % int(tcfg.checkpoint_every) == 0 or done == p_end:
        mngr.save(done, args=ocp.args.StandardSave(_as_tree(state)))
        mngr.wait_until_finished()
      record = {'epoch': done, 'step': int(state.step), 'phase': phase.name,
                **{k: float(np.mean(v)) for k, v in metrics.items()},
                'epoch_seconds': dt, 'examples_per_second': steps_per_epoch * bs / dt}
      if acc_fn is not None and (done % int(tcfg.eval_every) == 0 or done == total):
        record['test_accuracy'] = float(acc_fn(state.params, test_images, test_labels))
      metrics_log.write(record)
      epoch_times.append(dt)
      run_seconds += dt
      run_examples += steps_per_epoch * bs
      # ETA from the median epoch: the first includes compilation.
      eta = float(np.median(epoch_times)) * (total - done)
      acc_txt = f' test_acc {record["test_accuracy"]:.4f}' if 'test_accuracy' in record else ''
      log(f'{tag}epoch {done}/{total} [{phase.name}] loss {record["loss"]:.4f}{acc_txt} | '
          f'{steps_per_epoch / dt:.1f} steps/s {record["examples_per_second"]:.0f} ex/s | ETA {_fmt_time(eta)}')
      if after_epoch is not None:
        after_epoch(done)
    params = state.params
    # Compiled variants of this phase's epoch: 1 unless something retraced.
    compilations[phase.name] = epoch_fn._cache_size()

  if state is None:
    # Everything was already trained: load the final parameters.
    restored, _ = restore_params(workdir, total)
    params = jax.tree.map(jnp.asarray, restored)
    log(f'{tag}training already complete ({total} epochs) in {workdir}')
  mngr.close()
  return TrainResult(params=params, epochs=total, seconds=run_seconds,
                     examples_per_second=run_examples / run_seconds if run_seconds else 0.0,
                     resumed_from=start, compilations=compilations)
