"""What a method is: parameters, hyperparameters and a list of training phases.

A method owns its *objective*; the training loop owns everything else (data,
batching, sharding, optimiser state, checkpoints, logging). Each phase is a
pure loss function plus which parameters it may change, so multi-stage
recipes (a local-learning stage then a readout; hierarchical isometric levels
trained one after another) are data, not control flow inside the loop.

Shapes: ``batch = {'image': float32 [B, H, W, C] in [0,1], 'label': int32 [B]}``
with B the per-step global batch; ``loss_fn(params, batch, rng, hparams)``
returns ``(scalar loss, {name: scalar metric})``.

BatchNorm: a model with mutable state (Flax ``batch_stats``) keeps it in
``params['model_state']``, next to ``params['model']``; models without it
have no such key. The state is not trained: the optimiser leaves it alone
(``training.loop.phase_optimizer`` freezes it). A loss computes the new
running statistics with :meth:`Method.apply_with_state` and returns them in
its metrics under the reserved key ``'model_state'``; the train step pops
them out and writes them into ``params['model_state']`` after the optimiser
update. Evaluation (``apply(..., train=False)``, ``logits``) uses the running
averages, so a prediction never depends on the rest of its batch.

Constants: a model may keep non-trained values in the Flax collection
``constants`` (e.g. a noise layer's ``noise_scale``, which a sweep sets per
member); they live in ``params['constants']`` and, like the model state, the
optimiser never touches them (``phase_optimizer`` gives them no state and
exactly zero updates). :meth:`Method.set_constant` replaces one by name.

Randomness: ``apply`` / ``logits`` / ``apply_with_state`` take a key and hand
it to the Flax module as ``rngs`` (one stream per name in the model's
``rng_streams``, default ``('noise', 'dropout')``), so a module may draw with
``self.make_rng('noise')``. Whether a model draws noise at evaluation time is a
property of the model (a module attribute ``stochastic``, read by
:attr:`Method.stochastic`); the evaluation then uses EOT. Deterministic models
ignore the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from geomrobust import config as config_lib

Params = Any
# The params key (and reserved metrics key) of a model's non-trained state.
MODEL_STATE = 'model_state'
# The params key of a model's constants (Flax collection 'constants'): never trained.
CONSTANTS = 'constants'
LossFn = Callable[[Params, dict, jax.Array, dict], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Phase:
  """One stage of training.

  Attributes:
    name: shown in logs and metrics (e.g. ``train``, ``local``, ``readout``).
    epochs: passes over the training set.
    loss_fn: ``(params, batch, rng, hparams) -> (loss, metrics)``.
    trainable: predicate on a parameter's path (tuple of keys); parameters for
      which it is False get *exactly* zero updates and no optimiser state
      (``optax.set_to_zero``), which also freezes them under Adam momentum.
      ``None`` trains everything.
    lr: learning rate for this phase (``None``: ``config.train.lr``).
    steps: if set, the phase runs this many optimiser steps (in chunks of
      ``config.train.steps_per_log``) instead of ``epochs`` (which must be 0).
  """

  name: str
  epochs: int
  loss_fn: LossFn
  trainable: Callable[[tuple[str, ...]], bool] | None = None
  lr: float | None = None
  steps: int | None = None


class Method:
  """Base class; subclasses set ``phases`` and usually ``loss``.

  ``params`` is a dict ``{'model': <flax params>, ...}``: methods with extra
  parameters (e.g. auxiliary heads) add keys next to ``'model'``; a model
  with BatchNorm adds ``'model_state'`` (see the module docstring).

  ``BOUNDS``: the valid range of each numeric hyperparameter in
  ``config.method`` (``{field: config.integer(...) | config.number(...)}``),
  checked with the rest of the config before any data is loaded (and again
  when the method is built); a sweep's grid is checked against its hparam's.
  """

  BOUNDS: dict[str, config_lib.Range] = {}

  def __init__(self, model: nn.Module, config: ml_collections.ConfigDict, num_classes: int):
    config_lib.check_fields(config.method, self.BOUNDS, 'method')
    self.model = model
    self.config = config
    self.num_classes = num_classes

  # -- parameters ---------------------------------------------------------

  def init_params(self, rng: jax.Array, example_x: jax.Array) -> Params:
    # 'params' gets ``rng`` itself, so a deterministic model's init is unchanged
    # by the extra streams a noisy module may draw from while initialising.
    variables = self.model.init({'params': rng, **self._rngs(jax.random.fold_in(rng, 1))}, example_x)
    params = {'model': variables['params']}
    if 'batch_stats' in variables:
      params[MODEL_STATE] = variables['batch_stats']
    if CONSTANTS in variables:
      params[CONSTANTS] = variables[CONSTANTS]
    return params

  @staticmethod
  def set_constant(params: Params, name: str, value) -> Params:
    """``params`` with every leaf named ``name`` of ``params['constants']`` set
    to ``value`` (a scalar, or an array broadcast over stacked members);
    ValueError when the model has no such constant."""
    found = []

    def put(path, leaf):
      if path_names(path)[-1] != name:
        return leaf
      found.append(path)
      return jnp.broadcast_to(jnp.asarray(value, leaf.dtype), jnp.shape(value) + jnp.shape(leaf)[jnp.ndim(value):])

    if CONSTANTS in params:
      params = dict(params, **{CONSTANTS: jax.tree_util.tree_map_with_path(put, params[CONSTANTS])})
    if not found:
      raise ValueError(f'the model has no constant {name!r} (its constants: '
                       f'{sorted({path_names(p)[-1] for p, _ in jax.tree_util.tree_leaves_with_path(params.get(CONSTANTS, {}))}) or "none"})')
    return params

  def hparams(self) -> dict[str, jax.Array]:
    """Float hyperparameters the loss reads as *traced* values, so a sweep can
    vmap over them (one compiled program for a whole grid). The training step
    adds ``hparams['step']`` (int32, the global optimiser step, from 0) for
    losses that follow a schedule (e.g. :func:`warmup_fraction`)."""
    return {}

  def apply(self, params: Params, x: jax.Array, rng: jax.Array | None = None, train: bool = False):
    """``x [B, ...] -> (logits [B, C], reps tuple)``; ``rng`` for stochastic models.

    With BatchNorm, ``train=False`` normalises with the running averages in
    ``params['model_state']`` and ``train=True`` with the statistics of this
    batch; the updated running averages are dropped here (a loss keeps them
    with :meth:`apply_with_state`).
    """
    return self.apply_with_state(params, x, rng, train=train)[0]

  def apply_with_state(self, params: Params, x: jax.Array, rng: jax.Array | None = None,
                       train: bool = True) -> tuple[tuple[jax.Array, tuple], dict]:
    """Like :meth:`apply` but also returns the model state a loss must report.

    Returns ``((logits [B, C], reps), state)`` where ``state`` is
    ``{'model_state': new running statistics}`` for a BatchNorm model in train
    mode (the batch's statistics folded into the running averages),
    ``{'model_state': params['model_state']}`` (unchanged) in eval mode, and
    ``{}`` for a model without state. A loss merges ``state`` into its metrics
    dict: ``return loss, {**metrics, **state}``.
    """
    rngs = self._rngs(rng)
    variables = {'params': params['model']}
    if CONSTANTS in params:
      variables[CONSTANTS] = params[CONSTANTS]
    if MODEL_STATE not in params:
      return self.model.apply(variables, x, train=train, rngs=rngs), {}
    variables['batch_stats'] = params[MODEL_STATE]
    if not train:
      return self.model.apply(variables, x, train=False, rngs=rngs), {MODEL_STATE: params[MODEL_STATE]}
    out, mutated = self.model.apply(variables, x, train=True, mutable=['batch_stats'], rngs=rngs)
    return out, {MODEL_STATE: mutated['batch_stats']}

  def _rngs(self, rng: jax.Array | None) -> dict | None:
    """The module's rng streams, each its own fold of ``rng`` (None: no key)."""
    if rng is None:
      return None
    streams = tuple(getattr(self.model, 'rng_streams', ('noise', 'dropout')))
    return {name: jax.random.fold_in(rng, i) for i, name in enumerate(streams)}

  def logits(self, params: Params, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """The classifier the shared evaluation attacks: ``x [B, ...] -> [B, C]``."""
    return self.apply(params, x, rng)[0]

  @property
  def input_box(self):
    """The valid input range ``(lo, hi)`` of ``config.dataset`` (None: unbounded,
    e.g. generated data): a training-time attack clips to it, as the shared
    evaluation does."""
    from geomrobust.data import registry  # late: data imports this package's siblings
    return registry.get_spec(str(self.config.dataset)).box

  @property
  def stochastic(self) -> bool:
    """The classifier draws noise at evaluation time (a property of the model):
    the evaluation then averages over draws (EOT) and needs a key."""
    return bool(getattr(self.model, 'stochastic', False))

  def classifier_key(self):
    """A hashable key of the function ``logits`` computes: methods that keep
    this class's forward pass on equal models compute the same function of
    ``(params, x, rng)`` (e.g. a sweep's method and its baseline), so compiled
    evaluations and probes keyed by it are shared; others key by themselves."""
    cls = type(self)
    if any(getattr(cls, f) is not getattr(Method, f) for f in ('apply', 'apply_with_state', 'logits', '_rngs')):
      return self
    return ('model', self.model)

  # -- training -----------------------------------------------------------

  def phases(self) -> list[Phase]:
    raise NotImplementedError


def choice(section: ml_collections.ConfigDict, key: str, default: str, options) -> str:
  """``section[key]`` (``default`` when absent) as a string, which must be one
  of ``options``; else the one-line ValueError naming them (``method.<key>``)."""
  value = str(section.get(key, default))
  if value not in options:
    raise ValueError(f'unknown method.{key} {value!r}; available: {", ".join(options)}')
  return value


def warmup_fraction(hparams: dict, warmup_steps: int) -> jax.Array:
  """``min(1, (step + 1) / warmup_steps)`` for ``hparams['step']``; 1 when
  ``warmup_steps <= 0`` or no step is given (outside training)."""
  if warmup_steps <= 0 or 'step' not in hparams:
    return jnp.float32(1.0)
  return jnp.minimum(1.0, (hparams['step'].astype(jnp.float32) + 1.0) / float(warmup_steps))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy; ``logits [B, C]``, integer ``labels [B]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def path_names(path) -> tuple[str, ...]:
  """``jax.tree_util`` key path -> tuple of plain strings."""
  out = []
  for k in path:
    out.append(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))))
  return tuple(out)
