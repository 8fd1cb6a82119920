"""The sanity checks of evaluation.md, computed on every evaluation.

Each check is ``{passed: bool, value: float, detail: str}``; a failure is
reported (results.json, report.md, a WARNING line in the log), never hidden.
Checks read the attack grid, and some run attacks of their own:

  eps0_equals_clean        PGD at eps = 0 changes no verdict (catches
                           train-mode BatchNorm and randomness mistakes).
  monotone_in_eps          accuracy never rises with eps (per attack and for
                           the worst case; eps = 0 is the clean accuracy).
  iterative_le_single_step every iterative attack is at least as strong as FGSM.
  gradient_le_noise        every gradient attack is at least as strong as
                           random noise of the same norm.
  large_eps_to_zero        PGD at a huge eps (1.0 in linf on [0,1]: any image
                           is reachable) drives accuracy to ~0; a model that
                           survives it is masking gradients. The eps (see
                           :func:`large_eps`) is ``eval.large_eps`` when set;
                           else, with an input box (lo, hi) (the default
                           [0, 1]), the box width ``hi - lo`` in linf and
                           ``sqrt(d) * (hi - lo)`` in l2 (d = input size):
                           the whole box is reachable; with no box
                           (``evaluate(..., box=None)``, unbounded float
                           inputs) ``10 * max |x|`` over the evaluated inputs
                           in linf and ``sqrt(d)`` times that in l2 (1.0 in
                           place of max |x| if all inputs are 0): ten times
                           the data's scale, so the ball around any point
                           holds every evaluated input and far beyond.
  doubled_budget           PGD with twice the steps and twice the restarts,
                           run on the examples that survived every attack at
                           the check eps, breaks (almost) none of them.
  batch_size_invariance    nothing but float rounding depends on the eval
                           batch size. At the check eps the set is run at the
                           eval batch size a and at another b (a / 2, or 2a
                           when a covers the set), same per-example keys:
                           (1) Clean scores (the logits; for stochastic
                           models the mean probabilities of the EOT vote,
                           same draws) agree to LOGIT_RTOL = 1e-4 of the
                           example's scale (its max |score|, at least the
                           set's median of that), and a predicted class
                           changes only where the top-two gap is within that
                           tolerance. Why 1e-4: a and b tile the same
                           per-example arithmetic differently (XLA blocks a
                           batch of B by B), which moves a logit by a few
                           float32 roundings (eps 1.2e-7) of the terms summed
                           into it; 1e-4 is ~800 roundings, room for
                           cancellation, while a model that reads its batch
                           (BatchNorm on batch statistics) moves logits by a
                           sizable fraction of their scale (0.77 for the
                           tiny BN model of the tests).
                           (2) Every restart of the main iterative attack
                           starts at bit-identical points (randomness is per
                           example). This is also what keeps (3) honest: keys
                           that depended on the batch would move the starts,
                           hence the gradients, and (3) would excuse the
                           resulting flips.
                           (3) The main attack's verdicts. An example is
                           float-noise-limited when the attack's first step
                           at some restart (``attacks.step_direction`` of the
                           attack loss's input gradient at the restart's
                           start, the attack's own first gradient) differs
                           between a and b by more than DIRECTION_RTOL = 1e-3
                           of its largest entry; in linf: some sign differs.
                           That gradient entry is then rounding noise (e.g. a
                           confident example: p_y rounds to 1 and the CE
                           gradient loses its true-class term), the two runs
                           part at their first step, and which one breaks the
                           example is set by float tiling, not by the model.
                           Verdicts may change only at those examples (and at
                           clean top-two ties within the tolerance of (1)),
                           plus one more: trajectories can also part at a
                           later step. Measured, undefended MNIST CNN, 500
                           examples, PGD-CE 100 x 5 at eps 0.1, batch 500 vs
                           250: logits identical, 195 examples with a first
                           step that differs in some sign, 3 verdicts change,
                           all among them; the old verdict-only check failed
                           this honest model. The count of float-noise-limited
                           examples is reported: it bounds how many verdicts
                           rounding could decide, not how many it does. The
                           probe costs one gradient per restart, example and
                           batch size (an attack costs steps x restarts).
  frozen_noise_attack      (stochastic models) with the noise frozen, PGD does
                           at least as well as the EOT attacks.
  eot_doubled              (stochastic models) EOT with twice the draws does not
                           raise accuracy.

Tolerances: accuracy comparisons allow ``max(0.005, 2 / N)`` (half a point, or
two examples on a small set); "~0" means at most ``max(0.01, 2 / N)``.
"""

from __future__ import annotations

import math

import numpy as np

from geomrobust.evaluation import recipes as recipes_lib

# With no input box, the large-eps check's eps is this many times max |x| (the data scale).
NO_BOX_SCALE = 10.0
# batch_size_invariance: clean scores at two batch sizes agree to this fraction of their scale.
LOGIT_RTOL = 1e-4
# batch_size_invariance: an example whose first attack step differs by more than this
# (relative to its largest entry) between the batch sizes is float-noise-limited.
DIRECTION_RTOL = 1e-3


def tolerance(n: int) -> float:
  return max(0.005, 2.0 / max(n, 1))


def zero_tolerance(n: int) -> float:
  return max(0.01, 2.0 / max(n, 1))


def _check(passed: bool, value: float, detail: str) -> dict:
  return dict(passed=bool(passed), value=float(value), detail=detail)


def _by_attack(rows: list[dict]) -> dict[str, dict[float, float]]:
  out: dict[str, dict[float, float]] = {}
  for r in rows:
    out.setdefault(r['attack'], {})[float(r['eps'])] = float(r['accuracy'])
  return out


def grid_checks(clean: float, rows: list[dict], recipe_list, n: int) -> dict:
  """Checks that need only the grid's accuracies."""
  tol = tolerance(n)
  acc = _by_attack(rows)
  checks = {}
  # Monotone in eps, with the clean accuracy as the eps = 0 point.
  worst_rise, where = 0.0, ''
  for attack, curve in acc.items():
    eps = sorted(e for e in curve if e > 0)
    seq = [(0.0, clean)] + [(e, curve[e]) for e in eps]
    for (e0, a0), (e1, a1) in zip(seq, seq[1:]):
      if a1 - a0 > worst_rise:
        worst_rise, where = a1 - a0, f' ({attack}: {100 * a0:.2f}% at eps={e0:g} -> {100 * a1:.2f}% at {e1:g})'
  checks['monotone_in_eps'] = _check(worst_rise <= tol, worst_rise,
                                     f'largest accuracy rise between consecutive eps{where}; tolerance {tol:.3g}')

  def gap_check(name, reference, candidates, what):
    if reference not in acc or not candidates:
      return
    gap, where = -math.inf, ''
    for r in candidates:
      for e, a in acc[r].items():
        if e > 0 and e in acc[reference] and a - acc[reference][e] > gap:
          gap, where = a - acc[reference][e], f'{r} at eps={e:g}'
    if gap > -math.inf:
      checks[name] = _check(gap <= tol, gap, f'max accuracy({what}) - accuracy({reference}) over eps '
                                              f'(worst: {where}); tolerance {tol:.3g}')

  iterative = [r.name for r in recipe_list if r.iterative]
  gradient = [r.name for r in recipe_list if r.uses_gradient]
  gap_check('iterative_le_single_step', 'fgsm', iterative, 'iterative attack')
  gap_check('gradient_le_noise', 'noise', gradient, 'gradient attack')
  return checks


def choose_check_eps(ev, clean: float, rows: list[dict]) -> float | None:
  """``eval.check_eps``, or the grid eps whose worst-case accuracy is nearest
  half the clean accuracy (where a stronger attack would show most)."""
  if float(ev.get('check_eps', 0.0)) > 0:
    return float(ev.check_eps)
  worst = sorted((r['eps'], r['accuracy']) for r in rows if r['attack'] == 'worst_case' and r['eps'] > 0)
  if not worst:
    return None
  return min(worst, key=lambda ea: (abs(ea[1] - clean / 2), ea[0]))[0]


def _pgd(ev, recipe_list, eot: int) -> recipes_lib.Recipe:
  """The configured CE PGD (from the list if present), used by the checks."""
  for r in recipe_list:
    if r.name == 'pgd':
      return r
  base = recipes_lib.available(ev)['pgd']
  steps = base.steps or 40
  return base.replace(steps=steps, restarts=max(base.restarts, 1),
                      options=dict(norm=ev.norm, eot_samples=eot))


def large_eps(ev, box, x) -> float:
  """The eps of the ``large_eps_to_zero`` check (see the module doc).

  ``box``: the evaluation's ``(lo, hi)`` or None; ``x``: the evaluated inputs
  ``[N, ...]`` (read only when there is no box and ``eval.large_eps`` is 0).
  """
  if float(ev.get('large_eps', 0.0)):
    return float(ev.large_eps)
  if box is not None:
    scale = float(box[1]) - float(box[0])
  else:
    scale = NO_BOX_SCALE * (float(np.max(np.abs(np.asarray(x)))) or 1.0)
  d = int(np.prod(np.shape(x)[1:]))
  return scale if ev.norm == 'linf' else math.sqrt(d) * scale


def attack_checks(runner, recipe_list, masks: dict, clean_mask: np.ndarray, check_eps: float | None, *,
                  log=print, tag: str = '') -> dict:
  """Checks that run attacks of their own (``runner`` is the suite's runner)."""
  ev, n = runner.ev, runner.n
  tol, tol0 = tolerance(n), zero_tolerance(n)
  pgd = _pgd(ev, recipe_list, runner.eot)
  pgd1 = pgd.replace('pgd_1', restarts=1)
  checks = {}

  # 1. eps = 0: with the clean evaluation's own keys, every verdict must match.
  m = runner.mask(pgd1, 0.0, key_name='clean')
  changed = float(np.mean(m != clean_mask))
  checks['eps0_equals_clean'] = _check(changed == 0.0, changed, 'fraction of examples whose verdict PGD at eps=0 '
                                       'changes (must be exactly 0)')

  # 4. A huge eps: any point of the input box (or, with none, far beyond the data) is reachable.
  large = large_eps(ev, runner.box, runner.x)
  acc = float(runner.mask(pgd1, large).mean())
  checks['large_eps_to_zero'] = _check(acc <= tol0, acc, f'accuracy under PGD ({pgd1.steps} steps) at eps={large:g}; '
                                       f'must be ~0 (<= {tol0:.3g})')
  log(f'{tag}sanity: eps=0 changed {changed:.4f} of verdicts; PGD at eps={large:g}: accuracy {acc:.4f}')
  if check_eps is None:
    return checks

  # 5. Twice the steps and twice the restarts, on what survived everything.
  worst = masks[f'worst_case@{check_eps:g}']
  survivors = np.flatnonzero(worst)
  strong = pgd.replace('pgd_2x', steps=2 * pgd.steps, restarts=2 * pgd.restarts)
  broken = int((~runner.mask(strong, check_eps, subset=survivors)).sum())
  drop = broken / n
  checks['doubled_budget'] = _check(
      drop <= tol, drop, f'PGD {strong.steps} steps x {strong.restarts} restarts broke {broken} of the {len(survivors)} '
      f'examples that survived every attack at eps={check_eps:g}: robust accuracy would drop by this; '
      f'tolerance {tol:.3g}')

  # 7. Another batch size: the clean scores, the attack's starts and first steps, its verdicts.
  main = next((r for r in recipe_list if r.iterative), pgd)
  ref = masks.get(f'{main.name}@{check_eps:g}')
  if ref is None:
    ref = runner.mask(main, check_eps)
  devices = runner.mesh.devices.size
  other = runner.batch_size // 2 // devices * devices
  if other < devices or other >= min(runner.batch_size, n):
    other = 2 * runner.batch_size
  probe = runner.batch_probe(main, check_eps, (runner.batch_size, other))
  verdicts = (ref, runner.mask(main, check_eps, batch_size=other))
  checks['batch_size_invariance'] = batch_size_check(
      probe['scores'], probe['starts_equal'], probe['direction_diff'], verdicts,
      sizes=(runner.chunk_size(runner.batch_size, n), runner.chunk_size(other, n)), attack=main.name, eps=check_eps)
  log(f'{tag}sanity at eps={check_eps:g}: doubled PGD breaks {broken} more; '
      f'{checks["batch_size_invariance"]["detail"]}')

  # 6. Stochastic models: frozen noise, and EOT with twice the draws.
  if runner.stochastic:
    import jax
    frozen_key = jax.random.key(int(ev.seed) + 1)
    acc_frozen = float(runner.mask(pgd, check_eps, model_key=frozen_key).mean())
    acc_worst = float(worst.mean())
    checks['frozen_noise_attack'] = _check(
        acc_frozen <= acc_worst + tol, acc_frozen - acc_worst,
        f'accuracy with the noise frozen under PGD ({100 * acc_frozen:.2f}%) minus the EOT worst case '
        f'({100 * acc_worst:.2f}%) at eps={check_eps:g}; tolerance {tol:.3g}')
    ref_pgd = masks.get(f'pgd@{check_eps:g}')
    acc_pgd = float((ref_pgd if ref_pgd is not None else runner.mask(pgd, check_eps)).mean())
    double = pgd.replace('pgd_eot2x', options=dict(eot_samples=2 * runner.eot))
    acc_2x = float(runner.mask(double, check_eps).mean())
    checks['eot_doubled'] = _check(
        acc_2x <= acc_pgd + tol, acc_2x - acc_pgd,
        f'accuracy under PGD with {2 * runner.eot} EOT draws minus with {runner.eot} at eps={check_eps:g}; '
        f'tolerance {tol:.3g}')
  return checks


def batch_size_check(scores, starts_equal, direction_diff, verdicts, *, sizes: tuple[int, int], attack: str,
                     eps: float) -> dict:
  """The ``batch_size_invariance`` check (see the module doc) from what was measured.

  Args:
    scores: (a, b) float [N, C]: the clean scores at the batch sizes ``sizes``.
    starts_equal: bool [N]: every restart of the attack starts at the same point at both.
    direction_diff: float [N]: the largest difference between the attack's first
      step directions at both, relative to their largest entry (0: identical).
    verdicts: (a, b) bool [N]: the attack's verdicts at both.

  ``value`` is the fraction of examples whose verdict changes with no float-noise
  reason (at most one is allowed).
  """
  s_a, s_b = (np.asarray(v, np.float64) for v in scores)
  v_a, v_b = (np.asarray(v, bool) for v in verdicts)
  n = len(v_a)
  # Scores: within LOGIT_RTOL of the example's scale (the set's median scale at least).
  own = np.maximum(np.abs(s_a).max(-1, initial=0.0), np.abs(s_b).max(-1, initial=0.0))
  scale = np.maximum(own, np.median(own) if n else 0.0)
  tol = LOGIT_RTOL * scale
  diff = np.abs(s_a - s_b).max(-1, initial=0.0)
  rel = np.where(diff > 0, diff / np.maximum(scale, np.finfo(np.float64).tiny), 0.0)

  def gap(s):  # [N]: top-two gap
    top2 = np.sort(s, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]

  tie = (gap(s_a) <= tol) | (gap(s_b) <= tol)
  pred_flips = np.argmax(s_a, -1) != np.argmax(s_b, -1)
  starts_moved = int(np.sum(~np.asarray(starts_equal, bool)))
  # Verdicts: a change is explained where rounding decides the first step or the clean class.
  noisy = np.asarray(direction_diff) > DIRECTION_RTOL
  noise_limited = noisy | tie
  flips = v_a != v_b
  unexplained = int(np.sum(flips & ~noise_limited))
  passed = (bool(np.all(diff <= tol)) and not np.any(pred_flips & ~tie) and starts_moved == 0
            and unexplained <= 1)
  detail = (f'eval batch size {sizes[1]} vs {sizes[0]}. Clean scores: max difference {diff.max(initial=0.0):.3g}, '
            f'{rel.max(initial=0.0):.3g} of the score scale (tolerance {LOGIT_RTOL:g}); '
            f'{int(pred_flips.sum())} predictions change ({int(np.sum(pred_flips & tie))} at a top-two tie within '
            f'the tolerance). Attack starts: '
            + ('identical. ' if not starts_moved else
               f'{starts_moved} examples start elsewhere (randomness not per example). ')
            + f'{attack} verdicts at eps={eps:g}: {int(flips.sum())} change, {int(np.sum(flips & noise_limited))} '
            f'of them at the {int(noise_limited.sum())} float-noise-limited examples ({int(noisy.sum())} whose '
            f'first step direction differs by more than {DIRECTION_RTOL:g} between the batch sizes, '
            f'{int(tie.sum())} at a clean top-two tie), {unexplained} elsewhere (allowed: 1)')
  return _check(passed, unexplained / max(n, 1), detail)
