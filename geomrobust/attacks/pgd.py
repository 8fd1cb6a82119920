"""FGSM and PGD (Madry et al. 2018) with restarts, EOT and best-iterate selection."""

import jax
import jax.numpy as jnp

from geomrobust.attacks import common
from geomrobust.attacks.eot import LogitsFn, eot_value, eot_value_and_grad
from geomrobust.attacks.norms import check_norm, expand_to, project, random_init, step_direction


def fgsm(logits_fn: LogitsFn, x, labels, rng, *, eps, norm: str = 'linf', loss: str = 'ce',
         eot_samples: int = 1, targeted: bool = False, target_labels=None) -> jax.Array:
  """One ascent step of length ``eps`` from ``x`` (no random start).

  linf: ``x + eps * sign(g)``; l2: ``x + eps * g / ||g||``; then projected to
  the ball and [0, 1]. ``g`` is the (EOT-averaged over ``eot_samples`` draws of
  ``rng``) input gradient of ``loss``. x: [B, ...], labels: [B] -> x_adv [B, ...].
  """
  check_norm(norm)
  x = common.as_input(x)
  goal = common.make_goal(loss, labels, targeted, target_labels)
  grad = eot_value_and_grad(logits_fn, goal.objective, eot_samples)(x, rng).grad
  x_adv = project(x + expand_to(eps, x) * step_direction(grad, norm), x, eps, norm)
  return jax.lax.stop_gradient(x_adv)


def pgd(logits_fn: LogitsFn, x, labels, rng, *, eps, norm: str = 'linf', steps: int = 40,
        step_size=None, restarts: int = 1, loss: str = 'ce', random_start: bool = True,
        targeted: bool = False, target_labels=None, eot_samples: int = 1) -> jax.Array:
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
  static. Randomness: restart ``r`` uses ``key_r = fold_in(rng, r)``, split
  into (start, model) keys; the evaluation of iterate ``i`` draws the model's
  noise from ``split(fold_in(model_key, i), eot_samples)``, so every step sees
  fresh draws and the verdict on an iterate uses the draws of its gradient.
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

  def run_one(key):
    k_init, k_model = jax.random.split(key)
    x0 = project(x + random_init(k_init, x, eps, norm), x, eps, norm) if random_start else x

    def body(i, carry):
      x_cur, best = carry
      out = value_and_grad(x_cur, jax.random.fold_in(k_model, i))
      best = common.update_best(best, x_cur, out.loss, goal.is_success(out.probs))
      x_next = project(x_cur + step * step_direction(out.grad, norm), x, eps, norm)
      return x_next, best

    x_last, best = jax.lax.fori_loop(0, steps, body, (x0, common.init_best(x)))
    # The last iterate needs no gradient, only a verdict.
    out = value(x_last, jax.random.fold_in(k_model, steps))
    return common.update_best(best, x_last, out.loss, goal.is_success(out.probs))

  return jax.lax.stop_gradient(common.run_restarts(run_one, x, rng, restarts).x)
