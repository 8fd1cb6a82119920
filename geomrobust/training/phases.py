"""The one phase loop every trainer runs: phases, resume, NaN stop, checkpoints, metrics, progress.

``loop.train`` (one model) and ``sweep.train_sweep`` (a grid of models stacked
and vmapped) differ in how their state is built, compiled and reported; the
skeleton around that is here, once (:func:`run_phases`).

Rounds. A method's phases are laid out on one axis of *rounds*, the unit of
checkpoints, metrics rows and resume: an epoch-counted phase has one round per
epoch, a step-counted phase (``Phase.steps``) one round per compiled chunk of
``config.train.steps_per_log`` steps (the last chunk may be shorter). For a
run of epoch phases only, round == epoch, so checkpoint numbers and the
``epoch`` field of ``metrics.jsonl`` rows are what they always were; with step
phases, ``epoch`` in a row is the round index (rows also carry ``step``).

Randomness. Round ``r`` of an epoch phase uses ``fold_in(train_rng, r)``; the
step phase at index ``i`` of ``method.phases()`` uses
``K = fold_in(fold_in(train_rng, STEP_STREAM), i)`` for its whole step stream
(data ``fold_in(K, 0)``, step keys ``fold_in(K, 1)``, augmentation
``fold_in(K, 2)``, each folded with the step index in the phase), so the data
and keys do not depend on the chunk length, and a resumed run reproduces an
uninterrupted one bit for bit.

Checkpoints (orbax). Written every ``train.checkpoint_every`` rounds and at
every phase end; the newest ``keep_last`` survive, and so does every phase
end, so ``restore_params(workdir, phase=NAME)`` works after the run (the
layout is in ``checkpoints/phases.json``). Every checkpoint holds the
optimiser state except the end of a phase that another phase follows (that
phase starts a fresh one, so nothing would read it); the run's last
checkpoint keeps it, so a run given more epochs of its last phase goes on
exactly. (A checkpoint without optimiser state inside a phase, e.g. an old
sweep's end, resumes with a fresh one and a warning.) ``metrics.jsonl`` rows are written *before* the
round's checkpoint, and on resume rows after the restored round are dropped,
so a kill anywhere leaves no duplicate and no gap.

A trainer provides (see :class:`Trainer`): its initial state, the optimiser of
a phase, the checkpoint tree, the compiled round, and what a round reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import pathlib
import sys
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from geomrobust import runio
from geomrobust.methods import base

LAYOUT_FILE = 'phases.json'
# fold_in constants of the per-round test-accuracy keys (see accuracy_key) and
# of the step-phase keys (see step_phase_key); far above any round number.
ACCURACY_STREAM = 0x61636375
STEP_STREAM = 0x73746570


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message says why."""


class NonFiniteLoss(TrainingError):
  """The loss became NaN/inf. ``workdir`` is the run folder; a rerun there
  would repeat it (its config is fixed), so the fix is a new folder with a
  smaller learning rate (launch.py prints that command)."""

  def __init__(self, message: str, workdir: pathlib.Path | None):
    super().__init__(message)
    self.workdir = workdir


# --------------------------------------------------------------------------
# The round axis
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
  """One phase laid out on the round axis.

  Attributes:
    index: position in ``method.phases()``.
    phase: the phase.
    start, end: its rounds are ``start .. end - 1`` (checkpoint ``end`` is its last).
    first_step: optimiser steps taken by all earlier phases.
    steps: optimiser steps in this phase.
    round_steps: steps per round (steps per epoch, or the chunk length).
    by_steps: a step-counted phase (rounds are chunks, not epochs).
  """

  index: int
  phase: base.Phase
  start: int
  end: int
  first_step: int
  steps: int
  round_steps: int
  by_steps: bool

  @property
  def name(self) -> str:
    return self.phase.name

  def offset(self, r: int) -> int:
    """Steps of this phase done before round ``r``."""
    return (r - self.start) * self.round_steps

  def length(self, r: int) -> int:
    """Steps in round ``r``."""
    return min(self.round_steps, self.steps - self.offset(r))


def plan(phases: Sequence[base.Phase], steps_per_epoch: int, steps_per_log: int) -> list[Segment]:
  """The phases with at least one round, laid out on the round axis."""
  out, r, step = [], 0, 0
  for i, p in enumerate(phases):
    if p.steps is not None:
      if p.epochs:
        raise ValueError(f'phase {p.name!r} sets both epochs={p.epochs} and steps={p.steps}; set one '
                         '(epochs=0 with steps)')
      if int(steps_per_log) <= 0:
        raise ValueError(f'train.steps_per_log must be positive, got {steps_per_log}')
      n, per = int(p.steps), int(steps_per_log)
      rounds = math.ceil(n / per)
      seg = Segment(i, p, r, r + rounds, step, n, per, True)
    else:
      rounds, n = int(p.epochs), int(p.epochs) * int(steps_per_epoch)
      seg = Segment(i, p, r, r + rounds, step, n, int(steps_per_epoch), False)
    if rounds > 0:
      out.append(seg)
    r, step = r + rounds, step + n
  return out


def position(seg: Segment, done: int, total: int) -> str:
  """``epoch 3/10 [train]`` or ``step 200/1000 (round 4/12) [clean]`` for a finished round."""
  if seg.by_steps:
    return f'step {seg.offset(done - 1) + seg.length(done - 1)}/{seg.steps} (round {done}/{total}) [{seg.name}]'
  return f'epoch {done}/{total} [{seg.name}]'


def where(seg: Segment, r: int) -> str:
  """Where in the run round ``r`` is, for messages: ``epoch 4`` or ``round 4``."""
  return f'{"round" if seg.by_steps else "epoch"} {r + 1}'


def accuracy_key(seed_key: jax.Array, r: int) -> jax.Array:
  """The key of the per-round test accuracy after round ``r`` (0-based) of a
  run seeded with ``seed_key = jax.random.key(seed)``."""
  return jax.random.fold_in(jax.random.fold_in(seed_key, ACCURACY_STREAM), r + 1)


def step_phase_key(train_rng: jax.Array, seg: Segment) -> jax.Array:
  """The key of a step-counted phase's whole stream (see the module docstring)."""
  return jax.random.fold_in(jax.random.fold_in(train_rng, STEP_STREAM), seg.index)


def fmt_time(s: float) -> str:
  s = int(max(s, 0))
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


# --------------------------------------------------------------------------
# Checkpoints and the phase layout
# --------------------------------------------------------------------------


class _NoReadOnlyNotice(logging.Filter):
  """Orbax warns on every read-only manager (each load_run, resume check);
  reading a run is not worth a warning."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Given directory is read only')


logging.getLogger('absl').addFilter(_NoReadOnlyNotice())


def checkpoint_manager(workdir: pathlib.Path, keep_last: int = 2, keep_rounds: Sequence[int] = (),
                       read_only: bool = False) -> ocp.CheckpointManager:
  """Orbax manager of ``workdir/checkpoints``: the newest ``keep_last`` and
  the rounds ``keep_rounds`` (phase ends) survive."""
  policy = pp.LatestN(int(keep_last))
  if keep_rounds:
    policy = pp.AnyPreservationPolicy([policy, pp.CustomSteps(sorted(int(r) for r in keep_rounds))])
  return ocp.CheckpointManager(
      (pathlib.Path(workdir) / 'checkpoints').absolute(),
      options=ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only,
                                           save_interval_steps=0 if read_only else 1,
                                           enable_async_checkpointing=False, preservation_policy=policy),
      # Named so that item_metadata() can read a checkpoint's tree before restoring it.
      item_handlers=ocp.StandardCheckpointHandler())


def write_layout(workdir: pathlib.Path, segments: Sequence[Segment]) -> None:
  """``checkpoints/phases.json``: which round ends which phase."""
  rows = [dict(name=s.name, start=s.start, end=s.end, unit='steps' if s.by_steps else 'epochs',
               steps=s.steps, first_step=s.first_step) for s in segments]
  runio.write_json(pathlib.Path(workdir) / 'checkpoints' / LAYOUT_FILE, {'phases': rows})


def read_layout(workdir: pathlib.Path) -> list[dict]:
  path = pathlib.Path(workdir) / 'checkpoints' / LAYOUT_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} is missing: the run was written before phase snapshots were kept; '
                            'only its latest checkpoint can be restored')
  return runio.read_json(path)['phases']


def phase_end(workdir: pathlib.Path, phase: str) -> int:
  """The round whose checkpoint holds the parameters at the end of ``phase``."""
  rows = read_layout(workdir)
  for row in rows:
    if row['name'] == phase:
      return int(row['end'])
  raise ValueError(f'no phase {phase!r} in {workdir}; its phases: {", ".join(r["name"] for r in rows)}')


def restore_tree(workdir: pathlib.Path, round_: int | None = None, phase: str | None = None):
  """``(checkpoint tree as numpy, round)`` of the latest, a given round or a phase's end."""
  if phase is not None:
    if round_ is not None:
      raise ValueError('pass a round (epoch) or a phase, not both')
    round_ = phase_end(workdir, phase)
  ckpt = pathlib.Path(workdir) / 'checkpoints'
  if not ckpt.is_dir():
    raise FileNotFoundError(f'no checkpoint in {ckpt}')
  mngr = checkpoint_manager(workdir, read_only=True)
  try:
    step = mngr.latest_step() if round_ is None else round_
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt}')
    if step not in mngr.all_steps():
      raise FileNotFoundError(f'no checkpoint {step} in {ckpt} (it has {mngr.all_steps()})')
    _, why = _digest_damage(workdir, step)
    tree, why = (None, why) if why else _try_restore(mngr, step)
    if why is None:
      return tree, step
    # The weights asked for are gone: say so (another checkpoint's weights
    # would be a different model under this run's name).
    older, _ = newest_intact(mngr, workdir, below=step)
    retrain = (f'the newest intact checkpoint is {older}: to regenerate these weights, move '
               f'{pathlib.Path(workdir) / "results.json"} aside and rerun the training command (it resumes from '
               f'{older}, setting the damaged one aside, and ends with the same weights)' if older is not None
               else f'no checkpoint in {ckpt} is intact: delete {pathlib.Path(workdir)} and train again')
    raise runio.RunFolderError(f'checkpoint {ckpt / str(step)} is damaged ({why}); {retrain}')
  finally:
    mngr.close()


def _try_restore(mngr: ocp.CheckpointManager, step: int):
  """``(tree, None)``, or ``(None, why)`` when checkpoint ``step`` cannot be read."""
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore()), None
  except Exception as e:  # pylint: disable=broad-except
    # A truncated or garbled file surfaces as JSON, TensorStore (ValueError)
    # or plain Exception errors from orbax: any failure to read is damage.
    _quiet_failed_read_callbacks()
    first = (str(e).splitlines() or [''])[0].split(' See full TensorStore details')[0]
    return None, f'{type(e).__name__}: {first[:160]}'


def _quiet_failed_read_callbacks() -> None:
  """After a failed read, TensorStore's pending callbacks reach orbax's closed
  asyncio loop and each prints an unraisable 'Event loop is closed'
  traceback; the failure has been reported already, so those are dropped
  (any other unraisable exception still goes to the previous hook)."""
  previous = sys.unraisablehook
  if getattr(previous, 'geomrobust_quiet', False):
    return

  def hook(info):
    if isinstance(info.exc_value, RuntimeError) and 'Event loop is closed' in str(info.exc_value):
      return
    previous(info)

  hook.geomrobust_quiet = True
  sys.unraisablehook = hook


DIGEST_FILE = 'digests.json'


def _item_files(step_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """The files a restore reads (the saved item; not orbax's own bookkeeping
  beside it, which it may rewrite)."""
  item = step_dir / 'default'
  return {str(p.relative_to(step_dir)): p for p in sorted(item.rglob('*')) if p.is_file()}


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def record_digest(workdir: pathlib.Path, step: int) -> None:
  """Adds checkpoint ``step``'s file digests to ``checkpoints/digests.json``
  (and drops those of deleted checkpoints): damage is then found by hashing,
  without asking the storage library to read a broken file."""
  ckpt = pathlib.Path(workdir) / 'checkpoints'
  path = ckpt / DIGEST_FILE
  digests = runio.read_json(path) if path.exists() else {}
  digests = {k: v for k, v in digests.items() if (ckpt / k).is_dir()}
  digests[str(step)] = {name: [p.stat().st_size, _sha256(p)] for name, p in _item_files(ckpt / str(step)).items()}
  runio.write_json(path, digests)


def _digest_damage(workdir: pathlib.Path, step: int) -> tuple[bool, str | None]:
  """``(has digests, why damaged or None)`` of checkpoint ``step`` by its
  recorded digests (a file missing, resized or changed since written)."""
  ckpt = pathlib.Path(workdir) / 'checkpoints'
  path = ckpt / DIGEST_FILE
  recorded = (runio.read_json(path) if path.exists() else {}).get(str(step))
  if recorded is None:
    return False, None
  files = _item_files(ckpt / str(step))
  for name, (size, digest) in recorded.items():
    p = files.get(name)
    if p is None:
      return True, f'{name} is missing'
    if p.stat().st_size != size:
      return True, f'{name} has {p.stat().st_size} bytes, {size} were written'
    if _sha256(p) != digest:
      return True, f'{name} changed since it was written'
  return True, None


def damage(mngr: ocp.CheckpointManager, workdir: pathlib.Path, step: int) -> str | None:
  """Why checkpoint ``step`` is damaged (by its digests; for a checkpoint
  written without them, the error restoring it), or None when it is intact."""
  has_digests, why = _digest_damage(workdir, step)
  return why if has_digests else _try_restore(mngr, step)[1]


def newest_intact(mngr: ocp.CheckpointManager, workdir: pathlib.Path,
                  below: int | None = None) -> tuple[int | None, list]:
  """``(newest checkpoint that restores, [(step, why)] of the damaged ones
  newer than it])``, among the steps ``< below`` (all when None). A
  checkpoint with recorded digests is checked by them; an older one by
  restoring it."""
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    if below is not None and step >= below:
      continue
    why = damage(mngr, workdir, step)
    if why is None:
      return step, damaged
    damaged.append((step, why))
  return None, damaged


DAMAGED_DIR = 'damaged_checkpoints'


def resume_point(workdir: pathlib.Path, log: Callable[[str], None], tag: str = '') -> int:
  """The round training resumes from: the newest checkpoint that restores.

  Damaged newer ones (a truncated file, a half-copied folder) are moved to
  ``workdir/damaged_checkpoints/`` with a warning naming each, so the run
  goes on from the last good state and ends as an uninterrupted run would.
  When no checkpoint is intact, a TrainingError names the folder to delete.
  """
  ckpt = pathlib.Path(workdir) / 'checkpoints'
  if not ckpt.is_dir():
    return 0
  mngr = checkpoint_manager(workdir, read_only=True)
  try:
    if mngr.latest_step() is None:
      return 0
    good, damaged = newest_intact(mngr, workdir)
  finally:
    mngr.close()
  if good is None:
    step, why = damaged[0]
    raise TrainingError(f'every checkpoint in {ckpt} is damaged (e.g. {step}: {why}); delete that folder to '
                        f'train from scratch: rm -r {ckpt}')
  for step, why in damaged:
    dest = pathlib.Path(workdir) / DAMAGED_DIR / str(step)
    n = 1
    while dest.exists():
      dest, n = dest.with_name(f'{step}.{n}'), n + 1
    dest.parent.mkdir(exist_ok=True)
    (ckpt / str(step)).rename(dest)
    log(f'{tag}warning: checkpoint {ckpt / str(step)} is damaged ({why}); moved it to {dest} and resuming from '
        f'the newest intact one, {good}')
  return good


# --------------------------------------------------------------------------
# What a trainer provides
# --------------------------------------------------------------------------


class Trainer(Protocol):
  """The parts of a trainer that differ (``loop._Single``, ``sweep._Stacked``)."""

  noun: str          # '' or 'sweep ' in messages ("resumed the sweep from ...")
  keep_last: int     # checkpoints kept besides the phase ends

  def optimizer(self, seg: Segment):
    """The phase's optax transformation."""

  def initial(self) -> tuple[Any, Any]:
    """``(params, hparams)`` a fresh run starts from (init or given weights);
    new arrays (the first compiled call donates them)."""

  def hparams(self) -> Any:
    """Fresh traced hyperparameters (a resume at a phase boundary uses them)."""

  def fresh_state(self, params, hparams, tx, step: int):
    """A placed TrainState with fresh optimiser state at global ``step``."""

  def restore_template(self, tx) -> dict:
    """The checkpoint tree (with ``opt_state``) as ShapeDtypeStructs, for a
    resume inside a phase."""

  def from_tree(self, tree: dict):
    """A placed TrainState from a restored in-phase tree (also loads extras)."""

  def load_extras(self, tree: dict) -> None:
    """Trainer-specific parts of a restored tree (e.g. the sweep's accuracies)."""

  def tree(self, state, with_opt: bool) -> dict:
    """The checkpointed tree of a state."""

  def compile(self, seg: Segment, tx, length: int, note_trace: Callable[[], None]) -> Callable:
    """The jitted round ``(state, *args) -> (state, metrics)`` of ``length``
    steps; ``note_trace()`` must be called inside the traced function."""

  def round_args(self, seg: Segment, r: int) -> tuple:
    """The placed arguments after ``state`` of round ``r``'s compiled call."""

  def fetch(self, metrics) -> dict:
    """Device metrics -> host numpy ``{name: [..., steps]}`` (``'loss'`` included)."""

  def first_bad(self, losses: np.ndarray):
    """``None`` or ``(member, step index)`` of the first non-finite loss."""

  nan_remedy: str   # appended to the non-finite-loss advice ('' or e.g. ' or without that value')

  def nan_message(self, value, member, step: int, at: str, seg: Segment) -> str:
    """What went non-finite where (``at``: e.g. ``epoch 4``); the checkpoint
    and the advice are added by :func:`run_phases`."""

  def report(self, seg: Segment, r: int, state, metrics: dict, dt: float, total: int) -> dict:
    """The metrics.jsonl row of finished round ``r`` (measures accuracy if due)."""

  def progress(self, seg: Segment, r: int, record: dict, metrics: dict, dt: float, total: int, eta: float) -> str:
    """The progress line (without the tag)."""

  def final(self, state) -> Any:
    """Parameters to return from a state."""

  def final_from_tree(self, tree: dict) -> Any:
    """Parameters to return from the last checkpoint of a finished run."""


@dataclasses.dataclass
class PhaseRun:
  params: Any
  state: Any                 # None when everything was already trained
  total: int                 # rounds
  resumed_from: int          # rounds already done when this process started
  seconds: float             # wall time of the rounds run in this process
  steps_run: int             # optimiser steps run in this process (per member)
  compilations: dict         # phase -> traces of its compiled round(s)
  phase_seconds: dict        # phase -> wall seconds in this process
  first_round_seconds: dict  # phase -> its first round's wall time (includes compilation)
  phase_ends: dict           # phase -> its last round


def run_phases(trainer: Trainer, segments: Sequence[Segment], *, workdir: pathlib.Path | None,
               checkpoint_every: int, log: Callable[[str], None] = print, tag: str = '',
               after_round: Callable[[int], None] | None = None, transfer_guard: str | None = None) -> PhaseRun:
  """Runs (or resumes) every segment; see the module docstring.

  Args:
    trainer: what differs between trainers.
    segments: from :func:`plan`.
    workdir: ``checkpoints/`` and ``metrics.jsonl`` go here (None: neither).
    checkpoint_every: rounds between checkpoints (phase ends always).
    log, tag: progress lines.
    after_round: called with the number of finished rounds after a round's
      row and checkpoint are written (tests simulate a kill with it).
    transfer_guard: if set (e.g. ``'disallow'``), every compiled round runs
      under ``jax.transfer_guard(transfer_guard)``: a host transfer inside it
      is an error.
  """
  total = segments[-1].end if segments else 0
  phase_ends = {s.name: s.end for s in segments}
  mngr = metrics_log = None
  start = 0
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    start = resume_point(workdir, log, tag)
    mngr = checkpoint_manager(workdir, trainer.keep_last, [s.end for s in segments])
    metrics_log = runio.MetricsWriter(workdir / 'metrics.jsonl')
    if start > total:
      mngr.close()
      raise TrainingError(f'{workdir} has a {trainer.noun}checkpoint at epoch {start} but this config trains '
                          f'{total} epochs; use a fresh --workdir')
    write_layout(workdir, segments)
    metrics_log.truncate_after(start)
  ckpt_dir = workdir / 'checkpoints' if workdir is not None else None
  resumed = f'{tag}resumed {"the " + trainer.noun if trainer.noun else ""}from {ckpt_dir} at epoch {start}/{total}'

  state = None
  run_seconds, run_steps, round_times = 0.0, 0, []
  traces, phase_seconds, first_round = {}, {}, {}
  try:
    for seg in segments:
      if seg.end <= start:
        continue
      tx = trainer.optimizer(seg)
      if state is not None:
        # The next phase: the live parameters, a fresh optimiser state.
        state = trainer.fresh_state(state.params, state.hparams, tx, seg.first_step)
      elif start > seg.start and 'opt_state' in mngr.item_metadata(start):
        # Resuming inside this phase: the checkpoint holds its optimiser state.
        tree = mngr.restore(start, args=ocp.args.StandardRestore(trainer.restore_template(tx)))
        state = trainer.from_tree(tree)
        log(resumed)
      else:
        if start > seg.start:
          # The end of an earlier run's phase, without optimiser state: go on with a fresh one.
          log(f'{tag}warning: checkpoint {start} has no optimiser state; phase {seg.name!r} goes on with a '
              'fresh one')
        if start > 0:
          # Resuming at a phase boundary: parameters (and extras) only.
          tree = mngr.restore(start, args=ocp.args.StandardRestore())
          params, hparams = jax.tree.map(jnp.asarray, tree['params']), trainer.hparams()
          trainer.load_extras(tree)
          log(resumed)
        else:
          params, hparams = trainer.initial()
        state = trainer.fresh_state(params, hparams, tx, seg.first_step + seg.offset(max(start, seg.start)))

      traces[seg.name] = 0

      def note_trace(name=seg.name):
        traces[name] += 1

      programs = {}
      phase_t0 = time.perf_counter()
      for r in range(max(seg.start, start), seg.end):
        n = seg.length(r)
        if n not in programs:
          programs[n] = trainer.compile(seg, tx, n, note_trace)
        args = trainer.round_args(seg, r)
        t0 = time.perf_counter()
        if transfer_guard is not None:
          with jax.transfer_guard(transfer_guard):
            new_state, metrics = programs[n](state, *args)
        else:
          new_state, metrics = programs[n](state, *args)
        metrics = trainer.fetch(metrics)  # The one host transfer of the round.
        dt = time.perf_counter() - t0
        bad = trainer.first_bad(np.asarray(metrics['loss']))
        if bad is not None:
          member, i = bad
          value = np.asarray(metrics['loss'])[tuple(member) + (i,)]
          last = mngr.latest_step() if mngr is not None else None
          what = trainer.nan_message(value, member, seg.first_step + seg.offset(r) + i + 1, where(seg, r), seg)
          kept = (f'last good {trainer.noun}checkpoint: {"round" if seg.by_steps else "epoch"} {last} in '
                  f'{workdir / "checkpoints"}' if last else 'no checkpoint was written before it')
          raise NonFiniteLoss(f'{what}; {kept}. Rerunning here would repeat it (the folder\'s config is fixed): '
                              f'train again in a new --workdir with a smaller --config.train.lr'
                              f'{trainer.nan_remedy}', workdir)
        state = new_state
        done = r + 1
        record = trainer.report(seg, r, state, metrics, dt, total)
        if metrics_log is not None:
          metrics_log.write(record)  # Before the checkpoint: a kill in between re-runs this round.
        if mngr is not None and (done % int(checkpoint_every) == 0 or done == seg.end):
          with_opt = done != seg.end or seg is segments[-1]
          mngr.save(done, args=ocp.args.StandardSave(trainer.tree(state, with_opt=with_opt)))
          mngr.wait_until_finished()
          record_digest(workdir, done)
        if r == max(seg.start, start):
          first_round[seg.name] = dt
        round_times.append(dt)
        run_seconds += dt
        run_steps += n
        # ETA from the median round: the first includes compilation.
        eta = float(np.median(round_times)) * (total - done)
        log(tag + trainer.progress(seg, r, record, metrics, dt, total, eta))
        if after_round is not None:
          after_round(done)
      phase_seconds[seg.name] = time.perf_counter() - phase_t0

    if state is None:
      if total == 0:
        raise ValueError('no phase trains: every phase has 0 epochs / steps')
      # Everything was already trained: the final checkpoint has the parameters.
      tree = mngr.restore(total, args=ocp.args.StandardRestore())
      params = trainer.final_from_tree(tree)
      log(f'{tag}{trainer.noun}training already complete ({total} epochs) in {workdir}')
    else:
      params = trainer.final(state)
  finally:
    if mngr is not None:
      mngr.close()
  return PhaseRun(params=params, state=state, total=total, resumed_from=start, seconds=run_seconds,
                  steps_run=run_steps, compilations=traces, phase_seconds=phase_seconds,
                  first_round_seconds=first_round, phase_ends=phase_ends)


def check_init_params(given, like, what: str = 'init_params'):
  """``given`` cast to the dtypes of ``like`` (arrays or ShapeDtypeStructs of
  the method's own init); a ValueError names the first mismatch."""
  g_paths = jax.tree_util.tree_flatten_with_path(given)[0]
  l_leaves, l_def = jax.tree_util.tree_flatten(like)
  g_def = jax.tree_util.tree_structure(given)
  if g_def != l_def:
    raise ValueError(f'{what} do not match the model: its tree is {g_def}, the model\'s is {l_def}')
  out = []
  for (path, g), l in zip(g_paths, l_leaves):
    if tuple(np.shape(g)) != tuple(l.shape):
      raise ValueError(f'{what}: {"/".join(base.path_names(path))} has shape {tuple(np.shape(g))}, '
                       f'the model wants {tuple(l.shape)}')
    out.append(jnp.asarray(g, l.dtype))
  return jax.tree_util.tree_unflatten(l_def, out)

