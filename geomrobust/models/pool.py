"""Max-pooling whose gradient on the CPU is a select, not a scatter.

Why: ``nn.max_pool`` is ``lax.reduce_window``, whose gradient XLA emits as a
``select_and_scatter``; on the CPU that op runs a scalar loop over windows and
was the largest single cost of an attack step on the MNIST CNN (measured on a
2-core CPU, batch 500, inside ``fori_loop``: 2,800 input gradients/s with it,
4,400 with the rewrite below; PyTorch's oneDNN does ~4,300). For
non-overlapping windows (window == stride, the only pooling the models here
use) the same function is a reshape and a max, and its gradient goes to the
*first* maximal entry of each window in row-major order, exactly the entry
``select_and_scatter`` picks, so values and gradients are bit-identical to
the plain op, ties included (a ReLU feeding the pool makes all-zero windows
common; ``jnp.max``'s own gradient would split those between the ties).

The rewrite is chosen per backend by ``lax.platform_dependent``: CPU programs
get it, GPU/TPU programs keep ``reduce_window`` (their pooling gradient is
fast). Overlapping windows, strides other than the window, and padding fall
back to ``nn.max_pool`` everywhere.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _blocks(x: jax.Array, wh: int, ww: int) -> jax.Array:
  """[B, H, W, C] -> [B, H', wh, W', ww, C] (a reshape, no copy); the rows and
  columns past the last whole window are dropped, like 'VALID'."""
  b, h, w, c = x.shape
  ho, wo = h // wh, w // ww
  return x[:, :ho * wh, :wo * ww].reshape(b, ho, wh, wo, ww, c)


@jax.custom_vjp
def _pool_blocks(blocks: jax.Array) -> jax.Array:
  return blocks.max(axis=(2, 4))


def _pool_fwd(blocks):
  out = blocks.max(axis=(2, 4))
  return out, (blocks, out)


def _pool_bwd(res, g):
  blocks, out = res
  wh, ww = blocks.shape[2], blocks.shape[4]
  zero = jnp.zeros((), g.dtype)
  seen = jnp.zeros(out.shape, bool)
  rows = []
  for i in range(wh):  # row-major over the window, unrolled (a window has a few entries)
    cols = []
    for j in range(ww):
      first = (blocks[:, :, i, :, j] == out) & ~seen  # the first maximum only
      cols.append(jnp.where(first, g, zero))
      seen = seen | first
    rows.append(jnp.stack(cols, axis=3))            # [B, H', W', ww, C]
  return (jnp.stack(rows, axis=2),)                 # [B, H', wh, W', ww, C]


_pool_blocks.defvjp(_pool_fwd, _pool_bwd)


def _select_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  return _pool_blocks(_blocks(x, *window))


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int] | None = None,
             padding: str = 'VALID') -> jax.Array:
  """``nn.max_pool(x, window, strides, padding)`` for ``x [B, H, W, C]``, same values and
  gradients; non-overlapping 'VALID' windows use the select-gradient form on the CPU."""
  window = tuple(int(w) for w in window)
  strides = window if strides is None else tuple(int(s) for s in strides)
  plain = lambda v: nn.max_pool(v, window, strides=strides, padding=padding)
  if strides != window or padding != 'VALID' or x.ndim != 4 or len(window) != 2:
    return plain(x)
  return jax.lax.platform_dependent(x, cpu=lambda v: _select_pool(v, window), default=plain)
