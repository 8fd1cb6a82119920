"""Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1): step-size-free PGD with momentum, and APGD-T.

Differences from the reference PyTorch code, all deliberate:
  * the whole run is compiled: a ``fori_loop`` over steps with the checkpoint
    schedule precomputed as static arrays, and per-example step sizes;
  * restarting from the best point at a step-size halving also resets the
    momentum (x_prev := x_best), instead of pairing x_best with a stale x_prev;
  * the random start is uniform inside the ball (see ``norms.random_init``).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust.attacks import common
from geomrobust.attacks import losses as losses_lib
from geomrobust.attacks.eot import LogitsFn, eot_value, eot_value_and_grad
from geomrobust.attacks.norms import UNIT_BOX, Box, check_norm, expand_to, project, random_init, step_direction


def apgd_checkpoints(steps: int) -> list[int]:
  """Iterations ``0 < w_1 < w_2 < ... < steps`` where the step size is reconsidered.

  ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``; duplicates (small
  ``steps``) are merged.
  """
  p = [0.0, 0.22]
  while (nxt := p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)) <= 1.0:
    p.append(nxt)
  # The tiny offset keeps e.g. 0.41 * 100 = 41.000000000000004 from rounding up to 42.
  ws = sorted({math.ceil(pj * steps - 1e-6) for pj in p[1:]})
  return [w for w in ws if 0 < w < steps]


def _schedule(steps: int):
  """Static arrays over iterations k = 0..steps: is-checkpoint [steps+1], interval length."""
  is_check = np.zeros(steps + 1, bool)
  interval = np.ones(steps + 1, np.float32)
  prev = 0
  for w in apgd_checkpoints(steps):
    is_check[w] = True
    interval[w] = w - prev
    prev = w
  return jnp.asarray(is_check), jnp.asarray(interval)


class _State(NamedTuple):
  """Per-restart APGD state; [B, ...] for points and gradients, [B] for the rest."""

  x_cur: jax.Array            # x^(k)
  x_next: jax.Array           # x^(k+1), the point the next iteration evaluates
  x_prev: jax.Array           # x^(k-1), for the momentum term
  g_cur: jax.Array            # gradient at x^(k)
  loss_cur: jax.Array         # f(x^(k))
  eta: jax.Array              # per-example step size
  x_max: jax.Array            # highest-loss point so far (restart target)
  g_max: jax.Array            # its gradient, so a restart costs no extra evaluation
  loss_max: jax.Array
  n_increase: jax.Array       # #{f(x^(i+1)) > f(x^(i))} since the last checkpoint
  loss_max_at_check: jax.Array
  reduced_at_check: jax.Array  # bool: was eta halved at the last checkpoint
  best: common.Best           # best adversarial point (success first, then loss)


def apgd(logits_fn: LogitsFn, x, labels, rng, *, eps, norm: str = 'linf', steps: int = 100,
         restarts: int = 1, loss: str = 'ce', rho: float = 0.75, alpha: float = 0.75,
         random_start: bool = True, targeted: bool = False, target_labels=None,
         eot_samples: int = 1, return_losses: bool = False, box: Box = UNIT_BOX):
  """APGD with per-example step sizes. x: [B, ...], labels: [B] -> x_adv [B, ...].

  Starts with step size ``2 * eps`` (both norms). Iteration k:
  ``z = P(x_k + eta * dir(g_k))``,
  ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))`` with ``a = 1`` on
  the first step and ``alpha`` after. At checkpoint ``w_j`` (see
  :func:`apgd_checkpoints`) an example halves ``eta`` and restarts from its
  highest-loss point if (1) fewer than ``rho * (w_j - w_{j-1})`` of the steps
  since ``w_{j-1}`` increased the loss, or (2) ``eta`` was not halved at
  ``w_{j-1}`` and the best loss has not improved since.

  Uses ``steps + 1`` gradient evaluations per restart (the start plus one per
  step), i.e. ``steps`` updates, like :func:`pgd` with the same ``steps``.
  Returns, per example and over restarts, the best evaluated point: successful
  beats unsuccessful, then higher loss. ``eps`` may be traced; ``steps``,
  ``restarts``, ``norm``, ``loss``, ``rho``, ``alpha``, ``eot_samples`` are
  static, and so is ``box``, the valid input range every projection ``P``
  clips to after the ball (default [0, 1]; None: the ball only). The rng is
  used as in :func:`pgd`. With ``return_losses`` it returns
  ``(x_adv, losses [restarts, steps + 1, B])``, the loss of every iterate.
  """
  check_norm(norm)
  if steps < 0:
    raise ValueError(f'steps must be >= 0, got {steps}')
  x = common.as_input(x)
  goal = common.make_goal(loss, labels, targeted, target_labels)
  best, losses = _run(logits_fn, goal, x, rng, eps=eps, norm=norm, steps=steps, restarts=restarts, rho=rho,
                      alpha=alpha, random_start=random_start, eot_samples=eot_samples, box=box)
  x_adv = jax.lax.stop_gradient(best.x)
  return (x_adv, losses) if return_losses else x_adv


def _run(logits_fn: LogitsFn, goal: common.Goal, x, rng, *, eps, norm, steps, restarts, rho, alpha, random_start,
         eot_samples, box) -> tuple[common.Best, jax.Array]:
  """APGD's restarts towards ``goal``: ``(best over restarts, losses [restarts, steps + 1, B])``."""
  value_and_grad = eot_value_and_grad(logits_fn, goal.objective, eot_samples)
  is_check, interval = _schedule(steps)
  batch = x.shape[0]
  eta0 = jnp.broadcast_to(2.0 * jnp.asarray(eps, jnp.float32), (batch,))

  def per_example(mask):  # [B] -> [B, 1, ..., 1]
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))

  def run_one(key):
    k_init, k_model = jax.random.split(key)
    x0 = project(x + random_init(k_init, x, eps, norm), x, eps, norm, box=box) if random_start else x
    out0 = value_and_grad(x0, jax.random.fold_in(k_model, 0))

    def advance(s: _State, a) -> jax.Array:
      """x^(k+1) from x^(k), x^(k-1), the gradient and eta (momentum weight ``a``)."""
      z = project(s.x_cur + expand_to(s.eta, x) * step_direction(s.g_cur, norm), x, eps, norm, box=box)
      return project(s.x_cur + a * (z - s.x_cur) + (1 - a) * (s.x_cur - s.x_prev), x, eps, norm, box=box)

    state = _State(
        x_cur=x0, x_next=x0, x_prev=x0, g_cur=out0.grad, loss_cur=out0.loss, eta=eta0,
        x_max=x0, g_max=out0.grad, loss_max=out0.loss,
        n_increase=jnp.zeros((batch,), jnp.float32),
        loss_max_at_check=out0.loss, reduced_at_check=jnp.zeros((batch,), bool),
        best=common.update_best(common.init_best(x), x0, out0.loss, goal.is_success(out0.probs)))
    # The first step has no momentum (a = 1). Each iteration then computes the point the next one
    # evaluates, so the model's input is a loop variable: XLA cannot fuse the projection into
    # the model's first layer (it did, and recomputed it once per slice of a patches conv).
    state = state._replace(x_next=advance(state, jnp.asarray(1.0, x.dtype)))

    def body(i, carry):
      s, losses = carry
      x_next = s.x_next
      out = value_and_grad(x_next, jax.random.fold_in(k_model, i + 1))
      best = common.update_best(s.best, x_next, out.loss, goal.is_success(out.probs))

      n_increase = s.n_increase + (out.loss > s.loss_cur)
      improved = out.loss > s.loss_max
      x_max = jnp.where(per_example(improved), x_next, s.x_max)
      g_max = jnp.where(per_example(improved), out.grad, s.g_max)
      loss_max = jnp.where(improved, out.loss, s.loss_max)

      # Checkpoint k = i + 1 (static schedule, selected with where: no cond needed).
      check = is_check[i + 1]
      oscillating = n_increase < rho * interval[i + 1]
      stalled = ~s.reduced_at_check & (loss_max <= s.loss_max_at_check)
      reduce = check & (oscillating | stalled)
      r = per_example(reduce)
      new = _State(
          x_cur=jnp.where(r, x_max, x_next),
          x_next=x_next,
          x_prev=jnp.where(r, x_max, s.x_cur),
          g_cur=jnp.where(r, g_max, out.grad),
          loss_cur=jnp.where(reduce, loss_max, out.loss),
          eta=jnp.where(reduce, 0.5 * s.eta, s.eta),
          x_max=x_max, g_max=g_max, loss_max=loss_max,
          n_increase=jnp.where(check, 0.0, n_increase),
          loss_max_at_check=jnp.where(check, loss_max, s.loss_max_at_check),
          reduced_at_check=jnp.where(check, reduce, s.reduced_at_check),
          best=best)
      return new._replace(x_next=advance(new, jnp.asarray(alpha, x.dtype))), losses.at[i + 1].set(out.loss)

    losses = jnp.zeros((steps + 1, batch), jnp.float32).at[0].set(out0.loss)
    state, losses = jax.lax.fori_loop(0, steps, body, (state, losses))
    return state.best, losses

  return common.run_restarts(run_one, x, rng, restarts)


def apgd_targeted(logits_fn: LogitsFn, x, labels, rng, *, eps, norm: str = 'linf', steps: int = 100,
                  restarts: int = 1, num_targets: int = 9, target_batch: int = 1, loss: str = 'dlr',
                  rho: float = 0.75, alpha: float = 0.75, random_start: bool = True, eot_samples: int = 1,
                  return_losses: bool = False, box: Box = UNIT_BOX):
  """APGD-T (Croce & Hein 2020): APGD on a targeted loss, once per target class.

  x: [B, ...], labels: [B] -> x_adv [B, ...]. The targets of an example are
  the ``num_targets`` classes other than its label with the highest clean
  score (the mean softmax over ``eot_samples`` draws; at most C - 1 targets);
  for each, :func:`apgd` with ``restarts`` restarts maximises the targeted
  ``loss`` (default: targeted DLR, ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``).
  Success is misclassification (any wrong class, as in AutoAttack's
  evaluation), so the best point over all targets and restarts is a
  misclassified one whenever any run found one.

  Cost: ``num_targets * restarts * (steps + 1)`` gradient evaluations.
  ``target_batch`` targets run at once (vmapped; memory grows with it);
  the default 1 runs them one after another. Target ``j`` uses the key
  ``fold_in(attack key, j)``, so a target's run is the same whatever
  ``num_targets`` or ``target_batch`` is. With ``return_losses`` it returns
  ``(x_adv, losses [num_targets * restarts, steps + 1, B])``.
  """
  check_norm(norm)
  if num_targets < 1 or target_batch < 1:
    raise ValueError(f'need num_targets >= 1 and target_batch >= 1, got {num_targets}, {target_batch}')
  x = common.as_input(x)
  loss_fn = losses_lib.get_loss(loss)
  k_clean, k_attack = jax.random.split(rng)
  scores = eot_value(logits_fn, lambda z: jnp.zeros(z.shape[:1]), eot_samples)(x, k_clean).probs  # [B, C]
  num_classes = scores.shape[-1]
  num_targets = min(num_targets, num_classes - 1)
  others = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), -jnp.inf, scores)
  ranked = jnp.argsort(-others, axis=-1)[:, :num_targets]                  # [B, T], best target first
  misclassified = lambda p: jnp.argmax(p, axis=-1) != labels  # noqa: E731

  def one_target(j):
    target = ranked[:, j]
    goal = common.Goal(lambda z: loss_fn(z, labels, target), misclassified)
    return _run(logits_fn, goal, x, jax.random.fold_in(k_attack, j), eps=eps, norm=norm, steps=steps,
                restarts=restarts, rho=rho, alpha=alpha, random_start=random_start, eot_samples=eot_samples,
                box=box)

  bests, losses = jax.lax.map(one_target, jnp.arange(num_targets), batch_size=min(target_batch, num_targets))
  best = jax.tree.map(lambda a: a[0], bests)
  for j in range(1, num_targets):
    best = common.merge_best(best, jax.tree.map(lambda a, j=j: a[j], bests))
  x_adv = jax.lax.stop_gradient(best.x)
  if return_losses:
    return x_adv, losses.reshape((-1,) + losses.shape[2:])
  return x_adv
