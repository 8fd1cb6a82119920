"""Expectation over Transformation: loss and input gradient averaged over k model draws.

Model contract: ``logits_fn(x [B, ...], rng) -> logits [B, C]``. A deterministic
model ignores ``rng`` (wrap it with :func:`deterministic`). Draws use the keys
``jax.random.split(rng, k)``, so a deterministic model is simply the ``k=1``
case of the same code. Examples must not interact inside the model (eval-mode
batch norm, no cross-example ops), since the per-example input gradient is
taken as the gradient of the batch-summed loss.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
# An attack objective with its labels already bound: logits [B, C] -> [B].
Objective = Callable[[jax.Array], jax.Array]


class EotOutput(NamedTuple):
  """What one (EOT) evaluation of a batch returns.

  loss:  [B]      per-example objective, averaged over the k draws.
  grad:  [B, ...] its input gradient, averaged over the k draws (None if not asked for).
  probs: [B, C]   softmax probabilities averaged over the same k draws; attacks
                  judge "misclassified" by ``argmax(probs)``.
  """

  loss: jax.Array
  grad: jax.Array | None
  probs: jax.Array


def deterministic(f: Callable[[jax.Array], jax.Array]) -> LogitsFn:
  """Turns ``f(x) -> logits`` into the ``logits_fn(x, rng)`` contract, ignoring rng."""
  return lambda x, rng: f(x)


def _one_draw(logits_fn: LogitsFn, objective: Objective):
  """(x, key) -> (sum of per-example loss, (per-example loss [B], probs [B, C]))."""

  def draw(x, key):
    logits = logits_fn(x, key).astype(jnp.float32)
    per_example = objective(logits)
    return jnp.sum(per_example), (per_example, jax.nn.softmax(logits, axis=-1))

  return draw


def eot_value_and_grad(logits_fn: LogitsFn, objective: Objective, k: int = 1):
  """Builds ``(x [B, ...], rng) -> EotOutput`` averaging over exactly ``k`` draws.

  The draws are ``jax.random.split(rng, k)``, vmapped (memory grows with k).
  """
  if k < 1:
    raise ValueError(f'need at least one EOT draw, got k={k}')
  grad_fn = jax.grad(_one_draw(logits_fn, objective), has_aux=True)

  def fn(x, rng):
    keys = jax.random.split(rng, k)
    grads, (losses, probs) = jax.vmap(grad_fn, in_axes=(None, 0))(x, keys)
    return EotOutput(losses.mean(0), grads.mean(0), probs.mean(0))

  return fn


def eot_value(logits_fn: LogitsFn, objective: Objective, k: int = 1):
  """Like :func:`eot_value_and_grad` but forward only: ``grad`` is None.

  Uses the same draw function and keys, so its loss/probs equal those of
  :func:`eot_value_and_grad` for the same ``(x, rng)``.
  """
  if k < 1:
    raise ValueError(f'need at least one EOT draw, got k={k}')
  draw = _one_draw(logits_fn, objective)

  def fn(x, rng):
    keys = jax.random.split(rng, k)
    _, (losses, probs) = jax.vmap(draw, in_axes=(None, 0))(x, keys)
    return EotOutput(losses.mean(0), None, probs.mean(0))

  return fn


def eot_grad(logits_fn: LogitsFn, loss_fn, k: int = 1):
  """Builds ``(x [B, ...], labels [B], rng) -> (mean loss [B], mean input grad [B, ...])``.

  ``loss_fn(logits, labels) -> [B]``; the means are over exactly the ``k`` draws
  ``jax.random.split(rng, k)``.
  """

  def fn(x, labels, rng):
    out = eot_value_and_grad(logits_fn, lambda z: loss_fn(z, labels), k)(x, rng)
    return out.loss, out.grad

  return fn
