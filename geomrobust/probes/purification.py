"""Feature purification: robust accuracy vs tau with the dense-direction attack, weight purity, the principle.

Spec: ``papers/feature_purification.md``; the measurements are
``geomrobust.geometry.purification``. Per member, at every eps of the run's
shared evaluation (``tau``):

- ``robust``: ``shared`` is the evaluation's worst case recomputed per
  example from its own adversarial inputs (correct under every attack),
  ``dense`` the accuracy under the spec's dense-direction attack
  ``x - s tau M w*/||w*||`` (sparse-coding data only), and ``accuracy`` the
  per-example worst of both (the number the tables use: the dense attack can
  only add errors). ``break_radius``: where ``accuracy`` (with the clean
  accuracy at tau = 0) crosses 1/2, linearly interpolated; None beyond the
  grid.
- ``purity`` of the first-layer matrix ``w [d, m]`` (its neurons in the
  dictionary's basis: top-1 share, dense-mixture cosine, l1/l2), for the
  final weights and, when the method keeps snapshots
  (``method.weight_snapshots``, e.g. ``methods/purification.py``), the clean
  weights and the initialisation.
- When the run trained clean *then* adversarially: the ``principle`` table of
  the first layer (``w = beta w' + v``, ``rho``, cosines to w0, ``|cos(v, M
  w*)|``), the singular-value energy of the update ``W_adv - W_clean``
  (``update``), and the same decomposition for every weight matrix
  (``layers``: conv kernels as ``[h*w*c_in, c_out]``), which is what a
  CIFAR-10 ResNet gets, with a picture of its first conv layer's RGB filters
  at init, after clean and after adversarial training (``first_filters``).

A family of such members gets the cross-member tables of the issue's
contract in its top ``results.json`` (:meth:`Purification.family_results`):
``models``, ``principle``, ``purity``, ``rank``, ``principle_layers`` (the
adversarial member's per-matrix decomposition) and, for members of several
input sizes, ``scaling`` (break radius vs d), with plots in its report.

Options (``config.probes.purification``):
  clean_member, at_member, ideal_member   member names the family tables read
                (defaults 'clean_nn', 'at_nn', 'ideal').
  rank_tau      the tau of the rank table (0 = the middle of the eps grid).
  batch_size    examples per compiled forward call (1000).
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust import config as config_lib
from geomrobust import evaluation
from geomrobust import runio
from geomrobust.geometry import purification as geometry
from geomrobust.parallel import batching
from geomrobust.probes import base

CURVE_PLOT = 'purification_curves.png'
ROBUST_PLOT = 'purification_robust.png'
SCALING_PLOT = 'purification_scaling.png'
FILTER_PLOT = 'purification_filters.png'
FILTERS = 16   # first-layer filters pictured per stage
_DIM_SUFFIX = re.compile(r'_d(\d+)$')


class Purification(base.Probe):
  kind = 'geometry'
  BOUNDS = {'rank_tau': config_lib.number(0), 'batch_size': config_lib.integer(1, example=1000)}

  def adversarial_requests(self, config):
    names = [r.name for r in evaluation.recipes.resolve(config.eval)]
    return [(name, float(eps)) for eps in config.eval.eps for name in names]

  def _predict(self, inp: base.ProbeInput, x) -> np.ndarray:
    """Predicted classes of ``x [N, ...]``, in compiled chunks (one program per classifier)."""
    method = inp.method

    def build():
      bs = int(self.options.get('batch_size', 1000))
      return jax.jit(lambda p, key, xx: batching.map_batches(
          lambda xs: jnp.argmax(method.logits(p, xs[0], jax.random.fold_in(key, xs[1][0])), -1),
          (xx, jnp.arange(xx.shape[0])), bs))

    fn = self.compiled(('predict', method.classifier_key()), build)
    return np.asarray(fn(inp.params, inp.key, jnp.asarray(x, jnp.float32)))

  def _roles(self) -> dict:
    return {'clean': str(self.options.get('clean_member', 'clean_nn')),
            'adversarial': str(self.options.get('at_member', 'at_nn')),
            'ideal': str(self.options.get('ideal_member', 'ideal'))}

  def __call__(self, inp: base.ProbeInput) -> dict:
    cfg, y = inp.config, np.asarray(inp.eval_y)
    task = geometry.task_of(cfg)
    names = [r.name for r in evaluation.recipes.resolve(cfg.eval)]
    clean_ok = self._predict(inp, inp.eval_x) == y
    taus = sorted(float(e) for e in cfg.eval.eps)
    robust = []
    for tau in taus:
      shared = clean_ok.copy()
      for name in names:
        shared &= self._predict(inp, inp.adversarial(name, tau)) == y
      row = {'tau': tau, 'shared': float(shared.mean())}
      if task is not None:
        dense = self._predict(inp, geometry.dense_direction_inputs(inp.eval_x, y, *task, tau)) == y
        row['dense'] = float((dense & clean_ok).mean())
        shared &= dense
      row['accuracy'] = float(shared.mean())
      robust.append(row)
    clean = float(clean_ok.mean())
    curve = lambda key: ([0.0] + taus, [clean] + [r[key] for r in robust])
    m = cfg.method
    out = {'recipe': {'model': str(cfg.model.name), 'method': str(m.name), 'dim': int(np.prod(inp.eval_x.shape[1:])),
                      **{k: m.get(k) for k in ('recipe', 'clean_steps', 'adv_steps', 'attack', 'norm', 'tau', 'rank',
                                               'linearize', 'ideal') if m.get(k) is not None}},
           'roles': self._roles(), 'rank_tau': float(self.options.get('rank_tau', 0.0)),
           'clean_accuracy': clean, 'attacks': names, 'robust': robust,
           'break_radius': geometry.break_radius(*curve('accuracy')),
           'break_radius_shared': geometry.break_radius(*curve('shared'))}
    out.update(self._weights(inp, task))
    return out

  @staticmethod
  def _weights(inp: base.ProbeInput, task) -> dict:
    """Purity of the first layer, and the principle when the run has clean and adversarial snapshots."""
    snap = getattr(inp.method, 'weight_snapshots', None)
    if snap is None:
      return {}
    snaps = snap(inp.params)
    out = {}
    # The neurons of the sparse-coding network: its matrix 'w' [d, m] (poly2's [d, d] form is no layer of neurons).
    first = 'w' if task is not None and snaps['final'].get('w', np.zeros((0, 0))).shape[0] == task[0].shape[0] else None
    if first is not None:
      out['purity'] = {stage: geometry.purity_summary(snaps[stage][first], *task) for stage in ('init', 'clean', 'final')}
    if snaps.get('from_clean'):
      dense = None if task is None else task[0] @ task[1]
      layers = {}
      for k in snaps['final']:
        layers[k] = geometry.principle_summary(snaps['clean'][k], snaps['final'][k], snaps['init'][k],
                                               dense if k == first else None)
        layers[k]['update'] = geometry.singular_energy(snaps['final'][k] - snaps['clean'][k])
      out['layers'] = layers
      if first is not None:
        out['principle'] = {kk: v for kk, v in layers[first].items() if kk != 'update'}
        out['update'] = layers[first]['update']
    # An image model's first conv layer (c_in = 3): its filters per stage, for the report's picture.
    rgb = next((k for k, shape in snaps.get('shapes', {}).items() if len(shape) == 4 and shape[2] == 3), None)
    if rgb is not None:
      shape = snaps['shapes'][rgb]
      out['first_filters'] = {'layer': rgb, **{stage: np.asarray(snaps[stage][rgb]).reshape(shape)[..., :FILTERS].tolist()
                                               for stage in ('init', 'clean', 'final')}}
    return out

  def summary(self, out: dict) -> dict[str, float]:
    s = {}
    if out.get('break_radius') is not None:
      s['break_radius'] = out['break_radius']
    if 'purity' in out:
      s['dense_cos'] = out['purity']['final']['dense_cos']
      s['purity_top1'] = out['purity']['final']['top1']
    if 'principle' in out:
      s['median_rho'] = out['principle']['median_rho']
      s['frac_rho_below_1'] = out['principle']['frac_rho_below_1']
      s['update_top4_energy'] = out['update']['top4']
    return s

  def comparison_summary(self, out: dict) -> dict:
    """:meth:`summary` plus, per weight matrix of a clean-then-adversarial
    run, the (beta, v, rho) decomposition's medians and the update's top-4
    singular-value energy: ``median_rho_<layer>``, ``median_beta_<layer>``,
    ``update_top4_<layer>``."""
    flat = self.summary(out)
    for name, layer in (out.get('layers') or {}).items():
      short = name.split('/')[0]
      flat.update({f'median_rho_{short}': layer['median_rho'], f'median_beta_{short}': layer['median_beta'],
                   f'update_top4_{short}': layer['update']['top4']})
    return flat

  def report(self, out: dict, workdir: pathlib.Path) -> list[str]:
    lines = ['## Feature purification', '', 'Robust accuracy per tau: `shared` = the shared evaluation\'s worst case '
             f'({", ".join(out["attacks"])}), `dense` = the dense-direction attack, `accuracy` = both, per example.',
             '', '| tau | shared | dense | accuracy |', '|---|---|---|---|']
    for r in out['robust']:
      dense = _pct(r.get('dense'))
      lines.append(f'| {r["tau"]:g} | {_pct(r["shared"])} | {dense} | {_pct(r["accuracy"])} |')
    lines += ['', f'Break radius (accuracy = 50%): {_radius(out["break_radius"])}', '']
    if 'purity' in out:
      lines += ['| weights | top-1 share | dense cos | l1/l2 |', '|---|---|---|---|']
      for stage, p in out['purity'].items():
        lines.append(f'| {stage} | {p["top1"]:.3f} | {p["dense_cos"]:.3f} | {p["l1_l2"]:.2f} |')
      lines.append('')
    if 'first_filters' in out:
      _plot_filters(pathlib.Path(workdir) / FILTER_PLOT, out['first_filters'])
      lines += [f'First-layer filters ({out["first_filters"]["layer"]}; rows: init, clean, final; each filter scaled '
                'to [0, 1] on its own):', '', f'![first-layer filters]({FILTER_PLOT})', '']
    if 'layers' in out:
      lines += ['Principle per weight matrix (w = beta w\' + v; medians over neurons):', '',
                '| layer | neurons | median rho | rho < 1 | cos(w, w\') | cos(w, w0) | cos(w\', w0) | update energy top-1/4/16 |',
                '|---|---|---|---|---|---|---|---|']
      for k, p in out['layers'].items():
        u = p['update']
        lines.append(f'| {k} | {p["neurons"]} | {p["median_rho"]:.3f} | {100 * p["frac_rho_below_1"]:.1f}% | '
                     f'{p["cos_w_wadv"]:.3f} | {p["cos_w_w0"]:.3f} | {p["cos_wadv_w0"]:.3f} | '
                     f'{u["top1"]:.2f} / {u["top4"]:.2f} / {u["top16"]:.2f} |')
      lines.append('')
    return lines

  # -- the family -----------------------------------------------------------

  @classmethod
  def family_results(cls, outs: dict[str, dict]) -> dict:
    """The cross-member tables of a family (module docstring): ``models``,
    ``principle``, ``purity``, ``rank`` (and ``scaling`` for several sizes)."""
    outs = {n: o for n, o in outs.items() if o and 'robust' in o}
    if not outs:
      return {}
    roles = next(iter(outs.values()))['roles']
    top = {'models': [{'name': n, 'clean_accuracy': o['clean_accuracy'],
                       'robust': [{'tau': r['tau'], 'accuracy': r['accuracy']} for r in o['robust']],
                       'break_radius': o['break_radius'], 'break_radius_shared': o['break_radius_shared'],
                       'dim': o['recipe']['dim']} for n, o in outs.items()]}
    at, clean, ideal = (outs.get(roles[k]) for k in ('adversarial', 'clean', 'ideal'))
    if at is not None and 'principle' in at:
      p = at['principle']
      top['principle'] = {'median_rho': p['median_rho'], 'frac_rho_below_1': p['frac_rho_below_1'],
                          'cos_w_wadv': p['cos_w_wadv'], 'cos_w_w0': p['cos_w_w0'], 'cos_wadv_w0': p['cos_wadv_w0'],
                          'cos_v_dense': p.get('cos_v_dense'), 'neurons': p['neurons'], 'member': roles['adversarial'],
                          'update_energy': {k: v for k, v in at['update'].items() if k != 'singular_values'}}
    if at is not None and 'layers' in at:   # every weight matrix (a CIFAR ResNet's kernels)
      top['principle_layers'] = {k: {kk: vv for kk, vv in v.items() if kk != 'update'} |
                                 {'update_top4': v['update']['top4']} for k, v in at['layers'].items()}
    if at is not None and 'purity' in at:
      purity = {'dense_cos_at': at['purity']['final']['dense_cos'], 'top1_at': at['purity']['final']['top1'],
                'dense_cos_init': at['purity']['init']['dense_cos'], 'top1_init': at['purity']['init']['top1']}
      source = clean if clean is not None and 'purity' in clean else None
      if source is not None:
        purity.update(dense_cos_clean=source['purity']['final']['dense_cos'], top1_clean=source['purity']['final']['top1'])
      if ideal is not None and 'purity' in ideal:
        purity.update(dense_cos_ideal=ideal['purity']['final']['dense_cos'], top1_ideal=ideal['purity']['final']['top1'])
      top['purity'] = purity
    if at is not None:
      taus = [r['tau'] for r in at['robust']]
      tau = at['rank_tau'] or taus[len(taus) // 2]
      at_recipe = {k: v for k, v in at['recipe'].items() if k != 'rank'}
      ranked = [(n, o) for n, o in outs.items()
                if int(o['recipe'].get('rank', 0) or 0) > 0 and {k: v for k, v in o['recipe'].items() if k != 'rank'} == at_recipe]
      rows = [(int(o['recipe']['rank']), n, o) for n, o in ranked] + [('full', roles['adversarial'], at)]
      if ranked:
        top['rank'] = [{'rank': r, 'name': n, 'tau': tau, 'robust_accuracy': _at_tau(o, tau),
                        'clean_accuracy': o['clean_accuracy'], 'break_radius': o['break_radius'],
                        **({'dense_cos': o['purity']['final']['dense_cos']} if 'purity' in o else {})}
                       for r, n, o in sorted(rows, key=lambda t: (t[0] == 'full', t[0] if t[0] != 'full' else 0))]
    dims = {o['recipe']['dim'] for o in outs.values()}
    if len(dims) > 1:
      top['scaling'] = [{'model': _DIM_SUFFIX.sub('', n), 'name': n, 'dim': o['recipe']['dim'],
                         'break_radius': o['break_radius'], 'clean_accuracy': o['clean_accuracy']}
                        for n, o in outs.items()]
    return top

  @classmethod
  def family_report(cls, outs: dict[str, dict], workdir: pathlib.Path) -> list[str]:
    top = cls.family_results(outs)
    if not top:
      return []
    workdir = pathlib.Path(workdir)
    lines = ['## Feature purification: the members', '',
             'Robust accuracy = per example, the shared evaluation\'s worst case and the dense-direction attack '
             '(each member\'s report.md has both apart). Break radius: where it crosses 50%.', '']
    taus = sorted({r['tau'] for row in top['models'] for r in row['robust']})
    lines += ['| model | clean | ' + ' | '.join(f'tau={t:g}' for t in taus) + ' | break radius |',
              '|---|---|' + '---|' * len(taus) + '---|']
    for row in top['models']:
      acc = {r['tau']: r['accuracy'] for r in row['robust']}
      lines.append(f'| {row["name"]} | {100 * row["clean_accuracy"]:.1f}% | '
                   + ' | '.join('–' if t not in acc else f'{100 * acc[t]:.1f}%' for t in taus)
                   + f' | {_radius(row["break_radius"])} |')
    lines.append('')
    _plot_robust(workdir / ROBUST_PLOT, top['models'])
    lines += [f'![robust accuracy vs tau]({ROBUST_PLOT})', '']
    if 'purity' in top:
      p = top['purity']
      lines += ['| weights (median over neurons) | dense-mixture cos | top-1 share |', '|---|---|---|']
      for label, key in (('init', 'init'), ('clean training', 'clean'), ('after adversarial training', 'at'),
                         ('ideal f*', 'ideal')):
        if f'dense_cos_{key}' in p:
          lines.append(f'| {label} | {p[f"dense_cos_{key}"]:.3f} | {p[f"top1_{key}"]:.3f} |')
      lines.append('')
    # Trained networks only: a linearised model's weights are not its features, the ideal is not trained.
    curves = {n: _curve(workdir / n) for n, o in outs.items()
              if not o['recipe'].get('linearize') and not o['recipe'].get('ideal')}
    curves = {n: c for n, c in curves.items() if c}
    if curves:
      _plot_curves(workdir / CURVE_PLOT, curves)
      lines += ['Purity over training (medians over neurons, per logged round; the dashed line is the start of the '
                'adversarial phase):', '', f'![purity curves]({CURVE_PLOT})', '']
    if 'principle' in top:
      p = top['principle']
      e = p['update_energy']
      lines += [f'Principle ({p["member"]}, first layer, {p["neurons"]} neurons; w = beta w\' + v):', '',
                '| median rho | rho < 1 | cos(w, w\') | cos(w, w0) | cos(w\', w0) | cos(v, M w*) | '
                'update energy top-1 / 2 / 4 / 16 | effective rank |', '|---|---|---|---|---|---|---|---|',
                f'| {p["median_rho"]:.3f} | {100 * p["frac_rho_below_1"]:.1f}% | {p["cos_w_wadv"]:.3f} | '
                f'{p["cos_w_w0"]:.3f} | {p["cos_wadv_w0"]:.3f} | '
                f'{"–" if p["cos_v_dense"] is None else format(p["cos_v_dense"], ".3f")} | '
                f'{e["top1"]:.2f} / {e["top2"]:.2f} / {e["top4"]:.2f} / {e["top16"]:.2f} | {e["effective_rank"]:.1f} |', '']
      g = e.get('gaussian') or {}
      if g:
        lines += [f'(A Gaussian matrix of the same shape: energy top-1 / 2 / 4 / 16 = {g["top1"]:.2f} / {g["top2"]:.2f} / '
                  f'{g["top4"]:.2f} / {g["top16"]:.2f}, effective rank {g["effective_rank"]:.1f}.)', '']
    if 'rank' in top:
      lines += [f'Rank-r adversarial training (W = W_clean + A B^T), robust accuracy at tau={top["rank"][0]["tau"]:g}:',
                '', '| rank | member | clean | robust | break radius |', '|---|---|---|---|---|']
      for r in top['rank']:
        lines.append(f'| {r["rank"]} | {r["name"]} | {100 * r["clean_accuracy"]:.1f}% | '
                     f'{_pct(r["robust_accuracy"])} | '
                     f'{_radius(r["break_radius"])} |')
      lines.append('')
    if 'scaling' in top:
      _plot_scaling(workdir / SCALING_PLOT, top['scaling'])
      models = list(dict.fromkeys(r['model'] for r in top['scaling']))
      dims = sorted({r['dim'] for r in top['scaling']})
      radius = {(r['model'], r['dim']): r['break_radius'] for r in top['scaling']}
      lines += ['Break radius vs input dimension d:', '', '| model | ' + ' | '.join(f'd={d}' for d in dims) + ' |',
                '|---|' + '---|' * len(dims)]
      for mdl in models:
        lines.append(f'| {mdl} | ' + ' | '.join(_radius(radius.get((mdl, d)), missing='–') for d in dims) + ' |')
      lines += ['', f'![break radius vs d]({SCALING_PLOT})', '']
    return lines


def _pct(v) -> str:
  return '–' if v is None else f'{100 * v:.1f}%'


def _radius(v, missing='beyond the grid') -> str:
  if v is None:
    return missing
  return f'{v:.3f}'


def _at_tau(out: dict, tau: float):
  for r in out['robust']:
    if abs(r['tau'] - tau) < 1e-9:
      return r['accuracy']
  return None


def _curve(run_dir: pathlib.Path) -> list[dict]:
  """The member's logged purity rows (``dense_cos`` present), or []."""
  path = run_dir / 'metrics.jsonl'
  if not path.exists():
    return []
  return [r for r in runio.read_metrics(path) if 'dense_cos' in r]


def _figure(panels: int, width: float):
  from geomrobust.runio import report
  plt = report._plt()
  fig, axes = plt.subplots(1, panels, figsize=(width, 3.5), dpi=110)
  return plt, fig, list(np.atleast_1d(axes))


def _finish(plt, fig, axes, path: pathlib.Path, xlabel: str, titles=(), ylabel: str = '') -> None:
  for ax, title in zip(axes, titles or [''] * len(axes)):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _plot_curves(path: pathlib.Path, curves: dict[str, list[dict]]) -> None:
  """Dense-mixture cosine and top-1 share over the optimiser steps, a dashed
  line where each member's adversarial phase starts."""
  plt, fig, axes = _figure(2, 10)
  colours = dict(zip(curves, plt.cm.tab20(np.arange(len(curves)) % 20)))
  for name, rows in curves.items():
    for ax, key in zip(axes, ('dense_cos', 'purity_top1')):
      ax.plot([r['step'] for r in rows], [r[key] for r in rows], '-', color=colours[name], label=name)
    first_adv = next((r['step'] - r.get('phase_step', 0) for r in rows if r.get('phase') == 'adversarial'), None)
    for ax in axes if first_adv else ():
      ax.axvline(first_adv, color=colours[name], ls='--', lw=0.7)
  _finish(plt, fig, axes, path, 'optimiser step', ('dense-mixture cosine |cos(w_i, M w*)|', 'top-1 share of M^T w_i'))


def _plot_robust(path: pathlib.Path, models: list[dict]) -> None:
  plt, fig, axes = _figure(1, 6.5)
  for i, row in enumerate(models):
    taus = [0.0] + [r['tau'] for r in row['robust']]
    axes[0].plot(taus, [row['clean_accuracy']] + [r['accuracy'] for r in row['robust']], marker='o', ms=3,
                 color=plt.cm.tab20(i % 20), ls='-' if i < 20 else '--', label=row['name'])
  axes[0].axhline(0.5, color='grey', ls=':', lw=0.8)
  _finish(plt, fig, axes, path, 'tau', ylabel='robust accuracy')


def _plot_filters(path: pathlib.Path, filters: dict) -> None:
  """The first conv layer's RGB filters ``[h, w, 3, n]`` at init, after clean and after adversarial training."""
  stages = ('init', 'clean', 'final')
  n = np.asarray(filters['init']).shape[-1]
  from geomrobust.runio import report
  plt = report._plt()
  fig, axes = plt.subplots(len(stages), n, figsize=(0.7 * n, 0.8 * len(stages)), dpi=110, squeeze=False)
  for row, stage in enumerate(stages):
    k = np.asarray(filters[stage], np.float64)
    for j in range(n):
      f = k[..., j]
      axes[row][j].imshow((f - f.min()) / (f.max() - f.min() + 1e-12), interpolation='nearest')
      axes[row][j].set_xticks([])
      axes[row][j].set_yticks([])
    axes[row][0].set_ylabel(stage, fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _plot_scaling(path: pathlib.Path, rows: list[dict]) -> None:
  """Break radius vs d per model, log-log."""
  plt, fig, axes = _figure(1, 5.5)
  for model in dict.fromkeys(r['model'] for r in rows):
    pts = sorted((r['dim'], r['break_radius']) for r in rows if r['model'] == model and r['break_radius'])
    if pts:
      axes[0].plot(*zip(*pts), marker='o', ms=3, label=model)
  axes[0].set_xscale('log')
  axes[0].set_yscale('log')
  _finish(plt, fig, axes, path, 'input dimension d', ylabel='break radius (robust accuracy 50%)')


PROBE = Purification
