"""The experiment runner: ``run_experiment`` for every kind of experiment,
``train_and_evaluate`` for one model, ``evaluate_workdir`` for ``--evaluate``,
``analyze_workdir`` for ``--analyze`` (manifold geometry of a finished run).

An experiment expands to groups of members (``members.expand``: a single
model, a family, a sweep grid x seeds); an executor trains each group, one
member at a time (``training.loop``) or stacked and vmapped
(``training.sweep``); then every member goes through the same evaluation,
probes and writing (``pipeline``). Sweeps add their tables and the strong
evaluation of chosen members (``tables``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from geomrobust import comparison
from geomrobust import config as config_lib
from geomrobust import evaluation
from geomrobust import members as members_lib
from geomrobust import parallel
from geomrobust import pipeline
from geomrobust import probes as probes_lib
from geomrobust import runio
from geomrobust import tables
from geomrobust.probes import manifold_geometry
from geomrobust.pipeline import (Data, Run, check_workdir_config, data_key, evaluate_model, load_run,  # noqa: F401
                                 member_names, prepare_data, validate, write_results, _build)
from geomrobust.runio import lock
from geomrobust.runio import report
from geomrobust.runio import sweep_report
from geomrobust.training import loop
from geomrobust.training import sweep as sweep_lib

STACKED_DIR = 'stacked'


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       data_dir: str | None = None, *, mesh=None, eval_mesh=None,
                       log: Callable[[str], None] = print,
                       tag: str = '', after_epoch=None, data: Data | None = None,
                       evaluator: evaluation.Evaluator | None = None, probes: list | None = None) -> dict:
  """Trains one model (resuming from ``workdir``), evaluates it and writes
  ``results.json``, ``report.md`` and plots there. Returns the results dict.
  Holds ``workdir``'s writer lock throughout (``runio.lock``)."""
  workdir = pathlib.Path(workdir)
  with lock.writer(workdir, log=log):
    check_workdir_config(workdir, config)
    mesh = mesh or parallel.make_mesh(int(config.parallel.num_devices), training=True)
    eval_mesh = eval_mesh or parallel.make_mesh(int(config.parallel.num_devices))
    data = data or prepare_data(config, data_dir)
    method, trained = _train_alone(config, workdir, data, mesh, log=log, tag=tag, after_epoch=after_epoch)
    evaluator = evaluator or evaluation.Evaluator()
    probes = probes_lib.build_probes(config.get('probes')) if probes is None else probes
    results = evaluate_model(method, trained.params, data, config, eval_mesh, evaluator=evaluator, probes=probes,
                             log=log, tag=tag)
    results['timing'].update(train_seconds=trained.seconds,
                             train_examples_per_second=trained.examples_per_second,
                             resumed_from_epoch=trained.resumed_from)
    write_results(workdir, config, results, probes)
  return results


def _train_alone(config, workdir: pathlib.Path, data: Data, mesh, *, log, tag, after_epoch=None):
  """The one-by-one executor for one member: ``(method, loop.TrainResult)``
  (the caller has checked ``workdir``'s config)."""
  workdir.mkdir(parents=True, exist_ok=True)
  runio.atomic_write_text(workdir / 'config.json', config_lib.to_json(config) + '\n')
  method = _build(config, data.num_classes)
  amount = 'fresh batches' if data.train_labels is None else f'{len(data.train_labels)} train examples'
  log(f'{tag}{config.get("experiment", "")} method={config.method.name} dataset={config.dataset} '
      f'({amount} from {data.source}) on {mesh.devices.size} '
      f'{jax.devices()[0].platform} device(s), workdir {workdir}')
  init = str(config.get('init_from', '') or '')
  trained = loop.train(method, data.train_images, data.train_labels, data.test_images, data.test_labels,
                       config, workdir, mesh, log=log, tag=tag, after_epoch=after_epoch,
                       init_params=pipeline.init_params_from(init) if init else None)
  return method, trained


class _Context:
  """What the members of one experiment share: the mesh, one data load per
  distinct data config, one evaluator, one set of probes per probes config."""

  def __init__(self, config, data_dir):
    self.data_dir = data_dir
    self.mesh = parallel.make_mesh(int(config.parallel.num_devices), training=True)
    self.eval_mesh = parallel.make_mesh(int(config.parallel.num_devices))
    self.evaluator = evaluation.Evaluator()
    self._data, self._probes = {}, {}

  def data(self, config) -> Data:
    key = data_key(config)
    if key not in self._data:
      self._data[key] = prepare_data(config, self.data_dir)
    return self._data[key]

  def probes(self, config) -> list:
    key = json.dumps(config.get('probes', {}).to_dict() if config.get('probes') else {}, sort_keys=True, default=str)
    if key not in self._probes:
      self._probes[key] = probes_lib.build_probes(config.get('probes'))
    return self._probes[key]


def run_experiment(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, data_dir: str | None = None,
                   *, log: Callable[[str], None] = print, reevaluate: bool = False,
                   reuse: tuple[str | pathlib.Path, ...] = ()) -> dict:
  """Trains and evaluates every member of ``config`` into ``workdir``.

  Rerunning continues where a killed run stopped: finished members (their
  ``results.json`` exists, same config) are not retrained, and training
  resumes from checkpoints; a finished run is "already done" without writing
  anything. ``reevaluate``: evaluate every member again (sweeps;
  ``evaluate_workdir`` handles the rest). ``reuse``: finished run folders
  (or folders holding them) whose members a family adopts instead of
  training them again when their training configs are identical
  (``pipeline.find_reusable``). Everything that can be checked
  (configs, the folder's lock and writability, the data) is checked before
  training starts.
  """
  workdir = pathlib.Path(workdir)
  parallel.maybe_initialize_distributed(bool(config.parallel.distributed))
  groups = members_lib.expand(config)
  members_lib.validate(config, groups)
  if 'comparison' in config:
    comparison.validate(config)
  reuse = tuple(pathlib.Path(d) for d in reuse)
  for d in reuse:
    if not d.is_dir():
      raise FileNotFoundError(f'--reuse={d}: no such folder; give finished run folders, e.g. --reuse=runs/madry_mnist')
  if not reevaluate:
    done = _finished(config, groups, workdir)
    if done is not None:
      log(f'already done: {workdir / "results.json"} (use --evaluate={workdir} to re-evaluate)')
      if 'comparison' in config and _comparison_changed(workdir, config):
        # Its claims or columns changed: the table and report are rebuilt from the members' results.
        with lock.writer(workdir, log=log):
          runio.atomic_write_text(workdir / 'config.json', config_lib.to_json(config) + '\n')
          done = _rewrite_family(workdir, done, log=log)
      return done
  with lock.writer(workdir, log=log):
    if groups[0].role == 'single':
      return train_and_evaluate(groups[0].members[0].config, workdir, data_dir, log=log)
    if config.get('sweep'):
      check_workdir_config(workdir, config)
    ctx = _Context(config, data_dir)
    for m in (m for g in groups for m in g.members):
      check_workdir_config(workdir / m.name, m.config)
      ctx.data(m.config)  # Every dataset loads (or fails) before anything is written.
    sub = members_lib.member_sweep(config)
    if sub is not None:
      check_workdir_config(workdir / members_lib.sweep_name(config), sub)
      ctx.data(sub)
    runio.atomic_write_text(workdir / 'config.json', config_lib.to_json(config) + '\n')
    t_start = time.perf_counter()
    if groups[0].role in ('sweep', 'baseline'):
      return _run_sweep(config, workdir, groups, ctx, log=log, reevaluate=reevaluate, t_start=t_start)
    return _run_family(config, workdir, groups[0].members, ctx, log=log, reevaluate=reevaluate, reuse=reuse)


def _finished(config, groups, workdir: pathlib.Path) -> dict | None:
  """The top results of a finished run of this config in ``workdir``, or None
  (read only: a finished run in a read-only folder reruns as "already done")."""
  top_path = workdir / 'results.json'
  if not top_path.exists():
    return None
  is_sweep = groups[0].role in ('sweep', 'baseline')
  if groups[0].role == 'single' or is_sweep:
    check_workdir_config(workdir, config if is_sweep else groups[0].members[0].config)
    return runio.read_json(top_path)
  top = runio.read_json(top_path)
  members = groups[0].members
  if [r.get('name') for r in top.get('runs', [])] != [m.name for m in members]:
    return None  # Another selection of members (--config.only) was run here.
  sub = members_lib.member_sweep(config)
  if sub is not None and members_lib.sweep_name(config) not in top:
    return None
  for m in members:
    if not (workdir / m.name / 'results.json').exists():
      return None
    check_workdir_config(workdir / m.name, m.config)
  return top


def _run_family(config, workdir: pathlib.Path, ms, ctx: _Context, *, log, reevaluate: bool = False,
                reuse: tuple[pathlib.Path, ...] = ()) -> dict:
  """Each member trained and evaluated in its own folder, then the summary
  (and a member sweep, ``members.member_sweep``, run into its own folder).
  In a comparison (``config.comparison``) a member that fails is listed
  with its error line and the others go on; a rerun retries it."""
  runs, member_results, failed = [], {}, []
  for i, m in enumerate(ms):
    sub = workdir / m.name
    tag = f'[{m.name} {i + 1}/{len(ms)}] '
    done = sub / 'results.json'
    if not done.exists() and reuse:
      source = pipeline.find_reusable(reuse, m.config)
      if source is not None:
        log(f'{tag}reusing {source} (the same training config): not retrained')
        pipeline.adopt_run(source, sub, m.config)
    if done.exists():
      log(f'{tag}already done: {done} (use --evaluate={workdir} to re-evaluate)')
      res = runio.read_json(done)
    else:
      try:
        res = train_and_evaluate(m.config, sub, ctx.data_dir, mesh=ctx.mesh, eval_mesh=ctx.eval_mesh, log=log,
                                 tag=tag, data=ctx.data(m.config), evaluator=ctx.evaluator,
                                 probes=ctx.probes(m.config))
      except Exception as e:  # noqa: BLE001 -- a comparison reports it and goes on
        if 'comparison' not in config:
          raise
        line = (str(e).splitlines() or [''])[0] or type(e).__name__
        log(f'{tag}FAILED: {type(e).__name__}: {line} (the other members go on; rerunning retries it)')
        failed.append(dict(name=m.name, error=f'{type(e).__name__}: {line}'))
        continue
    member_results[m.name] = res
    runs.append(dict(name=m.name, overrides=m.overrides, results=f'{m.name}/results.json'))
  top = dict(experiment=config.get('experiment', ''), method=config.method.name, dataset=config.dataset,
             seed=int(config.seed), runs=runs, smoke=bool(config.get('smoke_run', False)))
  _family_tables(workdir, config, top, member_results, {m.name: m.config for m in ms}, failed)
  sub = members_lib.member_sweep(config)
  if sub is not None:
    # The member sweep: a plain sweep experiment in its own folder, its table in ours.
    name = members_lib.sweep_name(config)
    log(f'[{name}] sweep of member {config.sweep.member!r} over {sub.sweep.hparam} into {workdir / name}')
    sweep_top = run_experiment(sub, workdir / name, ctx.data_dir, log=lambda line: log(f'[{name}] {line}'),
                               reevaluate=reevaluate)
    top[name] = tables.member_sweep_rows(sweep_top)
    top['member_sweep'] = dict(name=name, member=str(config.sweep.member), hparam=str(sub.sweep.hparam),
                               eps=float(sub.sweep.pgd_eps), profile=str(sub.sweep.screen_profile),
                               results=f'{name}/results.json')
  top_path = workdir / 'results.json'
  runio.write_json(top_path, top)
  _write_reports(workdir, config, top, member_results)
  log(f'wrote {top_path} and {workdir / "report.md"}')
  if failed:
    log(f'{len(failed)} member(s) FAILED: ' + '; '.join(f'{f["name"]}: {f["error"]}' for f in failed))
  return top


def _family_tables(workdir: pathlib.Path, config, top: dict, member_results: dict[str, dict], configs: dict,
                   failed: list[dict]) -> None:
  """Into ``top``: the members' summary ``table`` and the probes' family
  tables; a comparison's contract ``table`` (the summary moves to
  ``members_table``), ranking, claims and ``failed``."""
  top.update(probes_lib.family_results(member_results))
  table = report.summary_table(member_results)
  if 'comparison' in config:
    top['members_table'] = table
    top.update(comparison.build(config, workdir, member_results, configs, failed))
  else:
    top['table'] = table


def _write_reports(workdir: pathlib.Path, config, top: dict, member_results: dict[str, dict]) -> None:
  """The family's report.md (a comparison's opens with its ranking, claims, table and figures)."""
  if 'comparison' not in config:
    report.write_experiment_report(workdir, config, top, member_results)
    return
  report.write_experiment_report(workdir, config, dict(top, table=top['members_table']), member_results)
  comparison.write_report(workdir, config, top, member_results)


# --------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------


class _Trained:
  """A trained sweep group: each member's params and test accuracies over the
  last epochs, whichever executor trained it."""

  def __init__(self, group, method, stacked=None, alone=None):
    self.group, self.method, self.stacked, self.alone = group, method, stacked, alone or {}

  def params(self, m):
    if self.stacked is not None:
      return jax.tree.map(lambda a: a[m.seed_index, m.value_index], self.stacked.params)
    return self.alone[m.name][0]

  def accuracies(self, m):
    if self.stacked is not None:
      return self.stacked.accuracy[m.seed_index, m.value_index]
    return self.alone[m.name][1]


def _train_group(g, config, workdir, ctx, *, log, timing) -> _Trained:
  sw = config.sweep
  data = ctx.data(g.config)
  method = _build(g.config, data.num_classes)
  if g.stacked:
    trained = sweep_lib.train_sweep(
        method, g.grid, data.train_images, data.train_labels, data.test_images, data.test_labels, g.config,
        workdir / STACKED_DIR / g.name, ctx.mesh, chunk_size=int(sw.chunk_size),
        mean_last=int(sw.mean_last_epochs), log=log, tag=f'[{g.name} {"x".join(map(str, g.grid.shape))}] ',
        init_params=pipeline.init_params_from(g.config.init_from) if g.config.get('init_from') else None)
    timing[f'{g.name}_train_seconds'] = trained.seconds
    timing[f'{g.name}_first_epoch_seconds'] = trained.first_epoch_seconds
    timing[f'{g.name}_compilations'] = trained.compilations
    timing[f'{g.name}_members'] = len(g.members)
    return _Trained(g, method, stacked=trained)
  alone, seconds = {}, 0.0
  for i, m in enumerate(g.members):
    _, result = _train_alone(m.config, workdir / m.name, data, ctx.mesh, log=log,
                             tag=f'[{m.name} {i + 1}/{len(g.members)}] ')
    alone[m.name] = (result.params, _last_accuracies(workdir / m.name, int(sw.mean_last_epochs)))
    seconds += result.seconds
  timing[f'{g.name}_train_seconds'] = seconds
  timing[f'{g.name}_members'] = len(g.members)
  return _Trained(g, method, alone=alone)


def _last_accuracies(run_dir: pathlib.Path, k: int) -> list[float]:
  """Test accuracy logged after each of the last ``k`` epochs of the final phase."""
  rows = [r for r in runio.read_metrics(run_dir / 'metrics.jsonl') if 'test_accuracy' in r]
  if not rows:
    return []
  last_phase = rows[-1]['phase']
  return [r['test_accuracy'] for r in rows if r['phase'] == last_phase][-k:] if k else []


def _member_metrics(group_dir: pathlib.Path, member) -> list[dict]:
  """A stacked member's own rows of its group's metrics.jsonl."""
  out = []
  for rec in runio.read_metrics(group_dir / 'metrics.jsonl'):
    row = {'epoch': rec['epoch'], 'phase': rec['phase'],
           'loss': rec['loss_members'][member.seed_index][member.value_index]}
    if 'test_accuracy_members' in rec:
      row['test_accuracy'] = rec['test_accuracy_members'][member.seed_index][member.value_index]
    out.append(row)
  return out


def _evaluate_sweep_member(m, trained: _Trained, config, workdir, ctx, *, log, tag) -> dict:
  """The screening evaluation and the probes of one member, plus its mean test
  accuracy over the last epochs (the sweep's clean accuracy); written to its folder."""
  sw = config.sweep
  data = ctx.data(m.config)
  probes = ctx.probes(m.config)
  params = trained.params(m)
  n_screen = min(int(sw.screen_examples), len(data.eval_labels))
  screen = dataclasses.replace(data, eval_images=data.eval_images[:n_screen], eval_labels=data.eval_labels[:n_screen])
  res = evaluate_model(trained.method, params, screen, m.config, ctx.eval_mesh, evaluator=ctx.evaluator, probes=[],
                       eval_config=members_lib.screen_eval_config(config), log=log, tag=tag)
  # Probes see the whole evaluation set, as in a single run.
  probed = pipeline.evaluate_probes(trained.method, params, data, m.config, probes, config.eval)
  acc = np.asarray(trained.accuracies(m), np.float64)
  res.update(geometry=probed['geometry'], probes=probed['probes'], summary=probed['summary'])
  res['timing']['probe_seconds'] = probed['seconds']
  res['training'] = dict(clean_accuracy_last_epochs=float(acc.mean()) if acc.size else float('nan'),
                         test_accuracies=acc.tolist(), test_examples=int(len(data.test_labels)))
  log(f'{tag}clean (mean of last {acc.size} epochs, {len(data.test_labels)} test images) '
      f'{res["training"]["clean_accuracy_last_epochs"]:.4f}' +
      ''.join(f'; {k} {v:.3f}' for k, v in probed['summary'].items()))
  res.update(eval_profile=str(sw.screen_profile),
             sweep=dict(group=m.group.name, role=m.group.role, hparam=m.group.grid.hparam, value=m.value,
                        seed=m.seed))
  sub = workdir / m.name
  sub.mkdir(parents=True, exist_ok=True)
  if trained.stacked is not None:
    # The manifest: load_run finds this member's params as a slice of the group's checkpoint.
    runio.atomic_write_text(sub / 'config.json', config_lib.to_json(m.config) + '\n')
    runio.write_json(sub / pipeline.MEMBER_FILE, dict(group_dir=f'{STACKED_DIR}/{m.group.name}',
                                                      seed_index=m.seed_index, value_index=m.value_index))
    metrics = _member_metrics(workdir / STACKED_DIR / m.group.name, m)
    runio.atomic_write_text(sub / 'metrics.jsonl', ''.join(json.dumps(r) + '\n' for r in metrics))
  write_results(sub, m.config, res, probes)
  return runio.read_json(sub / 'results.json')


def _strong_evaluate(m, trained: _Trained, results: dict, config, workdir, ctx, *, log, tag) -> dict:
  """Re-evaluates a member with ``config.eval`` (strong profile, sanity checks);
  the screening numbers move to ``results['screen']``."""
  ev = evaluate_model(trained.method, trained.params(m), ctx.data(m.config), m.config, ctx.eval_mesh,
                      evaluator=ctx.evaluator, probes=[], eval_config=config.eval, log=log, tag=tag)
  screen = {k: results[k] for k in ('clean_accuracy', 'robustness', 'eval_examples', 'eval_profile', 'sanity')}
  results = dict(results, clean_accuracy=ev['clean_accuracy'], robustness=ev['robustness'],
                 eval_examples=ev['eval_examples'], eval_profile=str(config.eval.get('profile', '') or 'custom'),
                 sanity=ev['sanity'], convergence=ev.get('convergence', []), masks=ev['masks'], screen=screen)
  results['timing'] = dict(results['timing'], strong_eval_seconds=ev['timing']['eval_seconds'])
  write_results(workdir / m.name, m.config, results, ctx.probes(m.config))
  return runio.read_json(workdir / m.name / 'results.json')


def _run_sweep(config, workdir: pathlib.Path, groups, ctx: _Context, *, log, reevaluate: bool, t_start) -> dict:
  """Trains every group, evaluates every member, writes the tables and the report."""
  sw = config.sweep
  hparam = str(sw.hparam)
  data = ctx.data(config)
  log(f'sweep {config.get("experiment", "")}: method={config.method.name}, {hparam} x seeds = '
      f'{len(sw.grid)} x {int(sw.seeds)}' + (f', baseline {groups[1].name}' if len(groups) > 1 else '') +
      f' ({"stacked" if groups[0].stacked else "one by one"}); '
      f'{"generated" if data.train_labels is None else len(data.train_labels)} train / '
      f'{len(data.test_labels)} test examples from {data.source}; {ctx.mesh.devices.size} '
      f'{jax.devices()[0].platform} device(s); workdir {workdir}')
  timing, trained_of, member_results, rows = {}, {}, {}, {}
  for g in groups:
    trained = _train_group(g, config, workdir, ctx, log=log, timing=timing)
    t0 = time.perf_counter()
    for i, m in enumerate(g.members):
      trained_of[m.name] = trained
      done = workdir / m.name / 'results.json'
      if done.exists() and not reevaluate:
        res = runio.read_json(done)
      else:
        res = _evaluate_sweep_member(m, trained, config, workdir, ctx, log=log,
                                     tag=f'[{m.name} {i + 1}/{len(g.members)}] ')
      member_results[m.name] = res
      rows[m.name] = tables.sweep_row(m, res, config)
    timing[f'{g.name}_eval_seconds'] = time.perf_counter() - t0

  all_members = [m for g in groups for m in g.members]
  sweep_rows = [rows[m.name] for m in all_members if m.group.role == 'sweep']
  base_rows = [rows[m.name] for m in all_members if m.group.role == 'baseline']
  summary = tables.summarize(sweep_rows, hparam)

  # The strong evaluation: the baseline and the best values, the number that counts.
  t0 = time.perf_counter()
  comparison = []
  for role, m in tables.strong_members(config, summary, all_members):
    res = member_results[m.name]
    if 'screen' not in res or reevaluate:
      res = _strong_evaluate(m, trained_of[m.name], res, config, workdir, ctx, log=log,
                             tag=f'[strong {role}: {m.name}] ')
      member_results[m.name] = res
    comparison.append(tables.strong_row(role, m, res, rows[m.name], hparam))
  timing['strong_eval_seconds'] = time.perf_counter() - t0
  timing['total_seconds'] = time.perf_counter() - t_start

  runs = [dict(name=m.name, overrides=m.overrides, results=f'{m.name}/results.json') for m in all_members]
  top = dict(experiment=config.get('experiment', ''), method=config.method.name, dataset=config.dataset,
             seed=int(config.seed), setting=str(config.get('setting', '') or ''), hparam=hparam, runs=runs,
             columns=tables.row_keys(sweep_rows + base_rows, hparam), sweep=sweep_rows, sweep_summary=summary,
             baseline=tables.baseline_entry(base_rows, hparam) if base_rows else None, baseline_runs=base_rows,
             pgd_comparison=comparison, timing=timing, smoke=bool(config.get('smoke_run', False)))
  runio.write_json(workdir / 'results.json', top)
  sweep_report.write_sweep_report(workdir, config, top, member_results)
  log(f'wrote {workdir / "results.json"} and {workdir / "report.md"} ({timing["total_seconds"]:.0f} s)')
  return top


# --------------------------------------------------------------------------
# --evaluate
# --------------------------------------------------------------------------


def evaluate_workdir(workdir: str | pathlib.Path, eval_overrides: list[tuple[str, str]], data_dir: str | None,
                     *, log=print) -> dict:
  """Re-evaluates a trained run (every member) with the current eval config.

  Holds the folder's writer lock, and reads everything it needs (configs,
  weights, the old results, the data) before the first attack runs, so a
  damaged file or a busy or read-only folder is reported at once. Rewrites
  each member's results.json, report.md, plots, and its config.json's
  ``eval``, ``parallel`` and ``probes`` sections (training fields are kept
  as stored). ``--config.probes.NAME={...}`` adds a probe to the runs (e.g.
  the latent-space study, ``probes/latent.py``).
  """
  workdir = pathlib.Path(workdir)
  missing = FileNotFoundError(f'no trained run in {workdir} (no config.json); train one there first: '
                              f'python launch.py --experiment=NAME --workdir={workdir}')
  if not workdir.is_dir():
    raise missing
  # The lock before anything else: a run in progress is not evaluated, and is
  # reported busy even before it has written its config.json.
  with lock.writer(workdir, log=log):
    if not (workdir / 'config.json').exists():
      raise missing
    return _evaluate_locked(workdir, eval_overrides, data_dir, log=log)


def _evaluate_locked(workdir: pathlib.Path, eval_overrides, data_dir, *, log) -> dict:
  cfg_path = workdir / 'config.json'
  stored = runio.read_json(cfg_path)
  if stored.get('sweep') and not stored['sweep'].get('member'):
    config = config_lib.apply_overrides(config_lib.with_defaults(stored), eval_overrides)
    return run_experiment(config, workdir, data_dir, log=log, reevaluate=True)
  names = [n for n in member_names(workdir) if (workdir / n / 'checkpoints').exists()] \
      if not (workdir / 'checkpoints').exists() else ['']
  if not names:
    raise FileNotFoundError(f'no trained run in {workdir} (no checkpoints/): train it first')
  loaded = []
  for name in names:
    run = load_run(workdir, name or None)
    cfg = config_lib.apply_overrides(run.config, eval_overrides)
    evaluation.recipes.resolve(cfg.eval)  # Bad eval settings fail before any work.
    stored = runio.read_json(run.workdir / 'config.json')
    loaded.append((name, run, cfg, stored, run.results or {}))
  top_path = workdir / 'results.json'
  family = names != ['']
  top = runio.read_json(top_path) if family and top_path.exists() else {}
  ctx = _Context(loaded[0][2], data_dir)
  for _, _, cfg, _, _ in loaded:
    ctx.data(cfg)
    ctx.probes(cfg)   # bad probe options too (built once, kept for the evaluation)

  out = {}
  for name, run, cfg, stored, old in loaded:
    probes = ctx.probes(cfg)
    res = evaluate_model(run.method, run.params, ctx.data(cfg), cfg, ctx.eval_mesh, evaluator=ctx.evaluator,
                         probes=probes, log=log, tag=f'[{name}] ' if name else '')
    res['timing'] = dict(old.get('timing', {}), **res['timing'])
    # Only what --evaluate may change: a rerun of the training command still finds its own config.
    stored = dict(stored, eval=cfg.eval.to_dict(), parallel=cfg.parallel.to_dict(),
                  probes=cfg.probes.to_dict() if cfg.get('probes') else {})
    runio.atomic_write_text(run.workdir / 'config.json',
                            config_lib.to_json(ml_collections.ConfigDict(stored)) + '\n')
    write_results(run.workdir, cfg, res, _keep_analysis(old, res, probes))
    out[name] = res
  if not family and _is_member(workdir):
    refresh_family_table(workdir.parent, log=log)
  if family:
    info = top.get('member_sweep')
    if info and (workdir / info['name'] / 'config.json').exists():
      # The member sweep is re-evaluated as the sweep it is (its screening and strong evaluations).
      top[info['name']] = tables.member_sweep_rows(evaluate_workdir(
          workdir / info['name'], eval_overrides, data_dir, log=lambda line: log(f'[{info["name"]}] {line}')))
    _write_family(workdir, top, out)
  return out


def _write_family(workdir: pathlib.Path, top: dict, member_results: dict[str, dict]) -> None:
  """A family's summary table from its members' results, into its top
  ``results.json`` (``top`` with the new table) and ``report.md``."""
  config = config_lib.with_defaults(runio.read_json(workdir / 'config.json'))
  configs = {n: config_lib.with_defaults(runio.read_json(workdir / n / 'config.json')) for n in member_results}
  _family_tables(workdir, config, top, member_results, configs, top.get('failed', []))
  runio.write_json(workdir / 'results.json', top)
  _write_reports(workdir, config, top, member_results)


def _comparison_changed(workdir: pathlib.Path, config) -> bool:
  stored = runio.read_json(workdir / 'config.json').get('comparison')
  return stored != json.loads(config_lib.to_json(config))['comparison']


def _rewrite_family(workdir: pathlib.Path, top: dict, *, log=print) -> dict:
  names = [r.get('name') for r in top.get('runs', [])]
  _write_family(workdir, top, {n: runio.read_json(workdir / n / 'results.json') for n in names})
  log(f'rewrote {workdir / "results.json"} and {workdir / "report.md"} from the members\' results')
  return top


def refresh_family_table(workdir: str | pathlib.Path, *, log=print) -> bool:
  """Rebuilds a finished family's summary table (top ``results.json``) and
  ``report.md`` from its members' ``results.json``, e.g. after one member was
  re-evaluated on its own (``--evaluate=WORKDIR/member`` does this itself).
  Returns False, with a line saying why, when the family's folder is busy
  (its run still writes it) or not a finished family."""
  workdir = pathlib.Path(workdir)
  top_path = workdir / 'results.json'
  if not top_path.exists():
    log(f'{workdir}: no finished family there (no results.json); its table is written when its run ends')
    return False
  top = runio.read_json(top_path)
  names = [r.get('name') for r in top.get('runs', [])]
  if top.get('sweep') or not names:
    return False
  try:
    with lock.writer(workdir, log=log):
      _rewrite_family(workdir, top, log=log)
  except lock.RunFolderBusy as e:
    log(f'not refreshing the family table: {e}')
    return False
  return True


def _keep_analysis(old: dict, res: dict, probes: list) -> list:
  """Carries a ``--analyze`` result over a re-evaluation: the geometry depends
  on the weights and the data only, which ``--evaluate`` does not change.
  Returns the probes whose report parts go into report.md."""
  out = old.get('geometry', {}).get(GEOMETRY_PROBE)
  if not out or GEOMETRY_PROBE in res['geometry']:
    return probes
  probe = _geometry_probe(out['options'])
  res['geometry'][GEOMETRY_PROBE] = out
  res['summary'].update(probe.summary(out))
  return list(probes) + [probe]


# --------------------------------------------------------------------------
# --analyze
# --------------------------------------------------------------------------

GEOMETRY_PROBE = 'manifold_geometry'
# --analyze's overrides: --config.geometry.<option>=value.
GEOMETRY_PREFIX = 'geometry.'


def geometry_options(run_options, overrides: list[tuple[str, str]]) -> dict:
  """The manifold_geometry options of one run: the probe's defaults < the
  run's own ``config.probes.manifold_geometry`` (``run_options``) <
  ``overrides`` (``('geometry.n_t', '100')``), type- and range-checked (one
  line naming the ``--config.geometry.*`` flag and a valid value)."""
  opts = ml_collections.ConfigDict({'geometry': manifold_geometry.resolve_options(run_options or {})})
  bounds = manifold_geometry.PROBE.BOUNDS
  for key, text in overrides:
    if not key.startswith(GEOMETRY_PREFIX):
      raise config_lib.ConfigError(f'--analyze only takes --config.geometry.* overrides, not --config.{key}')
    config_lib.apply_override(opts, key, text)   # unknown option or bad type: one line
    name = key[len(GEOMETRY_PREFIX):]
    if name in bounds:
      config_lib.check_value(key, opts.geometry[name], bounds[name], text=text,
                             examples=[manifold_geometry.DEFAULTS[name]])
  return manifold_geometry.resolve_options(opts.geometry.to_dict())


def _geometry_probe(options: dict) -> manifold_geometry.ManifoldGeometry:
  return manifold_geometry.PROBE(GEOMETRY_PROBE, ml_collections.ConfigDict(dict(options)))


def training_command(folder: pathlib.Path) -> str:
  """The command that trains (or resumes) the run ``folder`` belongs to."""
  top = folder.parent if _is_member(folder) else folder
  cfg = runio.read_json(top / 'config.json')
  args = [f'--experiment={cfg.get("experiment") or "NAME"}']
  if cfg.get('setting'):
    args.append(f'--setting={cfg["setting"]}')
  if cfg.get('smoke_run'):
    args.append('--smoke')
  only, members = cfg.get('only'), cfg.get('members') or []
  smoke_only = ','.join(config_lib.parse_member(m)[0] for m in members[:2])   # what --smoke picks itself
  if only and not (cfg.get('smoke_run') and only == smoke_only):
    args.append(f'--config.only={only}')
  return ' '.join(['python launch.py', *args, f'--workdir={top}'])


def _is_member(folder: pathlib.Path) -> bool:
  """``folder`` is one member of a multi-model run (its parent lists or holds it)."""
  parent = folder.parent
  return (parent / 'config.json').exists() and not (parent / 'checkpoints').exists() and \
      folder.name in member_names(parent)


def _unfinished(folder: pathlib.Path) -> FileNotFoundError:
  return FileNotFoundError(f'{folder} is not a finished run (no results.json); finish it first (rerunning its '
                           f'training command resumes it): {training_command(folder)}')


def analyze_workdir(workdir: str | pathlib.Path, overrides: list[tuple[str, str]], data_dir: str | None,
                    *, log=print) -> dict:
  """Manifold geometry (probe ``manifold_geometry``) of a finished run: every
  member of a multi-model workdir, or the one run/member folder given.

  Options: the probe's defaults < the run's ``config.probes.manifold_geometry``
  < ``overrides`` (``--config.geometry.*``). Holds the folder's writer lock and
  reads every config, checkpoint, results.json and dataset before the first
  attack. Writes, per member, ``geometry.json`` and ``geometry.png``, the
  result under ``results.json['geometry']['manifold_geometry']`` (with its
  summary numbers in ``results['summary']``) and report.md; a family's top
  results.json table and report.md are rewritten too (also when one member of
  it is analysed: ``WORKDIR/member``). Returns ``{member: out}``
  (member ``''`` for a single run).
  """
  workdir = pathlib.Path(workdir)
  geometry_options({}, overrides)   # A bad override fails before anything is read.
  if not workdir.is_dir():
    raise FileNotFoundError(f'{workdir} does not exist; pass a finished run folder, e.g. '
                            f'--analyze=runs/standard_mnist (train one: python launch.py --experiment=NAME '
                            f'--workdir={workdir})')
  if not (workdir / 'config.json').exists():
    raise FileNotFoundError(f'no run in {workdir} (no config.json); train one there first: '
                            f'python launch.py --experiment=NAME --workdir={workdir}')
  with lock.writer(workdir, log=log):
    return _analyze_locked(workdir, overrides, data_dir, log=log)


def _analyze_locked(workdir: pathlib.Path, overrides, data_dir, *, log) -> dict:
  single = (workdir / 'checkpoints').exists() or (workdir / pipeline.MEMBER_FILE).exists()
  if not (workdir / 'results.json').exists():
    raise _unfinished(workdir)
  names = [''] if single else member_names(workdir)
  if not names:
    raise _unfinished(workdir)
  # Everything is read first: a damaged or missing file fails before minutes of attacks.
  loaded, data = [], {}
  for name in names:
    folder = workdir / name if name else workdir
    if not (folder / 'results.json').exists():
      raise _unfinished(folder)
    run = load_run(workdir, name or None)
    opts = geometry_options((run.config.get('probes') or {}).get(GEOMETRY_PROBE), overrides)
    # The whole test set: class manifolds take the first M images of each class.
    data_cfg = config_lib.apply_overrides(run.config, [('eval.num_examples', '0')])
    if data_key(data_cfg) not in data:
      data[data_key(data_cfg)] = prepare_data(data_cfg, data_dir)
    loaded.append((name, run, opts, runio.read_json(folder / 'results.json'), data[data_key(data_cfg)]))
  top_path = workdir / 'results.json'
  top = runio.read_json(top_path) if not single else None

  out, member_results = {}, {}
  for name, run, opts, results, d in loaded:
    tag = f'[{name}] ' if name else ''
    probe = _geometry_probe(opts)
    probe.log = lambda line, tag=tag: log(tag + line)
    inp = probes_lib.ProbeInput(
        method=run.method, params=run.params, config=run.config, eval_x=pipeline.model_input(d.eval_images),
        eval_y=d.eval_labels, train_x=None if d.train_labels is None else d.train_images, train_y=d.train_labels,
        test_x=d.test_images, test_y=d.test_labels, box=d.box, key=jax.random.key(opts['seed']))
    t0 = time.perf_counter()
    result = probe(inp)
    previous = results.get('geometry', {}).get(GEOMETRY_PROBE)
    summary = {k: v for k, v in results.get('summary', {}).items()
               if not previous or k not in probe.summary(previous)}   # an earlier analysis' numbers go
    results = dict(results, geometry=dict(results.get('geometry', {}), **{GEOMETRY_PROBE: result}),
                   summary=dict(summary, **probe.summary(result)),
                   timing=dict(results.get('timing', {}), manifold_geometry_seconds=time.perf_counter() - t0))
    probes = [p for p in probes_lib.build_probes(run.config.get('probes')) if p.name != GEOMETRY_PROBE]
    write_results(run.workdir, run.config, results, probes + [probe])
    log(f'{tag}wrote {run.workdir / manifold_geometry.JSON_FILE}, {run.workdir / manifold_geometry.PLOT_FILE} and '
        f'{run.workdir / "report.md"} ({time.perf_counter() - t0:.0f} s)')
    out[name] = result
    member_results[name] = results
  if single and _is_member(workdir):
    refresh_family_table(workdir.parent, log=log)   # the family's table and report carry the new numbers
  if top is not None and not top.get('sweep') and [r.get('name') for r in top.get('runs', [])] == names:
    _write_family(workdir, top, member_results)   # its table carries the probes' numbers of every member
  return out
