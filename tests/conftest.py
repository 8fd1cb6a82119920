"""Shared fixtures. ../shared/data (beside the checkout) holds the real datasets."""

import json
import os
import pathlib
import subprocess
import sys

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


@pytest.fixture
def run_on_8_cpu_devices(tmp_path):
  """Runs a script template in a fresh process with 8 simulated CPU devices.

  The template gets ``{repo}`` and ``{tmp}`` (str.format) and must write its
  results as JSON to ``{tmp}/out.json``, which is returned.
  """

  def run(template: str) -> dict:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES='8', JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=8')
    script = template.format(repo=str(REPO), tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / 'out.json').read_text())

  return run
