"""Adversarial attacks on ``logits_fn(x, rng) -> logits`` closures, all jit-compatible.

Inputs are float images/vectors ``x`` [B, ...], by default in [0, 1] (eps is on
that scale); every attack takes a static ``box=(lo, hi)`` for another valid
input range, or ``box=None`` for inputs with no valid box (the eps-ball only).
Deterministic models: wrap ``f(x)`` with :func:`deterministic`. Stochastic
models get EOT gradients with ``eot_samples=k`` (the gradient-free ``square``
averages its forward passes over the same k draws).
"""

import jax

from geomrobust.attacks.apgd import apgd, apgd_checkpoints, apgd_targeted
from geomrobust.attacks.eot import EotOutput, deterministic, eot_grad, eot_value, eot_value_and_grad
from geomrobust.attacks.losses import LOSSES, cross_entropy, dlr, get_loss, margin
from geomrobust.attacks.noise import gaussian_noise, random_noise
from geomrobust.attacks.norms import (NORMS, UNIT_BOX, Box, check_box, clip_to_box, per_example_norm, project,
                                      random_init, random_surface, step_direction)
from geomrobust.attacks.pgd import fgsm, pgd
from geomrobust.attacks.square import square

ATTACKS = {'fgsm': fgsm, 'pgd': pgd, 'apgd': apgd, 'apgd_t': apgd_targeted, 'square': square, 'noise': random_noise}


def get_attack(name: str):
  if name not in ATTACKS:
    raise ValueError(f'unknown attack {name!r}; available: {", ".join(sorted(ATTACKS))}')
  return ATTACKS[name]


def run_attack(name: str, logits_fn, x, labels, rng, **kwargs) -> jax.Array:
  """``ATTACKS[name](logits_fn, x, labels, rng, **kwargs)`` -> x_adv [B, ...]."""
  return get_attack(name)(logits_fn, x, labels, rng, **kwargs)


def make_attack(name: str, apply_fn, **static_kwargs):
  """A jitted ``(params, x, labels, rng, eps, **array_kwargs) -> x_adv`` for one attack.

  ``apply_fn(params, x, rng) -> logits [B, C]``. Passing ``params`` as an
  argument (instead of closing over them) keeps the weights out of the
  compiled program as constants. ``eps`` and any ``array_kwargs`` (e.g.
  ``step_size``, ``target_labels``) are traced, so an eps grid compiles once
  per input shape; ``static_kwargs`` (steps, restarts, norm, loss, box, ...) are
  fixed at construction.
  """
  attack = get_attack(name)

  @jax.jit
  def run(params, x, labels, rng, eps, **array_kwargs):
    return attack(lambda xx, r: apply_fn(params, xx, r), x, labels, rng, eps=eps,
                  **static_kwargs, **array_kwargs)

  return run


__all__ = [
    'ATTACKS', 'Box', 'EotOutput', 'LOSSES', 'NORMS', 'UNIT_BOX', 'apgd', 'apgd_checkpoints', 'apgd_targeted', 'check_box',
    'clip_to_box', 'cross_entropy', 'deterministic', 'dlr', 'eot_grad', 'eot_value', 'eot_value_and_grad', 'fgsm',
    'gaussian_noise', 'get_attack', 'get_loss', 'make_attack', 'margin', 'per_example_norm', 'pgd', 'project',
    'random_init', 'random_noise', 'random_surface', 'run_attack', 'square', 'step_direction',
]
