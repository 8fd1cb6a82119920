"""Multi-layer perceptron that exposes every hidden representation."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from geomrobust import config as config_lib
from geomrobust.models import common

# Valid config.model values (each entry of a sequence); see config.field_bounds.
BOUNDS = {'hidden': config_lib.integer(1, example=100)}


class MLP(nn.Module):
  """Fully connected network on flattened inputs.

  Attributes:
    hidden: widths of the hidden layers (layer k is named ``hidden_k``).
    num_classes: width of the linear readout (named ``out``).
    activation: name in ``common.ACTIVATIONS``.
    weight_init: name in ``common.INITS`` (``torch`` = PyTorch's default uniform).
    use_bias: whether the Dense layers have biases.

  ``__call__(x)`` takes ``x: float32 [B, ...]`` (any trailing shape; it is
  flattened) and returns ``(logits [B, num_classes], reps)`` where ``reps`` is a
  tuple with one ``[B, hidden[k]]`` array per hidden layer, post-activation.
  """

  hidden: Sequence[int]
  num_classes: int
  activation: str = 'relu'
  weight_init: str = 'lecun'
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No train-mode behaviour (no dropout / batch norm) in this model.
    act = common.get_activation(self.activation)
    h = x.reshape((x.shape[0], -1))
    reps = []
    for k, width in enumerate(self.hidden):
      h = act(common.dense(width, self.weight_init, self.use_bias, name=f'hidden_{k}')(h))
      reps.append(h)
    logits = common.dense(self.num_classes, self.weight_init, self.use_bias, name='out')(h)
    return logits, tuple(reps)
