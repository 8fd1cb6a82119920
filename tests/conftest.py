"""Shared fixtures. ../shared/data (beside the checkout) holds the real datasets."""

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data_dir() -> str:
  if not (SHARED_DATA / 'mnist').is_dir():
    pytest.skip(f'real data not found at {SHARED_DATA}')
  return str(SHARED_DATA)


@pytest.fixture(scope='session')
def tiny_mnist_dir(tmp_path_factory) -> str:
  """Generated MNIST-shaped IDX files (load them with data.verify=False)."""
  from geomrobust.data import testing
  folder = tmp_path_factory.mktemp('tiny_data') / 'mnist'
  testing.write_idx_dataset(folder, n_train=256, n_test=128, seed=0)
  return str(folder.parent)
