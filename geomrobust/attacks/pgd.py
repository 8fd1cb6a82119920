"""FGSM and PGD (Madry et al. 2018) with restarts, EOT and best-iterate selection."""

import jax
import jax.numpy as jnp

from geomrobust.attacks import common
from geomrobust.attacks.eot import LogitsFn, eot_value, eot_value_and_grad
from geomrobust.attacks.norms import UNIT_BOX, Box, check_norm, expand_to, project, random_init, step_direction


def fgsm(logits_fn: LogitsFn, x, labels, rng, *, eps, norm: str = 'linf', loss: str = 'ce',
         eot_samples: int = 1, targeted: bool = False, target_labels=None,
         box: Box = UNIT_BOX) -> jax.Array:
  """One ascent step of length ``eps`` from ``x`` (no random start).

  linf: ``x + eps * sign(g)``; l2: ``x + eps * g / ||g||``; then projected to
  the ball and ``box`` (static; default [0, 1]; None: the ball only). ``g`` is
  the (EOT-averaged over ``eot_samples`` draws of ``rng``) input gradient of
  ``loss``. x: [B, ...], labels: [B] -> x_adv [B, ...].
  """
  check_norm(norm)
  x = common.as_input(x)
  goal = common.make_goal(loss, labels, targeted, target_labels)
  grad = eot_value_and_grad(logits_fn, goal.objective, eot_samples)(x, rng).grad
  x_adv = project(x + expand_to(eps, x) * step_direction(grad, norm), x, eps, norm, box=box)
  return jax.lax.stop_gradient(x_adv)


def pgd(logits_fn: LogitsFn, x, labels, rng, *, eps, norm: str = 'linf', steps: int = 40,
        step_size=None, restarts: int = 1, loss: str = 'ce', random_start: bool = True,
        targeted: bool = False, target_labels=None, eot_samples: int = 1,
        return_losses: bool = False, x_init=None, return_last: bool = False,
        box: Box = UNIT_BOX):
  """Projected gradient ascent on ``loss`` inside the ``eps``-ball. x: [B, ...] -> [B, ...].

  Each restart starts at a uniform point of the ball (or at ``x`` when
  ``random_start=False``) and takes ``steps`` steps
  ``x <- P(x + step_size * dir(g))``, ``dir`` = sign (linf) or unit l2 direction.
  Every evaluated iterate (``steps + 1`` per restart, the start included) is a
  candidate; per example the best one over all restarts is returned
  (successful beats unsuccessful, then higher loss).

  ``eps`` and ``step_size`` may be traced scalars (or per-example [B] arrays);
  ``step_size`` defaults to ``2.5 * eps / steps``. ``norm``, ``steps``,
  ``restarts``, ``loss``, ``random_start``, ``targeted``, ``eot_samples`` are
  static, and so is ``box``: the valid input range ``(lo, hi)`` every point is
  clipped to after the ball projection (default [0, 1]; None: no clipping, the
  ball only). Randomness: restart ``r`` uses ``key_r = fold_in(rng, r)``, split
  into (start, model) keys; the evaluation of iterate ``i`` draws the model's
  noise from ``split(fold_in(model_key, i), eot_samples)``, so every step sees
  fresh draws and the verdict on an iterate uses the draws of its gradient.

  Returns ``x_adv`` [B, ...], or ``(x_adv, losses)`` with ``return_losses``:
  the attack loss of every iterate, ``[restarts, steps + 1, B]`` (the
  convergence picture: a flat curve at the last steps means PGD converged).

  Training-time options (adversarial training, e.g. ``methods/trades.py``):
  ``x_init`` [B, ...] is the start of every restart instead of the uniform
  random point (projected onto the ball around ``x`` and the box first; e.g.
  TRADES' ``x + 0.001 * N(0, I)``). ``return_last=True`` returns the final
  iterate instead of the best one, as Madry et al.'s and TRADES' training
  code do (needs ``restarts=1``; no verdicts, so no extra forward pass).
  """
  check_norm(norm)
  if steps < 0:
    raise ValueError(f'steps must be >= 0, got {steps}')
  x = common.as_input(x)
  goal = common.make_goal(loss, labels, targeted, target_labels)
  value_and_grad = eot_value_and_grad(logits_fn, goal.objective, eot_samples)
  value = eot_value(logits_fn, goal.objective, eot_samples)
  if step_size is None:
    step_size = 2.5 * jnp.asarray(eps, x.dtype) / max(steps, 1)
  step = expand_to(step_size, x)

  def start(k_init):
    if x_init is not None:
      return project(jnp.asarray(x_init, x.dtype), x, eps, norm, box=box)
    return project(x + random_init(k_init, x, eps, norm), x, eps, norm, box=box) if random_start else x

  if return_last:
    if restarts != 1 or return_losses:
      raise ValueError('return_last=True takes restarts=1 and return_losses=False')
    # The same keys as restart 0 below, so the iterates are the same.
    k_init, k_model = jax.random.split(jax.random.fold_in(rng, 0))

    def ascend(i, x_cur):
      grad = value_and_grad(x_cur, jax.random.fold_in(k_model, i)).grad
      return project(x_cur + step * step_direction(grad, norm), x, eps, norm, box=box)

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, ascend, start(k_init)))

  def run_one(key):
    k_init, k_model = jax.random.split(key)
    x0 = start(k_init)

    def body(i, carry):
      x_cur, best, losses = carry
      out = value_and_grad(x_cur, jax.random.fold_in(k_model, i))
      best = common.update_best(best, x_cur, out.loss, goal.is_success(out.probs))
      x_next = project(x_cur + step * step_direction(out.grad, norm), x, eps, norm, box=box)
      return x_next, best, losses.at[i].set(out.loss)

    losses = jnp.zeros((steps + 1, x.shape[0]), jnp.float32)
    x_last, best, losses = jax.lax.fori_loop(0, steps, body, (x0, common.init_best(x), losses))
    # The last iterate needs no gradient, only a verdict.
    out = value(x_last, jax.random.fold_in(k_model, steps))
    best = common.update_best(best, x_last, out.loss, goal.is_success(out.probs))
    return best, losses.at[steps].set(out.loss)

  best, losses = common.run_restarts(run_one, x, rng, restarts)
  x_adv = jax.lax.stop_gradient(best.x)
  return (x_adv, losses) if return_losses else x_adv
