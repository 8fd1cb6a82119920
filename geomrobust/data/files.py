"""Reading a canonical file's bytes (gunzipping when needed) and checking its md5."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib

from geomrobust.data.errors import DataError


def read_content(path: str | os.PathLike, *, gz: bool | None = None) -> bytes:
  """The uncompressed content of `path`.

  Args:
    path: the file.
    gz: whether the file is gzipped; None decides from the name (".gz").

  Raises:
    DataError naming the file when it cannot be read or is not valid gzip.
  """
  path = os.fspath(path)
  if gz is None:
    gz = path.endswith(".gz")
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"cannot read {path}: {e.strerror or e}; check that it exists and is readable") from e
  if not gz:
    return raw
  try:
    # One C call for the whole file: far faster than streaming via GzipFile.
    return gzip.decompress(raw)
  except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as e:
    raise DataError(
        f"{path} is not a valid gzip file ({one_line(e)}); delete it and fetch it again"
    ) from e


def md5_hex(content: bytes) -> str:
  """md5 hex digest of `content` (an integrity check, not a security one)."""
  return hashlib.md5(content, usedforsecurity=False).hexdigest()


def check_md5(content: bytes, expected: str | None, path: str | os.PathLike) -> None:
  """Raise DataError naming `path` when md5(content) != expected (None: no check)."""
  if expected is None:
    return
  actual = md5_hex(content)
  if actual != expected.lower():
    raise DataError(
        f"{os.fspath(path)}: content md5 {actual} does not match the expected {expected}; "
        "the file is corrupt or not the canonical one: delete it and fetch it again "
        "(for generated test files pass --config.data.verify=false)"
    )


def one_line(e: BaseException) -> str:
  """An exception as one short line, for embedding in a DataError message."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text[:200]
