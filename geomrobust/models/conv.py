"""2-D convolution whose gradients are themselves plain forward convolutions.

Why: XLA:CPU runs the convolutions that JAX's autodiff emits for a conv's
gradients (a kernel-flipped, in/out-swapped conv for the input gradient; a
batch/feature-swapped conv for the kernel gradient) on a slow generic path
when they sit inside a loop body (``lax.scan`` / ``fori_loop`` / ``while``),
which is exactly where this project runs them: attacks step in a
``fori_loop`` and training epochs are one ``lax.scan``. Measured on a 2-core
CPU for a conv16-conv32 MNIST CNN, inside ``lax.scan``: input gradients 117
vs 3,098 examples/s, kernel gradients 27 vs 2,932 examples/s (autodiff vs the
rewrite below); outside loops both are fast. Rewriting each gradient as an
ordinary forward convolution on explicitly transposed operands keeps every
conv on the fast path, with the same values (tested against autodiff).
Accelerators compute the same numbers either way.

On the CPU a convolution with few input channels (at most
``PATCHES_MAX_CHANNELS``: an image's first layer) is further lowered to
patches and one matmul (``conv_patches``), with its gradients as matmuls and
shifted sums: XLA:CPU's convolution does little work per tap when each tap
contracts over 1-3 channels, while its GEMM runs at full speed. Measured on a
2-core CPU, input gradients inside ``fori_loop``: MNIST conv1 (1 -> 16, 5x5)
10,200 vs 19,500 examples/s, CIFAR conv1 (3 -> 32, 3x3) 3,500 vs 10,100; at
8 input channels the plain conv is faster (16,100 vs 12,800). The choice is
made per backend (``lax.platform_dependent``): GPU/TPU programs keep the
plain convolution. Both forms compute the same sums in another order, so
they agree to float rounding (tested), not bit for bit.

Only stride-1, undilated, ungrouped convolutions are rewritten; anything else
falls back to ``lax.conv_general_dilated`` and its own autodiff.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_DIMS = ('NHWC', 'HWIO', 'NHWC')
Padding = tuple[tuple[int, int], tuple[int, int]]
# On the CPU, convolutions with at most this many input channels run as patches + matmul.
PATCHES_MAX_CHANNELS = 4


def _conv(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_DIMS)


def conv2d(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """Stride-1 convolution ``x [B, H, W, C] * kernel [kh, kw, C, O] -> [B, H', W', O]``.

  ``padding``: ``((top, bottom), (left, right))`` zero padding of ``x``. On
  the CPU, ``C <= PATCHES_MAX_CHANNELS`` runs as :func:`conv_patches`.
  """
  if x.shape[-1] > PATCHES_MAX_CHANNELS:
    return conv_forward_grads(x, kernel, padding)
  return jax.lax.platform_dependent(x, kernel, cpu=lambda a, k: conv_patches(a, k, padding),
                                    default=lambda a, k: conv_forward_grads(a, k, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_forward_grads(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """:func:`conv2d` as ``lax`` convolutions, gradients included (see the module doc)."""
  return _conv(x, kernel, padding)


def _fwd(x, kernel, padding):
  return _conv(x, kernel, padding), (x, kernel)


def _bwd(padding, res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  (top, bottom), (left, right) = padding
  # d/dx: the "full" correlation of g with the flipped kernel, in/out swapped.
  flipped = jnp.transpose(jnp.flip(kernel, (0, 1)), (0, 1, 3, 2))
  dx = _conv(g, flipped, ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)))
  # d/dkernel: correlate x with g over the batch, i.e. a conv whose "batch" is
  # x's channels and whose "features" are the examples.
  dk = _conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), padding)  # [C, kh, kw, O]
  return dx.astype(x.dtype), jnp.transpose(dk, (1, 2, 0, 3)).astype(kernel.dtype)


conv_forward_grads.defvjp(_fwd, _bwd)


def _padded(x, padding):
  (top, bottom), (left, right) = padding
  return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def _patches(x, kh: int, kw: int, padding) -> jax.Array:
  """[B, H, W, C] -> [B, H', W', kh * kw * C]: the input under each output pixel,
  ordered (i, j, c) like ``kernel.reshape(kh * kw * C, O)``."""
  # XLA fuses an elementwise producer of x into each of the kh * kw slices below (it computes
  # it kh * kw times): callers that run this in a loop pass a loop variable (attacks/apgd.py).
  xp = _padded(x, padding)
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  taps = [xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)]
  return jnp.concatenate(taps, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_patches(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """:func:`conv2d` as one matmul of the input patches with the flattened kernel."""
  kh, kw, c, o = kernel.shape
  return _patches(x, kh, kw, padding) @ kernel.reshape(kh * kw * c, o)


def _patches_fwd(x, kernel, padding):
  return conv_patches(x, kernel, padding), (x, kernel)


def _patches_bwd(padding, res, g):
  x, kernel = res
  kh, kw, c, o = kernel.shape
  b, h, w, _ = x.shape
  ho, wo = g.shape[1:3]
  (top, bottom), (left, right) = padding
  # d/dpatches = g K^T. Tap (i, j) of output pixel (y, x) was cut from padded-input pixel
  # (y + i, x + j): padding the taps' pixels by the kernel size makes every tap's
  # contribution one slice, and the input gradient one sum of kh * kw slices.
  d_taps = (g @ kernel.reshape(kh * kw * c, o).T).reshape(b, ho, wo, kh * kw, c)
  d_taps = jnp.pad(d_taps, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0), (0, 0)))
  hp, wp = h + top + bottom, w + left + right
  dxp = sum(d_taps[:, kh - 1 - t // kw:kh - 1 - t // kw + hp, kw - 1 - t % kw:kw - 1 - t % kw + wp, t]
            for t in range(kh * kw))                                                 # [B, hp, wp, C]
  dx = dxp[:, top:top + h, left:left + w]
  # d/dkernel = patches^T g, contracted over every output pixel of every example.
  dk = jnp.einsum('bhwk,bhwo->ko', _patches(x, kh, kw, padding), g)
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


conv_patches.defvjp(_patches_fwd, _patches_bwd)


def same_padding(kernel_size: Sequence[int]) -> Padding:
  """lax's 'SAME' padding for a stride-1 conv: the extra pixel goes last."""
  return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size)


class Conv(nn.Module):
  """Drop-in for ``nn.Conv`` (NHWC, params ``kernel [kh, kw, C, O]`` and ``bias [O]``).

  ``padding``: 'SAME', 'VALID' or ``((top, bottom), (left, right))``.
  Stride 1 uses :func:`conv2d`; other strides use ``lax`` directly.
  """

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = 'SAME'
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ks = tuple(self.kernel_size)
    kernel = self.param('kernel', self.kernel_init, ks + (x.shape[-1], self.features))
    if isinstance(self.padding, str):
      if self.padding not in ('SAME', 'VALID'):
        raise ValueError(f"Conv padding must be 'SAME', 'VALID' or explicit pairs, got {self.padding!r}")
      pad = same_padding(ks) if self.padding == 'SAME' else ((0, 0), (0, 0))
    else:
      pad = tuple(tuple(int(v) for v in p) for p in self.padding)
    if tuple(self.strides) == (1, 1):
      y = conv2d(x, kernel.astype(x.dtype), pad)
    else:
      if isinstance(self.padding, str) and self.padding == 'SAME':
        pad = self.padding  # lax computes strided SAME padding itself
      y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), tuple(self.strides), pad,
                                       dimension_numbers=_DIMS)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,))
    return y
