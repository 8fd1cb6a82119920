"""Two-class models of the feature-purification task (``papers/feature_purification.md``).

Both return ``(logits [B, 2], reps)`` with logits ``[-f/2, f/2]`` for a scalar
score ``f``, so the softmax cross-entropy of label ``y`` is the logistic loss
``log(1 + exp(-s f))`` with ``s = 2y - 1``, and the margin is ``s f``.

``SymmetricReLU`` (``model.name='symmetric_relu'``): the theory's network

  f(x) = sum_i a_i [ act(<w_i, x> - b_i) - act(-<w_i, x> - b_i) ]

with ``m`` neurons ``w_i`` (the columns of the parameter ``w``, ``[d, m]``,
init N(0, init_std^2)), threshold ``b_i = threshold * ||w_i||`` held constant
(``stop_gradient``: it moves with the weights but passes no gradient), ``act``
the ReLU or, with ``smooth > 0``, the smoothed ReLU (quadratic on
``[0, smooth]``, then linear), and output weights ``a_i`` a *constant*
(Flax collection ``constants``, name ``out``; ones, never trained). The ideal
classifier f* of the spec is this network with ``w = M`` and ``a = w*``.
f is odd: ``f(-x) = -f(x)``. reps: ``(h [B, m],)``, the neurons' outputs.

``Poly2`` (``model.name='poly2'``): the degree-2 polynomial
``f(x) = <v, x> + x^T Q x + c`` (parameters ``linear`` [d], ``quadratic``
[d, d], ``bias``), the lower-bound baseline of low-degree polynomials.
reps: ``((<v, x>, x^T Q x) [B, 2],)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from geomrobust import config as config_lib

BOUNDS = {'width': config_lib.integer(0, example=512), 'init_std': config_lib.number(0, example=0.01),
          'threshold': config_lib.number(0, example=0.5), 'smooth': config_lib.number(0, example=0.0)}


def _two_logits(f: jax.Array) -> jax.Array:
  """``f [B] -> [B, 2]``: ``[-f/2, f/2]`` (softmax CE = logistic loss of ``f``)."""
  return jnp.stack([-0.5 * f, 0.5 * f], axis=-1)


def smoothed_relu(z: jax.Array, width: float) -> jax.Array:
  """ReLU (``width == 0``) or its smoothing: ``z^2 / (2 width)`` on ``[0, width]``,
  ``z - width / 2`` above (continuous with a continuous slope)."""
  if width <= 0:
    return jax.nn.relu(z)
  return jnp.where(z <= 0, 0.0, jnp.where(z < width, z * z / (2 * width), z - width / 2))


def _check_binary(num_classes: int, name: str) -> None:
  if num_classes != 2:
    raise ValueError(f'model {name!r} is a two-class model (a scalar score f), got num_classes={num_classes}; '
                     'use it with a two-class dataset such as sparse_coding')


class SymmetricReLU(nn.Module):
  """The symmetric two-layer ReLU network (see the module docstring).

  Attributes:
    width: neurons m (0 = twice the input dimension, the spec's m = 2d).
    init_std: standard deviation of the Gaussian init of ``w``.
    threshold: ``b_i = threshold * ||w_i||``.
    smooth: width of the smoothed ReLU (0 = plain ReLU).
  """

  width: int = 0
  init_std: float = 0.01
  threshold: float = 0.5
  smooth: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    h = x.reshape((x.shape[0], -1))
    m = int(self.width) or 2 * h.shape[-1]
    w = self.param('w', nn.initializers.normal(self.init_std), (h.shape[-1], m))
    out = self.variable('constants', 'out', lambda: jnp.ones((m,), jnp.float32)).value
    b = jax.lax.stop_gradient(self.threshold * jnp.linalg.norm(w, axis=0))      # [m]
    pre = h @ w                                                                    # [B, m]
    act = smoothed_relu(pre - b, self.smooth) - smoothed_relu(-pre - b, self.smooth)
    return _two_logits(act @ out), (act,)


class Poly2(nn.Module):
  """Degree-2 polynomial score (see the module docstring)."""

  init_std: float = 0.01

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    h = x.reshape((x.shape[0], -1))
    d = h.shape[-1]
    v = self.param('linear', nn.initializers.normal(self.init_std), (d,))
    q = self.param('quadratic', nn.initializers.normal(self.init_std / d ** 0.5), (d, d))
    c = self.param('bias', nn.initializers.zeros, ())
    lin, quad = h @ v, jnp.einsum('bi,ij,bj->b', h, q, h)
    return _two_logits(lin + quad + c), (jnp.stack([lin, quad], -1),)


def build_symmetric(c, num_classes: int) -> SymmetricReLU:
  _check_binary(num_classes, 'symmetric_relu')
  return SymmetricReLU(width=int(c.get('width', 0)), init_std=float(c.get('init_std', 0.01)),
                       threshold=float(c.get('threshold', 0.5)), smooth=float(c.get('smooth', 0.0)))


def build_poly2(c, num_classes: int) -> Poly2:
  _check_binary(num_classes, 'poly2')
  return Poly2(init_std=float(c.get('init_std', 0.01)))
