"""Activations and initialisers shared by the models."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def _fermi_bose(x):
  # The local-contrastive paper's hidden unit: (1 + tanh(x)) / 2, in (0, 1).
  return 0.5 * (1.0 + jnp.tanh(x))


ACTIVATIONS = {
    'relu': nn.relu,
    'tanh': jnp.tanh,
    'sigmoid': nn.sigmoid,
    'gelu': nn.gelu,
    'half_tanh': _fermi_bose,
    'identity': lambda x: x,
}


def get_activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; available: {", ".join(sorted(ACTIVATIONS))}')
  return ACTIVATIONS[name]


def _torch_uniform(fan_in_axes=(0,)):
  """PyTorch's nn.Linear/Conv default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:-1])  # Flax kernels are [..., in, out].
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _normal_fan_in():
  """N(0, 1/fan_in) weights, the local-contrastive paper's init."""

  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:-1])
    return jax.random.normal(key, shape, dtype) / math.sqrt(fan_in)

  return init


INITS = ('lecun', 'torch', 'normal_fan_in', 'he')


def kernel_init(name: str):
  if name == 'lecun':
    return nn.initializers.lecun_normal()
  if name == 'he':
    return nn.initializers.he_normal()
  if name == 'torch':
    return _torch_uniform()
  if name == 'normal_fan_in':
    return _normal_fan_in()
  raise ValueError(f'unknown init {name!r}; available: {", ".join(INITS)}')


def dense(features: int, init: str, use_bias: bool, name: str) -> nn.Module:
  """A Dense layer; ``torch`` init also draws the bias from U(+-1/sqrt(fan_in))."""
  if init == 'torch':
    return _TorchDense(features=features, use_bias=use_bias, name=name)
  return nn.Dense(features, use_bias=use_bias, kernel_init=kernel_init(init),
                  bias_init=nn.initializers.zeros, name=name)


class _TorchDense(nn.Module):
  """Dense layer with PyTorch default init for weights *and* bias."""

  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    bound = 1.0 / math.sqrt(fan_in)
    kernel = self.param('kernel', _torch_uniform(), (fan_in, self.features))
    y = x @ kernel
    if self.use_bias:
      bias = self.param(
          'bias', lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound), (self.features,))
      y = y + bias
    return y
