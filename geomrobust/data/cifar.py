"""Reader for the CIFAR-10 binary format (cifar-10-binary.tar.gz).

Each record is 1 label byte then 3072 image bytes: the 1024 red, then 1024
green, then 1024 blue values of a 32x32 image, each plane row-major. The
python-pickle flavour of CIFAR is deliberately not supported: nothing in this
project unpickles data.
"""

from __future__ import annotations

import os

import numpy as np

from geomrobust.data.errors import DataError
from geomrobust.data.files import check_md5, read_content

HEIGHT = WIDTH = 32
CHANNELS = 3
RECORD_BYTES = 1 + CHANNELS * HEIGHT * WIDTH  # 3073


def parse_cifar_bin(
    content: bytes, path: str | os.PathLike = "<bytes>", *, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
  """Parse the bytes of one CIFAR-10 binary batch file.

  Returns:
    images: uint8 [n, 32, 32, 3] (NHWC, C-contiguous);
    labels: int32 [n], each in [0, num_classes).

  Raises:
    DataError naming the file when its length is not a positive multiple of
    3073 bytes or a label is out of range.
  """
  path = os.fspath(path)
  if len(content) == 0 or len(content) % RECORD_BYTES:
    raise DataError(
        f"{path}: {len(content)} bytes is not a positive multiple of the {RECORD_BYTES}-byte "
        "CIFAR-10 record; the file is truncated or not a CIFAR-10 binary batch, fetch it again"
    )
  records = np.frombuffer(content, dtype=np.uint8).reshape(-1, RECORD_BYTES)
  labels = records[:, 0].astype(np.int32)
  if labels.size and int(labels.max()) >= num_classes:
    bad = int(np.argmax(labels >= num_classes))
    raise DataError(
        f"{path}: record {bad} has label {int(labels[bad])}, outside 0..{num_classes - 1}; "
        "the file is corrupt or not a CIFAR-10 batch, fetch it again"
    )
  # Planes are stored channel-major (CHW); the framework works in NHWC.
  chw = records[:, 1:].reshape(-1, CHANNELS, HEIGHT, WIDTH)
  images = np.ascontiguousarray(chw.transpose(0, 2, 3, 1))
  return images, labels


def read_cifar_bin(
    path: str | os.PathLike, *, expected_md5: str | None = None, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
  """Read one CIFAR-10 binary batch file (gunzipped first if its name ends in .gz).

  Returns:
    (images uint8 [n, 32, 32, 3], labels int32 [n]).
  """
  content = read_content(path)
  check_md5(content, expected_md5, path)
  return parse_cifar_bin(content, path, num_classes=num_classes)
