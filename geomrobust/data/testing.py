"""Writers of tiny canonical-format files, for tests across the project.

Generated files have neither the canonical counts nor the canonical md5s, so
load them with `load_dataset(name, folder, verify_checksums=False,
expected_counts=False)` (the project's `data.verify=False` config flag).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from geomrobust.data.cifar import CHANNELS, HEIGHT, WIDTH
from geomrobust.data.idx import IMAGES_MAGIC, LABELS_MAGIC


def encode_idx(array: np.ndarray) -> bytes:
  """IDX bytes of a uint8 array: [n, rows, cols] -> images file, [n] -> labels file."""
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim not in (1, 3):
    raise ValueError(f"encode_idx needs uint8 [n] or [n, rows, cols], got {array.dtype} {array.shape}")
  magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
  header = struct.pack(f">{1 + array.ndim}i", magic, *array.shape)
  return header + np.ascontiguousarray(array).tobytes()


def encode_cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
  """CIFAR-10 binary records of uint8 images [n, 32, 32, 3] (NHWC) and labels [n]."""
  images = np.asarray(images, dtype=np.uint8)
  if images.shape[1:] != (HEIGHT, WIDTH, CHANNELS) or len(images) != len(labels):
    raise ValueError(f"encode_cifar_records needs [n, 32, 32, 3] images and n labels, got {images.shape}, {len(labels)}")
  chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane
  records = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], chw], axis=1)
  return records.tobytes()


def write_idx_dataset(
    folder: str | os.PathLike,
    *,
    n_train: int = 64,
    n_test: int = 32,
    shape: tuple[int, int] = (28, 28),
    num_classes: int = 10,
    seed: int = 0,
    gz: bool = True,
) -> None:
  """Write the four canonical IDX files (MNIST names) into `folder` (created).

  Images are uniform random uint8; labels cycle 0, 1, ..., num_classes-1, 0, ...
  so every class is present. gz=False writes the un-gzipped names.
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.uint8)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
      data = encode_idx(array)
      name = f"{prefix}-{kind}-ubyte"
      if gz:
        data, name = gzip.compress(data, mtime=0), name + ".gz"  # mtime=0: reproducible bytes
      (folder / name).write_bytes(data)


def write_cifar10_bin(
    folder: str | os.PathLike, *, n_per_train_file: int = 20, n_test: int = 20, seed: int = 0
) -> None:
  """Write cifar-10-batches-bin/data_batch_{1..5}.bin and test_batch.bin under `folder`.

  Images are uniform random uint8; labels cycle through 0..9 within each file.
  """
  target = Path(folder) / "cifar-10-batches-bin"
  target.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  names = [(f"data_batch_{i}.bin", n_per_train_file) for i in range(1, 6)] + [("test_batch.bin", n_test)]
  for name, n in names:
    images = rng.integers(0, 256, size=(n, HEIGHT, WIDTH, CHANNELS), dtype=np.uint8)
    labels = np.arange(n) % 10
    (target / name).write_bytes(encode_cifar_records(images, labels))


def class_blobs(n: int = 256, seed: int = 0, shape=(8, 8, 1), num_classes: int = 10, noise: float = 40.0):
  """A tiny learnable dataset: uint8 images ``[n, *shape]`` around one random
  centre per class (Gaussian pixel noise of std ``noise``), labels ``[n]``
  cycling through the classes. For fast training tests."""
  rng = np.random.default_rng(seed)
  y = (np.arange(n) % num_classes).astype(np.int32)
  centers = rng.integers(0, 255, size=(num_classes,) + tuple(shape))
  x = np.clip(centers[y] + rng.normal(0, noise, size=(n,) + tuple(shape)), 0, 255).astype(np.uint8)
  return x, y


def write_spoken_digit(folder: str | os.PathLike, *, samples: int = 400, seed: int = 0) -> None:
  """Write all canonical spoken_digit recordings into ``folder/recordings/``:
  short mono 16-bit 8 kHz WAVs, a tone whose pitch depends on the digit plus
  noise (a learnable stand-in; load with data.verify=False)."""
  from geomrobust.data.registry import REGISTRY
  from geomrobust.data.wav import write_wav

  spec = REGISTRY["spoken_digit"]
  target = Path(folder) / "recordings"
  target.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  t = np.arange(samples) / spec.sample_rate
  for name in spec.files:
    digit = int(Path(name).name.split("_")[0])
    tone = 0.3 * np.sin(2 * np.pi * (300 + 250 * digit) * t + rng.uniform(0, 2 * np.pi))
    write_wav(Path(folder) / name, tone + 0.02 * rng.standard_normal(samples), spec.sample_rate)
