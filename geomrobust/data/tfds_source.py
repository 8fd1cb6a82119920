"""Loading a tfds-prepared copy, when tensorflow_datasets is installed.

tensorflow_datasets is an optional dependency: it is imported lazily, and any
failure (not installed, not prepared, no network) is reported back as a reason
instead of raised, so that `load_dataset` can try its next source.
"""

from __future__ import annotations

import numpy as np

from geomrobust.data.dataset import Dataset, freeze, validate_split
from geomrobust.data.errors import DataError
from geomrobust.data.files import one_line
from geomrobust.data.registry import DatasetSpec


def load_from_tfds(
    spec: DatasetSpec, data_dir: str | None, *, expected_counts: bool
) -> tuple[Dataset | None, str]:
  """Try to load `spec` from tfds without downloading.

  Tries tfds's `data_dir` = the given data_dir (tfds's own layout,
  <data_dir>/<name>/<version>/, fits the parent-folder form), then tfds's
  default location.

  Returns:
    (dataset, "") on success, else (None, why it failed, one line).
  """
  if spec.format != "idx" and spec.format != "cifar_bin":
    return None, f"not used for {spec.format} data (read the files with --data_dir)"
  try:
    import tensorflow_datasets as tfds  # optional and slow to import
  except ImportError:
    return None, "not installed"
  except Exception as e:  # a broken install (e.g. a TF mismatch) is not our crash
    return None, f"import failed: {one_line(e)}"

  reasons = []
  for tfds_dir in dict.fromkeys([data_dir, None]):  # dedupe, keep order
    try:
      return _load(tfds, spec, tfds_dir, expected_counts), ""
    except Exception as e:  # any tfds failure means: try the next source
      where = f"data_dir={tfds_dir}: " if tfds_dir else ""
      reasons.append(f"{where}{type(e).__name__}: {one_line(e)}")
  return None, "; ".join(reasons)


def _load(tfds, spec: DatasetSpec, tfds_dir: str | None, expected_counts: bool) -> Dataset:
  arrays = {}
  for split in ("train", "test"):
    batch = tfds.as_numpy(
        tfds.load(spec.tfds_name, split=split, batch_size=-1, download=False, data_dir=tfds_dir)
    )
    images = np.asarray(batch["image"])
    labels = np.asarray(batch["label"])
    if images.dtype != np.uint8:
      raise DataError(f"tfds {spec.tfds_name} {split}: images are {images.dtype}, expected uint8")
    where = f"tfds {spec.tfds_name} {split}"
    validate_split(spec, split, images, labels, images_where=where, labels_where=where,
                   expected_counts=expected_counts)
    arrays[split] = (np.ascontiguousarray(images), labels.astype(np.int32))
  return Dataset(
      name=spec.name,
      train_images=freeze(arrays["train"][0]),
      train_labels=freeze(arrays["train"][1]),
      test_images=freeze(arrays["test"][0]),
      test_labels=freeze(arrays["test"][1]),
      num_classes=spec.num_classes,
      source=f"tfds:{tfds_dir}" if tfds_dir else "tfds",
  )
