"""ResNet-18 for 32x32 inputs (the CIFAR variant), with BatchNorm.

The CIFAR variant of He et al. (2016) as used by the adversarial-training
literature: a 3x3 stride-1 stem convolution and no max-pool (32x32 inputs are
too small to downsample at the stem), then 4 stages of 2 BasicBlocks (two 3x3
convolutions each) with widths ``width * (1, 2, 4, 8)`` (64-128-256-512 by
default), stride 2 at the first block of stages 2-4, global average pooling
and a linear readout.

Standard (post-activation) blocks by default: this is the "ResNet-18" of the
TRADES / MART / ASCL code bases (kuangliu's pytorch-cifar ResNet18), which the
ASCL comparison's PGD-AT and TRADES baselines come from, so their numbers are
comparable. ``preact=True`` gives the pre-activation blocks of He et al.
(2016b), the PreActResNet-18 of Wong et al. (2020, fast AT) and Rice et al.
(2020, robust overfitting), with the final BN-ReLU before pooling.

BatchNorm: ``train=True`` normalises with the batch statistics (the mean
over the *global* batch when the batch is sharded over devices under jit) and
updates the running averages in the ``batch_stats`` collection (PyTorch's
momentum 0.1, eps 1e-5); ``train=False`` uses the running averages. The
methods keep ``batch_stats`` in ``params['model_state']`` (``methods.base``).
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from geomrobust import config as config_lib
from geomrobust.models import common
from geomrobust.models.conv import Conv

# Valid config.model values; see config.field_bounds.
BOUNDS = {'width': config_lib.integer(1, example=64), 'blocks': config_lib.integer(1, example=2)}

# PyTorch's BatchNorm2d defaults (its momentum 0.1 is Flax's 0.9).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity (or 1x1-conv) shortcut.

  ``__call__(x [B, H, W, C_in], train) -> [B, H / stride, W / stride, features]``.
  """

  features: int
  stride: int = 1
  preact: bool = False
  weight_init: str = 'he'

  @nn.compact
  def __call__(self, x, train: bool):
    kinit = common.kernel_init(self.weight_init)
    conv = lambda f, k, s, name: Conv(f, (k, k), strides=(s, s), padding=((k // 2, k // 2),) * 2,
                                      use_bias=False, kernel_init=kinit, name=name)
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                                     epsilon=_BN_EPSILON, name=name)
    needs_projection = self.stride != 1 or x.shape[-1] != self.features
    if self.preact:
      h = nn.relu(norm('bn1')(x))
      # The projection shortcut reads the normalised input, as in He et al. (2016b).
      shortcut = conv(self.features, 1, self.stride, 'shortcut_conv')(h) if needs_projection else x
      h = conv(self.features, 3, self.stride, 'conv1')(h)
      h = conv(self.features, 3, 1, 'conv2')(nn.relu(norm('bn2')(h)))
      return h + shortcut
    h = nn.relu(norm('bn1')(conv(self.features, 3, self.stride, 'conv1')(x)))
    h = norm('bn2')(conv(self.features, 3, 1, 'conv2')(h))
    shortcut = x
    if needs_projection:
      shortcut = norm('shortcut_bn')(conv(self.features, 1, self.stride, 'shortcut_conv')(x))
    return nn.relu(h + shortcut)


class ResNet(nn.Module):
  """CIFAR-style ResNet; the defaults are ResNet-18.

  Attributes:
    stage_sizes: BasicBlocks per stage ((2, 2, 2, 2) = ResNet-18).
    width: channels of the stem and the first stage; stage s has
      ``width * 2**s`` (64 gives the standard 64-128-256-512).
    num_classes: width of the linear readout (named ``out``).
    preact: pre-activation blocks (see the module docstring).
    weight_init: kernel initialiser name in ``common.INITS``.
    stem: the 3x3 stem convolution (and its BN-ReLU); False feeds ``x``
      straight to the first stage (a front end of its own, e.g. VOneResNet).

  ``__call__(x, train)`` takes ``x: float32 [B, H, W, C]`` (32x32 for CIFAR)
  and returns ``(logits [B, num_classes], reps)``: the output of each stage,
  ``[B, H / 2**s, W / 2**s, width * 2**s]`` for s = 0..3, then the pooled
  penultimate features ``[B, width * 8]`` (what the readout reads).
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  num_classes: int = 10
  preact: bool = False
  weight_init: str = 'he'
  stem: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    kinit = common.kernel_init(self.weight_init)
    h = x
    if self.stem:
      h = Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=kinit,
               name='stem_conv')(x)
    if self.stem and not self.preact:
      h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                               name='stem_bn')(h))
    reps = []
    for s, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        h = BasicBlock(self.width * 2 ** s, stride=2 if (s > 0 and b == 0) else 1, preact=self.preact,
                       weight_init=self.weight_init, name=f'stage{s}_block{b}')(h, train)
      reps.append(h)
    if self.preact:
      h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                               name='final_bn')(h))
    h = jnp.mean(h, axis=(1, 2))
    reps.append(h)
    logits = common.dense(self.num_classes, self.weight_init, True, name='out')(h)
    return logits, tuple(reps)


def resnet18(width: int = 64, num_classes: int = 10, preact: bool = False, weight_init: str = 'he',
             blocks: int = 2) -> ResNet:
  """ResNet-18 (2-2-2-2 BasicBlocks), widths ``width * (1, 2, 4, 8)``; ``blocks`` per stage
  other than 2 gives the same network deeper or shallower (1: a ResNet-10, what the
  CIFAR experiments' ``--smoke`` runs on a CPU)."""
  return ResNet(stage_sizes=(blocks,) * 4, width=width, num_classes=num_classes, preact=preact,
                weight_init=weight_init)
