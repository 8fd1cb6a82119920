"""Audio: the spoken_digit WAV loader (real, generated and corrupt files) and
the differentiable log-mel front end against a numpy reference."""

import shutil
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomrobust import data
from geomrobust.data import testing, wav
from geomrobust.models import audio


@pytest.fixture(scope='module')
def fsdd_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('audio') / 'spoken_digit'
  testing.write_spoken_digit(folder, samples=400, seed=0)
  return folder


def _load(folder):
  data.clear_cache()
  return data.load_dataset('spoken_digit', folder.parent, verify_checksums=False, expected_counts=True)


def test_generated_recordings_load_with_the_usual_split(fsdd_dir):
  ds = _load(fsdd_dir)
  assert ds.train_images.shape == (2700, 8000) and ds.test_images.shape == (300, 8000)
  assert ds.train_images.dtype == np.float32 and ds.box == (-1.0, 1.0)
  np.testing.assert_allclose(np.abs(ds.test_images).max(1), 0.5, rtol=1e-6)     # every recording at peak 0.5
  np.testing.assert_array_equal(ds.test_labels[:10], np.arange(10))             # any prefix is balanced
  np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 30))
  # Short recordings are zero-padded at the end, long ones centre-cropped.
  assert np.all(ds.test_images[:, 400:] == 0)
  x = np.arange(10, dtype=np.float32)
  np.testing.assert_array_equal(wav.fix_length(x, 4), [3, 4, 5, 6])
  np.testing.assert_array_equal(wav.fix_length(x[:2], 4), [0, 1, 0, 0])


@pytest.mark.parametrize('damage,message', [
    (lambda p: p.write_bytes(b'RIFF\x00\x00'), 'is not a valid WAV file'),
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), 'truncated'),
    (lambda p: wav.write_wav(p, np.zeros(100), 16000), r'16000 Hz \(expected 8000 Hz\)'),
    (lambda p: wav.write_wav(p, np.zeros(100), 8000), 'is silent'),
])
def test_a_corrupt_recording_is_one_clear_error_naming_it(fsdd_dir, tmp_path, damage, message):
  folder = tmp_path / 'spoken_digit'
  shutil.copytree(fsdd_dir, folder)
  bad = folder / 'recordings' / '7_theo_3.wav'
  damage(bad)
  with pytest.raises(data.DataError, match=message) as e:
    _load(folder)
  assert str(bad) in str(e.value) and '\n' not in str(e.value)


def test_stereo_and_8_bit_files_are_refused(tmp_path):
  path = tmp_path / 'x.wav'
  with wave.open(str(path), 'wb') as w:
    w.setnchannels(2)
    w.setsampwidth(1)
    w.setframerate(8000)
    w.writeframes(b'\x80' * 200)
  with pytest.raises(data.DataError, match='2 channels.*8-bit'):
    wav.parse_wav(path.read_bytes(), path, rate=8000)


def test_missing_recordings_say_where_to_put_them(tmp_path):
  (tmp_path / 'spoken_digit' / 'recordings').mkdir(parents=True)
  wav.write_wav(tmp_path / 'spoken_digit' / 'recordings' / '0_george_0.wav', np.ones(10) * 0.1, 8000)
  with pytest.raises(data.DataError, match='holds only part of spoken_digit'):
    _load(tmp_path / 'spoken_digit')


def test_the_real_recordings_pass_their_checksums(shared_data_dir):
  data.clear_cache()
  ds = data.load_dataset('spoken_digit', shared_data_dir)
  assert ds.train_images.shape == (2700, 8000) and ds.test_images.shape == (300, 8000)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), np.full(10, 270))


def _numpy_log_mel(x, rate=8000, frame=256, hop=80, n_mels=40, fmin=20.0, fmax=4000.0, ref=1e-4):
  """An independent reference: np.fft.rfft of Hann-windowed frames, mel filters built by a loop."""
  window = np.hanning(frame + 1)[:-1]                      # periodic Hann
  count = 1 + (len(x) - frame) // hop
  spec = np.stack([np.abs(np.fft.rfft(window * x[i * hop:i * hop + frame])) ** 2 / frame for i in range(count)])
  mel = lambda f: 2595 * np.log10(1 + f / 700)
  inv = lambda m: 700 * (10 ** (m / 2595) - 1)
  edges = inv(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
  freqs = np.fft.rfftfreq(frame, 1 / rate)
  bank = np.zeros((len(freqs), n_mels))
  for m in range(n_mels):
    for k, f in enumerate(freqs):
      if edges[m] <= f <= edges[m + 1]:
        bank[k, m] = (f - edges[m]) / (edges[m + 1] - edges[m])
      elif edges[m + 1] < f <= edges[m + 2]:
        bank[k, m] = (edges[m + 2] - f) / (edges[m + 2] - edges[m + 1])
  return np.log1p(spec @ bank / ref)


def test_log_mel_matches_numpy_and_is_differentiable():
  rng = np.random.default_rng(0)
  t = np.arange(2000) / 8000
  x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(2000)).astype(np.float32)
  ours = np.asarray(audio.log_mel(jnp.asarray(x)[None]))[0]
  ref = _numpy_log_mel(x.astype(np.float64))
  assert ours.shape == ref.shape == (1 + (2000 - 256) // 80, 40)
  np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=2e-3)
  # The 440 Hz tone lands in the mel band whose centre is nearest to it.
  centres = audio.mel_to_hz(np.linspace(audio.hz_to_mel(20), audio.hz_to_mel(4000), 42))[1:-1]
  assert int(np.argmax(ours.mean(0))) == int(np.argmin(np.abs(centres - 440)))
  # Gradients reach the waveform, finite and matching finite differences.
  f = lambda v: jnp.sum(audio.log_mel(v[None])[0, :, 5:15])
  g = np.asarray(jax.grad(f)(jnp.asarray(x)))
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  d = np.zeros_like(x)
  d[700] = 1.0
  with jax.enable_x64(True):
    xd = jnp.asarray(x, jnp.float64)
    fd = (f(xd + 1e-4 * d) - f(xd - 1e-4 * d)) / 2e-4
  assert float(fd) == pytest.approx(float(g[700]), rel=1e-2, abs=1e-3)
  with pytest.raises(ValueError, match='Nyquist'):
    audio.mel_filterbank(256, 40, 8000, 20.0, 5000.0)
