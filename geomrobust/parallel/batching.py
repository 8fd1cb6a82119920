"""Applying a function to a large array in fixed-size chunks inside jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def map_batches(fn, xs, batch_size: int):
  """``fn`` over leading-axis chunks of ``xs`` (a pytree of ``[N, ...]`` arrays).

  Pads N up to a multiple of ``batch_size`` (repeating the last example),
  runs ``lax.map`` over ``[N / batch_size, batch_size, ...]`` and drops the
  padding, so one compiled program handles any N and memory stays bounded.
  Returns ``fn``'s outputs concatenated along axis 0.
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  bs = min(batch_size, n)
  n_chunks = -(-n // bs)
  pad = n_chunks * bs - n

  def chunk(a):
    if pad:
      a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)], axis=0)
    return a.reshape((n_chunks, bs) + a.shape[1:])

  out = jax.lax.map(fn, jax.tree.map(chunk, xs))
  return jax.tree.map(lambda o: o.reshape((n_chunks * bs,) + o.shape[2:])[:n], out)
