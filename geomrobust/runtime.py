"""Process-wide JAX settings, made once at start-up before the first computation.

``launch.py`` and ``python -m geomrobust.bench`` call :func:`configure`:

* **CPU devices.** XLA:CPU runs one program's many small fusions on one
  thread at a time and splits only the big ones (convolutions, GEMMs) over
  the cores, so a CPU attack left a core idle most of the time. Exposing the
  host as several XLA devices and sharding the evaluated examples over them
  keeps every core busy: on a 2-core CPU, PGD on the MNIST CNN went from 150
  to 250 examples/s with 2 devices (``geomrobust.bench``). Training is the
  other way round: a data-parallel train step on two CPU "devices" adds an
  all-reduce per step and ran at half the speed, so on the CPU training uses
  one device and the evaluation all of them (``parallel.make_mesh``). The
  default is 2 devices on a host with 2 or more cores (every batch size in
  the experiments is even), 1 otherwise; ``--cpu_devices=N`` sets another
  count. Accelerator hosts are unaffected (this only shapes the CPU backend).
  A count set in the environment (``JAX_NUM_CPU_DEVICES`` or ``XLA_FLAGS``'s
  ``--xla_force_host_platform_device_count``) wins.
* **Persistent compilation cache.** Compiled programs are kept in
  ``$GEOMROBUST_CACHE_DIR/jax`` (default ``~/.cache/geomrobust/jax``, next to
  the dataset cache), so a rerun, a resume or ``--evaluate`` of the same
  experiment loads its attacks and train steps instead of compiling them
  again. ``--nocompilation_cache`` turns it off. A cache folder set in the
  environment (``JAX_COMPILATION_CACHE_DIR``, e.g. the test suite's shared
  one) wins, and so do ``JAX_PERSISTENT_CACHE_MIN_*`` thresholds.
"""

from __future__ import annotations

import os
import pathlib

import jax

from geomrobust.data import download

# The CPU device count when none is given and the host has at least two cores.
DEFAULT_CPU_DEVICES = 2
# Programs that compile faster than this are not worth a disk write (JAX's own
# default is 1 s, which skips most of the evaluation's programs on a fast CPU).
MIN_COMPILE_SECONDS = 0.2


def usable_cores() -> int:
  """Cores this process may run on (the affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS, Windows
    return os.cpu_count() or 1


def default_cpu_devices() -> int:
  return DEFAULT_CPU_DEVICES if usable_cores() >= 2 else 1


def compilation_cache_dir() -> pathlib.Path:
  return download.cache_root() / 'jax'


def _devices_set_by_environment() -> bool:
  return bool(os.environ.get('JAX_NUM_CPU_DEVICES')) or \
      'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')


def configure(cpu_devices: int = 0, compilation_cache: bool = True) -> dict:
  """Sets the CPU device count (0: :func:`default_cpu_devices`) and the
  persistent compilation cache; returns what was set. Must run before JAX
  creates its backends (the first computation or ``jax.devices()``)."""
  if cpu_devices < 0:
    raise ValueError(f'--cpu_devices must be >= 0 (0: automatic), got {cpu_devices}')
  out = {}
  if not _devices_set_by_environment():
    out['cpu_devices'] = cpu_devices or default_cpu_devices()
    jax.config.update('jax_num_cpu_devices', out['cpu_devices'])
  if compilation_cache:
    folder = pathlib.Path(os.environ.get('JAX_COMPILATION_CACHE_DIR') or compilation_cache_dir())
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', str(folder))
    if not os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'):
      jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
    if not os.environ.get('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'):
      jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    out['compilation_cache'] = str(folder)
  else:
    jax.config.update('jax_compilation_cache_dir', None)
  return out
