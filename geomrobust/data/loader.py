"""`load_dataset`: find a data set in the first source that has it."""

from __future__ import annotations

import os
from pathlib import Path

from geomrobust.data import download as download_lib
from geomrobust.data.dataset import Dataset
from geomrobust.data.errors import DataError
from geomrobust.data.local import candidate_folders, find_in_dir, load_folder, locate_files
from geomrobust.data.registry import FORMAT_CIFAR_BIN, FORMAT_WAV, DatasetSpec, get_spec
from geomrobust.data.tfds_source import load_from_tfds

DATA_DIR_ENV = "GEOMROBUST_DATA_DIR"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    verify_checksums: bool = True,
    expected_counts: bool = True,
    download: bool = True,
) -> Dataset:
  """Load a registered data set (see `available_datasets()`).

  Sources, in order:
    1. `data_dir` (else $GEOMROBUST_DATA_DIR): a folder holding the canonical
       files directly, or a parent with one sub-folder per data set
       (<data_dir>/mnist/, <data_dir>/cifar10/[cifar-10-batches-bin/], or
       <data_dir>/cifar-10-batches-bin/). A data_dir that does not exist is an
       error; one without this data set's files falls through.
    2. a tfds-prepared copy, when tensorflow_datasets is installed (no download).
    3. the download cache, $GEOMROBUST_CACHE_DIR/<name> (default
       ~/.cache/geomrobust/<name>): used as is when complete, else the missing
       canonical files are downloaded into it, unless `download=False` or
       $GEOMROBUST_OFFLINE is set. Downloads are always md5-verified where the
       registry knows a checksum, whatever `verify_checksums` says.

  Checks on files read from disk (data_dir or cache). Both are ON by default
  and only the two keywords turn them off; the rest of the project turns them
  off only through its `data.verify=False` config flag, which the test suite
  sets for tiny generated files (see `geomrobust.data.testing`):
    verify_checksums: the md5 of each file's uncompressed content must match
      the registry (where known: MNIST and Fashion-MNIST, not CIFAR-10 files).
    expected_counts: each split must have the canonical number of examples.
  Always checked: file structure (IDX magic and exact payload length, CIFAR
  record length), image shape == the spec's, image count == label count,
  labels in [0, num_classes).

  Loads of the same files are cached in-process: repeated calls return the
  same Dataset with the same read-only arrays.

  Raises:
    DataError (one line): unknown name, missing data_dir, a corrupt or
    mismatching file (named), or no source had the data (the message lists
    what was tried and which files to put where).
  """
  spec = get_spec(name)
  if spec.generated:
    raise DataError(f"{name!r} is a generated dataset, not files: build its training source with "
                    f"geomrobust.data.make_source({name!r}, config.data.get({name!r}))")
  tried = []

  # 1. An explicit folder.
  if data_dir is not None:
    flag, raw_dir = "--data_dir", os.fspath(data_dir)
  else:
    flag, raw_dir = DATA_DIR_ENV, os.environ.get(DATA_DIR_ENV) or None
  if raw_dir is None:
    tried.append(f"--data_dir (not set, nor {DATA_DIR_ENV})")
  else:
    root = Path(raw_dir).expanduser()
    if not root.is_dir():
      raise DataError(f"{flag}={raw_dir} does not exist or is not a folder; create it or pass the folder that holds the data")
    hit = find_in_dir(root, spec)
    if hit is not None:
      folder, files = hit
      return load_folder(spec, files, source=f"data_dir:{folder}",
                         verify_checksums=verify_checksums, expected_counts=expected_counts)
    looked = " or ".join(f"{f}/" for f in candidate_folders(root, spec))
    tried.append(f"{flag}={raw_dir} (no {name} files in {looked})")

  # 2. tfds, never downloading.
  dataset, reason = load_from_tfds(spec, raw_dir, expected_counts=expected_counts)
  if dataset is not None:
    return dataset
  tried.append(f"tfds ({reason})")

  # 3. The download cache, filled from the network when allowed.
  cache = download_lib.cache_dir(spec)
  files = _complete_in(cache, spec)
  if files is not None:
    return load_folder(spec, files, source=f"cache:{cache}",
                       verify_checksums=verify_checksums, expected_counts=expected_counts)
  blocked = "disabled: download=False" if not download else download_lib.offline_reason()
  if spec.format == FORMAT_WAV:
    blocked = f"disabled: no download source for {name} here"
  if blocked is not None:
    if not blocked.startswith("disabled"):
      blocked = f"offline: {blocked}"
    tried.append(f"download ({blocked}; cache {cache} incomplete)")
  else:
    try:
      download_lib.download(spec, cache)
    except download_lib.NetworkUnavailable as e:
      tried.append(f"download (offline: {e})")
    else:
      files = _complete_in(cache, spec)
      if files is None:  # download() guarantees this; keep the error readable anyway
        raise DataError(f"download into {cache} did not produce all {name} files; delete the folder and retry")
      return load_folder(spec, files, source=f"download:{cache}",
                         verify_checksums=verify_checksums, expected_counts=expected_counts)

  raise DataError(f"no data for {name!r}: looked in {', '.join(tried)}. {_how_to_fix(spec)}")


def _complete_in(cache: Path, spec: DatasetSpec):
  """The cache's files for `spec` if it holds all of them, else None."""
  folders = [cache] + ([cache / spec.archive_folder] if spec.archive_folder else [])
  for folder in folders:
    found, missing = locate_files(folder, spec)
    if not missing:
      return found
  return None


def _how_to_fix(spec: DatasetSpec) -> str:
  if spec.format == FORMAT_WAV:
    return (f"Put the {len(spec.files)} recordings (e.g. {spec.files[0]}) in DIR/{spec.name}/ and pass "
            "--data_dir=DIR.")
  if spec.format == FORMAT_CIFAR_BIN:
    where = f"DIR/{spec.name}/{spec.archive_folder}/ (from {spec.archive_url})"
  else:
    where = f"DIR/{spec.name}/"
  return f"Put {', '.join(spec.files)} in {where} and pass --data_dir=DIR."
