"""Per-layer point clouds ("manifolds") of a trained classifier, for MFTMA.

Two kinds, both read at every layer the model exposes: ``pixels`` (the
flattened input), each representation ``method.apply`` returns (named by the
model's optional ``layer_names`` attribute, else ``layer1 .. layerK``) and
``logits``.

* Class manifolds: the first M test images of each of the first P classes,
  clean (eps 0) or each attacked once with L-inf PGD at eps.
* Exemplar manifolds: P images, each repeated M times; every repeat is
  attacked from its own random start, so a manifold is the spread of one
  input's (adversarial) responses. For a stochastic model each repeat also
  sees fresh noise, in the attack (EOT gradients) and in the feature pass.

Output: ``{layer: float32 [S, P, N', M]}`` (P manifolds of M points in N'
features). A layer wider than ``max_features`` is randomly projected
(``mftma.projection``, one matrix per projection seed ``s < S``) inside the
feature pass, batch by batch, so full-width conv features never pile up in
memory; a layer that fits has ``S = 1`` and ``N' = N``.

Collapsed manifolds: at eps 0 the M repeats of an exemplar are one point
for a deterministic model, and also at the layers before a stochastic
model's noise; at eps > 0 PGD from different starts may still converge to
one point. :func:`collapsed` finds them, so callers can treat them as the
points they are and say so (``probes/manifold_geometry.py`` does).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust import attacks
from geomrobust.geometry import mftma

KINDS = ('class', 'exemplar')

# Projection matrices are kept on the device between calls up to this many
# bytes (oldest dropped first): MNIST-sized layers keep all seeds' matrices
# (making one takes ~1 s), very wide layers are remade per call instead.
MATRIX_CACHE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer's points: ``width`` features, projected to ``features`` with
  ``seeds`` matrices when ``projected`` (else ``features == width``, 1 seed)."""
  name: str
  width: int
  features: int
  seeds: int

  @property
  def projected(self) -> bool:
    return self.features != self.width


def select_class_examples(x: np.ndarray, y: np.ndarray, classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``per_class`` examples of each class ``0 .. classes-1``, class by class.

  Args:
    x: ``[n, ...]`` examples; y: int ``[n]`` labels.

  Returns:
    ``(x [P*M, ...], y [P*M])`` ordered manifold-major (example ``p*M + m``
    is point m of class p). Raises ValueError when a class has too few.
  """
  y = np.asarray(y)
  idx = []
  for c in range(classes):
    found = np.flatnonzero(y == c)[:per_class]
    if len(found) < per_class:
      raise ValueError(f'class manifolds: class {c} has {len(found)} of the {per_class} images per class asked for '
                       f'in the first {len(y)} test examples; ask for fewer (per_class) or use more test data')
    idx.append(found)
  idx = np.concatenate(idx)
  return np.asarray(x)[idx], y[idx]


def select_exemplars(x: np.ndarray, y: np.ndarray, exemplars: int, repeats: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``exemplars`` examples, each repeated ``repeats`` times:
  ``(x [P*M, ...], y [P*M])`` manifold-major, as :func:`select_class_examples`."""
  if len(y) < exemplars:
    raise ValueError(f'exemplar manifolds: {exemplars} images asked for, the test data has {len(y)}')
  return np.repeat(np.asarray(x)[:exemplars], repeats, axis=0), np.repeat(np.asarray(y)[:exemplars], repeats)


def collapsed(cloud: np.ndarray, rtol: float = 1e-5) -> np.ndarray:
  """Which of the P manifolds of ``cloud [P, N, M]`` are a single point: bool ``[P]``
  (every point within ``rtol`` x the largest center norm of its center).

  A tolerance, not equality: the same input in another batch position may
  differ in the last float32 bits. Besides eps 0, L-inf PGD collapses an
  exemplar manifold when every random start converges to the same vertex of
  the eps-box (sign steps saturate), which happens on real models.
  """
  c = cloud.mean(axis=2, keepdims=True)
  spread = np.sqrt(((cloud - c)**2).sum(axis=1)).max(axis=1)        # [P]
  scale = float(np.sqrt((c**2).sum(axis=1)).max())
  return spread <= rtol * max(scale, np.finfo(np.float32).tiny)


def _pad_to(a: np.ndarray, n: int) -> np.ndarray:
  """``a [k, ...]`` padded to ``[n, ...]`` by repeating its last row (one compiled shape)."""
  return a if len(a) == n else np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)])


class ManifoldBuilder:
  """Builds the manifolds of one classifier; its compiled functions live on the object.

  Args:
    method: ``method.apply(params, x, rng) -> (logits [B, C], reps)``;
      ``method.stochastic`` says whether it draws noise (then ``rng`` matters).
    box: the valid input range ``(lo, hi)`` attacks clip to, or None.
    steps: PGD steps; ``step_fraction``: step size as a fraction of eps.
    eot_samples: noise draws averaged per attack gradient (stochastic models).
    batch_size: examples per compiled call (attack and feature pass).
    max_features: layers wider than this are projected to it.
    projection_seeds: how many projection matrices (S) for such layers.
    layers: which layers to read, as indices into ``[pixels, *representations,
      logits]`` (negative from the end: -2 is the last hidden layer); () = all.
  """

  def __init__(self, method, *, box=attacks.UNIT_BOX, steps: int = 16, step_fraction: float = 0.25,
               eot_samples: int = 1, batch_size: int = 500, max_features: int = 2000, projection_seeds: int = 1,
               layers: tuple[int, ...] = ()):
    if steps < 1 or step_fraction <= 0 or eot_samples < 1 or batch_size < 1 or max_features < 1 or \
       projection_seeds < 1:
      raise ValueError('ManifoldBuilder: steps, eot_samples, batch_size, max_features, projection_seeds must be '
                       '>= 1 and step_fraction > 0')
    self.method = method
    self.box = attacks.check_box(box)
    self.steps, self.step_fraction = int(steps), float(step_fraction)
    # A deterministic model has nothing to average over.
    self.eot_samples = int(eot_samples) if method.stochastic else 1
    self.batch_size = int(batch_size)
    self.max_features, self.projection_seeds = int(max_features), int(projection_seeds)
    self.select = tuple(int(i) for i in layers)
    self._attack = attacks.make_attack('pgd', method.logits, norm='linf', steps=self.steps, restarts=1,
                                       random_start=True, eot_samples=self.eot_samples, box=self.box)
    self._features = jax.jit(self._features_batch)
    self._mats: dict[tuple[int, int], Any] = {}
    self._layers: dict[tuple, list[Layer]] = {}

  # -- layers ---------------------------------------------------------------

  def layers(self, params, x_example) -> list[Layer]:
    """The layers read, with their widths (from shapes only, nothing runs;
    once per input shape). ``x_example``: ``[B, ...]`` model inputs."""
    shape = tuple(np.shape(x_example)[1:])
    if shape not in self._layers:
      found = self._find_layers(params, x_example)
      self._layers[shape] = [found[i] for i in self._indices(len(found))]
    return self._layers[shape]

  def _indices(self, n: int) -> list[int]:
    """The positions of the selected layers among ``n`` (all when none are selected)."""
    if not self.select:
      return list(range(n))
    bad = [i for i in self.select if not -n <= i < n]
    if bad:
      raise ValueError(f'layer index {bad[0]} out of range: this model has {n} layers (pixels, '
                       f'{n - 2} representations, logits); use -{n}..{n - 1}')
    return sorted({i % n for i in self.select})

  def _find_layers(self, params, x_example) -> list[Layer]:
    rng = jax.random.key(0) if self.method.stochastic else None
    logits, reps = jax.eval_shape(lambda x: self.method.apply(params, x, rng), jnp.asarray(x_example[:1]))
    names = list(getattr(self.method.model, 'layer_names', None) or [f'layer{i + 1}' for i in range(len(reps))])
    if len(names) != len(reps):
      raise ValueError(f'the model names {len(names)} layers (layer_names) but returns {len(reps)} representations')
    widths = [int(np.prod(x_example.shape[1:]))] + [int(np.prod(r.shape[1:])) for r in reps] + [int(logits.shape[1])]
    out = []
    for name, w in zip(['pixels'] + names + ['logits'], widths):
      wide = w > self.max_features
      out.append(Layer(name, w, self.max_features if wide else w, self.projection_seeds if wide else 1))
    return out

  def _matrix(self, width: int, seed: int):
    """``mftma.projection(width, max_features, seed)`` on the device (cached, see MATRIX_CACHE_BYTES)."""
    if (width, seed) not in self._mats:
      size = 4 * width * self.max_features
      while self._mats and 4 * self.max_features * sum(w for w, _ in self._mats) + size > MATRIX_CACHE_BYTES:
        del self._mats[next(iter(self._mats))]
      self._mats[(width, seed)] = jnp.asarray(mftma.projection(width, self.max_features, seed))
    return self._mats[(width, seed)]

  # -- the two passes ---------------------------------------------------------

  def perturb(self, params, x: np.ndarray, y: np.ndarray, eps: float, key: jax.Array) -> np.ndarray:
    """PGD at ``eps`` from a random start, each example on its own: ``x [n, ...] -> [n, ...]``.

    Every example draws its own start (and noise) from the batch's key
    ``fold_in(key, b)``, so repeats of one image get independent starts.
    eps 0 returns ``x`` unchanged.
    """
    if eps == 0:
      return np.asarray(x, np.float32)
    bs = min(self.batch_size, len(x))
    out = []
    for b, i in enumerate(range(0, len(x), bs)):
      xb, yb = _pad_to(np.asarray(x[i:i + bs], np.float32), bs), _pad_to(np.asarray(y[i:i + bs], np.int32), bs)
      adv = self._attack(params, jnp.asarray(xb), jnp.asarray(yb), jax.random.fold_in(key, b),
                         jnp.float32(eps), step_size=jnp.float32(self.step_fraction * eps))
      out.append(np.asarray(adv)[:min(bs, len(x) - i)])
    return np.concatenate(out)

  def _features_batch(self, params, x, rng, mats):
    """``x [B, ...] -> tuple over layers of [B, N']``; ``mats[l]``: layer l's
    projection ``[N_l, N']`` or None."""
    logits, reps = self.method.apply(params, x, rng if self.method.stochastic else None)
    flat = [x.reshape(x.shape[0], -1)] + [r.reshape(r.shape[0], -1) for r in reps] + [logits]
    flat = [flat[i] for i in self._indices(len(flat))]
    # HIGHEST: accelerators would otherwise multiply float32 in reduced precision.
    return tuple(f.astype(jnp.float32) if m is None else jnp.dot(f.astype(jnp.float32), m,
                                                                 precision=jax.lax.Precision.HIGHEST)
                 for f, m in zip(flat, mats))

  def features(self, params, x: np.ndarray, key: jax.Array) -> dict[str, np.ndarray]:
    """Every layer's features of ``x [n, ...]``: ``{layer: float32 [S, n, N']}``.

    The pass runs once per projection seed (only projected layers are kept
    from the later passes); a stochastic model draws the same noise
    ``fold_in(key, b)`` for batch b in every pass, so all seeds project the
    same points.
    """
    layers = self.layers(params, x)
    bs = min(self.batch_size, len(x))
    seeds = max(l.seeds for l in layers)
    out = {l.name: np.empty((l.seeds, len(x), l.features), np.float32) for l in layers}
    for s in range(seeds):
      mats = tuple(self._matrix(l.width, s) if l.projected else None for l in layers)
      for b, i in enumerate(range(0, len(x), bs)):
        n = min(bs, len(x) - i)
        feats = self._features(params, jnp.asarray(_pad_to(np.asarray(x[i:i + n], np.float32), bs)),
                               jax.random.fold_in(key, b), mats)
        for l, f in zip(layers, feats):
          if s < l.seeds:
            out[l.name][s, i:i + n] = np.asarray(f)[:n]
    return out

  # -- manifolds --------------------------------------------------------------

  def build(self, params, x: np.ndarray, y: np.ndarray, manifolds: int, points: int, eps: float,
            key: jax.Array) -> dict[str, np.ndarray]:
    """Attacks ``x [P*M, ...]`` (manifold-major, see :func:`select_class_examples`)
    at ``eps`` and returns ``{layer: float32 [S, P, N', M]}``."""
    if len(x) != manifolds * points:
      raise ValueError(f'build: {len(x)} examples, expected P * M = {manifolds} * {points}')
    k_attack, k_features = jax.random.split(key)
    x_adv = self.perturb(params, x, y, eps, k_attack)
    out = {}
    for name, f in self.features(params, x_adv, k_features).items():
      s, _, n = f.shape
      out[name] = np.ascontiguousarray(f.reshape(s, manifolds, points, n).transpose(0, 1, 3, 2))
    return out

  def class_manifolds(self, params, x, y, *, classes: int, per_class: int, eps: float,
                      key: jax.Array) -> dict[str, np.ndarray]:
    """P = ``classes`` class manifolds of M = ``per_class`` images (the first
    of each class in ``x [n, ...], y [n]``): ``{layer: [S, P, N', M]}``."""
    xs, ys = select_class_examples(x, y, classes, per_class)
    return self.build(params, xs, ys, classes, per_class, eps, key)

  def exemplar_manifolds(self, params, x, y, *, exemplars: int, repeats: int, eps: float,
                         key: jax.Array) -> dict[str, np.ndarray]:
    """P = ``exemplars`` images (the first of ``x``), each repeated M =
    ``repeats`` times, every repeat attacked from its own random start (and
    with its own noise): ``{layer: [S, P, N', M]}``."""
    xs, ys = select_exemplars(x, y, exemplars, repeats)
    return self.build(params, xs, ys, exemplars, repeats, eps, key)
