"""Finding a data set's canonical files in a folder and loading them (cached)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from geomrobust.data import registry
from geomrobust.data.cifar import read_cifar_bin
from geomrobust.data.dataset import Dataset, freeze, validate_split
from geomrobust.data.errors import DataError
from geomrobust.data.idx import read_idx
from geomrobust.data.registry import FORMAT_CIFAR_BIN, FORMAT_IDX, FORMAT_WAV, DatasetSpec
from geomrobust.data.wav import read_recordings


def locate_files(folder: Path, spec: DatasetSpec) -> tuple[dict[str, Path], list[str]]:
  """Which of the spec's canonical files `folder` holds.

  A canonical "x.gz" is also accepted un-gzipped as "x" (the .gz wins when
  both exist).

  Returns:
    (found: canonical name -> path on disk, missing: canonical names not found).
  """
  found, missing = {}, []
  for name in spec.files:
    names = [name, name[: -len(".gz")]] if name.endswith(".gz") else [name]
    for candidate in names:
      path = folder / candidate
      if path.is_file():
        found[name] = path
        break
    else:
      missing.append(name)
  return found, missing


def candidate_folders(data_dir: Path, spec: DatasetSpec) -> list[Path]:
  """Folders under `data_dir` that may hold `spec`'s files, most specific first.

  The parent form (<data_dir>/<name>/) comes first. The direct form
  (<data_dir> itself) is skipped when data_dir is named after ANOTHER
  registered data set: MNIST and Fashion-MNIST share file names, so
  `load_dataset('fashion_mnist', '.../mnist')` must not quietly return MNIST.
  """
  folders = [data_dir / spec.name]
  if spec.archive_folder:
    folders += [data_dir / spec.name / spec.archive_folder, data_dir / spec.archive_folder]
  if not (data_dir.name in registry.REGISTRY and data_dir.name != spec.name):
    folders.append(data_dir)
  return folders


def find_in_dir(data_dir: Path, spec: DatasetSpec) -> tuple[Path, dict[str, Path]] | None:
  """The first candidate folder holding ALL of spec's files, or None if none holds any.

  Raises:
    DataError naming the folder and the missing files when a folder holds
    only some of them: that is a broken copy the user should complete, not a
    reason to silently look elsewhere.
  """
  for folder in candidate_folders(data_dir, spec):
    if not folder.is_dir():
      continue
    found, missing = locate_files(folder, spec)
    if not missing:
      return folder, found
    if found:
      raise DataError(
          f"{folder} holds only part of {spec.name}: missing {', '.join(missing)}; "
          "add the missing files (or remove the folder)"
      )
  return None


def load_folder(
    spec: DatasetSpec,
    files: dict[str, Path],
    *,
    source: str,
    verify_checksums: bool,
    expected_counts: bool,
) -> Dataset:
  """Load `spec` from located files, reusing an earlier load of the same files.

  The cache key includes each file's path, size and mtime, so a file that is
  replaced on disk is re-read rather than served stale.
  """
  stamps = []
  for name in spec.files:
    st = os.stat(files[name])
    stamps.append((name, os.fspath(files[name]), st.st_size, st.st_mtime_ns))
  return _load_cached(spec, tuple(stamps), source, verify_checksums, expected_counts)


def clear_cache() -> None:
  """Forget every data set loaded in this process."""
  _load_cached.cache_clear()


# Small maxsize: each entry can hold ~200 MB (CIFAR-10); a run uses one or two.
@functools.lru_cache(maxsize=4)
def _load_cached(spec, stamps, source, verify_checksums, expected_counts) -> Dataset:
  files = {name: Path(path) for name, path, _, _ in stamps}
  if spec.format == FORMAT_IDX:
    splits = [
        _read_idx_split(spec, split, *(files[n] for n in names), verify_checksums, expected_counts)
        for split, names in (("train", spec.train_files), ("test", spec.test_files))
    ]
  elif spec.format == FORMAT_CIFAR_BIN:
    splits = [
        _read_cifar_split(spec, split, [files[n] for n in names], verify_checksums, expected_counts)
        for split, names in (("train", spec.train_files), ("test", spec.test_files))
    ]
  elif spec.format == FORMAT_WAV:
    splits = [
        _read_wav_split(spec, split, [files[n] for n in names], verify_checksums, expected_counts)
        for split, names in (("train", spec.train_files), ("test", spec.test_files))
    ]
  else:  # a registry bug, not a user error
    raise ValueError(f"unknown format {spec.format!r} for {spec.name}")
  (train_images, train_labels), (test_images, test_labels) = splits
  return Dataset(
      input_box=spec.box,
      name=spec.name,
      train_images=freeze(train_images),
      train_labels=freeze(train_labels),
      test_images=freeze(test_images),
      test_labels=freeze(test_labels),
      num_classes=spec.num_classes,
      source=source,
  )


def _read_idx_split(spec, split, images_path, labels_path, verify, counts):
  """(uint8 [N, H, W, 1], int32 [N]) from one images + labels IDX pair."""
  md5 = spec.md5_of if verify else (lambda _: None)
  canonical_images, canonical_labels = (spec.train_files if split == "train" else spec.test_files)[:2]
  images = read_idx(images_path, expected_md5=md5(canonical_images), kind="images")
  labels = read_idx(labels_path, expected_md5=md5(canonical_labels), kind="labels")
  images = images[..., None]  # IDX is greyscale; add the channel axis (a view, no copy)
  validate_split(
      spec, split, images, labels,
      images_where=os.fspath(images_path), labels_where=os.fspath(labels_path),
      expected_counts=counts,
  )
  return images, labels.astype(np.int32)


def _read_cifar_split(spec, split, paths, verify, counts):
  """(uint8 [N, 32, 32, 3], int32 [N]) from the split's batch files, in order."""
  parts = [
      read_cifar_bin(
          p,
          expected_md5=spec.md5_of(p.name) if verify else None,
          num_classes=spec.num_classes,
      )
      for p in paths
  ]
  images = np.concatenate([i for i, _ in parts]) if len(parts) > 1 else parts[0][0]
  labels = np.concatenate([l for _, l in parts]) if len(parts) > 1 else parts[0][1]
  where = os.fspath(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({split} batches {paths[0].name}..{paths[-1].name})"
  validate_split(spec, split, images, labels, images_where=where, labels_where=where, expected_counts=counts)
  return images, labels


def _read_wav_split(spec, split, paths, verify, counts):
  """(float32 [N, samples], int32 [N]) from the split's recordings, in canonical order."""
  md5 = dict(spec.split_md5).get(split) if verify else None
  waves, labels = read_recordings(paths, rate=spec.sample_rate, length=spec.image_shape[0], peak=spec.signal_peak,
                                  expected_md5=md5)
  where = f"{paths[0].parent} ({split} recordings)"
  validate_split(spec, split, waves, labels, images_where=where, labels_where=where, expected_counts=counts)
  return waves, labels
