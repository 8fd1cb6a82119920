"""The latent-space study of papers/ascl.md: where adversarial examples land.

For each attack size eps, on the evaluation set and in one layer's
representation z (the penultimate layer by default; any run, any method):

- the adversarial input of each example is the evaluation's own worst case:
  of the shared evaluation's attacks at that eps, the input with the lowest
  margin ``logit_y - max_{k != y} logit_k`` (so a fooling input whenever one
  of them fooled the model);
- the attack *succeeded* on an example the model classifies correctly when
  clean and wrongly at that input, *failed* when it stays correct;
  clean-misclassified examples are counted apart (``clean_wrong``);
- ``distance``: the per-example L2 distance ``||z(x_adv) - z(x)||``, its mean,
  standard error and median over the succeeded and over the failed examples,
  also divided by the mean clean inter-class distance (``relative``, a
  scale-free number that compares networks);
- ``ratio``: mean intra-class over mean inter-class pairwise L2 distance (by
  true label), for the clean and for the adversarial latents (lower: tighter,
  better separated classes);
- ``centroid``: with class centroids = the means of the clean latents of each
  true class, the fraction of adversarial latents whose nearest centroid is
  the class the model predicts for them (all examples, and the succeeded
  ones: a fooled example whose latent sits in the wrong class's region), the
  fraction of succeeded ones still nearest their *true* class, and the
  same agreement for the clean latents as the reference.

The adversarial inputs come from the shared evaluation (``adversarial_requests``),
so the probe costs forward passes only. A stochastic model is measured with
one noise draw per input (the probe's key); its ``passes`` are not averaged.

Options (``config.probes.latent``):
  eps         attack sizes (default: the run's ``eval.eps``, all of them).
  layer       index into the model's representations (-1: the penultimate).
  batch_size  examples per compiled forward call (500).

Any trained run gets it with a re-evaluation:
  python launch.py --evaluate=WORKDIR --config.probes.latent={}
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust import config as config_lib
from geomrobust import evaluation
from geomrobust.attacks import losses
from geomrobust.geometry import distances
from geomrobust.parallel import batching
from geomrobust.probes import base

PLOT_FILE = 'latent.png'
COMPARISON_PLOT = 'latent_comparison.png'


def _dists(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
  """L2 distances ``[N, D] x [M, D] -> [N, M]`` (the project's Gram form)."""
  return np.sqrt(np.asarray(distances.pairwise_sq_dists(jnp.asarray(a), None if b is None else jnp.asarray(b))))


def class_distances(z: np.ndarray, labels: np.ndarray) -> dict:
  """Mean intra-class (same label, i != j) and inter-class pair distance and their ratio."""
  d = _dists(z)
  same = labels[:, None] == labels[None, :]
  np.fill_diagonal(same, False)
  diff = labels[:, None] != labels[None, :]
  intra = float(d[same].mean()) if same.any() else float('nan')
  inter = float(d[diff].mean()) if diff.any() else float('nan')
  return {'intra': intra, 'inter': inter, 'ratio': intra / inter if inter > 0 else float('nan')}


def nearest_centroid(z: np.ndarray, centroids: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """The class of the nearest centroid (L2) of each row: ``[N, D], [K, D], [K] -> [N]``."""
  return classes[np.argmin(_dists(z, centroids), 1)]


def _stats(v: np.ndarray) -> dict:
  n = len(v)
  if not n:
    return {'n': 0, 'mean': None, 'se': None, 'median': None}
  return {'n': n, 'mean': float(v.mean()), 'se': float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
          'median': float(np.median(v))}


def study(z_clean: np.ndarray, z_adv: np.ndarray, labels: np.ndarray, pred_clean: np.ndarray,
          pred_adv: np.ndarray) -> dict:
  """The study at one eps, from latents ``[N, D]`` and labels / predictions ``[N]`` (module docstring)."""
  labels = np.asarray(labels)
  ok = pred_clean == labels
  succeeded, failed = ok & (pred_adv != labels), ok & (pred_adv == labels)
  dist = np.linalg.norm(np.asarray(z_adv, np.float64) - np.asarray(z_clean, np.float64), axis=1)
  clean_cd = class_distances(z_clean, labels)
  scale = clean_cd['inter']
  classes = np.unique(labels)
  centroids = np.stack([np.asarray(z_clean, np.float64)[labels == k].mean(0) for k in classes])
  near_adv = nearest_centroid(z_adv, centroids, classes)
  near_clean = nearest_centroid(z_clean, centroids, classes)
  frac = lambda m: float(m.mean()) if m.size else None
  return {
      'examples': int(len(labels)), 'succeeded': int(succeeded.sum()), 'failed': int(failed.sum()),
      'clean_wrong': int((~ok).sum()),
      'distance': {'succeeded': _stats(dist[succeeded]), 'failed': _stats(dist[failed])},
      # Collapsed latents (every clean point the same) have no scale: no relative numbers.
      'relative_distance': {k: _stats(dist[m] / scale if scale > 0 else np.zeros(0))
                            for k, m in (('succeeded', succeeded), ('failed', failed))},
      'clean': clean_cd, 'adversarial': class_distances(z_adv, labels),
      'centroid': {'adv_nearest_is_predicted': frac(near_adv == pred_adv),
                   'succeeded_nearest_is_predicted': frac(near_adv[succeeded] == pred_adv[succeeded]),
                   'succeeded_nearest_is_true': frac(near_adv[succeeded] == labels[succeeded]),
                   'clean_nearest_is_predicted': frac(near_clean == pred_clean)},
  }


class Latent(base.Probe):
  kind = 'geometry'
  BOUNDS = {'eps': config_lib.number(above=0, example=0.3), 'batch_size': config_lib.integer(1, example=500)}

  def _eps(self, config) -> list[float]:
    return sorted({float(e) for e in self.options.get('eps', None) or config.eval.eps})

  def adversarial_requests(self, config):
    names = [r.name for r in evaluation.recipes.resolve(config.eval)]
    return [(name, eps) for eps in self._eps(config) for name in names]

  def _forward(self, inp: base.ProbeInput, x) -> tuple[np.ndarray, np.ndarray]:
    """``x [N, ...] -> (logits [N, C], z [N, D])`` in chunks, jitted once per classifier and layer."""
    method, layer = inp.method, int(self.options.get('layer', -1))

    def build():
      def chunk(p, key, xs):
        xx, idx = xs
        logits, reps = method.apply(p, xx, jax.random.fold_in(key, idx[0]))
        if not -len(reps) <= layer < len(reps):
          raise ValueError(f'probes.latent.layer={layer}: the model has {len(reps)} representations '
                           f'(use -{len(reps)} .. {len(reps) - 1}; -1 is the penultimate layer)')
        return logits, reps[layer].reshape((xx.shape[0], -1))
      bs = int(self.options.get('batch_size', 500))
      return jax.jit(lambda p, key, xx: batching.map_batches(
          lambda xs: chunk(p, key, xs), (xx, jnp.arange(xx.shape[0])), bs))

    fn = self.compiled(('forward', method.classifier_key(), layer), build)
    logits, z = fn(inp.params, inp.key, jnp.asarray(x, jnp.float32))
    return np.asarray(logits), np.asarray(z)

  def __call__(self, inp: base.ProbeInput) -> dict:
    y = np.asarray(inp.eval_y)
    logits_clean, z_clean = self._forward(inp, inp.eval_x)
    pred_clean = logits_clean.argmax(1)
    names = [r.name for r in evaluation.recipes.resolve(inp.config.eval)]
    out = {'layer': int(self.options.get('layer', -1)), 'attacks': names, 'runs': []}
    for eps in self._eps(inp.config):
      # Per example, the input of lowest margin over the evaluation's attacks at this eps.
      best_m = np.full(len(y), np.inf)
      best_logits = np.zeros_like(logits_clean)
      best_z = np.zeros_like(z_clean)
      for name in names:
        logits, z = self._forward(inp, inp.adversarial(name, eps))
        m = -np.asarray(losses.margin(jnp.asarray(logits), jnp.asarray(y)))   # logit_y - max other
        better = m < best_m
        best_m[better], best_logits[better], best_z[better] = m[better], logits[better], z[better]
      out['runs'].append({'eps': eps, **study(z_clean, best_z, y, pred_clean, best_logits.argmax(1))})
    return out

  def summary(self, out: dict) -> dict[str, float]:
    if not out.get('runs'):
      return {}
    run = out['runs'][-1]   # the largest eps
    tag = f'_eps{run["eps"]:g}'  # not '@': the report reads '@' keys as accuracies
    s = {'latent_ratio_clean': run['clean']['ratio'], f'latent_ratio_adv{tag}': run['adversarial']['ratio'],
         f'latent_adv_nearest_is_pred{tag}': run['centroid']['adv_nearest_is_predicted']}
    for outcome in ('succeeded', 'failed'):
      v = run['relative_distance'][outcome]['mean']
      if v is not None:
        s[f'latent_shift_{outcome}{tag}'] = v
    return s

  def report(self, out: dict, workdir: pathlib.Path) -> list[str]:
    plot(pathlib.Path(workdir) / PLOT_FILE, {'': out})
    lines = [f'## Latent space: clean vs adversarial (layer {out["layer"]})', '',
             'Adversarial input per example: the lowest-margin input of the evaluation\'s attacks '
             f'({", ".join(out["attacks"])}). Shift = ||z(x_adv) - z(x)|| / mean clean inter-class distance '
             '(mean ± SE over the examples). Ratio = mean intra-class / inter-class distance. Centroid: the '
             'fraction of latents whose nearest clean class mean is the predicted class.', '',
             f'![latent space]({PLOT_FILE})', '']
    return lines + _table({'': out}) + ['']

  @classmethod
  def family_report(cls, outs: dict[str, dict], workdir: pathlib.Path) -> list[str]:
    outs = {name: out for name, out in outs.items() if out and out.get('runs')}
    if len(outs) < 2:
      return []
    plot(pathlib.Path(workdir) / COMPARISON_PLOT, outs)
    return (['## Latent space of the members (clean vs adversarial)', '',
             'Columns as in each member\'s report.md.', '', f'![latent space of the members]({COMPARISON_PLOT})', '']
            + _table(outs) + [''])


def _pm(stats: dict) -> str:
  if stats['mean'] is None:
    return '–'
  return f'{stats["mean"]:.3f}' + ('' if stats['se'] is None else f' ± {stats["se"]:.3f}')


def _frac(v) -> str:
  return '–' if v is None else f'{100 * v:.1f}%'


def _table(outs: dict[str, dict]) -> list[str]:
  named = any(outs)
  lines = [('| model ' if named else '') + '| eps | fooled / correct | shift, fooled | shift, not fooled '
           '| ratio clean | ratio adv | adv nearest = predicted | fooled: nearest = predicted | fooled: nearest = true |',
           ('|---' if named else '') + '|---|---|---|---|---|---|---|---|---|']
  for name, out in outs.items():
    for r in out['runs']:
      c, rel = r['centroid'], r['relative_distance']
      lines.append((f'| {name} ' if named else '') +
                   f'| {r["eps"]:g} | {r["succeeded"]} / {r["succeeded"] + r["failed"]} | {_pm(rel["succeeded"])} '
                   f'| {_pm(rel["failed"])} | {r["clean"]["ratio"]:.3f} | {r["adversarial"]["ratio"]:.3f} '
                   f'| {_frac(c["adv_nearest_is_predicted"])} | {_frac(c["succeeded_nearest_is_predicted"])} '
                   f'| {_frac(c["succeeded_nearest_is_true"])} |')
  return lines


def plot(path: pathlib.Path, outs: dict[str, dict]) -> None:
  """Three panels vs eps, one colour per model: the latent shift of fooled
  (solid) and not fooled (dashed) examples; the intra/inter-class ratio of
  clean (dotted) and adversarial (solid) latents; the fraction of fooled
  examples whose latent is nearest the predicted class's centroid."""
  from geomrobust.runio import report
  plt = report._plt()
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=110)
  colours = dict(zip(outs, plt.cm.tab10(np.arange(len(outs)) % 10)))
  for name, out in outs.items():
    eps = [r['eps'] for r in out['runs']]
    label = f'{name}: ' if name else ''
    for outcome, style in (('succeeded', '-'), ('failed', '--')):
      mean = [r['relative_distance'][outcome]['mean'] for r in out['runs']]
      se = [r['relative_distance'][outcome]['se'] or 0.0 for r in out['runs']]
      mean = [np.nan if v is None else v for v in mean]
      axes[0].errorbar(eps, mean, yerr=se, fmt=style, marker='o', ms=3, capsize=2, color=colours[name],
                       label=f'{label}{"fooled" if outcome == "succeeded" else "not fooled"}')
    axes[1].plot(eps, [r['adversarial']['ratio'] for r in out['runs']], '-', marker='o', ms=3,
                 color=colours[name], label=f'{label}adversarial')
    axes[1].plot(eps, [r['clean']['ratio'] for r in out['runs']], ':', color=colours[name], label=f'{label}clean')
    frac = [r['centroid']['succeeded_nearest_is_predicted'] for r in out['runs']]
    axes[2].plot(eps, [np.nan if v is None else v for v in frac], '-', marker='o', ms=3, color=colours[name],
                 label=name or 'fooled examples')
  titles = ('shift ||z(x_adv) - z(x)|| / inter-class distance', 'intra / inter-class distance',
            'fooled: nearest centroid = predicted class')
  for ax, title in zip(axes, titles):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel('eps')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


PROBE = Latent
