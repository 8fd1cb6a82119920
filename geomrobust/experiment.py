"""``train_and_evaluate`` for one model, ``run_experiment`` for a family, and
``load_run`` to get a trained run back as a pure JAX function.

Every experiment goes through here: data -> model + method -> training loop ->
the shared evaluation -> geometry -> results.json / report.md / plots.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from geomrobust import config as config_lib
from geomrobust import data as data_lib
from geomrobust import evaluation
from geomrobust import methods
from geomrobust import models
from geomrobust import parallel
from geomrobust import runio
from geomrobust.data import subsets
from geomrobust.runio import report
from geomrobust.training import loop

# Config sections that may change between a run and its resume/re-evaluation.
_NOT_TRAINING_KEYS = ('eval', 'only', 'members', 'smoke', 'parallel', 'settings', 'setting')


@dataclasses.dataclass
class Data:
  train_images: np.ndarray   # uint8 [N, H, W, C]
  train_labels: np.ndarray   # int32 [N]
  test_images: np.ndarray    # uint8 [M, H, W, C]: the split used for per-epoch logs
  test_labels: np.ndarray
  eval_images: np.ndarray    # uint8: the first eval.num_examples of the full test split
  eval_labels: np.ndarray
  num_classes: int
  source: str


def prepare_data(config: ml_collections.ConfigDict, data_dir: str | None) -> Data:
  d = config.data
  ds = data_lib.load_dataset(config.dataset, data_dir, verify_checksums=bool(d.verify),
                             expected_counts=bool(d.verify))
  tr_x, tr_y = subsets.first_examples(ds.train_images, ds.train_labels, examples=int(d.train_examples),
                                      per_class=int(d.train_per_class), num_classes=ds.num_classes)
  te_x, te_y = subsets.first_examples(ds.test_images, ds.test_labels, examples=int(d.test_examples),
                                      per_class=int(d.test_per_class), num_classes=ds.num_classes)
  n_eval = int(config.eval.num_examples) or len(ds.test_labels)
  return Data(tr_x, tr_y, te_x, te_y, ds.test_images[:n_eval], ds.test_labels[:n_eval],
              ds.num_classes, ds.source)


def data_key(config: ml_collections.ConfigDict) -> str:
  """What ``prepare_data`` depends on: members that agree on it share one load."""
  return json.dumps([config.dataset, config.data.to_dict(), int(config.eval.num_examples)], sort_keys=True,
                    default=str)


def _training_view(cfg: dict) -> dict:
  return {k: v for k, v in cfg.items() if k not in _NOT_TRAINING_KEYS}


def _config_diff(a: dict, b: dict, prefix: str = '') -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out.extend(_config_diff(va, vb, f'{prefix}{k}.'))
    elif va != vb:
      out.append(f'{prefix}{k}: {va!r} -> {vb!r}')
  return out


def check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run whose training config differs (would mix runs)."""
  path = workdir / 'config.json'
  if not path.exists():
    return
  # Fields added to default_config() since that run was written count as
  # their defaults, so upgrading geomrobust does not orphan finished runs.
  old = _training_view(config_lib.fill_defaults(runio.read_json(path)))
  new = _training_view(json.loads(config_lib.to_json(config)))
  diff = _config_diff(old, new)
  if diff:
    raise config_lib.ConfigError(
        f'{workdir} holds a run with a different config ({"; ".join(diff[:4])}); pass a new --workdir, '
        'or delete that folder to start over')


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast (before data or training) on unknown names and bad combinations."""
  num_classes = data_lib.get_spec(config.dataset).num_classes
  method = _build(config, num_classes)
  method.phases()
  evaluation.recipes.resolve(config.eval)
  if int(config.train.batch_size) <= 0 or int(config.train.epochs) < 0:
    raise config_lib.ConfigError('train.batch_size must be positive and train.epochs non-negative')


def _build(config: ml_collections.ConfigDict, num_classes: int):
  model = models.build_model(config.model, num_classes)
  return methods.build_method(config, model, num_classes)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       data_dir: str | None = None, *, mesh=None, log: Callable[[str], None] = print,
                       tag: str = '', after_epoch=None, data: Data | None = None) -> dict:
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
  results = evaluate_method(method, trained.params, data, config, mesh, log=log, tag=tag)
  results['timing'].update(train_seconds=trained.seconds,
                           train_examples_per_second=trained.examples_per_second,
                           resumed_from_epoch=trained.resumed_from)
  write_results(workdir, config, results)
  return results


def evaluate_method(method: methods.Method, params, data: Data, config, mesh, *, log=print, tag='') -> dict:
  """The shared evaluation plus the method's geometry, as a results dict."""
  x = data_lib.to_float(data.eval_images)
  # The bound method is the same function for every model of this method
  # object, so the evaluation's compiled attacks are reused across calls.
  ev = evaluation.evaluate(method.logits, params, x, data.eval_labels, config.eval, mesh,
                           stochastic=method.stochastic, log=log, tag=tag)
  t0 = time.perf_counter()
  geo_n = min(len(data.eval_labels), 2000)  # Pairwise geometry is O(n^2) per class.
  geometry = method.geometry(params, x[:geo_n], data.eval_labels[:geo_n])
  ev['timing']['geometry_seconds'] = time.perf_counter() - t0
  paper = method.paper_evaluation(params, x, data.eval_labels, config)
  return dict(
      experiment=config.get('experiment', ''), method=config.method.name, dataset=config.dataset,
      seed=int(config.seed), clean_accuracy=ev['clean_accuracy'], robustness=ev['robustness'],
      eval_examples=ev['eval_examples'], sanity=ev['sanity'], geometry=geometry, timing=ev['timing'],
      paper_evaluation=paper, convergence=ev['convergence'], masks=ev['masks'],
      smoke=bool(config.get('smoke_run', False)))


def write_results(workdir: pathlib.Path, config, results: dict) -> None:
  masks = results.pop('masks', None)
  if masks is not None:
    # Per-example correctness after each (attack, eps): which examples are robust.
    np.savez_compressed(workdir / 'robust_masks.npz', **{k: np.asarray(v) for k, v in masks.items()})
    results['robust_masks'] = 'robust_masks.npz'
  runio.write_json(workdir / 'results.json', results)
  report.write_run_report(workdir, config, results)


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
    from geomrobust import sweep_experiment
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
      res = train_and_evaluate(cfg, sub, data_dir, mesh=mesh, log=log, tag=tag, data=loaded[key])
    member_results[name] = res
    runs.append(dict(name=name, overrides=overrides, results=f'{name}/results.json'))
  top = dict(experiment=config.get('experiment', ''), method=config.method.name, dataset=config.dataset,
             seed=int(config.seed), runs=runs, table=report.summary_table(member_results),
             smoke=bool(config.get('smoke_run', False)))
  runio.write_json(workdir / 'results.json', top)
  report.write_experiment_report(workdir, config, top, member_results)
  log(f'wrote {workdir / "results.json"} and {workdir / "report.md"}')
  return top


# --------------------------------------------------------------------------
# Loading a run back
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """A trained run: its config, parameters and classifier.

  ``run.logits(x)`` (or ``run.logits(x, rng)`` for stochastic models) maps
  float32 images in [0,1] shaped like the dataset's examples (NHWC, e.g.
  ``[B, 28, 28, 1]``) to logits ``[B, C]``; it is a pure JAX function of
  ``x`` (jit/grad/vmap work), closing over ``run.params``.
  """

  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  params: Any
  method: methods.Method
  epoch: int

  @property
  def stochastic(self) -> bool:
    return self.method.stochastic

  def apply_fn(self, params, x, rng=None):
    """``(params, x, rng) -> logits``: the same classifier with explicit params."""
    return self.method.logits(params, x, rng)

  def logits(self, x, rng=None):
    if self.stochastic and rng is None:
      raise ValueError('this model is stochastic: call run.logits(x, rng) with a jax.random key')
    return self.method.logits(self.params, jnp.asarray(x, jnp.float32), rng)

  @property
  def results(self) -> dict | None:
    path = self.workdir / 'results.json'
    return runio.read_json(path) if path.exists() else None


def member_names(workdir: str | pathlib.Path) -> list[str]:
  path = pathlib.Path(workdir) / 'results.json'
  if path.exists():
    return [r['name'] for r in runio.read_json(path).get('runs', [])]
  return sorted(p.parent.name for p in pathlib.Path(workdir).glob('*/config.json'))


def load_run(workdir: str | pathlib.Path, member: str | None = None) -> Run:
  """Loads a trained run (``member`` names one model of a multi-model experiment)."""
  workdir = pathlib.Path(workdir)
  if member:
    workdir = workdir / member
  from geomrobust import sweep_experiment
  if sweep_experiment.is_member(workdir):
    # A member of a vmapped sweep: its params are a slice of the stacked checkpoint.
    return sweep_experiment.load_member(workdir)
  cfg_path = workdir / 'config.json'
  if not cfg_path.exists():
    raise FileNotFoundError(f'no run in {workdir} (config.json missing)')
  config = config_lib.with_defaults(runio.read_json(cfg_path))
  if not (workdir / 'checkpoints').exists():
    names = member_names(workdir)
    if names:
      raise ValueError(f'{workdir} holds several models; call load_run({str(workdir)!r}, member) with member '
                       f'one of: {", ".join(names)}')
    raise FileNotFoundError(f'no checkpoints in {workdir}: the run has not trained an epoch yet')
  num_classes = data_lib.get_spec(config.dataset).num_classes
  method = _build(config, num_classes)
  params, epoch = loop.restore_params(workdir)
  return Run(workdir=workdir, config=config, params=jax.tree.map(jnp.asarray, params), method=method, epoch=epoch)


def evaluate_workdir(workdir: str | pathlib.Path, eval_overrides: list[tuple[str, str]], data_dir: str | None,
                     *, log=print) -> dict:
  """Re-evaluates a trained run (every member) with the current eval config."""
  workdir = pathlib.Path(workdir)
  from geomrobust import sweep_experiment
  if sweep_experiment.is_sweep(workdir):
    return sweep_experiment.evaluate_sweep(workdir, eval_overrides, data_dir, log=log)
  names = [n for n in member_names(workdir) if (workdir / n / 'checkpoints').exists()] \
      if not (workdir / 'checkpoints').exists() else ['']
  if not names:
    raise FileNotFoundError(f'no trained run in {workdir}')
  out = {}
  for name in names:
    run = load_run(workdir, name or None)
    cfg = config_lib.apply_overrides(run.config, eval_overrides)
    mesh = parallel.make_mesh(int(cfg.parallel.num_devices))
    data = prepare_data(cfg, data_dir)
    res = evaluate_method(run.method, run.params, data, cfg, mesh, log=log, tag=f'[{name}] ' if name else '')
    old = run.results or {}
    res['timing'] = dict(old.get('timing', {}), **res['timing'])
    runio.atomic_write_text(run.workdir / 'config.json', config_lib.to_json(cfg) + '\n')
    write_results(run.workdir, cfg, res)
    out[name] = res
  if names != ['']:
    top_path = workdir / 'results.json'
    top = runio.read_json(top_path) if top_path.exists() else {}
    top['table'] = report.summary_table(out)
    runio.write_json(top_path, top)
    report.write_experiment_report(workdir, ml_collections.ConfigDict(runio.read_json(workdir / 'config.json')),
                                   top, out)
  return out
