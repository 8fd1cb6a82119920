"""The `Dataset` container, split validation, and uint8 -> float conversion."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust.data.errors import DataError
from geomrobust.data.registry import DatasetSpec


# eq=False: comparing/hashing by array content is meaningless (and numpy's
# elementwise == would make a generated __eq__ raise); identity is what we want.
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
  """A loaded classification data set, held in host memory.

  Files give images: uint8 [N, H, W, C], scaled by 1/255 where they are used,
  valid input box (0, 1). A Dataset may instead hold float32 inputs of any
  shape [N, ...] (e.g. [N, D] vectors or [N, T, F] audio features), used as
  they are, with no input box; `box` says which. For training, wrap the
  arrays in a source (`geomrobust.data.source.StoredSource`, or `.train_source`).

  Attributes:
    name: registry name, e.g. "mnist".
    train_images: uint8 [N, H, W, C] (MNIST [60000, 28, 28, 1]; CIFAR-10 [50000, 32, 32, 3]),
      or float32 [N, ...].
    train_labels: int32 [N], in [0, num_classes).
    test_images: uint8 [M, H, W, C].
    test_labels: int32 [M].
    num_classes: number of classes.
    source: where the arrays came from, e.g. "data_dir:/path/mnist", "tfds",
      "cache:/root/.cache/geomrobust/mnist", "download:/root/.cache/geomrobust/mnist".

  Arrays returned by `load_dataset` are read-only and shared between loads.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  source: str
  input_box: object = "auto"   # (lo, hi), None, or "auto": by dtype (see `box`)

  def __post_init__(self):
    # Cheap structural checks so a malformed Dataset fails where it is built.
    for split in ("train", "test"):
      images = getattr(self, f"{split}_images")
      labels = getattr(self, f"{split}_labels")
      image_ok = images.dtype == np.uint8 and images.ndim == 4
      float_ok = images.dtype == np.float32 and images.ndim >= 2
      if not (image_ok or float_ok):
        raise DataError(f"{self.name} {split}_images must be uint8 [N, H, W, C] or float32 [N, ...], "
                        f"got {images.dtype} {images.shape}")
      if labels.dtype != np.int32 or labels.ndim != 1:
        raise DataError(f"{self.name} {split}_labels must be int32 [N], got {labels.dtype} {labels.shape}")
      if len(images) != len(labels):
        raise DataError(f"{self.name} {split}: {len(images)} images but {len(labels)} labels")
    if self.train_images.dtype != self.test_images.dtype:
      raise DataError(f"{self.name}: train inputs are {self.train_images.dtype} but test inputs "
                      f"{self.test_images.dtype}")
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise DataError(
          f"{self.name}: train images {self.train_images.shape[1:]} and test images "
          f"{self.test_images.shape[1:]} differ in shape"
      )

  @property
  def image_shape(self) -> tuple[int, ...]:
    """(H, W, C) of one image (the shape of one example for float data)."""
    return tuple(self.train_images.shape[1:])

  @property
  def box(self) -> tuple[float, float] | None:
    """The valid input box: ``input_box`` when given (e.g. (-1, 1) for
    waveforms), else (0.0, 1.0) for uint8 images and None for float data."""
    if self.input_box != "auto":
      return self.input_box
    return (0.0, 1.0) if self.train_images.dtype == np.uint8 else None

  def train_source(self):
    """The training split as a `StoredSource` (for `training.loop.train`)."""
    from geomrobust.data.source import StoredSource

    return StoredSource(self.train_images, self.train_labels, num_classes=self.num_classes)

  def __repr__(self) -> str:
    return (
        f"Dataset(name={self.name!r}, train={self.train_images.shape}, "
        f"test={self.test_images.shape}, num_classes={self.num_classes}, source={self.source!r})"
    )


def to_float(images: jax.Array | np.ndarray) -> jax.Array:
  """uint8 images -> float32 in [0, 1] (x / 255), any shape; works under jit.

  Only uint8 is accepted: rescaling images that are already float is a silent
  bug (everything ends up near 0), so it is refused loudly instead.
  """
  if images.dtype != np.uint8:
    raise TypeError(f"to_float expects uint8 images, got {images.dtype}; they may already be float")
  return jnp.asarray(images, dtype=jnp.float32) / 255.0


def freeze(array: np.ndarray) -> np.ndarray:
  """Mark `array` read-only (it is shared via the in-process cache) and return it."""
  array.flags.writeable = False
  return array


def validate_split(
    spec: DatasetSpec,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    images_where: str,
    labels_where: str,
    expected_counts: bool,
) -> None:
  """Check one split against the spec; DataError naming the offending file.

  Args:
    spec: the data set's spec.
    split: "train" or "test".
    images: uint8 [N, H, W, C] (float32 [N, samples] for audio).
    labels: integer [N].
    images_where, labels_where: how to name the sources in messages (paths).
    expected_counts: also require N to equal the spec's count for the split.
  """
  if images.shape[1:] != tuple(spec.image_shape):
    raise DataError(
        f"{images_where}: {spec.name} {split} images have shape {images.shape[1:]}, expected "
        f"{spec.image_shape}; this is not a {spec.name} file"
    )
  if len(images) != len(labels):
    raise DataError(
        f"{images_where} has {len(images)} images but {labels_where} has {len(labels)} labels; "
        "the files do not belong together, fetch them again"
    )
  if labels.size:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= spec.num_classes:
      bad = low if low < 0 else high
      raise DataError(
          f"{labels_where}: label {bad} is outside 0..{spec.num_classes - 1} for {spec.name}; "
          "the file is corrupt or belongs to another data set"
      )
  if expected_counts:
    want = spec.train_count if split == "train" else spec.test_count
    if len(labels) != want:
      raise DataError(
          f"{labels_where}: {spec.name} {split} has {len(labels)} examples, expected {want}; "
          "the file is incomplete or not the canonical one (for generated test files pass expected_counts=False)"
      )
