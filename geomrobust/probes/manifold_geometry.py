"""Manifold geometry (MFTMA) of class and exemplar manifolds, per layer and eps.

The stochastic-neurons paper's geometry (papers/stochastic.md, "MFTMA" and
"Manifolds to build"): for each manifold kind and attack size eps, the
per-layer point clouds of ``geometry.manifolds`` go through
``geometry.mftma.analyze`` once per projection seed, and the probe reports
the mean and the std over projection seeds of capacity, radius, dimension,
center correlation, K, the participation ratio and the 90%-variance
dimension (std is null for a layer narrow enough to need no projection).
Runs in the generic probe path (``config.probes.manifold_geometry``) or
alone: ``python launch.py --analyze=WORKDIR`` (``--config.geometry.*`` set
these options). Writes ``geometry.json`` (this output) and ``geometry.png``
(capacity, radius, dimension, center correlation vs layer, one line per eps,
class and exemplar manifolds side by side) into the run folder.

Class manifolds are taken from the test data the probe has: the larger of
the evaluation set and the per-epoch test split (both start at the test
set's beginning, so the first M images of a class are the same in either);
``--analyze`` uses the whole test set.

Options (``config.probes.manifold_geometry``; defaults from the paper):
  eps               attack sizes, L-inf on the input scale (default the
                    paper's MNIST grid 0, 0.05, 0.1, 0.2, 0.3; set it for
                    other datasets). eps 0 is the clean input.
  kinds             which manifolds: class, exemplar (default both).
  classes           P of the class manifolds: the first P classes (10).
  per_class         M of the class manifolds: the first M test images of each class (50).
  exemplars         P of the exemplar manifolds: the first P test images (50).
  repeats           M of the exemplar manifolds: attacked copies of each image (50).
  n_t               Gaussian vectors per manifold in MFTMA (200).
  kappa             MFTMA margin (0).
  projection_seeds  random projections of a layer wider than max_features (5).
  max_features      layers wider than this are projected to it (2000).
  steps             PGD steps (16); random start, cross-entropy loss.
  step_fraction     PGD step size as a fraction of eps (0.25: eps/4).
  eot_samples       noise draws averaged per PGD gradient, stochastic models
                    only (0: the run's eval.eot_samples).
  batch_size        examples per compiled attack / feature call (500).
  seed              seeds the attack starts, the model's noise and MFTMA's
                    Gaussian vectors (0); projection seeds are 0..S-1.
  layers            which layers to measure: indices into [pixels,
                    representations..., logits], negative from the end
                    (-2,-1: the last hidden layer and the logits); empty = all.

Exemplar manifolds at eps 0 of a deterministic model are M copies of one
point, as are the layers before a stochastic model's noise, and PGD from
different starts can converge to one vertex of the eps-box (a collapsed
manifold at eps > 0, common with 16 sign steps of eps/4). A manifold that is
one point is measured as exactly one point (MFTMA's point limit: radius 0,
dimension 0, capacity 2 at kappa 0) and counted (``collapsed``; the table
says "k/P one point"); a layer where every manifold is one point, and eps 0
exemplars of a deterministic model, are skipped with the reason
(``skipped``), never reported as NaN.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Callable, Mapping

import jax
import ml_collections
import numpy as np

from geomrobust import config as config_lib
from geomrobust import runio
from geomrobust.data import source as source_lib
from geomrobust.geometry import manifolds as manifolds_lib
from geomrobust.geometry import mftma
from geomrobust.probes import base

DEFAULTS = dict(eps=(0.0, 0.05, 0.1, 0.2, 0.3), kinds=manifolds_lib.KINDS, classes=10, per_class=50, exemplars=50,
                repeats=50, n_t=200, kappa=0.0, projection_seeds=5, max_features=2000, steps=16, step_fraction=0.25,
                eot_samples=0, batch_size=500, seed=0, layers=())

# The numbers reported per (kind, eps, layer); the plot shows the first four.
METRICS = ('capacity', 'radius', 'dimension', 'center_correlation', 'K', 'participation_ratio', 'dimension_90')
PER_MANIFOLD = ('capacity_all', 'radius_all', 'dimension_all')
PLOTTED = ('capacity', 'radius', 'dimension', 'center_correlation')
JSON_FILE = 'geometry.json'
PLOT_FILE = 'geometry.png'
COMPARISON_PLOT = 'geometry_comparison.png'   # a family's members side by side


def resolve_options(*layers: Mapping) -> dict:
  """DEFAULTS updated by each mapping in turn (later wins), types as DEFAULTS'.
  Unknown names, bad types and bad kinds raise a one-line ConfigError;
  ranges are checked by :class:`ManifoldGeometry` (its ``BOUNDS``)."""
  out = dict(DEFAULTS)
  for layer in layers:
    for k, v in (layer or {}).items():
      if k not in DEFAULTS:
        raise config_lib.ConfigError(f'unknown manifold_geometry option {k!r}; valid: {", ".join(DEFAULTS)}')
      out[k] = _like(k, v, DEFAULTS[k])
  if not out['eps'] or not out['kinds']:
    raise config_lib.ConfigError('manifold_geometry needs at least one eps and one kind (e.g. eps=0,0.1)')
  bad = [k for k in out['kinds'] if k not in manifolds_lib.KINDS]
  if bad:
    raise config_lib.ConfigError(f'unknown manifold kind {bad[0]!r}; kinds are {", ".join(manifolds_lib.KINDS)}')
  return out


def _like(name: str, value, default):
  """``value`` as the type of ``default`` (JSON gives lists for tuples)."""
  try:
    if isinstance(default, tuple):
      value = (value,) if isinstance(value, (str, int, float)) else value
      return tuple((type(default[0]) if default else int)(v) for v in value)
    if isinstance(default, int) and (isinstance(value, bool) or not float(value).is_integer()):
      raise ValueError
    return type(default)(value)
  except (TypeError, ValueError):
    raise config_lib.ConfigError(f'manifold_geometry option {name}={value!r}: expected a value like '
                                 f'{default!r}') from None


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy on the points of ``logits [P, C, M]``; ``labels [P]`` one per manifold."""
  return float(np.mean(logits.argmax(axis=1) == np.asarray(labels)[:, None]))


def _mean_std(values: list) -> tuple[float, float | None]:
  """Mean and sample std (ddof 1; None for one value)."""
  a = np.asarray(values, np.float64)
  return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def summarize_layer(per_seed: list[dict]) -> dict:
  """One layer's ``mftma.analyze`` outputs (one per projection seed) ->
  ``{metric: mean, metric_std: std over seeds (None for one seed),
  capacity_all...: per-manifold means over seeds, per_seed: [{metric: value}]}``."""
  out = {}
  for m in METRICS:
    out[m], out[f'{m}_std'] = _mean_std([r[m] for r in per_seed])
  for m in PER_MANIFOLD:
    out[m] = np.mean([r[m] for r in per_seed], axis=0).tolist()
  out['features'] = int(per_seed[0]['features'])
  out['per_seed'] = [{m: r[m] for m in METRICS} for r in per_seed]
  bad = [m for m in METRICS if not math.isfinite(out[m])]
  warnings = [f'MFTMA returned non-finite {", ".join(bad)}'] if bad else []
  unsolved = sum(r.get('unsolved', 0) for r in per_seed)
  if unsolved:
    warnings.append(f'{unsolved} anchor problems missed the solver tolerance')
  if warnings:
    # Kept visible (runio writes NaN as the string "nan"), with the reason.
    out['warning'] = '; '.join(warnings)
  return out


class ManifoldGeometry(base.Probe):
  kind = 'geometry'
  BOUNDS = {'eps': config_lib.number(0, example=0.1), 'classes': config_lib.integer(2, example=10),
            'per_class': config_lib.integer(2, example=50), 'exemplars': config_lib.integer(2, example=50),
            'repeats': config_lib.integer(2, example=50), 'n_t': config_lib.integer(1, example=200),
            'kappa': config_lib.number(0, example=0.0), 'projection_seeds': config_lib.integer(1, example=5),
            'max_features': config_lib.integer(1, example=2000), 'steps': config_lib.integer(1, example=16),
            'step_fraction': config_lib.number(above=0, example=0.25), 'eot_samples': config_lib.integer(0),
            'batch_size': config_lib.integer(1, example=500), 'seed': config_lib.integer(0),
            'layers': config_lib.integer(-64, 63, example=-2)}

  def __init__(self, name: str, options: ml_collections.ConfigDict):
    super().__init__(name, options)
    self.opts = resolve_options(options)
    # Progress lines (one per kind and eps); --analyze points it at its own log.
    self.log: Callable[[str], None] = print

  def builder(self, inp: base.ProbeInput) -> manifolds_lib.ManifoldBuilder:
    o = self.opts
    eot = int(o['eot_samples'] or inp.config.eval.get('eot_samples', 1))
    return self.compiled(('builder', inp.method.classifier_key(), inp.box, eot, o['layers']), lambda: manifolds_lib.ManifoldBuilder(
        inp.method, box=inp.box, steps=o['steps'], step_fraction=o['step_fraction'], eot_samples=eot,
        batch_size=o['batch_size'], max_features=o['max_features'], projection_seeds=o['projection_seeds'],
        layers=o['layers']))

  @staticmethod
  def test_images(inp: base.ProbeInput) -> tuple[np.ndarray, np.ndarray]:
    """The larger of the evaluation set and the per-epoch test split, as model inputs."""
    if inp.test_x is not None and len(inp.test_y) > len(inp.eval_y):
      return np.asarray(source_lib.to_model_input(inp.test_x)), np.asarray(inp.test_y)
    return np.asarray(inp.eval_x, np.float32), np.asarray(inp.eval_y)

  def __call__(self, inp: base.ProbeInput) -> dict:
    o = self.opts
    x, y = self.test_images(inp)
    builder = self.builder(inp)
    layers = builder.layers(inp.params, x[:1])
    sizes = {'class': (o['classes'], o['per_class']), 'exemplar': (o['exemplars'], o['repeats'])}
    self.log(f'manifold_geometry: {", ".join(f"{k} {sizes[k][0]} x {sizes[k][1]}" for k in o["kinds"])} at eps '
             f'{",".join(f"{e:g}" for e in o["eps"])}; layers ' + ', '.join(
                 f'{l.name} {l.width}' + (f'->{l.features} x{l.seeds}' if l.projected else '') for l in layers))
    key = jax.random.key(o['seed'])
    runs = []
    for kind in o['kinds']:
      p, m = sizes[kind]
      for eps in o['eps']:
        t0 = time.perf_counter()
        run = dict(kind=kind, eps=float(eps), P=p, M=m, layers={})
        if kind == 'exemplar' and eps == 0 and not inp.method.stochastic:
          reason = (f'eps=0 on a deterministic model: the {m} repeats of an image are one point (an exemplar '
                    'manifold has no extent to measure)')
          run.update(accuracy=None, skipped=reason, layers={l.name: {'skipped': reason} for l in layers})
          runs.append(run)
          self.log(f'manifold_geometry: {kind} eps={eps:g}: skipped ({reason})')
          continue
        # Same key for every eps of a kind: the attack starts scale with eps (common random numbers).
        build = builder.class_manifolds if kind == 'class' else builder.exemplar_manifolds
        sizes_kw = dict(classes=p, per_class=m) if kind == 'class' else dict(exemplars=p, repeats=m)
        # Keyed by the kind itself, so asking for one kind gives the same manifolds as asking for both.
        clouds = build(inp.params, x, y, eps=float(eps), key=jax.random.fold_in(key, manifolds_lib.KINDS.index(kind)),
                       **sizes_kw)
        t_build = time.perf_counter() - t0
        run['accuracy'] = None if 'logits' not in clouds or layers[-1].projected else _accuracy(
            clouds['logits'][0], np.arange(p) if kind == 'class' else y[:p])
        for name, cloud in clouds.items():
          run['layers'][name] = self._analyze(cloud, o)
        run['seconds'] = time.perf_counter() - t0
        runs.append(run)
        acc = '' if run['accuracy'] is None else f', accuracy on them {100 * run["accuracy"]:.1f}%'
        self.log(f'manifold_geometry: {kind} eps={eps:g}: {p * m} images {"attacked and " if eps else ""}read in '
                 f'{t_build:.1f} s{acc}, MFTMA of {len(clouds)} layers in {run["seconds"] - t_build:.1f} s')
    return dict(options=dict(o, eot_samples=builder.eot_samples), stochastic=bool(inp.method.stochastic),
                layers=[dict(name=l.name, width=l.width, features=l.features, projection_seeds=l.seeds)
                        for l in layers], runs=runs)

  def _analyze(self, cloud: np.ndarray, o: dict) -> dict:
    """One layer's clouds ``[S, P, N', M]`` -> its summary, or ``{'skipped': why}``.

    A manifold whose points coincide within float noise
    (``manifolds.collapsed``) is set to exactly its center, so MFTMA gives
    the point limit (radius 0, dimension 0, capacity 1 / E[(t + kappa)_+^2],
    2 at kappa 0) rather than the shape of float noise; ``collapsed`` counts
    them. A layer where every manifold is one point has nothing to measure
    and is skipped.
    """
    p, m = cloud.shape[1], cloud.shape[3]
    flat = manifolds_lib.collapsed(cloud[0])
    n_flat = int(flat.sum())
    if n_flat == p:
      return {'skipped': f'all {p} manifolds are one point (their {m} points coincide at this layer): no extent '
                         'to measure', 'collapsed': n_flat}
    if n_flat:
      cloud = cloud.copy()
      cloud[:, flat] = cloud[:, flat].mean(axis=3, keepdims=True)
    per_seed = [mftma.analyze(c, kappa=o['kappa'], n_t=o['n_t'], seed=o['seed'], max_features=o['max_features'],
                              projection_seed=s) for s, c in enumerate(cloud)]
    out = dict(summarize_layer(per_seed), collapsed=n_flat)
    if n_flat:
      out['note'] = (f'{n_flat} of {p} manifolds are one point (all {m} points coincide, e.g. every PGD start '
                     'converged to the same vertex of the eps-box): measured as points')
    return out

  # -- tables and report ------------------------------------------------------

  def summary(self, out: dict) -> dict[str, float]:
    """Logits-layer capacity of class manifolds and radius of exemplar
    manifolds at the smallest and largest eps run (when measured)."""
    flat = {}
    for kind, metric in (('class', 'capacity'), ('exemplar', 'radius')):
      measured = {r['eps']: r['layers']['logits'][metric] for r in out.get('runs', [])
                  if r['kind'] == kind and metric in r['layers'].get('logits', {})}
      for eps in sorted({min(measured), max(measured)} if measured else ()):
        flat[f'{kind}_{metric}_logits_eps{eps:g}'] = measured[eps]
    return flat

  def comparison_summary(self, out: dict) -> dict:
    """Capacity, radius and dimension of the class and exemplar manifolds at
    the last hidden layer (the last one measured before the logits), at the
    smallest and the largest eps measured: ``{kind}_{metric}_eps{eps}``,
    plus ``mftma_layer`` (its name)."""
    names = [l['name'] for l in out.get('layers', []) if l['name'] not in ('logits', 'pixels')]
    if not names:
      return {}
    layer, flat = names[-1], {'mftma_layer': names[-1]}
    for kind in ('class', 'exemplar'):
      measured = {r['eps']: r['layers'][layer] for r in out.get('runs', [])
                  if r['kind'] == kind and 'capacity' in r['layers'].get(layer, {})}
      for eps in sorted({min(measured), max(measured)} if measured else ()):
        for metric in ('capacity', 'radius', 'dimension'):
          flat[f'{kind}_{metric}_eps{eps:g}'] = measured[eps][metric]
    return flat

  def report(self, out: dict, workdir: pathlib.Path) -> list[str]:
    workdir = pathlib.Path(workdir)
    runio.write_json(workdir / JSON_FILE, out)
    plot_geometry(workdir / PLOT_FILE, out, f'{workdir.name}: manifold geometry (MFTMA) per layer')
    o = out['options']
    lines = ['## Manifold geometry (MFTMA)', '',
             f'Class manifolds: first {o["per_class"]} test images of each of the first {o["classes"]} classes; '
             f'exemplar manifolds: the first {o["exemplars"]} test images, each attacked {o["repeats"]} times from '
             f'independent random starts. L-inf PGD {o["steps"]} steps, step {o["step_fraction"]:g} eps'
             + (f', EOT over {o["eot_samples"]} noise draws' if out.get('stochastic') else '') +
             f'; MFTMA with n_t = {o["n_t"]}, kappa = {o["kappa"]:g}; layers wider than {o["max_features"]} '
             f'features randomly projected to it ({o["projection_seeds"]} projections: mean ± std). '
             f'Full output: `{JSON_FILE}`.', '', f'![manifold geometry]({PLOT_FILE})', '']
    for kind in dict.fromkeys(r['kind'] for r in out['runs']):
      lines += [f'### {kind.capitalize()} manifolds', '',
                '| eps | layer | capacity | radius | dimension | center corr. | K | PR | accuracy (%) |',
                '|---|---|---|---|---|---|---|---|---|']
      for run in (r for r in out['runs'] if r['kind'] == kind):
        acc = '–' if run.get('accuracy') is None else f'{100 * run["accuracy"]:.1f}'
        if run.get('skipped'):
          lines.append(f'| {run["eps"]:g} | all | skipped: {run["skipped"]} | | | | | | {acc} |')
          continue
        for name, v in run['layers'].items():
          if 'skipped' in v:
            lines.append(f'| {run["eps"]:g} | {name} | skipped: {v["skipped"]} | | | | | | {acc} |')
            continue
          cells = [_pm(v, m) for m in ('capacity', 'radius', 'dimension', 'center_correlation', 'K',
                                       'participation_ratio')]
          flat = f' ({v["collapsed"]}/{run["P"]} one point)' if v.get('collapsed') else ''
          lines.append(f'| {run["eps"]:g} | {name}{flat} | ' + ' | '.join(cells) + f' | {acc} |')
      lines.append('')
    return lines

  @classmethod
  def family_report(cls, outs: dict[str, dict], workdir: pathlib.Path) -> list[str]:
    """The members side by side: per kind, one row per (member, eps), one
    column per layer position (capacity / radius / dimension / center
    correlation), and ``geometry_comparison.png``. Layers are matched by
    position (networks of one family share their depth; a column names every
    member's layer there, e.g. ``front/noise``)."""
    outs = {name: out for name, out in outs.items() if out and out.get('runs')}
    if len(outs) < 2:
      return []   # one analysed member: its own report has everything
    columns = _layer_columns(outs)
    plot_comparison(pathlib.Path(workdir) / COMPARISON_PLOT, outs, columns)
    lines = ['## Manifold geometry (MFTMA) of the members', '',
             'Each cell: capacity / radius / dimension / center correlation (mean over projections; the members\' '
             'report.md have the std, K and the participation ratio). Layers matched by position. '
             '"–": skipped (e.g. exemplar manifolds at eps 0 of a deterministic network are points).', '',
             f'![geometry of the members]({COMPARISON_PLOT})', '']
    kinds = list(dict.fromkeys(r['kind'] for out in outs.values() for r in out['runs']))
    for kind in kinds:
      lines += [f'### {kind.capitalize()} manifolds', '', '| model | eps | ' + ' | '.join(columns) + ' |',
                '|---|---|' + '---|' * len(columns)]
      for name, out in outs.items():
        layer_names = [l['name'] for l in out['layers']]
        for run in (r for r in out['runs'] if r['kind'] == kind):
          cells = []
          for layer in layer_names:
            v = run.get('layers', {}).get(layer, {})
            cells.append('–' if 'capacity' not in v else ' / '.join(f'{float(v[m]):.3g}' for m in PLOTTED))
          lines.append(f'| {name} | {run["eps"]:g} | ' + ' | '.join(cells) + ' |')
      lines.append('')
    return lines


def _layer_columns(outs: dict[str, dict]) -> list[str]:
  """Column names by layer position: the distinct names members give it."""
  depth = max(len(out['layers']) for out in outs.values())
  return ['/'.join(dict.fromkeys(out['layers'][i]['name'] for out in outs.values() if i < len(out['layers'])))
          for i in range(depth)]


def _layer_axis(ax, kind: str, metric: str, layers: list[str]) -> None:
  ax.set_title(f'{kind}: {metric.replace("_", " ")}', fontsize=9)
  ax.set_xticks(range(len(layers)))
  ax.set_xticklabels(layers, rotation=45, ha='right', fontsize=7)
  ax.grid(alpha=0.3)


def plot_comparison(path: pathlib.Path, outs: dict[str, dict], columns: list[str]) -> None:
  """Rows: manifold kinds; columns: capacity, radius, dimension, center
  correlation vs layer position; colour: member; line style: eps."""
  from geomrobust.runio import report
  plt = report._plt()
  kinds = list(dict.fromkeys(r['kind'] for out in outs.values() for r in out['runs']))
  eps_all = sorted({r['eps'] for out in outs.values() for r in out['runs']})
  styles = dict(zip(eps_all, ['-', '--', ':', '-.'] * len(eps_all)))
  colours = dict(zip(outs, plt.cm.tab10(np.arange(len(outs)) % 10)))
  fig, axes = plt.subplots(len(kinds), len(PLOTTED), figsize=(3.4 * len(PLOTTED), 2.9 * len(kinds)), dpi=110,
                           squeeze=False)
  for row, kind in zip(axes, kinds):
    for ax, metric in zip(row, PLOTTED):
      for name, out in outs.items():
        layer_names = [l['name'] for l in out['layers']]
        for run in (r for r in out['runs'] if r['kind'] == kind):
          vals = [float(run.get('layers', {}).get(n, {}).get(metric, np.nan)) for n in layer_names]
          if not np.all(np.isnan(vals)):
            ax.plot(range(len(vals)), vals, styles[run['eps']], marker='o', ms=3, lw=1.2, color=colours[name],
                    label=f'{name}, eps={run["eps"]:g}')
      _layer_axis(ax, kind, metric, columns)
    if row[0].get_legend_handles_labels()[0]:
      row[0].legend(fontsize=6)
  fig.suptitle('manifold geometry (MFTMA) per layer: colour = model, line style = eps', fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _pm(v: dict, m: str) -> str:
  std = v.get(f'{m}_std')
  # float(): a stored result holds NaN as the string "nan".
  return f'{float(v[m]):.4g}' + ('' if std is None or float(std) == 0 else f' ± {float(std):.2g}')


def plot_geometry(path: pathlib.Path, out: dict, title: str = '') -> None:
  """Rows: manifold kinds; columns: capacity, radius, dimension, center
  correlation vs layer; one line per eps (error bars: std over projections)."""
  from geomrobust.runio import report
  plt = report._plt()
  kinds = list(dict.fromkeys(r['kind'] for r in out['runs']))
  names = [l['name'] for l in out['layers']]
  fig, axes = plt.subplots(len(kinds), len(PLOTTED), figsize=(3.4 * len(PLOTTED), 2.9 * len(kinds)), dpi=110,
                           squeeze=False)
  eps_all = sorted({r['eps'] for r in out['runs']})
  colours = dict(zip(eps_all, plt.cm.viridis(np.linspace(0, 0.9, len(eps_all)))))
  for row, kind in zip(axes, kinds):
    for ax, metric in zip(row, PLOTTED):
      for run in (r for r in out['runs'] if r['kind'] == kind):
        vals = [float(run['layers'].get(n, {}).get(metric, np.nan)) for n in names]
        errs = [float(run['layers'].get(n, {}).get(f'{metric}_std') or 0.0) for n in names]
        if np.all(np.isnan(np.asarray(vals, float))):
          if ax is row[0]:  # skipped (e.g. exemplar eps 0 of a deterministic model): said in the legend
            ax.plot([], [], ' ', label=f'eps={run["eps"]:g}: skipped')
          continue
        ax.errorbar(range(len(names)), vals, yerr=errs, marker='o', ms=3, lw=1.2, capsize=2,
                    color=colours[run['eps']], label=f'eps={run["eps"]:g}')
      _layer_axis(ax, kind, metric, names)
    if row[0].get_legend_handles_labels()[0]:
      row[0].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


PROBE = ManifoldGeometry
