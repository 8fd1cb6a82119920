"""Generated data sets: made on the device inside the compiled epoch.

One is registered, the sparse-coding task of the feature-purification paper
(Allen-Zhu & Li; ``papers/feature_purification.md``):

  sparse_coding   M: a random d x d orthogonal dictionary (QR of a Gaussian,
                  drawn once on the host with numpy from ``seed``, so it is
                  the same on every platform); w*: a dense N(0, I) vector
                  from the same seed. A sample: a sparse code z in
                  {-1, 0, +1}^d, each coordinate non-zero with probability
                  k/d and then +-1 with equal probability; input
                  x = M z + noise * N(0, I) (float32 [d]); label
                  y = 1 if <w*, z> > 0 else 0 (an all-zero code is class 0).
                  Two classes, no valid input box (None).

Options live in ``config.data.<name>`` (defaults in ``GENERATORS[name].defaults``;
``sparse_coding``: dim=256, sparsity=8, noise=0.0, seed=0,
steps_per_epoch=100, test_examples=2048, test_seed=1) and their valid
ranges in ``GENERATORS[name].bounds`` (checked with the rest of the config
before anything is generated). Build the training source with
``make_source(name, config.data.get(name))``; its ``test`` property is the
fixed test split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust import config as config_lib
from geomrobust.data.errors import DataError
from geomrobust.data.source import GeneratorSource


def sparse_coding(dim: int = 256, sparsity: int = 8, noise: float = 0.0, seed: int = 0,
                  steps_per_epoch: int = 100, test_examples: int = 2048, test_seed: int = 1) -> GeneratorSource:
  """The sparse-coding source (see the module docstring).

  Args:
    dim: d, the input and code dimension.
    sparsity: k, the expected number of non-zero code coordinates.
    noise: standard deviation of the Gaussian input noise.
    seed: fixes the dictionary M and the label direction w*.
    steps_per_epoch: steps that count as one epoch.
    test_examples: size of the fixed test set.
    test_seed: its key (``jax.random.key(test_seed)``).

  Returns:
    a GeneratorSource; ``source.dictionary`` (M, numpy [d, d], atoms in the
    columns) and ``source.w_star`` (numpy [d]) are attached for probes.
  """
  dim, sparsity = int(dim), int(sparsity)
  if dim <= 0 or not 0 < sparsity <= dim:
    raise DataError(f'sparse_coding needs dim > 0 and 0 < sparsity <= dim, got dim={dim}, sparsity={sparsity}')
  rng = np.random.default_rng(int(seed))
  q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
  dictionary = (q * np.sign(np.diag(r))).astype(np.float32)  # sign fix: a uniformly random orthogonal matrix
  w_star = rng.standard_normal(dim).astype(np.float32)
  m_t, w = jnp.asarray(dictionary.T), jnp.asarray(w_star)
  p, sigma = sparsity / dim, float(noise)

  def sample(key: jax.Array, batch_size: int):
    k_support, k_sign, k_noise = jax.random.split(key, 3)
    support = jax.random.bernoulli(k_support, p, (batch_size, dim))
    signs = jax.random.rademacher(k_sign, (batch_size, dim), dtype=jnp.float32)
    z = jnp.where(support, signs, 0.0)
    x = z @ m_t                                     # x = M z, per row
    if sigma:
      x = x + sigma * jax.random.normal(k_noise, x.shape, jnp.float32)
    y = (z @ w > 0).astype(jnp.int32)
    return x, y

  source = GeneratorSource(sample=sample, example_shape=(dim,), num_classes=2, epoch_steps=int(steps_per_epoch),
                           test_examples=int(test_examples), test_key_seed=int(test_seed), box=None,
                           name='sparse_coding')
  object.__setattr__(source, 'dictionary', dictionary)
  object.__setattr__(source, 'w_star', w_star)
  return source


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
  """A registered generated data set.

  ``get_spec(name)`` returns it for generated names, with the fields the
  runner reads of any spec: ``name``, ``num_classes``, ``box``.
  """

  name: str
  num_classes: int
  build: Callable[..., GeneratorSource]
  defaults: tuple[tuple[str, Any], ...]
  bounds: Mapping[str, config_lib.Range] = dataclasses.field(default_factory=dict)  # of the numeric options
  format: str = 'generator'

  @property
  def box(self):
    """Generated inputs have no valid input box."""
    return None

  @property
  def generated(self) -> bool:
    return True

  def options(self, overrides: Mapping | None = None) -> dict:
    """The defaults updated with ``overrides``; unknown keys are a DataError,
    values out of ``bounds`` a ConfigError."""
    out = dict(self.defaults)
    for k, v in dict(overrides or {}).items():
      if k not in out:
        raise DataError(f'unknown option data.{self.name}.{k}; available: {", ".join(sorted(out))}')
      out[k] = v
    config_lib.check_fields(out, self.bounds, f'data.{self.name}')
    return out


GENERATORS: dict[str, GeneratorSpec] = {
    'sparse_coding': GeneratorSpec(
        name='sparse_coding', num_classes=2, build=sparse_coding,
        defaults=(('dim', 256), ('sparsity', 8), ('noise', 0.0), ('seed', 0), ('steps_per_epoch', 100),
                  ('test_examples', 2048), ('test_seed', 1)),
        # sparsity <= dim as well (checked by sparse_coding itself).
        bounds={'dim': config_lib.integer(1, example=256), 'sparsity': config_lib.integer(1, example=8),
                'noise': config_lib.number(0), 'seed': config_lib.integer(0),
                'steps_per_epoch': config_lib.integer(1, example=100),
                'test_examples': config_lib.integer(1, example=2048), 'test_seed': config_lib.integer(0)}),
}


def generated_datasets() -> list[str]:
  """Names of the registered generated data sets, sorted."""
  return sorted(GENERATORS)


def make_source(name: str, options: Mapping | None = None) -> GeneratorSource:
  """The training source of generated data set ``name``; ``options`` (e.g.
  ``config.data.get(name)``) override its defaults."""
  if name not in GENERATORS:
    raise DataError(f'{name!r} is not a generated dataset; generated: {", ".join(generated_datasets())}')
  spec = GENERATORS[name]
  opts = spec.options(options.to_dict() if hasattr(options, 'to_dict') else options)
  return spec.build(**opts)
