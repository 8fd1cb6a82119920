"""Named bundles of attack settings: the shared evaluation's profiles.

A profile fixes *which* attacks run and how hard (steps, restarts), never the
eps grid or the number of examples, which belong to the experiment. Every
experiment names one (``config.eval.profile``) so methods are compared under
the same attacks:

  mnist_linf    the default for MNIST-like data, L-infinity: FGSM, sign noise,
                APGD-CE, APGD-DLR and APGD-T (9 targets) with 100 steps, PGD-CE
                and PGD-margin with 100 steps x 5 restarts, and the Square
                attack with 5,000 queries (evaluation.md; AutoAttack's
                standard suite is inside it but for FAB-T, see the README).
  cifar10_linf  the same attacks with PGD 50 steps x 2 restarts (CIFAR models
                are far more expensive per step; the APGDs keep 100 steps).
  l2            the MNIST profile in the L2 norm (Square in its L2 form).
  autoattack    AutoAttack's standard suite as this evaluation runs it:
                APGD-CE (100 steps), APGD-T (9 targets x 100 steps), Square
                (5,000 queries), cascaded (FGSM and noise join for the sanity
                checks); FAB-T is not built (README, "Evaluation").
  quick         FGSM, noise, PGD-CE 40 x 1 and APGD-DLR 40: a cheap screen
                (e.g. every point of a sweep), not a final number.

Every profile cascades (``cascade=True``): at each eps an iterative attack
runs only on the examples that are still robust (correct, and not broken by
an earlier attack in the list), as AutoAttack does; its row then reports the
robust accuracy after it and every attack before it, and how many examples
it faced and broke. The worst case is the same as running every attack on
every example (tested). ``--config.eval.cascade=False`` runs every attack on
every example (rows: each attack's own accuracy) at several times the cost.

``--config.eval.profile=NAME`` on the command line sets these fields before
any other ``--config.eval.*`` override, so ``--config.eval.profile=quick
--config.eval.pgd_steps=80`` is the quick profile with 80 PGD steps.
"""

from __future__ import annotations

import ml_collections

# Cheapest first: in a cascade the costlier attacks then face only what the
# earlier ones left (the worst case does not depend on the order).
_STRONG = dict(attacks=('fgsm', 'noise', 'apgd_ce', 'apgd_dlr', 'apgd_t', 'pgd', 'pgd_margin', 'square'),
               pgd_steps=100, pgd_restarts=5, pgd_step_size=2.5, apgd_steps=100, apgd_restarts=1, apgd_targets=9,
               square_queries=5000, square_p_init=0.8, noise_samples=10, cascade=True)

PROFILES: dict[str, dict] = {
    'mnist_linf': dict(_STRONG, norm='linf'),
    'cifar10_linf': dict(_STRONG, norm='linf', pgd_steps=50, pgd_restarts=2),
    'l2': dict(_STRONG, norm='l2'),
    'autoattack': dict(_STRONG, norm='linf', attacks=('apgd_ce', 'apgd_t', 'square')),
    'quick': dict(attacks=('fgsm', 'noise', 'pgd', 'apgd_dlr'), pgd_steps=40, pgd_restarts=1,
                  pgd_step_size=2.5, apgd_steps=40, apgd_restarts=1, noise_samples=4, cascade=True),
}


def profile_fields(name: str) -> dict:
  """The eval fields a profile sets (a copy)."""
  if name not in PROFILES:
    raise ValueError(f'unknown eval.profile {name!r}; available: {", ".join(PROFILES)}')
  return dict(PROFILES[name])


def apply_profile(eval_config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets ``eval_config.profile = name`` and the profile's fields; returns it."""
  fields = profile_fields(name)
  with eval_config.unlocked(), eval_config.ignore_type():
    eval_config.profile = name
    for key, value in fields.items():
      eval_config[key] = value
  return eval_config
