"""Stochastic neurons: a noise layer with an explicit key, the fixed Gabor
"VOne" front end, and the networks built on them (papers/stochastic.md).

Noise (``NoiseLayer``), per unit, with e ~ N(0, 1):

  poisson   x + scale * e * sqrt(relu(s x + l) + 1e-4) / s,  s = 0.35, l = 0.07
            (mean x, variance (relu(s x + l) + 1e-4) / s^2 at scale 1: it grows
            with the mean, like a Poisson spike count);
  gaussian  x + scale * sigma * e,  sigma = 0.07;
  none      x (a deterministic network of the same architecture).

The layer returns the noisy pre-activation; the network applies the ReLU
after it (and reports the pre-ReLU output as that block's representation,
the point the paper's geometry reads). ``scale`` (config ``noise_scale``,
1 = the paper's noise) is kept as a *constant* leaf ``noise_scale`` in the
``constants`` collection, so a sweep can trace it (``methods.base``: the
``constants`` are in ``params['constants']``, never trained).

Randomness: the draw comes from the module's ``noise`` rng stream (the key
a method passes to ``apply`` / ``logits``), split per example, so example
``i`` of a batch of B gets ``split(key, B)[i]``: the noise does not depend on
how a batch is sharded over devices, and an example evaluated alone with key
k (as the evaluation does, per example) gets ``split(k, 1)[0]``. With
``frozen=True`` the layer ignores the stream and uses one fixed draw
(``frozen_seed``) for every call: a deterministic network, needed by the
frozen-noise sanity check (which passes one fixed key instead, the same
thing from outside). A stochastic model called without a key is an error.

VOne front end (``VOneBank``): a fixed bank of Gabor filters, half simple
cells ``relu(q0)`` and half complex cells ``sqrt(q0^2 + q1^2 + 1e-5) / sqrt(2)``
(q0, q1 a quadrature pair: the same Gabor with phases phi and phi + pi/2),
multiplied by ``k_exc`` = 25, applied to the input normalised to [-1, 1]
((x - 0.5) / 0.5, as VOneNet does). Each filter reads one input channel
(drawn at random for colour inputs). Spatial frequency (cycles per pixel)
is log-uniform in ``[sf_min, sf_max]`` with ``sf_max < 0.5`` (Nyquist),
orientation uniform in [0, pi), phase uniform in [0, 2 pi), envelope
widths ``sigma = n / sf`` with n ~ U(0.3, 0.6) cycles (x) and U(0.3, 0.9)
(y), capped at half the kernel; each kernel has zero mean (a uniform patch
gives no response) and is scaled by 1 / (2 pi sigma_x sigma_y). The bank is
computed with numpy from ``gabor_seed`` and compiled in as a constant: it is
not a parameter, so no optimiser ever sees it.

Networks:
  ``StochasticCNN`` (config name ``vone_cnn``): a first block (VOne bank or
  a learned conv, then the noise, ReLU, 2x2 max-pool), then the small
  CNN's conv blocks and dense layers. ``front_end='conv', noise='none'`` is
  the deterministic network with the same back end (the standard and
  PGD-AT baselines of the comparison); ``front_end='conv'`` with noise is
  the cheaper ablation.
  ``VOneResNet`` (config name ``vone_resnet18``): the first block (stride 1,
  no pool), a 1x1 "bottleneck" conv to ``width`` channels, then ResNet-18's
  stages without its stem.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geomrobust import config as config_lib
from geomrobust.models import common
from geomrobust.models import pool
from geomrobust.models import resnet
from geomrobust.models.conv import Conv, conv2d, same_padding

# The paper's noise constants (Dapello et al. 2021, VOneNet's Poisson-like noise).
POISSON_S = 0.35
POISSON_L = 0.07
GAUSSIAN_SIGMA = 0.07
NOISE_KINDS = ('poisson', 'gaussian', 'none')
FRONT_ENDS = ('vone', 'conv')
K_EXC = 25.0
# The constant leaf a sweep over the noise level sets (``params['constants']``).
NOISE_SCALE = 'noise_scale'


def poisson_like(x: jax.Array, e: jax.Array, scale=1.0, s: float = POISSON_S, l: float = POISSON_L) -> jax.Array:
  """``x + scale * e * sqrt(relu(s x + l) + 1e-4) / s`` elementwise (e: standard normal, x's shape)."""
  return x + scale * e * jnp.sqrt(nn.relu(s * x + l) + 1e-4) / s


def poisson_like_variance(x, scale=1.0, s: float = POISSON_S, l: float = POISSON_L):
  """The variance of :func:`poisson_like` at ``x`` (its mean is ``x``)."""
  return (scale ** 2) * (np.maximum(s * np.asarray(x, np.float64) + l, 0.0) + 1e-4) / s ** 2


def per_example_normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """N(0, 1) of ``shape = (B, ...)``: example i drawn with ``split(key, B)[i]``,
  so its draw depends on its position only, not on B's sharding."""
  keys = jax.random.split(key, shape[0])
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)


class NoiseLayer(nn.Module):
  """``x [B, ...] -> x + noise`` (see the module docstring); draws from the ``noise`` stream."""

  kind: str = 'poisson'
  scale: float = 1.0
  frozen: bool = False
  frozen_seed: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind not in NOISE_KINDS:
      raise ValueError(f'unknown noise {self.kind!r}; available: {", ".join(NOISE_KINDS)}')
    if self.kind == 'none':
      return x
    # A constant (never trained, never differentiated): what a noise-level sweep sets per member.
    scale = jax.lax.stop_gradient(
        self.variable('constants', NOISE_SCALE, lambda: jnp.float32(self.scale)).value)
    if self.frozen:
      key = jax.random.key(self.frozen_seed)
    elif self.has_rng('noise'):
      key = self.make_rng('noise')
    else:
      raise ValueError('this model draws noise at every call (a stochastic network): pass a key, '
                       'method.logits(params, x, rng) / model.apply(..., rngs={"noise": key})')
    e = per_example_normal(key, x.shape, x.dtype)
    if self.kind == 'poisson':
      return poisson_like(x, e, scale)
    return x + scale * GAUSSIAN_SIGMA * e


def gabor_bank(channels: int, kernel: int, in_channels: int = 1, *, seed: int = 0, sf_min: float = 0.1,
               sf_max: float = 0.3) -> tuple[np.ndarray, dict]:
  """The VOne filters: ``(kernel [k, k, in, n_simple + 2 n_complex] float32, info)``.

  ``channels`` output channels, the first half simple cells (one filter
  each), the rest complex cells (a quadrature pair each: their q0 filters
  follow the simple ones, their q1 filters come last). ``info`` holds each
  output channel's ``sf`` (cycles/pixel), ``theta``, ``phase``,
  ``sigma_x``, ``sigma_y`` and input ``channel`` (numpy [channels]).
  """
  if channels < 2 or kernel < 3:
    raise ValueError(f'a Gabor bank needs >= 2 channels and kernel >= 3, got {channels}, {kernel}')
  if not 0 < sf_min <= sf_max < 0.5:
    raise ValueError(f'Gabor frequencies must satisfy 0 < sf_min <= sf_max < 0.5 (Nyquist, cycles/pixel), '
                     f'got {sf_min}, {sf_max}')
  rng = np.random.default_rng(seed)
  n_simple = channels // 2
  n_complex = channels - n_simple
  sf = np.exp(rng.uniform(np.log(sf_min), np.log(sf_max), channels))
  theta = rng.uniform(0, np.pi, channels)
  phase = rng.uniform(0, 2 * np.pi, channels)
  half = kernel / 2
  sigma_x = np.minimum(rng.uniform(0.3, 0.6, channels) / sf, half)
  sigma_y = np.minimum(rng.uniform(0.3, 0.9, channels) / sf, half)
  src = rng.integers(0, in_channels, channels)
  r = np.arange(kernel) - (kernel - 1) / 2
  yy, xx = np.meshgrid(r, r, indexing='ij')

  def gabor(i, extra_phase):
    xr = xx * np.cos(theta[i]) + yy * np.sin(theta[i])
    yr = -xx * np.sin(theta[i]) + yy * np.cos(theta[i])
    env = np.exp(-0.5 * (xr ** 2 / sigma_x[i] ** 2 + yr ** 2 / sigma_y[i] ** 2))
    g = env * np.cos(2 * np.pi * sf[i] * xr + phase[i] + extra_phase)
    g = g - g.mean()                                  # zero DC: a uniform patch gives no response
    return g / (2 * np.pi * sigma_x[i] * sigma_y[i])

  filters = [gabor(i, 0.0) for i in range(channels)] + [gabor(i, np.pi / 2) for i in range(n_simple, channels)]
  sources = list(src) + list(src[n_simple:])
  bank = np.zeros((kernel, kernel, in_channels, len(filters)), np.float32)
  for j, (f, c) in enumerate(zip(filters, sources)):
    bank[:, :, c, j] = f
  info = dict(sf=sf, theta=theta, phase=phase, sigma_x=sigma_x, sigma_y=sigma_y, channel=src,
              simple=n_simple, complex=n_complex)
  return bank, info


class VOneBank(nn.Module):
  """The fixed Gabor front end: ``x [B, H, W, C] in [0, 1] -> [B, H', W', channels]``
  (simple then complex cells, times ``k_exc``); no parameters."""

  channels: int = 32
  kernel: int = 7
  stride: int = 1
  k_exc: float = K_EXC
  seed: int = 0
  sf_min: float = 0.1
  sf_max: float = 0.3

  def bank(self, in_channels: int) -> tuple[np.ndarray, dict]:
    return gabor_bank(self.channels, self.kernel, in_channels, seed=self.seed, sf_min=self.sf_min,
                      sf_max=self.sf_max)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, info = self.bank(x.shape[-1])
    k = jnp.asarray(kernel, x.dtype)                 # a compile-time constant, not a parameter
    x = (x - 0.5) / 0.5
    if self.stride == 1:
      q = conv2d(x, k, same_padding((self.kernel, self.kernel)))
    else:
      q = jax.lax.conv_general_dilated(x, k, (self.stride, self.stride), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    n_s, n_c = info['simple'], info['complex']
    simple = nn.relu(q[..., :n_s])
    q0, q1 = q[..., n_s:n_s + n_c], q[..., n_s + n_c:]
    complex_ = jnp.sqrt(q0 ** 2 + q1 ** 2 + 1e-5) / math.sqrt(2.0)
    return self.k_exc * jnp.concatenate([simple, complex_], axis=-1)


class FirstBlock(nn.Module):
  """Front end (VOne bank or a learned conv) then the noise: returns the noisy
  *pre-ReLU* output ``[B, H', W', channels]``."""

  front_end: str = 'vone'
  noise: str = 'poisson'
  noise_scale: float = 1.0
  channels: int = 32
  kernel: int = 7
  stride: int = 1
  k_exc: float = K_EXC
  gabor_seed: int = 0
  sf_min: float = 0.1
  sf_max: float = 0.3
  frozen: bool = False
  weight_init: str = 'lecun'

  @nn.compact
  def __call__(self, x):
    if self.front_end == 'vone':
      h = VOneBank(self.channels, self.kernel, self.stride, self.k_exc, self.gabor_seed, self.sf_min, self.sf_max,
                   name='vone')(x)
    elif self.front_end == 'conv':
      h = Conv(self.channels, (self.kernel, self.kernel), strides=(self.stride, self.stride), padding='SAME',
               kernel_init=common.kernel_init(self.weight_init), name='conv')(x)
    else:
      raise ValueError(f'unknown front_end {self.front_end!r}; available: {", ".join(FRONT_ENDS)}')
    return NoiseLayer(self.noise, self.noise_scale, self.frozen, name='noise')(h)


def _first_block(m: nn.Module, x: jax.Array) -> jax.Array:
  """Network ``m``'s first block (its ``front_*`` / noise fields) applied to ``x``, as
  submodule ``first``: the noisy pre-ReLU output. Shared by both networks."""
  return FirstBlock(m.front_end, m.noise, m.noise_scale, m.front_channels, m.front_kernel, m.front_stride, m.k_exc,
                    m.gabor_seed, m.sf_min, m.sf_max, m.frozen_noise, m.weight_init, name='first')(x)


def conv_dense_head(m: nn.Module, h: jax.Array, reps: list, first_conv: int = 0) -> tuple:
  """The back end shared by the stochastic and auditory CNNs, built inside
  ``m``'s compact call from its fields ``channels``, ``kernel_size``,
  ``dense``, ``num_classes`` and ``weight_init``: conv blocks (conv, ReLU,
  2x2 max-pool; submodules ``conv_{first_conv}``..), hidden dense layers
  (``hidden_0``..) and the output layer ``out``. Appends each block's and
  hidden layer's output to ``reps``; returns ``(logits, tuple(reps))``."""
  kinit = common.kernel_init(m.weight_init)
  for b, ch in enumerate(m.channels):
    h = nn.relu(Conv(ch, (m.kernel_size, m.kernel_size), padding='SAME', kernel_init=kinit,
                     name=f'conv_{b + first_conv}')(h))
    h = pool.max_pool(h, (2, 2))
    reps.append(h)
  h = h.reshape((h.shape[0], -1))
  for k, width in enumerate(m.dense):
    h = nn.relu(common.dense(width, m.weight_init, True, name=f'hidden_{k}')(h))
    reps.append(h)
  return common.dense(m.num_classes, m.weight_init, True, name='out')(h), tuple(reps)


class StochasticCNN(nn.Module):
  """First block (VOne or conv, noise, ReLU, 2x2 max-pool), conv blocks, dense layers.

  ``__call__(x [B, H, W, C])`` returns ``(logits [B, num_classes], reps)``:
  the first block's noisy pre-ReLU output ``[B, H, W, front_channels]``,
  each later conv block's pooled output and each hidden dense layer.
  ``layer_names`` names them for the geometry (``noise``/``front``, ``block2``.., ``dense1``..).
  """

  front_end: str = 'vone'
  noise: str = 'poisson'
  noise_scale: float = 1.0
  front_channels: int = 32
  front_kernel: int = 7
  front_stride: int = 1
  k_exc: float = K_EXC
  gabor_seed: int = 0
  sf_min: float = 0.1
  sf_max: float = 0.3
  frozen_noise: bool = False
  channels: Sequence[int] = (32,)
  kernel_size: int = 5
  dense: Sequence[int] = (256,)
  num_classes: int = 10
  weight_init: str = 'lecun'

  @property
  def stochastic(self) -> bool:
    return self.noise != 'none' and not self.frozen_noise

  @property
  def layer_names(self) -> tuple[str, ...]:
    first = 'noise' if self.noise != 'none' else 'front'
    return ((first,) + tuple(f'block{b + 2}' for b in range(len(self.channels)))
            + tuple(f'dense{k + 1}' for k in range(len(self.dense))))

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    pre = _first_block(self, x)
    return conv_dense_head(self, pool.max_pool(nn.relu(pre), (2, 2)), [pre], first_conv=1)


class VOneResNet(nn.Module):
  """First block (stride 1, no pool), ReLU, a 1x1 conv to ``width`` channels, ResNet-18's stages.

  ``__call__(x [B, 32, 32, C], train)`` returns ``(logits, reps)``: the first
  block's noisy pre-ReLU output, then the ResNet's reps (each stage, the pooled features).
  """

  front_end: str = 'vone'
  noise: str = 'poisson'
  noise_scale: float = 1.0
  front_channels: int = 64
  front_kernel: int = 7
  front_stride: int = 1
  k_exc: float = K_EXC
  gabor_seed: int = 0
  sf_min: float = 0.1
  sf_max: float = 0.3
  frozen_noise: bool = False
  width: int = 64
  blocks: int = 2          # BasicBlocks per stage (2: ResNet-18's)
  num_classes: int = 10
  preact: bool = False
  weight_init: str = 'he'

  @property
  def stochastic(self) -> bool:
    return self.noise != 'none' and not self.frozen_noise

  @property
  def layer_names(self) -> tuple[str, ...]:
    first = 'noise' if self.noise != 'none' else 'front'
    return (first, 'stage1', 'stage2', 'stage3', 'stage4', 'pooled')

  @nn.compact
  def __call__(self, x, train: bool = False):
    pre = _first_block(self, x)
    h = Conv(self.width, (1, 1), padding='VALID', use_bias=False, kernel_init=common.kernel_init(self.weight_init),
             name='bottleneck')(nn.relu(pre))
    logits, reps = resnet.ResNet(stage_sizes=(self.blocks,) * 4, width=self.width, num_classes=self.num_classes,
                                 preact=self.preact, weight_init=self.weight_init, stem=False, name='resnet')(h, train)
    return logits, (pre,) + tuple(reps)


# Valid config.model values (see config.field_bounds).
BOUNDS = {
    'noise_scale': config_lib.number(0, example=1.0), 'front_channels': config_lib.integer(2, example=32),
    'front_kernel': config_lib.integer(3, example=7), 'front_stride': config_lib.integer(1, example=1),
    'k_exc': config_lib.number(above=0, example=25.0), 'gabor_seed': config_lib.integer(0),
    'sf_min': config_lib.number(above=0, below=0.5, example=0.1),
    'sf_max': config_lib.number(above=0, below=0.5, example=0.3),
    'channels': config_lib.integer(1, example=32), 'kernel_size': config_lib.integer(1, example=5),
    'dense': config_lib.integer(1, example=256), 'width': config_lib.integer(1, example=64),
    'blocks': config_lib.integer(1, example=2),
}
# Model fields a stacked sweep can trace (``sweep.hparam=model.<field>``): constants in params.
TRACED = {'noise_scale': NOISE_SCALE}


def _first_kwargs(c) -> dict:
  for field, choices in (('front_end', FRONT_ENDS), ('noise', NOISE_KINDS)):
    if c.get(field, choices[0]) not in choices:
      raise ValueError(f'unknown model.{field} {c.get(field)!r}; available: {", ".join(choices)}')
  return dict(front_end=c.get('front_end', 'vone'), noise=c.get('noise', 'poisson'),
              noise_scale=float(c.get('noise_scale', 1.0)), front_kernel=int(c.get('front_kernel', 7)),
              front_stride=int(c.get('front_stride', 1)), k_exc=float(c.get('k_exc', K_EXC)),
              gabor_seed=int(c.get('gabor_seed', 0)), sf_min=float(c.get('sf_min', 0.1)),
              sf_max=float(c.get('sf_max', 0.3)), frozen_noise=bool(c.get('frozen_noise', False)))


def build_cnn(c, num_classes: int) -> StochasticCNN:
  return StochasticCNN(**_first_kwargs(c), front_channels=int(c.get('front_channels', 32)),
                       channels=tuple(c.get('channels', (32,))), kernel_size=int(c.get('kernel_size', 5)),
                       dense=tuple(c.get('dense', (256,))), num_classes=num_classes,
                       weight_init=c.get('weight_init', 'lecun'))


def build_resnet(c, num_classes: int) -> VOneResNet:
  return VOneResNet(**_first_kwargs(c), front_channels=int(c.get('front_channels', 64)),
                    width=int(c.get('width', 64)), blocks=int(c.get('blocks', 2)), num_classes=num_classes,
                    preact=bool(c.get('preact', False)), weight_init=c.get('weight_init', 'he'))
