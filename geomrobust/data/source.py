"""Training data as a *source*: stored arrays, or a generator run on the device.

The training loop (``geomrobust.training``) never looks at where a batch comes
from; it asks a source for three pure, jit-able pieces and traces them into
the compiled epoch (or step chunk), so neither kind makes a host round trip:

  arrays                the device-resident data handed to the compiled call
                        (a tuple; ``()`` for a generator).
  epoch_plan(arrays, key, batch_size, steps) -> plan [steps, ...]
                        what one *epoch* of ``steps`` batches reads.
  stream_plan(arrays, key, start, steps, batch_size, steps_per_epoch)
                        the same for steps ``start .. start + steps - 1`` of an
                        endless stream (step-counted phases run it in chunks;
                        the stream does not depend on the chunk length).
  batch(arrays, plan_row, batch_size) -> (x float32 [B, ...], y int32 [B])

Two kinds:

``StoredSource(inputs, labels)``: arrays held in memory and put on the device
  once. ``uint8`` inputs (images, NHWC) are scaled by ``1/255`` inside the
  step exactly as the loop always did (``x.astype(float32) / 255``), valid box
  ``(0.0, 1.0)``; ``float32`` inputs of *any* shape (``[N, D]`` vectors,
  ``[N, T, F]`` audio features, ...) are used as they are, box ``None``
  unless given. An epoch is a fresh permutation; the stream is a sequence of
  such epochs, epoch ``k`` permuted with ``fold_in(key, k)``.

``GeneratorSource(sample, ...)``: ``sample(key, batch_size) -> (x, y)`` makes
  a fresh batch on the device; step ``i`` of an epoch (or of the stream) draws
  with ``fold_in(key, i)``. ``steps_per_epoch`` is given (an "epoch" is just a
  count of steps) and a fixed test set is drawn once from a fixed key. Box
  ``None`` unless given.

Registered generated data sets (``generated_datasets()``, options under
``config.data.<name>``) are built with :func:`make_source`; see
``geomrobust.data.generated``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust.data.errors import DataError

# The valid input box of image data in [0, 1] pixel scale.
IMAGE_BOX = (0.0, 1.0)
Box = tuple[float, float] | None


def to_model_input(x: jax.Array) -> jax.Array:
  """uint8 -> ``float32 / 255`` (bit-identical to the loop's conversion);
  floating inputs unchanged. Dispatches on the dtype at trace time."""
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x


def default_box(dtype) -> Box:
  """``(0, 1)`` for uint8 (images), ``None`` (no box) for float data."""
  return IMAGE_BOX if np.dtype(dtype) == np.uint8 else None


class TrainSource:
  """Base class of the two kinds (see the module docstring).

  Every source also has ``example_shape`` (one input's shape), ``box`` (the
  valid input range or None) and ``num_classes`` (or None when not known).
  """

  @property
  def arrays(self) -> tuple:
    raise NotImplementedError

  def steps_per_epoch(self, batch_size: int) -> int:
    raise NotImplementedError

  def epoch_plan(self, arrays, key, batch_size: int, steps: int):
    raise NotImplementedError

  def stream_plan(self, arrays, key, start, steps: int, batch_size: int, steps_per_epoch: int):
    raise NotImplementedError

  def batch(self, arrays, plan_row, batch_size: int) -> tuple[jax.Array, jax.Array]:
    raise NotImplementedError

  @property
  def test(self) -> tuple[np.ndarray, np.ndarray] | None:
    """A fixed test split ``(x, y)`` if the source has its own, else None."""
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class StoredSource(TrainSource):
  """Stored examples: ``inputs`` uint8 (scaled by 1/255) or float32 [N, ...], ``labels`` int32 [N].

  ``box``: the valid input range; by default ``(0.0, 1.0)`` for uint8 and
  ``None`` for float inputs.
  """

  inputs: np.ndarray | jax.Array
  labels: np.ndarray | jax.Array
  box: Box = dataclasses.field(default='auto')  # type: ignore[assignment]
  num_classes: int | None = None

  def __post_init__(self):
    dt = np.dtype(self.inputs.dtype)
    if dt != np.uint8 and dt != np.float32:
      raise DataError(f'stored inputs must be uint8 (images, scaled by 1/255) or float32 (used as is), got {dt}')
    if self.inputs.ndim < 2:
      raise DataError(f'stored inputs must be [N, ...] with at least one feature axis, got shape {self.inputs.shape}')
    if self.labels.ndim != 1 or len(self.labels) != len(self.inputs):
      raise DataError(f'labels must be [N] with N={len(self.inputs)}, got shape {self.labels.shape}')
    if self.box == 'auto':
      object.__setattr__(self, 'box', default_box(dt))

  @property
  def arrays(self) -> tuple:
    return (self.inputs, self.labels)

  @property
  def num_examples(self) -> int:
    return int(self.inputs.shape[0])

  @property
  def example_shape(self) -> tuple[int, ...]:
    return tuple(self.inputs.shape[1:])

  def steps_per_epoch(self, batch_size: int) -> int:
    return self.num_examples // batch_size

  @staticmethod
  def epoch_plan(arrays, key, batch_size: int, steps: int):
    """``[steps, batch_size]`` example indices: one permutation, truncated."""
    n = arrays[0].shape[0]
    order = jax.random.permutation(key, n)[:steps * batch_size]
    return order.reshape(steps, batch_size)

  @staticmethod
  def stream_plan(arrays, key, start, steps: int, batch_size: int, steps_per_epoch: int):
    """Indices of stream steps ``start .. start + steps - 1`` (``start`` may be
    traced): stream epoch ``k`` is ``epoch_plan`` with ``fold_in(key, k)``."""
    spe = steps_per_epoch
    n_epochs = steps // spe + 2  # static: covers any start offset
    first = start // spe
    plans = jax.vmap(lambda j: StoredSource.epoch_plan(arrays, jax.random.fold_in(key, first + j), batch_size, spe))(
        jnp.arange(n_epochs))
    flat = plans.reshape(n_epochs * spe, batch_size)
    return jax.lax.dynamic_slice_in_dim(flat, start - first * spe, steps, axis=0)

  @staticmethod
  def batch(arrays, plan_row, batch_size: int):
    del batch_size  # the plan row holds the indices
    inputs, labels = arrays
    return to_model_input(inputs[plan_row]), labels[plan_row]


@dataclasses.dataclass(frozen=True, eq=False)
class GeneratorSource(TrainSource):
  """Fresh batches made on the device by ``sample(key, batch_size) -> (x float32 [B, ...], y int32 [B])``.

  Attributes:
    sample: pure and jit-able; called inside the compiled epoch.
    example_shape: shape of one ``x`` (without the batch axis).
    num_classes: labels lie in ``[0, num_classes)``.
    epoch_steps: optimiser steps that count as one epoch.
    test_examples: size of the fixed test set, drawn once with ``test_key``.
    test_key_seed: the seed of the fixed test key (independent of the run's
      seed, so every run is judged on the same examples).
    box: valid input range (None: unbounded).
    name: shown in logs.
  """

  sample: Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]
  example_shape: tuple[int, ...]
  num_classes: int
  epoch_steps: int
  test_examples: int = 1024
  test_key_seed: int = 0
  box: Box = None
  name: str = 'generated'

  def __post_init__(self):
    if self.epoch_steps <= 0:
      raise DataError(f'{self.name}: steps_per_epoch must be positive, got {self.epoch_steps}')

  @property
  def arrays(self) -> tuple:
    return ()

  def steps_per_epoch(self, batch_size: int) -> int:
    del batch_size
    return int(self.epoch_steps)

  @staticmethod
  def epoch_plan(arrays, key, batch_size: int, steps: int):
    del arrays, batch_size
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(steps))

  @staticmethod
  def stream_plan(arrays, key, start, steps: int, batch_size: int, steps_per_epoch: int):
    del arrays, batch_size, steps_per_epoch
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(steps))

  def batch(self, arrays, plan_row, batch_size: int):
    del arrays
    x, y = self.sample(plan_row, batch_size)
    return x, y.astype(jnp.int32)

  @property
  def test(self) -> tuple[np.ndarray, np.ndarray]:
    """The fixed test set (host numpy arrays), drawn once and cached."""
    cached = self.__dict__.get('_test')
    if cached is None:
      x, y = jax.jit(self.sample, static_argnums=1)(jax.random.key(self.test_key_seed), int(self.test_examples))
      cached = (np.asarray(x, np.float32), np.asarray(y, np.int32))
      object.__setattr__(self, '_test', cached)
    return cached


def as_source(inputs, labels=None) -> TrainSource:
  """A source as is, or ``(inputs, labels)`` arrays wrapped in a StoredSource."""
  if isinstance(inputs, TrainSource):
    if labels is not None:
      raise ValueError('pass labels=None with a TrainSource (the source holds its labels)')
    return inputs
  if labels is None:
    raise ValueError('stored training data needs labels')
  return StoredSource(inputs, labels)
