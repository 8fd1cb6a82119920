"""The shared robustness evaluation every experiment ends in.

``evaluate(apply_fn, params, images, labels, config.eval, mesh)`` runs every
attack of ``eval.attacks`` (see ``recipes``; ``recipes.resolve``) at every eps of ``eval.eps`` on
the first ``eval.num_examples`` test examples, takes the per-example worst
case over all of them, runs the sanity checks of evaluation.md (``sanity``)
and records the attack loss per step for a few examples (``convergence``).
Methods cannot bring their own attack: they only provide
``apply_fn(params, x, rng) -> logits``. Named attack bundles are in
``profiles``.
"""

from geomrobust.evaluation import profiles
from geomrobust.evaluation import recipes
from geomrobust.evaluation.recipes import Recipe
from geomrobust.evaluation.sanity import attack_checks, choose_check_eps, grid_checks
from geomrobust.evaluation.suite import Evaluator, attack_key, correct_fn, evaluate, losses_fn

__all__ = ['Evaluator', 'Recipe', 'attack_checks', 'attack_key', 'choose_check_eps', 'correct_fn', 'evaluate', 'grid_checks',
           'losses_fn', 'profiles', 'recipes']
