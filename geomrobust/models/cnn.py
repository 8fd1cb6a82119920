"""Small convolutional network (the Madry et al. MNIST architecture by default)."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from geomrobust import config as config_lib
from geomrobust.models import common
from geomrobust.models import pool
from geomrobust.models.conv import Conv

# Valid config.model values (each entry of a sequence); see config.field_bounds.
BOUNDS = {'channels': config_lib.integer(1, example=32), 'convs_per_block': config_lib.integer(1),
          'kernel_size': config_lib.integer(1, example=5), 'dense': config_lib.integer(1, example=1024)}


class SmallCNN(nn.Module):
  """Conv blocks (conv -> activation -> 2x2 max-pool) then Dense layers.

  Defaults give Madry et al.'s MNIST network: conv32(5x5) - pool - conv64(5x5)
  - pool - fc1024 - fc10. ``convs_per_block=2`` with ``channels=(32, 64)`` and
  ``dense=(200, 200)`` gives the ASCL / TRADES MNIST network.

  ``__call__(x)`` takes ``x: float32 [B, H, W, C]`` and returns
  ``(logits [B, num_classes], reps)``: one representation per conv block
  (``[B, H', W', C']``) and per hidden Dense layer (``[B, width]``).
  """

  channels: Sequence[int] = (32, 64)
  convs_per_block: int = 1
  kernel_size: int = 5
  dense: Sequence[int] = (1024,)
  num_classes: int = 10
  activation: str = 'relu'
  weight_init: str = 'lecun'

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    act = common.get_activation(self.activation)
    kinit = common.kernel_init(self.weight_init)
    reps = []
    h = x
    for b, ch in enumerate(self.channels):
      for c in range(self.convs_per_block):
        h = act(Conv(ch, (self.kernel_size, self.kernel_size), padding='SAME',
                        kernel_init=kinit, name=f'conv_{b}_{c}')(h))
      h = pool.max_pool(h, (2, 2))
      reps.append(h)
    h = h.reshape((h.shape[0], -1))
    for k, width in enumerate(self.dense):
      h = act(common.dense(width, self.weight_init, True, name=f'hidden_{k}')(h))
      reps.append(h)
    logits = common.dense(self.num_classes, self.weight_init, True, name='out')(h)
    return logits, tuple(reps)
