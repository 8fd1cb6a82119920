"""Pieces shared by the iterative attacks: the goal, best-point bookkeeping, restarts.

"Best" is lexicographic per example: a successful point (misclassified, or
classified as the target when targeted) beats any unsuccessful one; among
equals the higher attack loss wins. The same rule picks the iterate within a
run and the run among restarts, so more restarts or steps can never make the
returned point worse by the attack's own judgement.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from geomrobust.attacks import losses


class Best(NamedTuple):
  """Per-example best point so far. x: [B, ...]; loss: [B]; success: [B] bool."""

  x: jax.Array
  loss: jax.Array
  success: jax.Array


class Goal(NamedTuple):
  """objective: logits [B, C] -> [B] (maximised); is_success: probs [B, C] -> [B] bool."""

  objective: Callable[[jax.Array], jax.Array]
  is_success: Callable[[jax.Array], jax.Array]


def make_goal(loss, labels, targeted: bool = False, target_labels=None) -> Goal:
  """Binds the loss and the success test to this batch's labels [B].

  ``loss`` is a name in ``losses.LOSSES`` or a callable with the same
  signature ``(logits [B, C], labels [B], target_labels=None) -> [B]`` (e.g.
  TRADES' KL to the clean prediction, closed over that prediction).
  """
  loss_fn = loss if callable(loss) else losses.get_loss(loss)
  if targeted != (target_labels is not None):
    raise ValueError('targeted=True needs target_labels, and target_labels needs targeted=True')
  if targeted:
    return Goal(lambda z: loss_fn(z, labels, target_labels),
                lambda p: jnp.argmax(p, axis=-1) == target_labels)
  return Goal(lambda z: loss_fn(z, labels), lambda p: jnp.argmax(p, axis=-1) != labels)


def init_best(x: jax.Array) -> Best:
  """The clean input with loss -inf: any finite evaluated point replaces it."""
  b = x.shape[0]
  return Best(x, jnp.full((b,), -jnp.inf, jnp.float32), jnp.zeros((b,), bool))


def _bool_expand(mask: jax.Array, x: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] so a per-example mask selects whole examples of ``x``."""
  return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def update_best(best: Best, x_new, loss_new, success_new) -> Best:
  """Keeps, per example, the better of ``best`` and the candidate (see module doc)."""
  better = (success_new & ~best.success) | ((success_new == best.success) & (loss_new > best.loss))
  return Best(
      jnp.where(_bool_expand(better, x_new), x_new, best.x),
      jnp.where(better, loss_new, best.loss),
      jnp.where(better, success_new, best.success),
  )


def merge_best(best: Best, other: Best) -> Best:
  return update_best(best, other.x, other.loss, other.success)


def run_restarts(run_one: Callable[[jax.Array], tuple[Best, jax.Array]], x: jax.Array, rng: jax.Array,
                 restarts: int) -> tuple[Best, jax.Array]:
  """Runs ``run_one(fold_in(rng, r))`` for r < restarts sequentially, keeping the best.

  ``run_one`` returns ``(best, trace)`` where ``trace`` is any per-restart
  array (the attacks pass their loss per step, ``[steps + 1, B]``); the traces
  come back stacked as ``[restarts, ...]``. They cost a few floats per step,
  so attacks always keep them and return them only when asked.

  A ``fori_loop`` rather than a vmap keeps memory independent of ``restarts``.
  Restart 0 uses the same key for every ``restarts`` value, so restarts=n
  contains the restarts=1 run.
  """
  if restarts < 1:
    raise ValueError(f'need at least one restart, got {restarts}')
  trace_shape = jax.eval_shape(run_one, rng)[1]
  traces = jnp.zeros((restarts,) + trace_shape.shape, trace_shape.dtype)

  def body(r, carry):
    best, traces = carry
    new, trace = run_one(jax.random.fold_in(rng, r))
    return merge_best(best, new), traces.at[r].set(trace)

  return jax.lax.fori_loop(0, restarts, body, (init_best(x), traces))


def as_input(x) -> jax.Array:
  """The attacked batch as a float array cut off from outer differentiation."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return jax.lax.stop_gradient(x)
