"""Shared fixtures. ../shared/data (beside the checkout) holds the real datasets."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'

# One JAX compilation cache for the whole session: the CLI tests launch many
# processes that compile the same programs (the MNIST CNN's train step and
# attacks), and XLA compilation, not running, is most of a smoke run on a CPU.
# Tracing and every code path still run; only identical XLA programs are
# reused. Set in the controller before xdist starts its workers, so workers
# and the processes they launch inherit it; a user's own cache dir wins.
_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
_OWN_CACHE = None
# XLA's unoptimised CPU code generation: compiling, not running, is most of the
# suite's time (a standard_mnist --smoke run: 149 s -> 86 s on 2 busy cores), and
# the tests' programs run on tiny data. Every program of a session is built the
# same way, so comparisons inside the suite (bit-exact resume, 8 devices vs
# one, batch sizes) are unaffected. Inherited by xdist workers and launched
# processes, like the cache above.
FAST_COMPILE = 0
# Where running is most of the time (ResNets: convolutions and batch norm run
# about 3x slower unoptimised), level 1 compiles about as fast and runs as fast
# as the default (an ascl_cifar10 --smoke: 188 s at level 0, 105 s at level 1).
FAST_RUN = 1
_LEVEL = '--xla_backend_optimization_level='


def with_opt_level(xla_flags: str | None, level: int = FAST_COMPILE) -> str:
  """``xla_flags`` with XLA's CPU optimisation level set to ``level`` (replacing any other)."""
  flags = [f for f in (xla_flags or '').split() if not f.startswith(_LEVEL)]
  return ' '.join(flags + [f'{_LEVEL}{level}'])


def pytest_configure(config):
  global _OWN_CACHE
  os.environ['XLA_FLAGS'] = with_opt_level(os.environ.get('XLA_FLAGS'))
  if not os.environ.get(_CACHE_ENV):
    _OWN_CACHE = tempfile.mkdtemp(prefix='geomrobust-test-xla-cache-')
    os.environ[_CACHE_ENV] = _OWN_CACHE
  # Cache every program, however quick to compile: hundreds of small ones add up.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
  import jax   # may be imported already (plugins): set the options, not only the environment
  jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE_ENV])
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes',
                    int(os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES']))


# The longest tests (each experiment's launched smoke run, about a minute) go
# first: xdist hands tests out in collection order, and one of them started
# last would leave the other worker idle at the end.
_LONG_FIRST = ('test_every_experiment_runs_with_smoke',)


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: item.originalname not in _LONG_FIRST)   # stable: the rest keep their order


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, 'workerinput'):   # the controller made it, the controller removes it
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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

  def run(template: str, optimised: bool = False) -> dict:
    # ``optimised``: XLA's default code generation instead of FAST_COMPILE (the 8-device ASCL
    # step's loss came out NaN at step 2 at level 0 and differed from one device at level 1:
    # tests/test_ascl.py::test_sharded_batch_is_one_contrastive_batch).
    flags = '--xla_force_host_platform_device_count=8'
    env = dict(os.environ, JAX_NUM_CPU_DEVICES='8', JAX_PLATFORMS='cpu',
               XLA_FLAGS=flags if optimised else with_opt_level(flags))
    script = template.format(repo=str(REPO), tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / 'out.json').read_text())

  return run
