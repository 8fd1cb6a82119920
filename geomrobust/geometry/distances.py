"""Pairwise distances used by losses and diagnostics."""

import jax
import jax.numpy as jnp


def flatten(x: jax.Array) -> jax.Array:
  """``[B, ...] -> [B, D]``."""
  return x.reshape((x.shape[0], -1))


def pairwise_sq_dists(a: jax.Array, b: jax.Array | None = None) -> jax.Array:
  """Squared Euclidean distances ``[B, D] x [M, D] -> [B, M]``.

  The Gram form (one matmul) is much cheaper than materialising ``[B, M, D]``
  differences; cancellation can make it slightly negative, so it is clipped at 0.
  """
  b = a if b is None else b
  sq_a = jnp.sum(a * a, axis=-1)
  sq_b = jnp.sum(b * b, axis=-1)
  d = sq_a[:, None] + sq_b[None, :] - 2.0 * a @ b.T
  return jnp.maximum(d, 0.0)


def pairwise_dists(a: jax.Array, b: jax.Array | None = None, min_sq: float = 1e-12) -> jax.Array:
  """Euclidean distances ``[B, M]``; the square is clipped at ``min_sq`` because
  d sqrt(s)/ds is infinite at s = 0 (NaN gradients on the diagonal otherwise)."""
  return jnp.sqrt(jnp.maximum(pairwise_sq_dists(a, b), min_sq))
