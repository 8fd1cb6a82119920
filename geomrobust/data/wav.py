"""Reader for folders of WAV recordings (the Free Spoken Digit Dataset).

A recording is a mono, 16-bit PCM WAV at the data set's sample rate, read
with the standard library's ``wave``. Each becomes a float32 waveform of a
fixed length: int16 / 32768, cropped (centred) or zero-padded at the end
to ``length`` samples, then scaled so its peak |x| is ``peak`` (recordings
come at very different levels; a fixed peak makes an attack's eps the
same loudness relative to every signal: ``20 log10(eps / peak)`` dB).
"""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np

from geomrobust.data.errors import DataError
from geomrobust.data.files import md5_hex, one_line


def parse_wav(content: bytes, path: str | os.PathLike = '<bytes>', *, rate: int) -> np.ndarray:
  """float32 [n] in [-1, 1) from the bytes of one mono 16-bit WAV at ``rate`` Hz.

  Raises:
    DataError naming the file when it is not a WAV, is truncated, or has
    another sample rate, channel count or sample width.
  """
  import io
  path = os.fspath(path)
  try:
    with wave.open(io.BytesIO(content), 'rb') as w:
      channels, width, framerate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
      raw = w.readframes(frames)
  except (wave.Error, EOFError, ValueError) as e:
    raise DataError(f'{path} is not a valid WAV file ({one_line(e)}); delete it and fetch it again') from e
  problems = []
  if channels != 1:
    problems.append(f'{channels} channels (expected mono)')
  if width != 2:
    problems.append(f'{8 * width}-bit samples (expected 16-bit PCM)')
  if framerate != rate:
    problems.append(f'{framerate} Hz (expected {rate} Hz)')
  if problems:
    raise DataError(f'{path}: {", ".join(problems)}; this is not a recording of this data set')
  if frames == 0 or len(raw) != frames * width * channels:
    raise DataError(f'{path}: the header says {frames} samples but the file holds {len(raw) // 2}; the file is '
                    'truncated or empty, delete it and fetch it again')
  return np.frombuffer(raw, '<i2').astype(np.float32) / 32768.0


def fix_length(x: np.ndarray, length: int) -> np.ndarray:
  """``x`` [n] cropped to its centre ``length`` samples, or zero-padded at the end."""
  if len(x) >= length:
    start = (len(x) - length) // 2
    return x[start:start + length]
  return np.pad(x, (0, length - len(x)))


def read_recordings(paths: list[Path], *, rate: int, length: int, peak: float,
                    expected_md5: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Waveforms float32 [N, length] (peak |x| = ``peak``) and labels int32 [N]
  (the digit before the first ``_`` of each file name).

  ``expected_md5``: the md5 of all files' bytes concatenated in the given
  order (None: not checked); a mismatch names the folder.
  """
  waves, labels, digest = [], [], []
  for p in paths:
    try:
      content = p.read_bytes()
    except OSError as e:
      raise DataError(f'cannot read {p}: {e.strerror or e}; check that it exists and is readable') from e
    digest.append(content)
    label = p.name.split('_', 1)[0]
    if not label.isdigit():
      raise DataError(f'{p}: the file name does not start with its digit ("{{digit}}_{{speaker}}_{{index}}.wav")')
    x = fix_length(parse_wav(content, p, rate=rate), length)
    top = float(np.max(np.abs(x)))
    if top == 0.0:
      raise DataError(f'{p} is silent (all samples 0); the file is damaged, delete it and fetch it again')
    waves.append(x * (peak / top))
    labels.append(int(label))
  if expected_md5 is not None and paths:
    actual = md5_hex(b''.join(digest))
    if actual != expected_md5:
      raise DataError(f'{paths[0].parent}: the recordings\' content md5 {actual} does not match the expected '
                      f'{expected_md5}; a file is damaged or not the canonical one (fetch the set again, or for '
                      'generated test files pass --config.data.verify=false)')
  return np.stack(waves).astype(np.float32), np.asarray(labels, np.int32)


def write_wav(path: str | os.PathLike, x: np.ndarray, rate: int) -> None:
  """Writes float ``x`` [n] in [-1, 1] as a mono 16-bit WAV (for tests)."""
  pcm = np.clip(np.round(np.asarray(x, np.float64) * 32767), -32768, 32767).astype('<i2')
  with wave.open(os.fspath(path), 'wb') as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(pcm.tobytes())
