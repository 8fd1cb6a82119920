"""Isometry diagnostics: how well hidden layers keep within-class input distances.

For each class c, with D(x) and D(h) the Euclidean distance matrices of that
class's inputs and representations (upper triangle, i < j):
  correlation   Pearson r between K * D(h) and D(x)
  stress        sum((K D(h) - D(x))^2) / sum(D(x)^2)   (normalised stress)
  max_ratio     max D(x) / max D(h)
"""

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust.geometry import distances


def _class_stats(x: np.ndarray, h: np.ndarray, k: float) -> dict:
  dx = np.asarray(distances.pairwise_dists(jnp.asarray(x), min_sq=0.0))
  dh = np.asarray(distances.pairwise_dists(jnp.asarray(h), min_sq=0.0))
  iu = np.triu_indices(len(x), 1)
  dx, dh = dx[iu].astype(np.float64), k * dh[iu].astype(np.float64)
  corr = float(np.corrcoef(dx, dh)[0, 1]) if dh.std() > 0 and dx.std() > 0 else 0.0
  return dict(correlation=corr,
              stress=float(np.sum((dh - dx) ** 2) / np.sum(dx ** 2)),
              max_ratio=float(dx.max() / max(dh.max() / k, 1e-12)))


def isometry_diagnostics(images, reps, labels, num_classes: int, k: float = 1.0,
                         per_class: int = 200) -> dict:
  """Per-layer isometry diagnostics on (test) data.

  Args:
    images: ``[N, ...]`` float inputs.
    reps: tuple of per-layer representations, each ``[N, ...]``.
    labels: ``[N]`` int labels.
    num_classes: number of classes.
    k: the method's scale factor K (D(h) is compared as K * D(h)).
    per_class: at most this many examples of each class are used.

  Returns:
    ``{'layers': [{layer, correlation, stress, max_ratio, mean_within_dist}],
    'per_class_last_layer': [...]}`` where layer values are means over classes.
  """
  x = np.asarray(distances.flatten(jnp.asarray(images)))
  labels = np.asarray(labels)
  layers = []
  per_class_last = []
  for li, rep in enumerate(reps):
    h = np.asarray(distances.flatten(jnp.asarray(rep)))
    stats = []
    for c in range(num_classes):
      idx = np.flatnonzero(labels == c)[:per_class]
      if len(idx) < 3:
        continue
      s = _class_stats(x[idx], h[idx], k)
      dh = np.asarray(distances.pairwise_dists(jnp.asarray(h[idx]), min_sq=0.0))
      s['mean_within_dist'] = float(dh[np.triu_indices(len(idx), 1)].mean())
      s['class'] = c
      stats.append(s)
    if not stats:
      continue
    mean = {key: float(np.mean([s[key] for s in stats]))
            for key in ('correlation', 'stress', 'max_ratio', 'mean_within_dist')}
    layers.append(dict(layer=li, **mean))
    if li == len(reps) - 1:
      per_class_last = stats
  # Mean within-class pixel distance, the scale the isometric loss matches.
  px = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)[:per_class]
    if len(idx) >= 2:
      d = np.asarray(distances.pairwise_dists(jnp.asarray(x[idx]), min_sq=0.0))
      px.append(d[np.triu_indices(len(idx), 1)].mean())
  return dict(layers=layers, per_class_last_layer=per_class_last,
              mean_within_input_dist=float(np.mean(px)) if px else None)
