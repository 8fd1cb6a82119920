"""Data parallelism the modern way: one ``jax.jit`` over a ``('data',)`` mesh.

The batch axis is sharded over 'data'; parameters, optimiser state and the
(small) dataset are replicated. XLA inserts the gradient all-reduce. This is
what ``pmap`` now lowers to anyway, without its per-device code.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def maybe_initialize_distributed(enabled: bool) -> None:
  """Multi-host: connects the processes (coordinator from the environment)."""
  if enabled:
    jax.distributed.initialize()


def make_mesh(num_devices: int = 0, training: bool = False) -> jax.sharding.Mesh:
  """A 1-D ``('data',)`` mesh over the first ``num_devices`` devices (0 = all;
  with ``training``, 0 on a CPU host is one device: CPU "devices" are groups
  of the same cores, where a sharded train step only adds an all-reduce per
  step, while the evaluation's independent examples gain from them; see
  ``geomrobust/runtime.py``)."""
  devices = jax.devices()
  n = num_devices or (1 if training and devices[0].platform == 'cpu' else len(devices))
  if n > len(devices):
    raise ValueError(f'parallel.num_devices={n} but only {len(devices)} devices are visible '
                     f'({devices[0].platform}); use 0 for all')
  # Auto axis: sharding is a constraint and XLA places the collectives (the
  # gradient all-reduce), which is what a data-parallel step wants.
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(tree, mesh):
  """Constrains every array's leading axis to the 'data' axis inside jit."""
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, batch_sharded(mesh)), tree)


def check_batch_size(batch_size: int, mesh, what: str = 'train.batch_size') -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f'{what}={batch_size} is not divisible by the {n} data-parallel devices; '
                     f'use a multiple of {n} or set --config.parallel.num_devices')
