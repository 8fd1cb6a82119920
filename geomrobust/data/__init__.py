"""Data layer: classification data sets by name.

    ds = load_dataset("mnist", data_dir="../shared/data")
    x = to_float(ds.train_images[:128])   # float32 [128, 28, 28, 1] in [0, 1]

Stored data sets are files read into uint8 NHWC arrays (see `load_dataset` for
where data is looked for and which checks apply). Generated ones
(`generated_datasets()`, e.g. "sparse_coding") make fresh batches on the device;
`make_source(name, config.data.get(name))` builds them. The training loop takes
a source (`StoredSource`, `GeneratorSource`, see `geomrobust.data.source`);
`get_spec(name).box` is a data set's valid input box ((0, 1) for images, None
for generated data).
"""

from geomrobust.data.cifar import parse_cifar_bin, read_cifar_bin
from geomrobust.data.dataset import Dataset, to_float
from geomrobust.data.errors import DataError
from geomrobust.data.generated import GENERATORS, GeneratorSpec, generated_datasets, make_source
from geomrobust.data.idx import parse_idx, read_idx
from geomrobust.data.loader import DATA_DIR_ENV, load_dataset
from geomrobust.data.local import clear_cache
from geomrobust.data.registry import REGISTRY, DatasetSpec, available_datasets, get_spec
from geomrobust.data.source import GeneratorSource, StoredSource, TrainSource, as_source

__all__ = [
    "DATA_DIR_ENV",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "GENERATORS",
    "GeneratorSource",
    "GeneratorSpec",
    "StoredSource",
    "TrainSource",
    "as_source",
    "generated_datasets",
    "make_source",
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
