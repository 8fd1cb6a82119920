"""Tests of geomrobust.data: readers, sources, checks, caching, real MNIST."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import shutil
import struct
import sys
import tarfile
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from geomrobust import data
from geomrobust.data import download as download_lib
from geomrobust.data import idx as idx_lib
from geomrobust.data import testing as data_testing

# ../shared/data from the repository root (tests/ is one level below the root).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
LOOSE = dict(verify_checksums=False, expected_counts=False)  # for generated files


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
  """No network, no tfds, an empty cache and no data_dir from the environment."""
  monkeypatch.setenv("GEOMROBUST_OFFLINE", "1")
  monkeypatch.setenv("GEOMROBUST_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("GEOMROBUST_DATA_DIR", raising=False)
  # None in sys.modules makes `import tensorflow_datasets` raise ImportError,
  # so the result does not depend on whether tfds happens to be installed.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  data.clear_cache()
  yield
  data.clear_cache()


# --- hand-made IDX bytes (struct, independent of the helper) -------------------------


def idx_images(images: np.ndarray) -> bytes:
  n, rows, cols = images.shape
  return struct.pack(">iiii", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
  return struct.pack(">ii", 2049, len(labels)) + np.asarray(labels, np.uint8).tobytes()


def write(path: Path, content: bytes) -> Path:
  """Write content, gzipping it when the name ends in .gz."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
  return path


def write_idx_set(folder: Path, train_images, train_labels, test_images, test_labels) -> None:
  contents = (idx_images(train_images), idx_labels(train_labels), idx_images(test_images), idx_labels(test_labels))
  for name, content in zip(IDX_NAMES, contents):
    write(folder / name, content)


def tiny_arrays(n_train=6, n_test=4, shape=(28, 28), seed=0):
  rng = np.random.default_rng(seed)
  return (
      rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
      np.arange(n_train) % 10,
      rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
      np.arange(n_test) % 10,
  )


# --- IDX reader -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x-images.gz", "x-images"])
def test_read_idx_images_and_labels(tmp_path, name):
  images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
  path = write(tmp_path / name, idx_images(images))
  got = data.read_idx(path)
  assert got.dtype == np.uint8 and got.shape == (3, 4, 5)
  np.testing.assert_array_equal(got, images)
  labels = write(tmp_path / ("y" + name), idx_labels(np.array([1, 0, 9])))
  np.testing.assert_array_equal(data.read_idx(labels, kind="labels"), [1, 0, 9])


@pytest.mark.parametrize(
    "content, pattern",
    [
        (struct.pack(">iiii", 1234, 1, 2, 2) + bytes(4), "bad IDX magic number 1234"),
        (struct.pack(">iiii", 2051, 2, 2, 2) + bytes(7), "truncated"),
        (struct.pack(">iiii", 2051, 2, 2, 2) + bytes(9), "trailing bytes"),
        (struct.pack(">ii", 2049, 3) + bytes(2), "truncated"),
        (struct.pack(">i", 2051) + bytes(3), "truncated"),
        (b"\x00\x00", "too short"),
    ],
)
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_corrupt_names_the_file(tmp_path, content, pattern, suffix):
  path = write(tmp_path / f"bad-idx{suffix}", content)
  with pytest.raises(data.DataError, match=pattern) as info:
    data.read_idx(path)
  assert str(path) in str(info.value)
  assert "\n" not in str(info.value)


def test_read_idx_bad_gzip(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
  with pytest.raises(data.DataError, match="not a valid gzip") as info:
    data.read_idx(path)
  assert str(path) in str(info.value)
  # A gzip stream cut short (EOFError inside gzip) is reported the same way.
  whole = gzip.compress(idx_labels(np.arange(100) % 10))
  path.write_bytes(whole[: len(whole) // 2])
  with pytest.raises(data.DataError, match="not a valid gzip"):
    data.read_idx(path)


def test_read_idx_md5_and_kind(tmp_path):
  content = idx_labels(np.array([1, 2, 3]))
  path = write(tmp_path / "labels.gz", content)
  good = hashlib.md5(content).hexdigest()  # md5 of the *uncompressed* content
  np.testing.assert_array_equal(data.read_idx(path, expected_md5=good), [1, 2, 3])
  with pytest.raises(data.DataError, match=f"content md5 {good} does not match the expected 0+") as info:
    data.read_idx(path, expected_md5="0" * 32)
  assert str(path) in str(info.value) and "delete it" in str(info.value)
  with pytest.raises(data.DataError, match="holds IDX labels but images were expected"):
    data.read_idx(path, kind="images")


def test_read_idx_missing_file(tmp_path):
  with pytest.raises(data.DataError, match="cannot read .*nope.gz"):
    data.read_idx(tmp_path / "nope.gz")


# --- IDX through load_dataset: cross-file and spec checks ------------------------------


def test_load_hand_made_idx(tmp_path):
  arrays = tiny_arrays()
  write_idx_set(tmp_path, *arrays)
  ds = data.load_dataset("mnist", tmp_path, **LOOSE)
  assert ds.train_images.shape == (6, 28, 28, 1) and ds.test_images.shape == (4, 28, 28, 1)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_images[..., 0], arrays[0])
  np.testing.assert_array_equal(ds.test_labels, arrays[3])
  assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
  assert ds.source == f"data_dir:{tmp_path}"


def test_label_out_of_range(tmp_path):
  train_images, _, test_images, test_labels = tiny_arrays()
  write_idx_set(tmp_path, train_images, np.array([0, 1, 2, 10, 4, 5]), test_images, test_labels)
  with pytest.raises(data.DataError, match="label 10 is outside 0..9") as info:
    data.load_dataset("mnist", tmp_path, **LOOSE)
  assert str(tmp_path / "train-labels-idx1-ubyte.gz") in str(info.value)


def test_image_label_count_mismatch(tmp_path):
  train_images, train_labels, test_images, test_labels = tiny_arrays()
  write_idx_set(tmp_path, train_images, train_labels, test_images, test_labels[:3])
  with pytest.raises(data.DataError, match="has 4 images but .* has 3 labels") as info:
    data.load_dataset("mnist", tmp_path, **LOOSE)
  assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in str(info.value)
  assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in str(info.value)


def test_wrong_image_size(tmp_path):
  data_testing.write_idx_dataset(tmp_path, shape=(8, 8))
  with pytest.raises(data.DataError, match=r"shape \(8, 8, 1\), expected \(28, 28, 1\)"):
    data.load_dataset("mnist", tmp_path, **LOOSE)


def test_checks_are_on_by_default(tmp_path):
  data_testing.write_idx_dataset(tmp_path)
  # md5 first: generated files are not the canonical ones.
  with pytest.raises(data.DataError, match="content md5 .* does not match the expected 6bbc9ace898e44ae57da46a324031adb") as info:
    data.load_dataset("mnist", tmp_path)
  assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(info.value)
  with pytest.raises(data.DataError, match="mnist train has 64 examples, expected 60000"):
    data.load_dataset("mnist", tmp_path, verify_checksums=False)
  with pytest.raises(data.DataError, match="content md5"):
    data.load_dataset("mnist", tmp_path, expected_counts=False)
  assert len(data.load_dataset("mnist", tmp_path, **LOOSE).train_labels) == 64


def test_raw_names_accepted(tmp_path):
  data_testing.write_idx_dataset(tmp_path, gz=False, n_train=10, n_test=5)
  assert not list(tmp_path.glob("*.gz"))
  ds = data.load_dataset("fashion_mnist", tmp_path, **LOOSE)
  assert ds.train_images.shape == (10, 28, 28, 1) and ds.name == "fashion_mnist"


# --- CIFAR-10 binary -------------------------------------------------------------------


def test_cifar_channel_placement(tmp_path):
  # One record by hand: label 3; R plane 10 except pixel (row 1, col 2) = 200; G 20; B 30.
  red = np.full((32, 32), 10, np.uint8)
  red[1, 2] = 200
  record = bytes([3]) + red.tobytes() + bytes([20]) * 1024 + bytes([30]) * 1024
  second = bytes([9]) + bytes(range(256)) * 12  # 3072 bytes: R plane starts 0, 1, 2...
  path = tmp_path / "test_batch.bin"
  path.write_bytes(record + second)
  images, labels = data.read_cifar_bin(path)
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and images.flags.c_contiguous
  np.testing.assert_array_equal(labels, [3, 9])
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(images[0, 1, 2], [200, 20, 30])
  np.testing.assert_array_equal(images[0, 0, 0], [10, 20, 30])
  # Row-major planes: R of pixel (0, 5) is byte 5 of the R plane; G of (0, 0) is byte 1024.
  assert images[1, 0, 5, 0] == 5 and images[1, 0, 0, 1] == 1024 % 256


@pytest.mark.parametrize("size", [3073 * 2 - 1, 3073 + 1, 0])
def test_cifar_bad_length(tmp_path, size):
  path = tmp_path / "data_batch_1.bin"
  path.write_bytes(bytes(size))
  with pytest.raises(data.DataError, match="multiple of the 3073-byte") as info:
    data.read_cifar_bin(path)
  assert str(path) in str(info.value)


def test_cifar_bad_label(tmp_path):
  path = tmp_path / "data_batch_1.bin"
  path.write_bytes(bytes([0]) + bytes(3072) + bytes([10]) + bytes(3072))
  with pytest.raises(data.DataError, match="record 1 has label 10") as info:
    data.read_cifar_bin(path)
  assert str(path) in str(info.value)


@pytest.mark.parametrize("layout", ["parent", "parent_batches", "batches", "direct"])
def test_load_cifar10_layouts(tmp_path, layout):
  root = tmp_path / "root"
  where = {
      "parent": root / "cifar10",  # <root>/cifar10/cifar-10-batches-bin/
      "parent_batches": root,  # <root>/cifar-10-batches-bin/
      "batches": root,  # data_dir = .../cifar-10-batches-bin itself
      "direct": root / "cifar10",  # data_dir = <root>/cifar10 (holding cifar-10-batches-bin/)
  }[layout]
  data_testing.write_cifar10_bin(where, n_per_train_file=4, n_test=6)
  data_dir = {"parent": root, "parent_batches": root, "batches": root / "cifar-10-batches-bin",
              "direct": root / "cifar10"}[layout]
  ds = data.load_dataset("cifar10", data_dir, **LOOSE)
  assert ds.train_images.shape == (20, 32, 32, 3) and ds.test_images.shape == (6, 32, 32, 3)
  assert ds.train_labels.dtype == np.int32 and set(ds.train_labels) <= set(range(10))
  assert ds.source.endswith("cifar-10-batches-bin")
  with pytest.raises(data.DataError, match="cifar10 train has 20 examples, expected 50000"):
    data.load_dataset("cifar10", data_dir, verify_checksums=False)


def test_cifar_writer_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  got, labels = data.parse_cifar_bin(data_testing.encode_cifar_records(images, np.arange(5)))
  np.testing.assert_array_equal(got, images)
  np.testing.assert_array_equal(labels, np.arange(5))


# --- sources ---------------------------------------------------------------------------


def test_parent_and_direct_layouts_and_env(tmp_path, monkeypatch):
  data_testing.write_idx_dataset(tmp_path / "parent" / "mnist", n_train=12)
  data_testing.write_idx_dataset(tmp_path / "direct", n_train=13)
  parent = data.load_dataset("mnist", tmp_path / "parent", **LOOSE)
  assert len(parent.train_labels) == 12 and parent.source == f"data_dir:{tmp_path / 'parent' / 'mnist'}"
  assert len(data.load_dataset("mnist", str(tmp_path / "direct"), **LOOSE).train_labels) == 13
  monkeypatch.setenv("GEOMROBUST_DATA_DIR", str(tmp_path / "parent"))
  assert data.load_dataset("mnist", **LOOSE) is parent  # same files: cached object
  # The argument wins over the environment variable.
  assert len(data.load_dataset("mnist", tmp_path / "direct", **LOOSE).train_labels) == 13


def test_missing_data_dir(tmp_path, monkeypatch):
  with pytest.raises(data.DataError, match=f"--data_dir={tmp_path / 'nope'} does not exist"):
    data.load_dataset("mnist", tmp_path / "nope")
  monkeypatch.setenv("GEOMROBUST_DATA_DIR", str(tmp_path / "gone"))
  with pytest.raises(data.DataError, match="GEOMROBUST_DATA_DIR=.*gone does not exist"):
    data.load_dataset("mnist")


def test_nothing_anywhere_one_line(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(data.DataError) as info:
    data.load_dataset("mnist", empty)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("no data for 'mnist': looked in ")
  assert f"--data_dir={empty} (no mnist files in {empty / 'mnist'}/ or {empty}/)" in message
  assert "tfds (not installed)" in message
  assert "download (offline: GEOMROBUST_OFFLINE=1" in message
  assert message.endswith(
      "Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
      "t10k-labels-idx1-ubyte.gz in DIR/mnist/ and pass --data_dir=DIR."
  )
  # No data_dir at all, and download=False.
  with pytest.raises(data.DataError, match=r"--data_dir \(not set, nor GEOMROBUST_DATA_DIR\).*download \(disabled"):
    data.load_dataset("cifar10", download=False)


def test_partial_folder_names_missing_files(tmp_path):
  data_testing.write_idx_dataset(tmp_path / "mnist")
  (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(data.DataError, match="holds only part of mnist: missing t10k-labels-idx1-ubyte.gz"):
    data.load_dataset("mnist", tmp_path, **LOOSE)


def test_folder_of_another_dataset_is_not_used(tmp_path):
  # MNIST and Fashion-MNIST share file names: a folder named mnist/ must not serve fashion_mnist.
  data_testing.write_idx_dataset(tmp_path / "mnist")
  with pytest.raises(data.DataError, match="no data for 'fashion_mnist'"):
    data.load_dataset("fashion_mnist", tmp_path / "mnist", **LOOSE)


def test_unknown_name():
  with pytest.raises(data.DataError) as info:
    data.load_dataset("foo")
  assert str(info.value) == "unknown dataset 'foo'; available: cifar10, fashion_mnist, mnist, spoken_digit"
  assert data.available_datasets() == ["cifar10", "fashion_mnist", "mnist", "spoken_digit"]


def test_cache_read_only_and_refresh(tmp_path):
  data_testing.write_idx_dataset(tmp_path, n_train=8)
  first = data.load_dataset("mnist", tmp_path, **LOOSE)
  assert data.load_dataset("mnist", tmp_path, **LOOSE) is first
  for array in (first.train_images, first.train_labels, first.test_images, first.test_labels):
    assert not array.flags.writeable
  with pytest.raises(ValueError):
    first.train_images[0, 0, 0, 0] = 1
  data_testing.write_idx_dataset(tmp_path, n_train=9)  # replaced on disk: re-read
  assert len(data.load_dataset("mnist", tmp_path, **LOOSE).train_labels) == 9


# --- tfds ------------------------------------------------------------------------------


def fake_tfds(calls, fail=None):
  module = types.ModuleType("tensorflow_datasets")

  def load(name, *, split, batch_size, download, data_dir=None):
    calls.append(dict(name=name, split=split, batch_size=batch_size, download=download, data_dir=data_dir))
    if fail:
      raise fail
    n = 7 if split == "train" else 3
    return {"image": np.full((n, 28, 28, 1), 5, np.uint8), "label": np.arange(n, dtype=np.int64) % 10}

  module.load = load
  module.as_numpy = lambda tree: tree
  return module


def test_tfds_source(monkeypatch):
  calls = []
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(calls))
  ds = data.load_dataset("fashion_mnist", **LOOSE)
  assert ds.source == "tfds"
  assert ds.train_images.shape == (7, 28, 28, 1) and ds.test_labels.dtype == np.int32
  assert [c["split"] for c in calls] == ["train", "test"]
  assert all(c["download"] is False and c["batch_size"] == -1 and c["name"] == "fashion_mnist" for c in calls)
  # expected_counts applies to tfds too; a failure there falls through to the next source.
  with pytest.raises(data.DataError, match=r"tfds \(DataError: .*expected 60000"):
    data.load_dataset("fashion_mnist")


def test_tfds_failure_falls_through(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(calls, fail=RuntimeError("not prepared")))
  (tmp_path / "d").mkdir()
  with pytest.raises(data.DataError, match=r"tfds \(data_dir=.*RuntimeError: not prepared; RuntimeError: not prepared\)"):
    data.load_dataset("mnist", tmp_path / "d")
  assert [c["data_dir"] for c in calls] == [str(tmp_path / "d"), None]


# --- download --------------------------------------------------------------------------


def serve_from(monkeypatch, folder: Path, fetched: list):
  """Replace the network: a URL is answered with the file of the same base name in folder."""

  def fetch(url, dest):
    fetched.append(url)
    source = folder / url.rsplit("/", 1)[-1]
    if not source.exists():
      raise urllib.error.URLError("no route to host")
    shutil.copyfile(source, dest)

  monkeypatch.delenv("GEOMROBUST_OFFLINE")
  monkeypatch.setattr(download_lib, "_fetch", fetch)


def content_md5s(folder: Path) -> tuple:
  return tuple((n, hashlib.md5(gzip.decompress((folder / n).read_bytes())).hexdigest()) for n in IDX_NAMES)


def test_download_verified_then_cached(tmp_path, monkeypatch):
  server = tmp_path / "server"
  data_testing.write_idx_dataset(server)
  spec = data.get_spec("mnist")
  monkeypatch.setitem(data.REGISTRY, "mnist", dataclasses.replace(spec, md5=content_md5s(server)))
  fetched = []
  serve_from(monkeypatch, server, fetched)
  ds = data.load_dataset("mnist", expected_counts=False)  # checksums verified
  cache = tmp_path / "cache" / "mnist"
  assert ds.source == f"download:{cache}"
  assert fetched == [spec.url_of(n) for n in IDX_NAMES]
  assert fetched[0] == "https://storage.googleapis.com/cvdf-datasets/mnist/train-images-idx3-ubyte.gz"
  assert sorted(p.name for p in cache.iterdir()) == sorted(IDX_NAMES)  # no temp files left
  # The cache is now complete: no network needed, even offline.
  monkeypatch.setenv("GEOMROBUST_OFFLINE", "1")
  again = data.load_dataset("mnist", expected_counts=False)
  assert again.source == f"cache:{cache}" and len(fetched) == 4
  np.testing.assert_array_equal(again.train_images, ds.train_images)


def test_download_bad_md5_leaves_nothing(tmp_path, monkeypatch):
  server = tmp_path / "server"
  data_testing.write_idx_dataset(server)  # registry keeps the real MNIST md5s
  serve_from(monkeypatch, server, [])
  with pytest.raises(data.DataError, match="download of .*train-images-idx3-ubyte.gz .* expected 6bbc9ace898e44ae57da46a324031adb") as info:
    data.load_dataset("mnist", **LOOSE)  # downloads are verified whatever verify_checksums says
  cache = tmp_path / "cache" / "mnist"
  assert str(cache / "train-images-idx3-ubyte.gz") in str(info.value)
  assert list(cache.iterdir()) == []


def test_download_network_error_falls_through(tmp_path, monkeypatch):
  serve_from(monkeypatch, tmp_path / "no-server", [])
  with pytest.raises(data.DataError, match=r"download \(offline: https://storage.googleapis.com/.*no route to host>?\)\. Put "):
    data.load_dataset("mnist")


def make_tar(path: Path, members: dict[str, bytes]) -> None:
  with tarfile.open(path, "w:gz") as tar:
    for name, content in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))


def test_download_cifar_archive_safely(tmp_path, monkeypatch):
  generated = tmp_path / "gen"
  data_testing.write_cifar10_bin(generated, n_per_train_file=2, n_test=3)
  members = {f"cifar-10-batches-bin/{p.name}": p.read_bytes() for p in (generated / "cifar-10-batches-bin").iterdir()}
  members["cifar-10-batches-bin/readme.html"] = b"hi"
  members["../evil.bin"] = b"x"
  members["/tmp/evil-abs.bin"] = b"x"
  server = tmp_path / "server"
  server.mkdir()
  archive = server / "cifar-10-binary.tar.gz"
  make_tar(archive, members)
  spec = data.get_spec("cifar10")
  monkeypatch.setitem(data.REGISTRY, "cifar10", dataclasses.replace(spec, archive_md5=hashlib.md5(archive.read_bytes()).hexdigest()))
  fetched = []
  serve_from(monkeypatch, server, fetched)
  ds = data.load_dataset("cifar10", **LOOSE)
  target = tmp_path / "cache" / "cifar10" / "cifar-10-batches-bin"
  assert fetched == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
  assert ds.source == f"download:{tmp_path / 'cache' / 'cifar10'}"
  assert ds.train_images.shape == (10, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
  assert sorted(p.name for p in target.iterdir()) == sorted(spec.files)
  assert sorted(p.name for p in (tmp_path / "cache" / "cifar10").iterdir()) == ["cifar-10-batches-bin"]
  assert not (tmp_path / "cache" / "evil.bin").exists()


def test_download_cifar_bad_archive_md5(tmp_path, monkeypatch):
  server = tmp_path / "server"
  server.mkdir()
  make_tar(server / "cifar-10-binary.tar.gz", {"cifar-10-batches-bin/test_batch.bin": bytes(3073)})
  serve_from(monkeypatch, server, [])
  with pytest.raises(data.DataError, match="has md5 .* expected c32a1d4ab5d03f1284b67883e8d87530"):
    data.load_dataset("cifar10", **LOOSE)
  assert list((tmp_path / "cache" / "cifar10").iterdir()) == []


# --- to_float and Dataset --------------------------------------------------------------


def test_to_float():
  import jax
  import jax.numpy as jnp

  images = np.array([[0, 51, 255]], np.uint8)
  out = data.to_float(images)
  assert isinstance(out, jax.Array) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), [[0.0, 0.2, 1.0]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(data.to_float)(jnp.asarray(images))), [[0.0, 0.2, 1.0]], rtol=1e-6)
  with pytest.raises(TypeError, match="expects uint8"):
    data.to_float(out)


def test_dataset_rejects_bad_arrays():
  images = np.zeros((2, 4, 4, 1), np.uint8)
  with pytest.raises(data.DataError, match="train_labels must be int32"):
    data.Dataset("x", images, np.zeros(2, np.int64), images, np.zeros(2, np.int32), 10, "test")
  ok = data.Dataset("x", images, np.zeros(2, np.int32), images, np.zeros(2, np.int32), 10, "test")
  assert ok.image_shape == (4, 4, 1) and "train=(2, 4, 4, 1)" in repr(ok)


# --- the real data ---------------------------------------------------------------------


@pytest.mark.parametrize("name, min_class, max_class", [("mnist", 5400, 6800), ("fashion_mnist", 6000, 6000)])
def test_real_data(name, min_class, max_class, monkeypatch):
  if not (SHARED_DATA / name).is_dir():
    pytest.skip(f"no real data at {SHARED_DATA / name}")
  # Record every file read and every md5 check of the IDX reader.
  reads, md5_checks = [], []
  real_read, real_check = idx_lib.read_content, idx_lib.check_md5

  def read_content(path, **kw):
    content = real_read(path, **kw)
    reads.append((Path(path).name, content))
    return content

  def check_md5(content, expected, path):
    md5_checks.append((Path(path).name, expected))
    return real_check(content, expected, path)

  monkeypatch.setattr(idx_lib, "read_content", read_content)
  monkeypatch.setattr(idx_lib, "check_md5", check_md5)

  ds = data.load_dataset(name, SHARED_DATA)  # full verification: md5s and counts
  spec = data.get_spec(name)
  # Each canonical file read once, and its md5 checked against the registry.
  assert sorted(n for n, _ in reads) == sorted(spec.files)
  assert sorted(md5_checks) == sorted((f, spec.md5_of(f)) for f in spec.files)
  assert all(expected is not None for _, expected in md5_checks)
  # The images are a view of the decompressed file content, not a copy.
  content = dict(reads)
  assert np.shares_memory(ds.train_images, np.frombuffer(content[spec.train_files[0]], np.uint8)), 'copied'
  assert np.shares_memory(ds.test_images, np.frombuffer(content[spec.test_files[0]], np.uint8)), 'copied'
  assert ds.source == f"data_dir:{SHARED_DATA / name}"
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
  for labels in (ds.train_labels, ds.test_labels):
    assert labels.dtype == np.int32 and labels.min() == 0 and labels.max() == 9
  counts = np.bincount(ds.train_labels, minlength=10)
  assert counts.min() >= min_class and counts.max() <= max_class
  assert 700 <= np.bincount(ds.test_labels).min() and np.bincount(ds.test_labels).max() <= 1200
  assert 20 < ds.train_images.mean() < 100  # mostly-black images, not noise or zeros
  # A second load is served from the in-process cache: the same object and
  # arrays, and no file is read (or checked) again.
  reads_before, checks_before = len(reads), len(md5_checks)
  again = data.load_dataset(name, SHARED_DATA)
  assert again is ds and again.train_images is ds.train_images and again.test_labels is ds.test_labels
  assert (len(reads), len(md5_checks)) == (reads_before, checks_before)
