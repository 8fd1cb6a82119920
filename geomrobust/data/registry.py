"""Registry of the supported data sets: one frozen `DatasetSpec` per name.

Checksums are md5 hex digests of the *uncompressed* content of each canonical
file. Hashing the content rather than the .gz file keeps the check valid for
copies that were re-compressed (e.g. Debian's Fashion-MNIST, or the re-packed
MNIST train-images in the shared data folder) while still pinning the data.
The MNIST values are the official ones; the Fashion-MNIST values were computed
from the official files.
"""

from __future__ import annotations

import dataclasses

from geomrobust.data.errors import DataError

# The two on-disk formats the readers understand.
FORMAT_IDX = "idx"  # four IDX files: train images/labels, test images/labels
FORMAT_CIFAR_BIN = "cifar_bin"  # CIFAR-10 binary batches: label byte + 3072 CHW bytes
FORMAT_WAV = "wav"  # one mono 16-bit WAV per example, "{label}_..." file names (data/wav.py)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Everything the loader needs to know about one data set.

  Attributes:
    name: registry name, also the sub-folder name under a parent data_dir.
    format: FORMAT_IDX or FORMAT_CIFAR_BIN.
    train_files: canonical names of the train files. IDX: (images, labels);
      CIFAR: the data batches in order.
    test_files: likewise for the test split.
    image_shape: (H, W, C) of one image.
    num_classes: labels lie in [0, num_classes).
    train_count, test_count: expected number of examples per split.
    md5: ((canonical file name, md5 of its uncompressed content or None), ...).
      A tuple of pairs rather than a dict so that the spec stays hashable
      (it is part of the in-process cache key).
    urls: ((canonical file name, download URL), ...) for per-file downloads.
    archive_url, archive_md5: for data sets shipped as one archive (CIFAR).
    archive_folder: folder inside the archive holding the canonical files;
      it is also accepted as a sub-folder of a data_dir.
    tfds_name: the name under which tensorflow_datasets knows the data set.
    sample_rate, signal_peak: audio (FORMAT_WAV): the recordings' sample rate
      and the peak |x| every waveform is scaled to (``image_shape`` is then
      ``(samples,)``, the fixed length).
    split_md5: ((split, md5 of the split's files' bytes concatenated in
      canonical order), ...), for sets of many small files.
  """

  name: str
  format: str
  train_files: tuple[str, ...]
  test_files: tuple[str, ...]
  image_shape: tuple[int, int, int]
  num_classes: int
  train_count: int
  test_count: int
  md5: tuple[tuple[str, str | None], ...] = ()
  urls: tuple[tuple[str, str], ...] = ()
  archive_url: str | None = None
  archive_md5: str | None = None
  archive_folder: str | None = None
  tfds_name: str = ""
  sample_rate: int = 0
  signal_peak: float = 0.0
  split_md5: tuple[tuple[str, str], ...] = ()

  @property
  def files(self) -> tuple[str, ...]:
    """All canonical file names, train first."""
    return self.train_files + self.test_files

  @property
  def box(self) -> tuple[float, float]:
    """The valid input box: [0, 1] for images (after the loop's x / 255),
    [-1, 1] for waveforms."""
    return (-1.0, 1.0) if self.format == FORMAT_WAV else (0.0, 1.0)

  @property
  def audio(self) -> bool:
    return self.format == FORMAT_WAV

  @property
  def generated(self) -> bool:
    return False

  def md5_of(self, filename: str) -> str | None:
    """Expected md5 of the uncompressed content of a canonical file, if known."""
    return dict(self.md5).get(filename)

  def url_of(self, filename: str) -> str | None:
    """Download URL of a canonical file, if it is downloaded on its own."""
    return dict(self.urls).get(filename)


_IDX_TRAIN = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
_IDX_TEST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _idx_spec(name: str, base_url: str, md5s: tuple[str, str, str, str]) -> DatasetSpec:
  files = _IDX_TRAIN + _IDX_TEST
  return DatasetSpec(
      name=name,
      format=FORMAT_IDX,
      train_files=_IDX_TRAIN,
      test_files=_IDX_TEST,
      image_shape=(28, 28, 1),
      num_classes=10,
      train_count=60000,
      test_count=10000,
      md5=tuple(zip(files, md5s)),
      urls=tuple((f, base_url + f) for f in files),
      tfds_name=name,
  )


# The Free Spoken Digit Dataset: 6 speakers x 10 digits x 50 recordings; the usual split
# puts recordings 0-4 of each (speaker, digit) in the test set.
FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")


def _fsdd_files(indices) -> tuple[str, ...]:
  # Interleaved (index, speaker, digit): any prefix of a split is balanced over the digits.
  return tuple(f"recordings/{d}_{s}_{i}.wav" for i in indices for s in FSDD_SPEAKERS for d in range(10))


_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = ("test_batch.bin",)

# Mutable on purpose (a plain dict): tests may swap a spec via monkeypatch.
REGISTRY: dict[str, DatasetSpec] = {
    "mnist": _idx_spec(
        "mnist",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        # train-images, train-labels, t10k-images, t10k-labels (uncompressed).
        (
            "6bbc9ace898e44ae57da46a324031adb",
            "a25bea736e30d166cdddb491f175f624",
            "2646ac647ad5339dbf082846283269ea",
            "27ae3e4e09519cfbb04c329615203637",
        ),
    ),
    "fashion_mnist": _idx_spec(
        "fashion_mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "9018921c3c673c538a1fc5bad174d6f9",
            "8181f5470baa50b63fa0f6fddb340f0a",
            "15d484375f8d13e6eb1aabb0c3f46965",
        ),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        format=FORMAT_CIFAR_BIN,
        train_files=_CIFAR_TRAIN,
        test_files=_CIFAR_TEST,
        image_shape=(32, 32, 3),
        num_classes=10,
        train_count=50000,
        test_count=10000,
        # No offline copy to compute content md5s from: only the archive is pinned.
        md5=tuple((f, None) for f in _CIFAR_TRAIN + _CIFAR_TEST),
        archive_url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        archive_md5="c32a1d4ab5d03f1284b67883e8d87530",
        archive_folder="cifar-10-batches-bin",
        tfds_name="cifar10",
    ),
    "spoken_digit": DatasetSpec(
        name="spoken_digit",
        format=FORMAT_WAV,
        train_files=_fsdd_files(range(5, 50)),
        test_files=_fsdd_files(range(5)),
        image_shape=(8000,),      # 1 s at 8 kHz: 99.3% of the recordings fit uncropped
        num_classes=10,
        train_count=2700,
        test_count=300,
        tfds_name="spoken_digit",
        sample_rate=8000,
        signal_peak=0.5,
        split_md5=(("train", "46f3faae7a2f63daaf9e710ec59796a6"), ("test", "4dcd36b4a0aa47833b1f80e9d23dbc2c")),
    ),
}


def available_datasets() -> list[str]:
  """Registered data set names, sorted."""
  return sorted(REGISTRY)


def get_spec(name: str):
  """The spec registered under `name`; DataError for an unknown name.

  Stored data sets give their `DatasetSpec`; generated ones (see
  `geomrobust.data.generated`) their `GeneratorSpec`. Both have `name`,
  `num_classes`, `box` and `generated`.
  """
  from geomrobust.data import generated  # late: generated imports jax

  if name in generated.GENERATORS:
    return generated.GENERATORS[name]
  try:
    return REGISTRY[name]
  except KeyError:
    raise DataError(
        f"unknown dataset {name!r}; available: {', '.join(available_datasets())}"
    ) from None
