"""Sweep experiments: a hyperparameter grid x seeds trained as one vmapped program.

An experiment config with a ``sweep`` section runs here instead of the
member-by-member path of ``experiment.run_experiment``:

  sweep.hparam            the swept traced hyperparameter (``method.<hparam>``).
  sweep.grid              its values.
  sweep.seeds             seeds ``config.seed, config.seed + 1, ...`` (a count).
  sweep.chunk_size        values per vmapped chunk (0 = the whole grid at once;
                          lower it when the stacked states do not fit).
  sweep.baseline          a member spec ``'name: key=value; ...'`` trained over
                          the same seeds by the same vmapped trainer ('' = none),
                          e.g. the paper's backprop MLP.
  sweep.mean_last_epochs  clean accuracy = mean test accuracy (on the ``data.test_*``
                          split) after each of the last K epochs of the final phase.
  sweep.screen_profile, sweep.screen_examples, sweep.pgd_eps
                          the shared evaluation run on *every* member (a cheap
                          profile, the first N eval examples, one eps): the sweep
                          table's ``pgd_accuracy`` (per-example worst case over
                          the profile's attacks).
  sweep.strong            members also evaluated with the experiment's own
                          ``config.eval`` (the strong profile with its sanity
                          checks), by role: ``baseline``, or ``best:<column>`` (the
                          value with the best mean of a table column, e.g.
                          ``best:clean_accuracy`` or a probe's number ``best:r_fgsm``).
  sweep.strong_seeds      how many seeds of each strong role (first ones).

Every member, the baseline included, also goes through the configured probes
(``config.probes``); their flat numbers become table columns, grouped by the
swept value with mean and std over seeds.

Workdir layout (the DESIGN contract for multi-model experiments):
  config.json, results.json (``runs``, the ``sweep`` table, ``baseline``,
  ``pgd_comparison``, ``timing``), report.md and plots;
  stacked/<group>/checkpoints, metrics.jsonl: the stacked training state of a
  group (the sweep, the baseline);
  <member>/config.json (the config that trains that member alone),
  results.json, report.md, metrics.jsonl and sweep_member.json (where its
  params sit in the stacked checkpoint): ``load_run(workdir, member)`` works.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from geomrobust import config as config_lib
from geomrobust import data as data_lib
from geomrobust import evaluation
from geomrobust import parallel
from geomrobust import pipeline
from geomrobust import probes as probes_lib
from geomrobust import runio
from geomrobust.pipeline import MEMBER_FILE, _build
from geomrobust.runio import sweep_report
from geomrobust.training import sweep as sweep_lib
STACKED_DIR = 'stacked'


@dataclasses.dataclass
class Group:
  """One vmapped training program: a grid over one config."""
  name: str                     # folder under stacked/
  role: str                     # 'sweep' or 'baseline'
  config: ml_collections.ConfigDict
  grid: sweep_lib.Grid
  overrides: dict               # the base overrides of every member (baseline spec)


@dataclasses.dataclass
class Member:
  name: str
  group: Group
  seed_index: int
  value_index: int
  config: ml_collections.ConfigDict
  overrides: dict

  @property
  def seed(self) -> int:
    return self.group.grid.seeds[self.seed_index]

  @property
  def value(self):
    return self.group.grid.values[self.value_index]


# --------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------


def _strip(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config without the sweep-level sections: what trains one member alone."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    for key in ('sweep', 'settings', 'smoke'):
      if key in cfg:
        del cfg[key]
  return cfg


def _fmt(value) -> str:
  return f'{float(value):g}'


def groups(config: ml_collections.ConfigDict) -> list[Group]:
  """The sweep group and (if configured) the baseline group."""
  sw = config.sweep
  hparam = str(sw.hparam)
  values = tuple(float(v) for v in sw.grid)
  if not values:
    raise config_lib.ConfigError('sweep.grid is empty: list the grid, e.g. --config.sweep.grid=0,0.5,1')
  if len(set(values)) != len(values):
    raise config_lib.ConfigError(f'sweep.grid has duplicates: {values}')
  if int(sw.seeds) < 1:
    raise config_lib.ConfigError(f'sweep.seeds must be >= 1 (got {sw.seeds})')
  if hparam not in config.method:
    raise config_lib.ConfigError(f'sweep.hparam={hparam!r} is not a field of config.method '
                                 f'({", ".join(k for k in config.method if k != "name")})')
  seeds = tuple(int(config.seed) + i for i in range(int(sw.seeds)))
  base = _strip(config)
  out = [Group(hparam, 'sweep', base, sweep_lib.Grid(hparam, values, seeds), {})]
  if str(sw.get('baseline', '') or ''):
    name, overrides = config_lib.parse_member(str(sw.baseline))
    out.append(Group(name, 'baseline', config_lib.apply_overrides(base, overrides),
                     sweep_lib.Grid('', (None,), seeds), dict(overrides)))
  return out


def members(group: Group) -> list[Member]:
  out = []
  for si, seed in enumerate(group.grid.seeds):
    for vi, value in enumerate(group.grid.values):
      overrides = dict(group.overrides)
      if group.grid.hparam:
        overrides[f'method.{group.grid.hparam}'] = _fmt(value)
        name = f'{group.grid.hparam}_{_fmt(value)}_seed{seed}'
      else:
        name = f'{group.name}_seed{seed}'
      overrides['seed'] = str(seed)
      cfg = config_lib.apply_overrides(group.config, [(k, v) for k, v in overrides.items()
                                                      if k not in group.overrides])
      out.append(Member(name, group, si, vi, cfg, overrides))
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast (before data or training) on a bad sweep config."""
  sw = config.sweep
  for g in groups(config):
    pipeline.validate(g.config)
  num_classes = data_lib.get_spec(config.dataset).num_classes
  method = _build(groups(config)[0].config, num_classes)
  if str(sw.hparam) not in method.hparams():
    raise config_lib.ConfigError(f'sweep.hparam={sw.hparam!r} is not a traced hyperparameter of method '
                                 f'{config.method.name!r} (it has: {", ".join(method.hparams()) or "none"})')
  for role in sw.strong:
    if role != 'baseline' and not (role.startswith('best:') and role[5:]):
      raise config_lib.ConfigError(f'unknown sweep.strong role {role!r}; use baseline or best:<table column>, '
                                   'e.g. best:clean_accuracy')
  evaluation.recipes.resolve(screen_eval_config(config))


def screen_eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.eval`` with the screening profile, one eps, no extra sanity attacks."""
  ev = copy.deepcopy(config.eval)
  evaluation.profiles.apply_profile(ev, str(config.sweep.screen_profile))
  with ev.unlocked(), ev.ignore_type():
    ev.eps = (float(config.sweep.pgd_eps),)
    ev.sanity = False
    ev.trajectories = 0
  return ev


# --------------------------------------------------------------------------
# Evaluation of one member
# --------------------------------------------------------------------------


def _worst_case(rows: list[dict], eps: float) -> float | None:
  for r in rows:
    if r['attack'] == 'worst_case' and abs(r['eps'] - eps) < 1e-9:
      return r['accuracy']
  return None


def evaluate_member(member: Member, method, params, accuracies, data, config, mesh, *, evaluator, probes,
                    log, tag) -> dict:
  """The screening evaluation and the probes of one member, plus its test
  accuracy over the last epochs (the sweep's clean accuracy)."""
  sw = config.sweep
  n_screen = min(int(sw.screen_examples), len(data.eval_labels))
  screen = dataclasses.replace(data, eval_images=data.eval_images[:n_screen], eval_labels=data.eval_labels[:n_screen])
  res = pipeline.evaluate_model(method, params, screen, member.config, mesh, evaluator=evaluator, probes=[],
                                eval_config=screen_eval_config(config), log=log, tag=tag)
  # Probes see the whole evaluation set, as in a single run.
  probed = pipeline.evaluate_probes(method, params, data, member.config, probes, config.eval)
  acc = np.asarray(accuracies, np.float64)
  res.update(geometry=probed['geometry'], probes=probed['probes'], summary=probed['summary'])
  res['timing']['probe_seconds'] = probed['seconds']
  res['training'] = dict(clean_accuracy_last_epochs=float(acc.mean()) if acc.size else float('nan'),
                         test_accuracies=acc.tolist(), test_examples=int(len(data.test_labels)))
  log(f'{tag}clean (mean of last {acc.size} epochs, {len(data.test_labels)} test images) '
      f'{res["training"]["clean_accuracy_last_epochs"]:.4f}' +
      ''.join(f'; {k} {v:.3f}' for k, v in probed['summary'].items()))
  res.update(eval_profile=str(sw.screen_profile),
             sweep=dict(group=member.group.name, role=member.group.role, hparam=member.group.grid.hparam,
                        value=member.value, seed=member.seed))
  return res


def strong_evaluate(member: Member, method, params, results: dict, data, config, mesh, *, evaluator, log,
                    tag) -> dict:
  """Re-evaluates a member with ``config.eval`` (strong profile, sanity checks);
  the screening numbers move to ``results['screen']``."""
  ev = pipeline.evaluate_model(method, params, data, member.config, mesh, evaluator=evaluator, probes=[],
                               eval_config=config.eval, log=log, tag=tag)
  screen = {k: results[k] for k in ('clean_accuracy', 'robustness', 'eval_examples', 'eval_profile', 'sanity')}
  results = dict(results, clean_accuracy=ev['clean_accuracy'], robustness=ev['robustness'],
                 eval_examples=ev['eval_examples'], eval_profile=str(config.eval.get('profile', '') or 'custom'),
                 sanity=ev['sanity'], convergence=ev.get('convergence', []), masks=ev['masks'], screen=screen)
  results['timing'] = dict(results['timing'], strong_eval_seconds=ev['timing']['eval_seconds'])
  return results


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

# Row fields that identify a member rather than measure it.
_ID_KEYS = ('name', 'seed', 'pgd_eps', 'pgd_profile', 'pgd_examples')


def sweep_row(member: Member, res: dict, config) -> dict:
  """One row of the sweep table: the member's flat numbers (accuracies as
  fractions, the probes' numbers in their own units)."""
  screen = res.get('screen', res)
  hparam = str(config.sweep.hparam)
  eps = float(config.sweep.pgd_eps)
  return {
      'name': member.name, hparam: None if member.value is None else float(member.value), 'seed': member.seed,
      'clean_accuracy': res.get('training', {}).get('clean_accuracy_last_epochs'),
      'pgd_accuracy': _worst_case(screen['robustness'], eps), 'pgd_eps': eps,
      'pgd_profile': screen.get('eval_profile'), 'pgd_examples': screen['eval_examples'],
      'eval_clean_accuracy': screen['clean_accuracy'], **res.get('summary', {})}


def row_keys(rows: list[dict], hparam: str) -> list[str]:
  """The numeric columns of ``rows``, in first-seen order."""
  keys = dict.fromkeys(k for r in rows for k, v in r.items()
                       if k not in _ID_KEYS and k != hparam and (v is None or isinstance(v, (int, float))))
  return list(keys)


def _mean_std(rows: list[dict], key: str) -> tuple[float | None, float | None]:
  vals = np.asarray([r[key] for r in rows if r.get(key) is not None], np.float64)
  if not vals.size:
    return None, None
  return float(vals.mean()), float(vals.std())


def summarize(rows: list[dict], hparam: str) -> list[dict]:
  """Mean and std (over seeds, ddof=0) of every row key, per value."""
  out = []
  for v in sorted({r[hparam] for r in rows}):
    sel = [r for r in rows if r[hparam] == v]
    entry = {hparam: v, 'seeds': len(sel)}
    for k in row_keys(rows, hparam):
      entry[k], entry[f'{k}_std'] = _mean_std(sel, k)
    out.append(entry)
  return out


def baseline_entry(rows: list[dict], hparam: str) -> dict:
  """The baseline's row: the sweep-row keys as the mean over its seeds (std beside)."""
  entry = {'name': rows[0]['name'].rsplit('_seed', 1)[0], hparam: None, 'seed': 'mean',
           'seeds': [r['seed'] for r in rows], 'pgd_eps': rows[0]['pgd_eps'], 'pgd_profile': rows[0]['pgd_profile']}
  for k in row_keys(rows, hparam):
    entry[k], entry[f'{k}_std'] = _mean_std(rows, k)
  return entry


# --------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------


def _member_metrics(group_dir: pathlib.Path, member: Member) -> list[dict]:
  out = []
  for rec in runio.read_metrics(group_dir / 'metrics.jsonl'):
    row = {'epoch': rec['epoch'], 'phase': rec['phase'],
           'loss': rec['loss_members'][member.seed_index][member.value_index]}
    if 'test_accuracy_members' in rec:
      row['test_accuracy'] = rec['test_accuracy_members'][member.seed_index][member.value_index]
    out.append(row)
  return out


def _write_member(workdir: pathlib.Path, member: Member, results: dict, probes) -> None:
  sub = workdir / member.name
  sub.mkdir(parents=True, exist_ok=True)
  runio.atomic_write_text(sub / 'config.json', config_lib.to_json(member.config) + '\n')
  runio.write_json(sub / MEMBER_FILE, dict(group_dir=f'{STACKED_DIR}/{member.group.name}',
                                           seed_index=member.seed_index, value_index=member.value_index))
  metrics = _member_metrics(workdir / STACKED_DIR / member.group.name, member)
  runio.atomic_write_text(sub / 'metrics.jsonl', ''.join(json.dumps(r) + '\n' for r in metrics))
  pipeline.write_results(sub, member.config, results, probes)


def _take(tree, si: int, vi: int):
  return jax.tree.map(lambda a: a[si, vi], tree)


def run_sweep(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, data_dir: str | None = None, *,
              log: Callable[[str], None] = print, reevaluate: bool = False) -> dict:
  """Trains every group of the sweep (one compiled program each), evaluates
  every member, writes the tables and the report. Resumes training from the
  stacked checkpoints and skips members already evaluated (unless
  ``reevaluate``)."""
  workdir = pathlib.Path(workdir)
  parallel.maybe_initialize_distributed(bool(config.parallel.distributed))
  validate(config)
  top_path = workdir / 'results.json'
  if top_path.exists() and not reevaluate:
    pipeline.check_workdir_config(workdir, config)
    log(f'already done: {top_path} (use --evaluate={workdir} to re-evaluate)')
    return runio.read_json(top_path)
  workdir.mkdir(parents=True, exist_ok=True)
  pipeline.check_workdir_config(workdir, config)
  runio.atomic_write_text(workdir / 'config.json', config_lib.to_json(config) + '\n')
  mesh = parallel.make_mesh(int(config.parallel.num_devices))
  t_start = time.perf_counter()
  data = pipeline.prepare_data(config, data_dir)
  sw = config.sweep
  hparam = str(sw.hparam)
  grps = groups(config)
  log(f'sweep {config.get("experiment", "")}: method={config.method.name}, {hparam} x seeds = '
      f'{len(sw.grid)} x {int(sw.seeds)}' + (f', baseline {grps[1].name}' if len(grps) > 1 else '') +
      f'; {len(data.train_labels)} train / {len(data.test_labels)} test examples from {data.source}; '
      f'{mesh.devices.size} {jax.devices()[0].platform} device(s); workdir {workdir}')

  timing = {}
  all_members, member_results, rows = [], {}, {}
  evaluator = evaluation.Evaluator()  # compiled attacks shared by every member
  probes = probes_lib.build_probes(config.get('probes'))
  for g in grps:
    method = _build(g.config, data.num_classes)
    tag = f'[{g.name} {"x".join(map(str, g.grid.shape))}] '
    trained = sweep_lib.train_sweep(
        method, g.grid, data.train_images, data.train_labels, data.test_images, data.test_labels, g.config,
        workdir / STACKED_DIR / g.name, mesh, chunk_size=int(sw.chunk_size), mean_last=int(sw.mean_last_epochs),
        log=log, tag=tag)
    timing[f'{g.name}_train_seconds'] = trained.seconds
    timing[f'{g.name}_first_epoch_seconds'] = trained.first_epoch_seconds
    timing[f'{g.name}_compilations'] = trained.compilations
    timing[f'{g.name}_members'] = g.grid.shape[0] * g.grid.shape[1]
    t0 = time.perf_counter()
    ms = members(g)
    for i, m in enumerate(ms):
      done = workdir / m.name / 'results.json'
      mtag = f'[{m.name} {i + 1}/{len(ms)}] '
      if done.exists() and not reevaluate:
        res = runio.read_json(done)
      else:
        params = _take(trained.params, m.seed_index, m.value_index)
        res = evaluate_member(m, method, params, trained.accuracy[m.seed_index, m.value_index], data, config,
                              mesh, evaluator=evaluator, probes=probes, log=log, tag=mtag)
        _write_member(workdir, m, res, probes)
        res = runio.read_json(done)
      member_results[m.name] = res
      rows[m.name] = sweep_row(m, res, config)
    timing[f'{g.name}_eval_seconds'] = time.perf_counter() - t0
    all_members.extend((m, method, trained) for m in ms)

  sweep_rows = [rows[m.name] for m, _, _ in all_members if m.group.role == 'sweep']
  base_rows = [rows[m.name] for m, _, _ in all_members if m.group.role == 'baseline']
  summary = summarize(sweep_rows, hparam)

  # The strong evaluation: the baseline and the best values, the number that counts.
  t0 = time.perf_counter()
  strong = strong_members(config, summary, all_members)
  comparison = []
  for role, (m, method, trained) in strong:
    res = member_results[m.name]
    if 'screen' not in res or reevaluate:
      res = strong_evaluate(m, method, _take(trained.params, m.seed_index, m.value_index), res, data, config, mesh,
                            evaluator=evaluator, log=log, tag=f'[strong {role}: {m.name}] ')
      pipeline.write_results(workdir / m.name, m.config, res, probes)
      res = runio.read_json(workdir / m.name / 'results.json')
      member_results[m.name] = res
    comparison.append(strong_row(role, m, res, rows[m.name], hparam))
  timing['strong_eval_seconds'] = time.perf_counter() - t0
  timing['total_seconds'] = time.perf_counter() - t_start

  runs = [dict(name=m.name, overrides=m.overrides, results=f'{m.name}/results.json') for m, _, _ in all_members]
  top = dict(experiment=config.get('experiment', ''), method=config.method.name, dataset=config.dataset,
             seed=int(config.seed), setting=str(config.get('setting', '') or ''), hparam=hparam, runs=runs,
             columns=row_keys(sweep_rows + base_rows, hparam), sweep=sweep_rows, sweep_summary=summary, baseline=baseline_entry(base_rows, hparam) if base_rows else None,
             baseline_runs=base_rows, pgd_comparison=comparison, timing=timing,
             smoke=bool(config.get('smoke_run', False)))
  runio.write_json(top_path, top)
  sweep_report.write_sweep_report(workdir, config, top, member_results)
  log(f'wrote {top_path} and {workdir / "report.md"} ({timing["total_seconds"]:.0f} s)')
  return top


def strong_members(config, summary: list[dict], all_members) -> list[tuple[str, tuple]]:
  """``[(role, (member, method, trained))]`` for the configured strong roles."""
  sw = config.sweep
  hparam = str(sw.hparam)
  n_seeds = max(int(sw.strong_seeds), 1)
  picks = []
  for role in sw.strong:
    if role == 'baseline':
      sel = [t for t in all_members if t[0].group.role == 'baseline']
    else:
      key = role[len('best:'):]
      ok = [s for s in summary if s.get(key) is not None]
      if not ok:
        continue
      best = max(ok, key=lambda s: s[key])[hparam]
      sel = [t for t in all_members if t[0].group.role == 'sweep' and float(t[0].value) == best]
    for t in sel[:n_seeds]:
      if all(t[0].name != p[1][0].name for p in picks):
        picks.append((role, t))
  return picks


def strong_row(role: str, member: Member, res: dict, row: dict, hparam: str) -> dict:
  worst = {f'{r["eps"]:g}': r['accuracy'] for r in res['robustness'] if r['attack'] == 'worst_case'}
  per_attack = {}
  for r in res['robustness']:
    per_attack.setdefault(r['attack'], {})[f'{r["eps"]:g}'] = r['accuracy']
  return dict(role=role, name=member.name, **{hparam: row[hparam]}, seed=member.seed,
              profile=res.get('eval_profile'), eval_examples=res['eval_examples'],
              clean_accuracy=res['clean_accuracy'], row=row, worst_case=worst, attacks=per_attack,
              sanity_failed=[k for k, v in res.get('sanity', {}).items() if not v.get('passed')])


def is_sweep(workdir: pathlib.Path) -> bool:
  path = pathlib.Path(workdir) / 'config.json'
  return path.exists() and bool(runio.read_json(path).get('sweep'))


def evaluate_sweep(workdir: pathlib.Path, eval_overrides, data_dir: str | None, *, log=print) -> dict:
  """``--evaluate=WORKDIR`` for a sweep: every member again with the new eval config, no training."""
  workdir = pathlib.Path(workdir)
  config = config_lib.apply_overrides(config_lib.with_defaults(runio.read_json(workdir / 'config.json')),
                                      eval_overrides)
  return run_sweep(config, workdir, data_dir, log=log, reevaluate=True)
