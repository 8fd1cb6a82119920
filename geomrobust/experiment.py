"""``train_and_evaluate`` for one model, ``run_experiment`` for a family, and
``load_run`` to get a trained run back as a pure JAX function.

Every experiment goes through here: data -> model + method -> training loop ->
the shared evaluation -> geometry -> results.json / report.md / plots.
"""

from __future__ import annotations

import pathlib
from typing import Callable

import jax
import ml_collections

from geomrobust import config as config_lib
from geomrobust import evaluation
from geomrobust import parallel
from geomrobust import probes as probes_lib
from geomrobust import runio
from geomrobust import sweep_experiment
from geomrobust.pipeline import (Data, Run, check_workdir_config, data_key, evaluate_model, load_run,  # noqa: F401
                                 member_names, prepare_data, validate, write_results, _build)
from geomrobust.runio import report
from geomrobust.training import loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       data_dir: str | None = None, *, mesh=None, log: Callable[[str], None] = print,
                       tag: str = '', after_epoch=None, data: Data | None = None,
                       evaluator: evaluation.Evaluator | None = None, probes: list | None = None) -> dict:
  """Trains one model (resuming from ``workdir``), evaluates it and writes
  ``results.json``, ``report.md`` and plots there. Returns the results dict."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  check_workdir_config(workdir, config)
  runio.atomic_write_text(workdir / 'config.json', config_lib.to_json(config) + '\n')
  mesh = mesh or parallel.make_mesh(int(config.parallel.num_devices))
  data = data or prepare_data(config, data_dir)
  method = _build(config, data.num_classes)
  log(f'{tag}{config.get("experiment", "")} method={config.method.name} dataset={config.dataset} '
      f'({len(data.train_labels)} train examples from {data.source}) on {mesh.devices.size} '
      f'{jax.devices()[0].platform} device(s), workdir {workdir}')
  trained = loop.train(method, data.train_images, data.train_labels, data.test_images, data.test_labels,
                       config, workdir, mesh, log=log, tag=tag, after_epoch=after_epoch)
  evaluator = evaluator or evaluation.Evaluator()
  probes = probes_lib.build_probes(config.get('probes')) if probes is None else probes
  results = evaluate_model(method, trained.params, data, config, mesh, evaluator=evaluator, probes=probes,
                           log=log, tag=tag)
  results['timing'].update(train_seconds=trained.seconds,
                           train_examples_per_second=trained.examples_per_second,
                           resumed_from_epoch=trained.resumed_from)
  write_results(workdir, config, results, probes)
  return results


# --------------------------------------------------------------------------
# Experiments with several members
# --------------------------------------------------------------------------


def run_experiment(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, data_dir: str | None = None,
                   *, log: Callable[[str], None] = print) -> dict:
  """Runs every member of ``config`` (or the single model) into ``workdir``.

  Members already finished (their ``results.json`` exists, same config) are
  not retrained, so rerunning a killed experiment continues where it stopped.
  """
  workdir = pathlib.Path(workdir)
  if config.get('sweep'):
    # A vmapped hyperparameter sweep (one compiled program per grid): its own path.
    return sweep_experiment.run_sweep(config, workdir, data_dir, log=log)
  parallel.maybe_initialize_distributed(bool(config.parallel.distributed))
  members = config_lib.member_configs(config)
  for _, _, cfg in members:
    validate(cfg)
  if len(members) == 1 and members[0][0] == '':
    done = workdir / 'results.json'
    if done.exists():
      check_workdir_config(workdir, members[0][2])
      log(f'already done: {done} (use --evaluate={workdir} to re-evaluate)')
      return runio.read_json(done)
    return train_and_evaluate(members[0][2], workdir, data_dir, log=log)
  workdir.mkdir(parents=True, exist_ok=True)
  runio.atomic_write_text(workdir / 'config.json', config_lib.to_json(config) + '\n')
  mesh = parallel.make_mesh(int(config.parallel.num_devices))
  loaded = {}  # one load per distinct dataset / data section / eval set
  evaluator = evaluation.Evaluator()  # one set of compiled attacks for every member
  runs, member_results = [], {}
  for i, (name, overrides, cfg) in enumerate(members):
    sub = workdir / name
    tag = f'[{name} {i + 1}/{len(members)}] '
    done = sub / 'results.json'
    if done.exists():
      check_workdir_config(sub, cfg)
      log(f'{tag}already done: {done} (use --evaluate={workdir} to re-evaluate)')
      res = runio.read_json(done)
    else:
      key = data_key(cfg)
      if key not in loaded:
        loaded[key] = prepare_data(cfg, data_dir)
      res = train_and_evaluate(cfg, sub, data_dir, mesh=mesh, log=log, tag=tag, data=loaded[key],
                               evaluator=evaluator)
    member_results[name] = res
    runs.append(dict(name=name, overrides=overrides, results=f'{name}/results.json'))
  top = dict(experiment=config.get('experiment', ''), method=config.method.name, dataset=config.dataset,
             seed=int(config.seed), runs=runs, table=report.summary_table(member_results),
             smoke=bool(config.get('smoke_run', False)))
  runio.write_json(workdir / 'results.json', top)
  report.write_experiment_report(workdir, config, top, member_results)
  log(f'wrote {workdir / "results.json"} and {workdir / "report.md"}')
  return top


def evaluate_workdir(workdir: str | pathlib.Path, eval_overrides: list[tuple[str, str]], data_dir: str | None,
                     *, log=print) -> dict:
  """Re-evaluates a trained run (every member) with the current eval config."""
  workdir = pathlib.Path(workdir)
  if sweep_experiment.is_sweep(workdir):
    return sweep_experiment.evaluate_sweep(workdir, eval_overrides, data_dir, log=log)
  names = [n for n in member_names(workdir) if (workdir / n / 'checkpoints').exists()] \
      if not (workdir / 'checkpoints').exists() else ['']
  if not names:
    raise FileNotFoundError(f'no trained run in {workdir}')
  out = {}
  evaluator = evaluation.Evaluator()
  for name in names:
    run = load_run(workdir, name or None)
    cfg = config_lib.apply_overrides(run.config, eval_overrides)
    mesh = parallel.make_mesh(int(cfg.parallel.num_devices))
    data = prepare_data(cfg, data_dir)
    probes = probes_lib.build_probes(cfg.get('probes'))
    res = evaluate_model(run.method, run.params, data, cfg, mesh, evaluator=evaluator, probes=probes, log=log,
                         tag=f'[{name}] ' if name else '')
    old = run.results or {}
    res['timing'] = dict(old.get('timing', {}), **res['timing'])
    runio.atomic_write_text(run.workdir / 'config.json', config_lib.to_json(cfg) + '\n')
    write_results(run.workdir, cfg, res, probes)
    out[name] = res
  if names != ['']:
    top_path = workdir / 'results.json'
    top = runio.read_json(top_path) if top_path.exists() else {}
    top['table'] = report.summary_table(out)
    runio.write_json(top_path, top)
    report.write_experiment_report(workdir, ml_collections.ConfigDict(runio.read_json(workdir / 'config.json')),
                                   top, out)
  return out
