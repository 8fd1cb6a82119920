"""Random-noise baselines: worst-of-n surface noise, and plain Gaussian corruption."""

import jax
import jax.numpy as jnp

from geomrobust.attacks import common
from geomrobust.attacks.eot import LogitsFn, eot_value
from geomrobust.attacks.norms import UNIT_BOX, Box, check_norm, clip_to_box, random_surface


def random_noise(logits_fn: LogitsFn, x, labels, rng, *, eps, norm: str = 'linf',
                 samples: int = 1, loss: str = 'ce', eot_samples: int = 1,
                 box: Box = UNIT_BOX) -> jax.Array:
  """Worst of ``samples`` random perturbations on the eps-sphere. x: [B, ...] -> [B, ...].

  linf: uniform corners ``x + eps * (+-1)``; l2: a uniform direction of length
  ``eps``; both clipped to ``box`` (static; default [0, 1]; None: not
  clipped), which keeps them inside the ball. Per example the worst draw is
  kept (misclassified beats not, then higher ``loss``). Draw ``s`` uses
  ``fold_in(rng, s)``, split into (noise, model) keys.
  """
  check_norm(norm)
  if samples < 1:
    raise ValueError(f'need at least one noise sample, got {samples}')
  x = common.as_input(x)
  goal = common.make_goal(loss, labels)
  value = eot_value(logits_fn, goal.objective, eot_samples)

  def body(s, best):
    k_noise, k_model = jax.random.split(jax.random.fold_in(rng, s))
    x_s = clip_to_box(x + random_surface(k_noise, x, eps, norm), box)
    out = value(x_s, k_model)
    return common.update_best(best, x_s, out.loss, goal.is_success(out.probs))

  best = jax.lax.fori_loop(0, samples, body, common.init_best(x))
  return jax.lax.stop_gradient(best.x)


def gaussian_noise(x, rng, std, *, box: Box = UNIT_BOX) -> jax.Array:
  """``clip(x + std * N(0, I), lo, hi)`` for ``box=(lo, hi)`` (default [0, 1];
  None: not clipped), same shape as x [B, ...]; std may be traced."""
  x = jnp.asarray(x)
  noise = jax.random.normal(rng, x.shape, x.dtype)
  return clip_to_box(x + jnp.asarray(std, x.dtype) * noise, box)
