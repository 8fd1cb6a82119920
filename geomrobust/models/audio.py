"""An auditory network: a fixed log-mel front end in JAX, the noise layer, a small CNN.

Input: waveforms ``x [B, T]`` (float32 in [-1, 1], 8 kHz for spoken digits);
attacks perturb the waveform itself. The front end is fixed (no
parameters) and differentiable, so gradients reach the samples:

  frames   T samples -> F = 1 + (T - frame) // hop frames of ``frame``
           samples (256 = 32 ms, hop 80 = 10 ms at 8 kHz), periodic Hann window;
  power    |DFT|^2 / frame per frequency bin (0 .. frame/2), the DFT as two
           matmuls with fixed cosine and sine matrices;
  mel      ``n_mels`` (40) triangular filters, equally spaced on the HTK mel
           scale from ``fmin`` to ``fmax`` (20 Hz .. 4 kHz), each peaking at 1;
  compress ``log(1 + mel / ref_power)`` (ref_power 1e-4): a log compression
           that is 0 for silence and non-negative, so the Poisson-like noise
           (whose variance grows with its input) reads it like a firing rate.

Then ``gain`` (1), the noise layer (``models.stochastic.NoiseLayer``: its
pre-ReLU output is the first representation, as in the vision networks), a
ReLU, conv blocks (3x3 conv, ReLU, 2x2 max-pool) over (time, mel) and dense
layers. ``noise='none'`` is the deterministic network with the same front
and back end.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from geomrobust import config as config_lib
from geomrobust.models import stochastic


def hz_to_mel(f):
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(frame: int, n_mels: int, rate: int, fmin: float, fmax: float) -> np.ndarray:
  """float32 [frame // 2 + 1, n_mels]: triangular filters on the HTK mel scale."""
  if not 0 <= fmin < fmax <= rate / 2:
    raise ValueError(f'mel filters need 0 <= fmin < fmax <= rate / 2 (Nyquist), got {fmin}, {fmax} at {rate} Hz')
  freqs = np.arange(frame // 2 + 1) * rate / frame
  edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
  up = (freqs[:, None] - lo) / (mid - lo)
  down = (hi - freqs[:, None]) / (hi - mid)
  return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def dft_matrices(frame: int) -> tuple[np.ndarray, np.ndarray]:
  """Windowed real DFT as matmuls: ``(cos, sin)`` float32 [frame, frame // 2 + 1],
  the periodic Hann window folded in."""
  n = np.arange(frame)
  window = 0.5 - 0.5 * np.cos(2 * np.pi * n / frame)
  angle = 2 * np.pi * np.outer(n, np.arange(frame // 2 + 1)) / frame
  return ((window[:, None] * np.cos(angle)).astype(np.float32), (window[:, None] * np.sin(angle)).astype(np.float32))


def log_mel(x, *, rate: int = 8000, frame: int = 256, hop: int = 80, n_mels: int = 40, fmin: float = 20.0,
            fmax: float = 4000.0, ref_power: float = 1e-4):
  """``x [B, T] -> [B, F, n_mels]``: ``log(1 + mel power / ref_power)`` (see the module docstring)."""
  t = x.shape[-1]
  if t < frame:
    raise ValueError(f'a waveform of {t} samples is shorter than one frame ({frame})')
  count = 1 + (t - frame) // hop
  idx = np.arange(count)[:, None] * hop + np.arange(frame)[None, :]
  frames = x[:, idx]                                             # [B, F, frame]
  cos, sin = dft_matrices(frame)
  power = ((frames @ cos) ** 2 + (frames @ sin) ** 2) / frame    # [B, F, frame // 2 + 1]
  mel = power @ jnp.asarray(mel_filterbank(frame, n_mels, rate, fmin, fmax))
  return jnp.log1p(mel / ref_power)


class AudioCNN(nn.Module):
  """Log-mel front end, noise, ReLU, conv blocks, dense layers (see the module docstring).

  ``__call__(x [B, T])`` returns ``(logits [B, num_classes], reps)``: the
  noisy pre-ReLU front-end output ``[B, F, n_mels, 1]``, each conv block's
  pooled output and each hidden dense layer.
  """

  rate: int = 8000
  frame: int = 256
  hop: int = 80
  n_mels: int = 40
  fmin: float = 20.0
  fmax: float = 4000.0
  ref_power: float = 1e-4
  gain: float = 1.0
  noise: str = 'poisson'
  noise_scale: float = 1.0
  frozen_noise: bool = False
  channels: Sequence[int] = (16, 32)
  kernel_size: int = 3
  dense: Sequence[int] = (128,)
  num_classes: int = 10
  weight_init: str = 'lecun'

  @property
  def stochastic(self) -> bool:
    return self.noise != 'none' and not self.frozen_noise

  @property
  def layer_names(self) -> tuple[str, ...]:
    first = 'noise' if self.noise != 'none' else 'front'
    return ((first,) + tuple(f'block{b + 1}' for b in range(len(self.channels)))
            + tuple(f'dense{k + 1}' for k in range(len(self.dense))))

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    feats = log_mel(x.reshape(x.shape[0], -1), rate=self.rate, frame=self.frame, hop=self.hop, n_mels=self.n_mels,
                    fmin=self.fmin, fmax=self.fmax, ref_power=self.ref_power)
    pre = stochastic.NoiseLayer(self.noise, self.noise_scale, self.frozen_noise, name='noise')(
        self.gain * feats[..., None])
    return stochastic.conv_dense_head(self, nn.relu(pre), [pre])


BOUNDS = {
    'rate': config_lib.integer(1, example=8000), 'frame': config_lib.integer(2, example=256),
    'hop': config_lib.integer(1, example=80), 'n_mels': config_lib.integer(1, example=40),
    'fmin': config_lib.number(0, example=20.0), 'fmax': config_lib.number(above=0, example=4000.0),
    'ref_power': config_lib.number(above=0, example=1e-4), 'gain': config_lib.number(above=0, example=1.0),
    'noise_scale': config_lib.number(0, example=1.0), 'channels': config_lib.integer(1, example=16),
    'kernel_size': config_lib.integer(1, example=3), 'dense': config_lib.integer(1, example=128),
}
TRACED = {'noise_scale': stochastic.NOISE_SCALE}


def build(c, num_classes: int) -> AudioCNN:
  if c.get('noise', 'poisson') not in stochastic.NOISE_KINDS:
    raise ValueError(f'unknown model.noise {c.get("noise")!r}; available: {", ".join(stochastic.NOISE_KINDS)}')
  mel_filterbank(int(c.get('frame', 256)), int(c.get('n_mels', 40)), int(c.get('rate', 8000)),
                 float(c.get('fmin', 20.0)), float(c.get('fmax', 4000.0)))   # bad frequencies fail here
  return AudioCNN(rate=int(c.get('rate', 8000)), frame=int(c.get('frame', 256)), hop=int(c.get('hop', 80)),
                  n_mels=int(c.get('n_mels', 40)), fmin=float(c.get('fmin', 20.0)), fmax=float(c.get('fmax', 4000.0)),
                  ref_power=float(c.get('ref_power', 1e-4)), gain=float(c.get('gain', 1.0)),
                  noise=c.get('noise', 'poisson'), noise_scale=float(c.get('noise_scale', 1.0)),
                  frozen_noise=bool(c.get('frozen_noise', False)), channels=tuple(c.get('channels', (16, 32))),
                  kernel_size=int(c.get('kernel_size', 3)), dense=tuple(c.get('dense', (128,))),
                  num_classes=num_classes, weight_init=c.get('weight_init', 'lecun'))
