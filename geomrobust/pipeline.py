"""The path every trained model takes, whichever executor trained it: data
for a config, workdir checks, the shared evaluation plus the configured
probes, writing results.json / report.md, and loading a run back.

The runner (``experiment``) builds on this module for every member, whether
trained alone or stacked in a vmapped group; this module imports no runner.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from geomrobust import config as config_lib
from geomrobust import data as data_lib
from geomrobust import evaluation
from geomrobust import methods
from geomrobust import models
from geomrobust import probes as probes_lib
from geomrobust import runio
from geomrobust.data import generated
from geomrobust.data import source as source_lib
from geomrobust.data import subsets
from geomrobust.runio import report
from geomrobust.training import loop
from geomrobust.training import sweep as sweep_lib

# A member trained inside a stacked (vmapped) group: where its slice sits.
MEMBER_FILE = 'sweep_member.json'

# A member adopted from a finished run without its results: where it came from.
REUSED_FILE = 'reused_from.json'

# Config sections that may change between a run and its resume/re-evaluation.
_NOT_TRAINING_KEYS = ('eval', 'probes', 'only', 'members', 'smoke', 'parallel', 'settings', 'setting', 'shared',
                      'comparison')
# Also free to differ between a finished run and a member that reuses it (``find_reusable``).
_NOT_REUSE_KEYS = ('experiment', 'smoke_run')


@dataclasses.dataclass
class Data:
  """The arrays a member trains and is evaluated on.

  Stored data: ``train_images`` uint8 ``[N, H, W, C]`` images (or float32 of
  any shape), ``train_labels`` int32 ``[N]``. Generated data: ``train_images``
  is the dataset's ``data.source.GeneratorSource`` (fresh batches made on the
  device inside the compiled epoch) and ``train_labels`` None; the test split
  is the source's fixed test set. ``box``: the valid input range attacks clip
  to ((0, 1) for images, None for unbounded data).
  """
  train_images: Any
  train_labels: np.ndarray | None
  test_images: np.ndarray    # the split used for per-epoch logs
  test_labels: np.ndarray
  eval_images: np.ndarray    # the first eval.num_examples of the full test split
  eval_labels: np.ndarray
  num_classes: int
  source: str
  box: tuple[float, float] | None = (0.0, 1.0)


def prepare_data(config: ml_collections.ConfigDict, data_dir: str | None) -> Data:
  d = config.data
  n_eval = int(config.eval.num_examples)
  spec = data_lib.get_spec(config.dataset)
  if getattr(spec, 'generated', False):
    src = generated.make_source(config.dataset, d.get(config.dataset))
    te_x, te_y = src.test
    n_eval = n_eval or len(te_y)
    return Data(src, None, te_x, te_y, te_x[:n_eval], te_y[:n_eval], spec.num_classes,
                f'generated:{config.dataset}', spec.box)
  ds = data_lib.load_dataset(config.dataset, data_dir, verify_checksums=bool(d.verify),
                             expected_counts=bool(d.verify))
  tr_x, tr_y = subsets.first_examples(ds.train_images, ds.train_labels, examples=int(d.train_examples),
                                      per_class=int(d.train_per_class), num_classes=ds.num_classes)
  te_x, te_y = subsets.first_examples(ds.test_images, ds.test_labels, examples=int(d.test_examples),
                                      per_class=int(d.test_per_class), num_classes=ds.num_classes)
  n_eval = n_eval or len(ds.test_labels)
  return Data(tr_x, tr_y, te_x, te_y, ds.test_images[:n_eval], ds.test_labels[:n_eval],
              ds.num_classes, ds.source, ds.box)


def model_input(x) -> jax.Array:
  """Stored examples as the model sees them: uint8 -> float32 / 255, floats as is."""
  return source_lib.to_model_input(jnp.asarray(x))


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
  # their defaults, so upgrading geomrobust does not orphan finished runs
  # (on both sides: a member that replaces a whole section, e.g.
  # model={'name': 'mlp', 'hidden': ()}, compares equal to its stored self).
  old = _training_view(config_lib.fill_defaults(runio.read_json(path)))
  new = _training_view(config_lib.fill_defaults(json.loads(config_lib.to_json(config))))
  diff = _config_diff(old, new)
  if diff:
    raise config_lib.ConfigError(
        f'{workdir} holds a run with a different config ({"; ".join(diff[:4])}); pass a new --workdir, '
        'or delete that folder to start over')


def _reuse_view(cfg: dict) -> dict:
  view = _training_view(config_lib.fill_defaults(cfg))
  return {k: v for k, v in view.items() if k not in _NOT_REUSE_KEYS}


def find_reusable(folders, config: ml_collections.ConfigDict) -> pathlib.Path | None:
  """The first finished run among ``folders`` (each a run folder, or a
  family's folder holding member folders) trained with exactly ``config``'s
  training fields (the experiment's name aside), or None. Finished: its
  ``results.json`` and ``checkpoints/`` exist (stacked sweep members are not
  reused: their weights live in their group's checkpoint)."""
  want = _reuse_view(json.loads(config_lib.to_json(config)))
  for folder in folders:
    folder = pathlib.Path(folder)
    for run in [folder] + sorted(p for p in folder.iterdir() if p.is_dir()):
      if not ((run / 'config.json').exists() and (run / 'results.json').exists() and (run / 'checkpoints').is_dir()):
        continue
      try:
        stored = runio.read_json(run / 'config.json')
      except ValueError:
        continue   # damaged: not a candidate
      if _reuse_view(stored) == want:
        return run
  return None


def adopt_run(source: pathlib.Path, dest: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Makes ``dest`` a copy of the finished run ``source`` for the member
  ``config`` (same training fields): its checkpoints and metrics, under the
  member's own config.json. When the evaluation and probes are the same too,
  its results, masks, report and plots come along (nothing to recompute);
  otherwise the member is evaluated as usual (its training is already done).
  ``results['reused_from']`` names the source."""
  dest.mkdir(parents=True, exist_ok=True)
  stored = config_lib.fill_defaults(runio.read_json(source / 'config.json'))
  mine = config_lib.fill_defaults(json.loads(config_lib.to_json(config)))
  same_eval = all(stored.get(k) == mine.get(k) for k in ('eval', 'probes', 'dataset', 'data'))
  for item in sorted(source.iterdir()):
    if item.name in ('config.json', 'run.lock', 'results.json') or item.is_symlink():
      continue
    if item.is_dir():
      if item.name == 'checkpoints' or same_eval:
        shutil.copytree(item, dest / item.name, dirs_exist_ok=True)
    elif item.name == 'metrics.jsonl' or same_eval:
      shutil.copy2(item, dest / item.name)
  runio.atomic_write_text(dest / 'config.json', config_lib.to_json(config) + '\n')
  if same_eval:
    results = runio.read_json(source / 'results.json')
    results.update(experiment=config.get('experiment', ''), reused_from=str(source))
    runio.write_json(dest / 'results.json', results)
  else:
    runio.write_json(dest / REUSED_FILE, dict(reused_from=str(source)))


def init_params_from(spec: str):
  """The parameters ``config.init_from`` names: ``'RUN_DIR'`` (its final
  weights; a family or sweep member's own folder) or ``'RUN_DIR@PHASE'`` (the
  snapshot at the end of that phase)."""
  path, _, phase = str(spec).partition('@')
  run_dir = pathlib.Path(path)
  if not (run_dir / 'config.json').exists():
    raise config_lib.ConfigError(f'init_from={spec!r}: no run in {run_dir} (config.json missing); give a trained '
                                 "run's folder, e.g. runs/standard_mnist or runs/isometric_mnist/ce")
  return restore_member_params(run_dir, phase=phase or None)[0]


def restore_member_params(run_dir: pathlib.Path, *, phase: str | None = None):
  """``(params, epoch)`` of one run folder: its own checkpoint, or its slice
  ``[seed_index, value_index]`` of a stacked group's checkpoint when the
  folder holds the manifest ``sweep_member.json``. ``phase``: that phase's
  end snapshot instead of the last checkpoint."""
  if (run_dir / MEMBER_FILE).exists():
    info = runio.read_json(run_dir / MEMBER_FILE)
    stacked, epoch = sweep_lib.restore_stacked_params(run_dir.parent / info['group_dir'], phase=phase)
    params = jax.tree.map(lambda a: a[info['seed_index'], info['value_index']], stacked)
  else:
    params, epoch = loop.restore_params(run_dir, phase=phase)
  return jax.tree.map(jnp.asarray, params), epoch


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails fast (before data or training) on unknown names and bad combinations."""
  num_classes = data_lib.get_spec(config.dataset).num_classes
  method = _build(config, num_classes)
  method.phases()
  init = str(config.get('init_from', '') or '')
  if init and not (pathlib.Path(init.partition('@')[0]) / 'config.json').exists():
    raise config_lib.ConfigError(f'init_from={init!r}: no run in {init.partition("@")[0]} (config.json missing)')
  # The DLR loss needs 3 classes; its targeted form (APGD-T) 4.
  needs = {r.name: 4 if r.attack == 'apgd_t' else 3 for r in evaluation.recipes.resolve(config.eval)
           if evaluation.recipes.loss_name(r) == 'dlr'}
  dlr = [name for name, k in needs.items() if num_classes < k]
  if dlr:
    keep = [a for a in config.eval.attacks if a not in dlr]
    raise config_lib.ConfigError(f'eval.attacks has {", ".join(dlr)} but {config.dataset} has {num_classes} classes; '
                                 f'the DLR loss needs at least 3 (targeted, apgd_t: 4) (pass '
                                 f'--config.eval.attacks={",".join(keep)})')
  if method.stochastic:
    # A stochastic model is never evaluated without EOT (evaluation.suite refuses it too, after training).
    if int(config.eval.eot_samples) < 2:
      raise config_lib.ConfigError(f'model {config.model.name!r} draws noise at evaluation time and needs EOT: '
                                   f'eval.eot_samples={int(config.eval.eot_samples)} must be >= 2 '
                                   '(pass --config.eval.eot_samples=8)')
    if int(config.eval.get('passes', evaluation.suite.MIN_PASSES)) < evaluation.suite.MIN_PASSES:
      raise config_lib.ConfigError(f'model {config.model.name!r} is stochastic: its accuracy is a mean over '
                                   f'eval.passes >= {evaluation.suite.MIN_PASSES} passes, got '
                                   f'{int(config.eval.passes)} (pass --config.eval.passes=5)')


def _build(config: ml_collections.ConfigDict, num_classes: int):
  model = models.build_model(config.model, num_classes)
  return methods.build_method(config, model, num_classes)


def evaluate_model(method: methods.Method, params, data: Data, config, mesh, *, evaluator: evaluation.Evaluator,
                   probes: list, eval_config=None, log=print, tag='') -> dict:
  """The shared evaluation (``eval_config``, default ``config.eval``) and the
  configured probes of one trained model, as a results dict.

  ``evaluator`` and ``probes`` are built once per experiment so their compiled
  programs serve every member. Probes get the evaluation's adversarial
  examples for the ``(attack, eps)`` pairs they request.
  """
  ev_cfg = eval_config if eval_config is not None else config.eval
  x = model_input(data.eval_images)
  requests = [r for p in probes for r in p.adversarial_requests(config)]
  apply_fn = evaluator.classifier(method.classifier_key(), method.logits)
  ev = evaluator.evaluate(apply_fn, params, x, data.eval_labels, ev_cfg, mesh, stochastic=method.stochastic,
                          log=log, tag=tag, keep_inputs=requests, box=data.box)
  adversarial = ev.pop('adversarial')
  probed = evaluate_probes(method, params, data, config, probes, ev_cfg, adversarial)
  ev['timing']['probe_seconds'] = probed['seconds']
  add_eps_db(ev['robustness'], config.dataset, x)
  # A stochastic model's clean accuracy over passes: clean_accuracy_std, clean_passes, ...
  clean_passes = {k: v for k, v in ev.items() if k.startswith('clean_') and k != 'clean_accuracy'}
  return dict(
      experiment=config.get('experiment', ''), method=config.method.name, dataset=config.dataset,
      seed=int(config.seed), clean_accuracy=ev['clean_accuracy'], **clean_passes, robustness=ev['robustness'],
      eval_examples=ev['eval_examples'], sanity=ev['sanity'], geometry=probed['geometry'],
      probes=probed['probes'], summary=probed['summary'], timing=ev['timing'], convergence=ev['convergence'],
      masks=ev['masks'], smoke=bool(config.get('smoke_run', False)))


def add_eps_db(rows: list[dict], dataset: str, x) -> None:
  """Audio data (a spec with ``signal_peak``): each row's eps also in dB relative
  to the signal, as audio papers state it: ``eps_db = 20 log10(eps / peak)``
  for linf (every waveform is scaled to that peak), ``20 log10(eps / mean ||x||_2)``
  over the evaluated examples for l2. Other data: unchanged."""
  peak = float(getattr(data_lib.get_spec(dataset), 'signal_peak', 0.0) or 0.0)
  if not peak:
    return
  l2 = float(jnp.mean(jnp.sqrt(jnp.sum(jnp.reshape(x, (x.shape[0], -1)) ** 2, axis=1))))
  for r in rows:
    ref = peak if r['norm'] == 'linf' else l2
    r['eps_db'] = float(20 * np.log10(r['eps'] / ref)) if r['eps'] > 0 else None


def evaluate_probes(method: methods.Method, params, data: Data, config, probes: list, ev_cfg,
                    adversarial: dict | None = None) -> dict:
  """Runs ``probes`` on one model: ``{'geometry': {name: out}, 'probes': {name:
  out}, 'summary': {flat numbers}, 'seconds'}``. ``adversarial`` holds the
  evaluation's attacked inputs (``'attack@eps' -> [N, ...]``) probes asked for."""
  t0 = time.perf_counter()
  x = model_input(data.eval_images)
  out = {'geometry': {}, 'probes': {}, 'summary': {}}
  for i, probe in enumerate(probes):

    def adversarial_of(attack: str, eps: float, name=probe.name):
      key = f'{attack}@{float(eps):g}'
      if not adversarial or key not in adversarial:
        raise ValueError(f'probe {name!r} read adversarial examples {key} it did not request')
      return adversarial[key]

    inp = probes_lib.ProbeInput(
        method=method, params=params, config=config, eval_x=x, eval_y=data.eval_labels,
        train_x=None if data.train_labels is None else data.train_images, train_y=data.train_labels,
        test_x=data.test_images, test_y=data.test_labels, box=data.box, key=jax.random.fold_in(jax.random.key(int(ev_cfg.seed)), 1000 + i),
        adversarial=adversarial_of)
    result = probe(inp)
    out['geometry' if probe.kind == 'geometry' else 'probes'][probe.name] = result
    for k, v in probe.summary(result).items():
      if k in out['summary']:
        raise config_lib.ConfigError(f'probes {probe.name!r} and another both report {k!r}; drop one of them')
      out['summary'][k] = v
  out['seconds'] = time.perf_counter() - t0
  return out


def write_results(workdir: pathlib.Path, config, results: dict, probes: list | None = None) -> None:
  masks = results.pop('masks', None)
  if masks is not None:
    # Per-example correctness after each (attack, eps): which examples are robust.
    np.savez_compressed(workdir / 'robust_masks.npz', **{k: np.asarray(v) for k, v in masks.items()})
    results['robust_masks'] = 'robust_masks.npz'
  if (workdir / REUSED_FILE).exists():
    results['reused_from'] = runio.read_json(workdir / REUSED_FILE)['reused_from']
  runio.write_json(workdir / 'results.json', results)
  if probes is None:
    probes = probes_lib.build_probes(config.get('probes'))
  parts = []
  for probe in probes:
    out = results.get('geometry' if probe.kind == 'geometry' else 'probes', {}).get(probe.name)
    if out:
      parts += probe.report(out, workdir)
  report.write_run_report(workdir, config, results, parts)


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
  cfg_path = workdir / 'config.json'
  if not cfg_path.exists():
    raise FileNotFoundError(f'no run in {workdir} (config.json missing)')
  config = config_lib.with_defaults(runio.read_json(cfg_path))
  if not (workdir / 'checkpoints').exists() and not (workdir / MEMBER_FILE).exists():
    names = member_names(workdir)
    if names:
      raise ValueError(f'{workdir} holds several models; call load_run({str(workdir)!r}, member) with member '
                       f'one of: {", ".join(names)}')
    raise FileNotFoundError(f'no checkpoints in {workdir}: the run has not trained an epoch yet')
  num_classes = data_lib.get_spec(config.dataset).num_classes
  params, epoch = restore_member_params(workdir)
  return Run(workdir=workdir, config=config, params=params, method=_build(config, num_classes), epoch=epoch)
