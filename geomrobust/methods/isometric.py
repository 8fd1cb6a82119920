"""Isometric regularisation (Beshkov, Verhellen & Lepperoed 2022, arXiv 2211.01236).

Cross-entropy plus a term that keeps *within-class* input distances in a hidden
layer h:

  L = CE + beta * mean_{i,j in batch}( (K * Y_ij * D(h)_ij - Y_ij * D(x)_ij)^2 )

with Y_ij = 1 for same-label pairs (diagonal included), D Euclidean distance
matrices, the mean over all B^2 entries (cross-class entries count as zeros)
and D(x) of raw pixels a constant. ``beta = 0`` is plain cross-entropy, so the
baseline shares every line with the method.

Config (``config.method``):
  beta             weight of the isometry term (0 = plain CE).
  k                scale K between hidden and input distances.
  levels           hierarchical ("stacked") variant: coarse-to-fine label
                   partitions *before* the final full-label level, each a
                   string of num_classes comma-separated group ids, e.g.
                   ``('0,0,0,0,0,1,1,1,1,1', '0,0,1,1,2,2,3,3,4,4')``. Empty =
                   the plain method.
  depth_per_level  hidden layers per level (hierarchical only): level l reads
                   the representation after (l+1)*depth_per_level hidden
                   layers, has its own linear head, CE and isometry loss
                   (against *input* distances, same-class mask of level l), and
                   is trained for train.epochs with earlier blocks frozen.
  min_sq_dist      clip for squared distances before sqrt (NaN-free gradients).

Probes that fit it: ``isometry`` (the diagnostics per layer) and
``train_loss_fgsm`` (the authors' FGSM on CE + beta * iso), see
``geomrobust/probes/``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust import config as config_lib
from geomrobust.geometry import distances
from geomrobust.methods import base


def isometry_penalty(h: jax.Array, x: jax.Array, labels: jax.Array, k: jax.Array,
                     min_sq: float = 1e-12) -> jax.Array:
  """``mean((K*Y*D(h) - Y*D(x))^2)`` over all B^2 entries.

  Args:
    h: ``[B, ...]`` representation (gradients flow through it).
    x: ``[B, ...]`` inputs (treated as constant).
    labels: ``[B]`` labels defining the same-class mask Y.
    k: scalar K.
    min_sq: clip for squared distances.
  """
  same = (labels[:, None] == labels[None, :]).astype(h.dtype)
  dh = distances.pairwise_dists(distances.flatten(h), min_sq=min_sq)
  dx = jax.lax.stop_gradient(distances.pairwise_dists(distances.flatten(x), min_sq=min_sq))
  return jnp.mean((k * same * dh - same * dx) ** 2)


def parse_partition(text: str, num_classes: int) -> np.ndarray:
  groups = [int(g) for g in text.split(',')]
  if len(groups) != num_classes:
    raise ValueError(f'hierarchy level {text!r} must list a group id for each of the {num_classes} classes')
  return np.asarray(groups, np.int32)


class Isometric(base.Method):
  """CE + beta * within-class isometry on the last hidden layer (or per level)."""

  BOUNDS = {'beta': config_lib.number(0, example=0.1), 'k': config_lib.number(above=0, example=1.0),
            'depth_per_level': config_lib.integer(1),
            'min_sq_dist': config_lib.number(above=0, example=1e-12)}  # > 0: sqrt's gradient at 0 is NaN

  def __init__(self, model, config, num_classes):
    super().__init__(model, config, num_classes)
    m = config.method
    self.levels = [parse_partition(t, num_classes) for t in (m.get('levels') or ())]
    self.depth = int(m.get('depth_per_level', 1))
    self.min_sq = float(m.get('min_sq_dist', 1e-12))
    if self.levels:
      n_hidden = len(config.model.hidden)
      need = (len(self.levels) + 1) * self.depth
      if n_hidden != need:
        raise ValueError(f'hierarchical isometric with {len(self.levels)} coarse levels and depth_per_level='
                         f'{self.depth} needs {need} hidden layers, model.hidden has {n_hidden}')

  def hparams(self):
    return {'beta': jnp.float32(self.config.method.beta), 'k': jnp.float32(self.config.method.k)}

  # -- parameters: one extra linear head per coarse level ------------------

  def init_params(self, rng, example_x):
    model_rng, head_rng = jax.random.split(rng)
    params = super().init_params(model_rng, example_x)
    if self.levels:
      width = self.config.model.hidden
      heads = {}
      for l, part in enumerate(self.levels):
        fan_in = width[(l + 1) * self.depth - 1]
        n_out = int(part.max()) + 1
        bound = 1.0 / math.sqrt(fan_in)  # PyTorch-style uniform, like the model.
        kw, kb = jax.random.split(jax.random.fold_in(head_rng, l))
        heads[f'level_{l}'] = {
            'kernel': jax.random.uniform(kw, (fan_in, n_out), jnp.float32, -bound, bound),
            'bias': jax.random.uniform(kb, (n_out,), jnp.float32, -bound, bound)}
      params['heads'] = heads
    return params

  # -- losses --------------------------------------------------------------

  def _loss(self, params, batch, rng, hparams, level: int | None):
    x, y = batch['image'], batch['label']
    logits, reps = self.apply(params, x, rng, train=True)
    if level is None or level == len(self.levels):
      h, labels_l, out = reps[-1], y, logits
    else:
      h = reps[(level + 1) * self.depth - 1]
      labels_l = jnp.asarray(self.levels[level])[y]
      head = params['heads'][f'level_{level}']
      out = h @ head['kernel'] + head['bias']
    ce = base.cross_entropy(out, labels_l)
    iso = isometry_penalty(h, x, labels_l, hparams['k'], self.min_sq)
    loss = ce + hparams['beta'] * iso
    return loss, {'ce': ce, 'iso': iso, 'accuracy': base.accuracy(out, labels_l)}

  def phases(self):
    epochs = self.config.train.epochs
    if not self.levels:
      return [base.Phase('train', epochs, functools.partial(self._loss, level=None))]
    phases = []
    for l in range(len(self.levels) + 1):
      own = {f'hidden_{i}' for i in range(l * self.depth, (l + 1) * self.depth)}
      own.add(f'level_{l}' if l < len(self.levels) else 'out')

      def trainable(path, own=frozenset(own)):
        return any(p in own for p in path)

      phases.append(base.Phase(f'level_{l}', epochs, functools.partial(self._loss, level=l), trainable))
    return phases


METHOD = Isometric
