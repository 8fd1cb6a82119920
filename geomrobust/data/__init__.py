"""Data layer: image-classification data sets by name, as uint8 NHWC arrays.

    ds = load_dataset("mnist", data_dir="../shared/data")
    x = to_float(ds.train_images[:128])   # float32 [128, 28, 28, 1] in [0, 1]

See `load_dataset` for where data is looked for and which checks apply.
"""

from geomrobust.data.cifar import parse_cifar_bin, read_cifar_bin
from geomrobust.data.dataset import Dataset, to_float
from geomrobust.data.errors import DataError
from geomrobust.data.idx import parse_idx, read_idx
from geomrobust.data.loader import DATA_DIR_ENV, load_dataset
from geomrobust.data.local import clear_cache
from geomrobust.data.registry import REGISTRY, DatasetSpec, available_datasets, get_spec

__all__ = [
    "DATA_DIR_ENV",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "REGISTRY",
    "available_datasets",
    "clear_cache",
    "get_spec",
    "load_dataset",
    "parse_cifar_bin",
    "parse_idx",
    "read_cifar_bin",
    "read_idx",
    "to_float",
]
