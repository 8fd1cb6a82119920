"""Reader for the IDX format of MNIST and Fashion-MNIST.

Layout: a big-endian int32 magic number (2051 for images, 2049 for labels),
then big-endian int32 sizes (images: n, rows, cols; labels: n), then exactly
prod(sizes) raw uint8 bytes.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from geomrobust.data.errors import DataError
from geomrobust.data.files import check_md5, read_content

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
# magic -> (number of int32 size fields, kind)
_LAYOUT = {IMAGES_MAGIC: (3, "images"), LABELS_MAGIC: (1, "labels")}


def parse_idx(content: bytes, path: str | os.PathLike = "<bytes>") -> np.ndarray:
  """Parse the (uncompressed) bytes of an IDX file.

  Args:
    content: the whole file content.
    path: only used to name the file in error messages.

  Returns:
    A read-only uint8 array viewing `content` without copying: [n, rows, cols]
    for images, [n] for labels.

  Raises:
    DataError naming the file on a bad magic number or when the payload is not
    exactly as long as the header says (truncated or trailing bytes).
  """
  path = os.fspath(path)
  if len(content) < 4:
    raise DataError(f"{path}: only {len(content)} bytes, too short for an IDX header; the file is truncated, fetch it again")
  (magic,) = struct.unpack(">i", content[:4])
  if magic not in _LAYOUT:
    raise DataError(
        f"{path}: bad IDX magic number {magic} (expected {IMAGES_MAGIC} for images "
        f"or {LABELS_MAGIC} for labels); it is not an uncompressed IDX file, fetch it again"
    )
  ndim, _ = _LAYOUT[magic]
  header = 4 + 4 * ndim
  if len(content) < header:
    raise DataError(f"{path}: only {len(content)} bytes, shorter than its {header}-byte IDX header; the file is truncated, fetch it again")
  shape = struct.unpack(f">{ndim}i", content[4:header])
  if any(d < 0 for d in shape):
    raise DataError(f"{path}: negative size in IDX header {shape}; the file is corrupt, fetch it again")
  expected = int(np.prod(shape, dtype=np.int64))
  payload = len(content) - header
  if payload != expected:
    what = "truncated" if payload < expected else "followed by trailing bytes"
    raise DataError(
        f"{path}: IDX payload is {payload} bytes but the header {shape} needs exactly {expected}; "
        f"the file is {what}, fetch it again"
    )
  return np.frombuffer(content, dtype=np.uint8, count=expected, offset=header).reshape(shape)


def read_idx(
    path: str | os.PathLike,
    *,
    expected_md5: str | None = None,
    kind: str | None = None,
) -> np.ndarray:
  """Read an IDX file, gzipped (name ends in .gz) or not.

  Generic on purpose: it checks the file's own consistency (and its md5 when
  given) but not the counts or image size of any data set; `load_dataset`
  checks those against the registry.

  Args:
    path: the file.
    expected_md5: md5 of the uncompressed content, or None to skip the check.
    kind: "images" or "labels" to require that kind of file; None accepts both.

  Returns:
    Read-only uint8 [n, rows, cols] (images) or [n] (labels).
  """
  content = read_content(path)
  check_md5(content, expected_md5, path)
  array = parse_idx(content, path)
  if kind is not None:
    got = "images" if array.ndim == 3 else "labels"
    if got != kind:
      raise DataError(f"{os.fspath(path)}: holds IDX {got} but {kind} were expected; the files are swapped or misnamed")
  return array
