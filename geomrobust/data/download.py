"""Fetching the canonical files into a local cache, verified and atomically.

Every file is downloaded to a temporary name in the cache folder, checked, and
only then renamed to its final name (os.replace is atomic on one file system),
so an interrupted or corrupt download never leaves a file under the final name.
All network access goes through `_fetch`, which tests replace.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from geomrobust.data.errors import DataError
from geomrobust.data.files import check_md5, md5_hex, one_line, read_content
from geomrobust.data.registry import FORMAT_CIFAR_BIN, FORMAT_IDX, DatasetSpec

CACHE_DIR_ENV = "GEOMROBUST_CACHE_DIR"
OFFLINE_ENV = "GEOMROBUST_OFFLINE"
TIMEOUT_S = 20.0  # per socket operation: fail fast on machines without internet

# What a failed fetch may raise: all "the network is not there", never our bug.
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)


class NetworkUnavailable(Exception):
  """A download could not be made (offline, DNS, HTTP error, timeout...)."""


def cache_root() -> Path:
  """The project's cache folder: $GEOMROBUST_CACHE_DIR, default ~/.cache/geomrobust."""
  return Path(os.environ.get(CACHE_DIR_ENV) or os.path.join("~", ".cache", "geomrobust")).expanduser()


def cache_dir(spec: DatasetSpec) -> Path:
  """Cache folder of one data set: $GEOMROBUST_CACHE_DIR/<name>, default ~/.cache/geomrobust/<name>."""
  return cache_root() / spec.name


def offline_reason() -> str | None:
  """Why the network must not be used (GEOMROBUST_OFFLINE set), or None."""
  value = os.environ.get(OFFLINE_ENV, "").strip().lower()
  if value and value not in ("0", "false", "no"):
    return f"{OFFLINE_ENV}={os.environ[OFFLINE_ENV]}"
  return None


def _fetch(url: str, dest: Path) -> None:
  """Download `url` into the file `dest` (overwritten). Raises on any network error."""
  with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
    shutil.copyfileobj(response, out, length=1 << 20)


def download(spec: DatasetSpec, dest: Path) -> None:
  """Fetch the canonical files of `spec` that `dest` does not hold yet.

  Raises:
    NetworkUnavailable: the network failed (the caller falls through).
    DataError: a download arrived but fails its checksum or is malformed.
  """
  dest.mkdir(parents=True, exist_ok=True)
  if spec.format == FORMAT_IDX:
    _download_files(spec, dest)
  elif spec.format == FORMAT_CIFAR_BIN:
    _download_archive(spec, dest)
  else:
    raise ValueError(f"no download method for format {spec.format!r}")


def _temp_path(dest: Path, name: str) -> Path:
  """A fresh, unique temporary file next to the final one (same file system)."""
  fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
  os.close(fd)
  return Path(path)


def _fetch_to_temp(url: str, dest: Path, name: str) -> Path:
  tmp = _temp_path(dest, name)
  try:
    _fetch(url, tmp)
  except NETWORK_ERRORS as e:
    tmp.unlink(missing_ok=True)
    raise NetworkUnavailable(f"{url}: {one_line(e)}") from e
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return tmp


def _download_files(spec: DatasetSpec, dest: Path) -> None:
  """Per-file downloads (IDX): each verified on its uncompressed content."""
  for name in spec.files:
    final = dest / name
    if final.is_file() or (name.endswith(".gz") and (dest / name[:-3]).is_file()):
      continue  # already fetched by an earlier, partly successful run
    url = spec.url_of(name)
    if url is None:
      raise ValueError(f"registry has no URL for {spec.name} file {name}")
    tmp = _fetch_to_temp(url, dest, name)
    try:
      # Named after the *final* file so that a failure says what it was for.
      content = read_content(tmp, gz=name.endswith(".gz"))
      _check_download(content, spec.md5_of(name), final, url)
      os.replace(tmp, final)
    finally:
      tmp.unlink(missing_ok=True)


def _check_download(content: bytes, expected: str | None, final: Path, url: str) -> None:
  try:
    check_md5(content, expected, final)
  except DataError:
    raise DataError(
        f"download of {url} for {final} has content md5 {md5_hex(content)}, expected {expected}; "
        "it was discarded: retry later, or fetch the file by hand and pass --data_dir"
    ) from None


def _download_archive(spec: DatasetSpec, dest: Path) -> None:
  """One archive (CIFAR-10): verify it, then extract only the expected members."""
  target = dest / spec.archive_folder
  if all((target / name).is_file() for name in spec.files):
    return
  archive_name = spec.archive_url.rsplit("/", 1)[-1]
  tmp = _fetch_to_temp(spec.archive_url, dest, archive_name)
  try:
    if spec.archive_md5 is not None:
      actual = md5_hex(tmp.read_bytes())
      if actual != spec.archive_md5:
        raise DataError(
            f"download of {spec.archive_url} for {dest / archive_name} has md5 {actual}, expected "
            f"{spec.archive_md5}; it was discarded: retry later, or fetch it by hand, extract it and pass --data_dir"
        )
    target.mkdir(parents=True, exist_ok=True)
    _safe_extract(tmp, spec.archive_url, target, spec.archive_folder, spec.files)
  finally:
    # The archive is not kept: the extracted files are what is loaded.
    tmp.unlink(missing_ok=True)


def _safe_extract(archive: Path, url: str, target: Path, folder: str, names: tuple[str, ...]) -> None:
  """Extract exactly `folder/<name>` for each of `names` into `target`.

  Never uses extractall: members are matched by exact expected name, which
  rules out absolute paths, '..' and links, and each one is written to a
  temporary file and renamed, as for single-file downloads.
  """
  wanted = {f"{folder}/{name}": name for name in names}
  done = set()
  try:
    with tarfile.open(archive, "r:*") as tar:
      for member in tar:
        name = wanted.get(member.name.removeprefix("./"))
        if name is None or name in done:
          continue
        if not member.isfile():
          raise DataError(f"{url}: archive member {member.name} is not a regular file; the archive is not the canonical one")
        source = tar.extractfile(member)
        tmp = _temp_path(target, name)
        try:
          with source, open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, length=1 << 20)
          os.replace(tmp, target / name)
        finally:
          tmp.unlink(missing_ok=True)
        done.add(name)
  except (tarfile.TarError, EOFError, OSError) as e:
    raise DataError(f"{url}: cannot extract the downloaded archive ({one_line(e)}); retry the download") from e
  missing = [n for n in names if n not in done]
  if missing:
    raise DataError(f"{url}: archive lacks {folder}/{', '.join(missing)}; it is not the canonical archive")
