"""Geometry of the threat models: eps-balls for ``'linf'`` and ``'l2'``, and the input box.

Every function takes a batch ``x`` of shape ``[B, ...]`` (NHWC images or flat
vectors). ``eps`` may be a Python float, a traced scalar, or a per-example
array ``[B]``; it is broadcast against ``x`` by :func:`expand_to`. Norms are
taken over all non-batch axes.

The valid input box: every attack takes ``box=(lo, hi)`` (default
``(0.0, 1.0)``, the pixel scale of images) and keeps its points inside
``[lo, hi]`` coordinate-wise; ``box=None`` means the inputs have no valid box
(e.g. synthetic float vectors) and only the eps-ball constrains the attack.
``box`` is static (a hashable tuple of Python floats, or None), never traced.
"""

import jax
import jax.numpy as jnp

NORMS = ('linf', 'l2')

# The valid input range, (lo, hi) per coordinate, or None for no box.
Box = tuple[float, float] | None
UNIT_BOX = (0.0, 1.0)

# Guards divisions by a norm; far below any meaningful eps (on the [0, 1] scale and above).
_TINY = 1e-12


def check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f'unknown norm {norm!r}; available: {", ".join(NORMS)}')


def check_box(box) -> Box:
  """``box`` as a hashable ``(float lo, float hi)`` with lo < hi, or None (no box)."""
  if box is None:
    return None
  try:
    lo, hi = box
    lo, hi = float(lo), float(hi)
  except (TypeError, ValueError):
    raise ValueError(f'box must be (lo, hi) or None, got {box!r}') from None
  if not lo < hi:
    raise ValueError(f'box needs lo < hi, got {box!r}')
  return (lo, hi)


def clip_to_box(x: jax.Array, box: Box) -> jax.Array:
  """``clip(x, lo, hi)`` for ``box=(lo, hi)``; ``x`` unchanged for ``box=None``."""
  box = check_box(box)
  if box is None:
    return x
  return jnp.clip(x, box[0], box[1])


def expand_to(v, x: jax.Array) -> jax.Array:
  """Broadcasts a scalar or per-example ``v`` ([] or [B]) against ``x`` [B, ...].

  Returns an array of shape [] or [B, 1, ..., 1] in ``x.dtype``.
  """
  v = jnp.asarray(v, x.dtype)
  if v.ndim == 0:
    return v
  if v.ndim != 1:
    raise ValueError(f'expected a scalar or a per-example [B] array, got shape {v.shape}')
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _flat_l2(v: jax.Array) -> jax.Array:
  """[B, ...] -> [B, 1, ..., 1] Euclidean norm, kept broadcastable."""
  axes = tuple(range(1, v.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def per_example_norm(v: jax.Array, norm: str) -> jax.Array:
  """[B, ...] -> [B]: the ``norm`` of each example's entries."""
  check_norm(norm)
  flat = v.reshape(v.shape[0], -1)
  if norm == 'linf':
    return jnp.max(jnp.abs(flat), axis=1)
  return jnp.sqrt(jnp.sum(jnp.square(flat), axis=1))


def project(x_adv: jax.Array, x: jax.Array, eps, norm: str, *, box: Box = UNIT_BOX) -> jax.Array:
  """Projects ``x_adv`` [B, ...] onto the ``eps``-ball around ``x`` and onto ``box``.

  Ball first, then box (``box=None``: the ball only). Since ``x`` itself lies
  in the box, clipping to the box only shrinks each coordinate of
  ``x_adv - x``, so the result stays inside the ball for both norms (for l2
  this is not the exact Euclidean projection onto the intersection, but it is
  the standard, cheap one). Up to float rounding (~1e-7 on the [0, 1] scale)
  the output satisfies both constraints.
  """
  check_norm(norm)
  eps = expand_to(eps, x)
  delta = x_adv - x
  if norm == 'linf':
    delta = jnp.clip(delta, -eps, eps)
  else:
    # Shrink only those examples outside the ball; eps=0 gives exactly zero.
    scale = jnp.minimum(1.0, eps / jnp.maximum(_flat_l2(delta), _TINY))
    delta = delta * scale
  return clip_to_box(x + delta, box)


def step_direction(g: jax.Array, norm: str) -> jax.Array:
  """The steepest-ascent unit direction for gradient ``g`` [B, ...].

  linf: ``sign(g)``; l2: ``g / ||g||_2`` per example, and 0 where ``g == 0``.
  """
  check_norm(norm)
  if norm == 'linf':
    return jnp.sign(g)
  return g / jnp.maximum(_flat_l2(g), _TINY)


def random_init(rng: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  """A perturbation [B, ...] drawn uniformly from the ``eps``-ball (not yet box-clipped).

  linf: i.i.d. U[-eps, eps]. l2: a uniform direction times radius
  ``eps * u**(1/d)`` with ``d`` the number of input dimensions, which is the
  uniform distribution on the d-ball (not just on its surface).
  """
  check_norm(norm)
  eps = expand_to(eps, x)
  if norm == 'linf':
    return eps * jax.random.uniform(rng, x.shape, x.dtype, -1.0, 1.0)
  k_dir, k_rad = jax.random.split(rng)
  d = x[0].size
  direction = step_direction(jax.random.normal(k_dir, x.shape, x.dtype), 'l2')
  u = jax.random.uniform(k_rad, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
  return eps * direction * u ** (1.0 / d)


def random_surface(rng: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  """A perturbation [B, ...] of norm exactly ``eps`` (before box clipping).

  linf: a uniformly random corner ``eps * (+-1)``; l2: a uniform direction
  (normalised Gaussian) scaled to length ``eps``.
  """
  check_norm(norm)
  eps = expand_to(eps, x)
  if norm == 'linf':
    return eps * jax.random.rademacher(rng, x.shape, x.dtype)
  return eps * step_direction(jax.random.normal(rng, x.shape, x.dtype), 'l2')
