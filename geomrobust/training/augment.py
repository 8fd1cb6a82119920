"""Training-time data augmentation, run inside the compiled epoch.

The dataset lives on the device and the epoch gathers its batches inside
``lax.scan`` (``loop.make_epoch``), so augmentation is a pure function of a
PRNG key and the gathered batch, traced into the same program: no host round
trip. ``config.train.augment`` names one (``''``: none, the default).

  crop_flip  the standard CIFAR recipe: pad 4 pixels with zeros on each side,
             take a random crop of the original size, then flip left-right
             with probability 1/2, independently per example (PyTorch's
             ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# (rng, images float32 [B, H, W, C]) -> images [B, H, W, C].
Augment = Callable[[jax.Array, jax.Array], jax.Array]

CROP_PAD = 4


def random_crop_flip(rng: jax.Array, images: jax.Array, pad: int = CROP_PAD) -> jax.Array:
  """Zero-pad by ``pad``, crop back to ``[H, W]`` at a random offset, random flip.

  Args:
    rng: a PRNG key; each example gets its own offsets and flip.
    images: ``[B, H, W, C]``.
    pad: pixels of zero padding per side (offsets are uniform in ``[0, 2*pad]``).

  Returns:
    ``[B, H, W, C]``, same dtype.
  """
  b, h, w, c = images.shape
  k_off, k_flip = jax.random.split(rng)
  offsets = jax.random.randint(k_off, (b, 2), 0, 2 * pad + 1)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

  out = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(k_flip, 0.5, (b,))
  return jnp.where(flip[:, None, None, None], out[:, :, ::-1, :], out)


AUGMENTATIONS: dict[str, Augment] = {'crop_flip': random_crop_flip}


def get_augment(name: str) -> Augment | None:
  """The augmentation called ``name``, or None for ``''`` / ``'none'``."""
  if name in ('', 'none'):
    return None
  if name not in AUGMENTATIONS:
    raise ValueError(f'unknown train.augment {name!r}; available: none, {", ".join(sorted(AUGMENTATIONS))}')
  return AUGMENTATIONS[name]
