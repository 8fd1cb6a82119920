"""The sanity checks of evaluation.md, computed on every evaluation.

Each check is ``{passed: bool, value: float, detail: str}``; a failure is
reported (results.json, report.md, a WARNING line in the log), never hidden.
Checks read the attack grid, and some run attacks of their own:

  gradient_free            (with ``square`` in the list) the gradient-free
                           Square attack, run after every other attack, breaks
                           at most a few of the examples they all left robust:
                           at every eps at most ``max(tolerance, 10% of what
                           the other attacks broke together)`` of the set.
                           Square cannot be fooled by gradient masking; a
                           model it breaks far beyond the gradient attacks
                           has gradients that mislead them (AutoAttack's
                           Square adds a few examples on honest models).
  eps0_equals_clean        PGD at eps = 0 changes no verdict (catches
                           train-mode BatchNorm and randomness mistakes).
  monotone_in_eps          accuracy never rises with eps (per attack and for
                           the worst case; eps = 0 is the clean accuracy);
                           random noise, a fresh sample at each eps, may rise
                           within its sampling error.
  iterative_le_single_step the iterative attacks are at least as strong as
                           FGSM: at each eps, the lowest accuracy among them
                           is at most FGSM's. A cascaded grid (``eval.cascade``:
                           iterative attacks run only on what earlier attacks
                           left) has no per-attack accuracy to compare, so
                           there PGD with one restart runs on every example at
                           every grid eps and is compared with FGSM.
  gradient_le_noise        every gradient attack is at least as strong as
                           random noise of the same norm (cascade: FGSM and
                           the one-restart PGD above).
  large_eps_to_zero        PGD at a huge eps (1.0 in linf on [0,1]: any image
                           is reachable; CE and margin loss, worst case per
                           example) drives accuracy to ~0; a model that
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
                           when a covers the set), same per-example keys (the
                           main attack: the first iterative one; in a cascade
                           the one-restart PGD above):
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
  frozen_noise_attack      (stochastic models) with the noise frozen to one
                           draw (one fixed key for every call: a deterministic
                           network), PGD leaves at most what the same PGD with
                           EOT leaves at the check eps, and at the huge eps above drives
                           accuracy to ~0 like on any deterministic network.
                           A model whose prediction barely depends on its
                           input (huge noise on a tiny signal: its
                           "robustness" is only randomness) fails the second.
  eot_doubled              (stochastic models) PGD with twice the EOT draws and
                           twice the steps lowers accuracy (mean over passes)
                           by at most the tolerance: the EOT attack converged.

Stochastic models: every accuracy is the mean over ``eval.passes`` passes
(one fresh noise draw each), so each comparison above also allows
``SE_MULTIPLE`` = 3 standard errors of the difference (``accuracy_se`` of the
rows, from the examples' fractions of correct passes); the worst case per
example is the attack the model gets right least often (``suite.worst_case``),
and ``doubled_budget`` adds the doubled PGD to that worst case on every
example some pass gets right and compares the means.

Tolerances: accuracy comparisons allow ``max(0.005, 2 / N)`` (half a point, or
two examples on a small set); "~0" means at most ``max(0.01, 2 / N)``.
"""

from __future__ import annotations

import math

import numpy as np

from geomrobust.evaluation import recipes as recipes_lib

# With no input box, the large-eps check's eps is this many times max |x| (the data scale).
NO_BOX_SCALE = 10.0
# gradient_free: Square may add at most this share of what the other attacks broke (or the tolerance).
GRADIENT_FREE_SHARE = 0.1
# Stochastic models: accuracy comparisons allow this many standard errors of the difference.
SE_MULTIPLE = 3.0
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


def _by_attack(rows: list[dict]) -> dict[str, dict[float, tuple[float, float]]]:
  """``{attack: {eps: (accuracy, its standard error)}}`` (se 0 for deterministic models)."""
  out: dict[str, dict[float, tuple[float, float]]] = {}
  for r in rows:
    out.setdefault(r['attack'], {})[float(r['eps'])] = (float(r['accuracy']), float(r.get('accuracy_se', 0.0)))
  return out


def sampling_allowance(*se: float) -> float:
  """What the accuracy comparisons of a stochastic model add to their tolerance:
  three standard errors of the difference (``SE_MULTIPLE * sqrt(sum se^2)``),
  since each accuracy is itself a mean over random passes. 0 for deterministic models."""
  return SE_MULTIPLE * math.sqrt(sum(float(v) ** 2 for v in se))


def grid_checks(clean: float, rows: list[dict], recipe_list, n: int, clean_se: float = 0.0) -> dict:
  """Checks that need only the grid's accuracies. A stochastic model's rows
  carry ``accuracy_se``: each comparison's tolerance grows by :func:`sampling_allowance`."""
  tol = tolerance(n)
  acc = _by_attack(rows)
  checks = {}
  # Monotone in eps, with the clean accuracy as the eps = 0 point; the pair nearest failing is reported.
  # Random noise draws afresh at every eps: its accuracies are each a sample
  # (binomial standard error over the n examples), not one curve, so only a
  # rise beyond their sampling error counts (measured: rises of 1-3% at n = 200).
  random = {r.name for r in recipe_list if r.random_baseline}
  rise, where, allowed = 0.0, '', tol
  for attack, curve in acc.items():
    eps = sorted(e for e in curve if e > 0)
    if attack in random:
      curve = {e: (a, s or math.sqrt(a * (1 - a) / max(n, 1))) for e, (a, s) in curve.items()}
    seq = [(0.0, (clean, clean_se))] + [(e, curve[e]) for e in eps]
    for (e0, (a0, s0)), (e1, (a1, s1)) in zip(seq, seq[1:]):
      allow = tol + sampling_allowance(s0, s1)
      if a1 - a0 > 0 and a1 - a0 - allow > rise - allowed:
        rise, allowed = a1 - a0, allow
        where = f' ({attack}: {100 * a0:.2f}% at eps={e0:g} -> {100 * a1:.2f}% at {e1:g})'
  checks['monotone_in_eps'] = _check(rise <= allowed, rise,
                                     f'largest accuracy rise between consecutive eps{where}; tolerance {allowed:.3g}')

  def gap_check(name, reference, candidates, what):
    if reference not in acc or not candidates:
      return
    gap, where, allowed = -math.inf, '', tol
    for r in candidates:
      for e, (a, s_a) in acc[r].items():
        if e > 0 and e in acc[reference]:
          ref, s_ref = acc[reference][e]
          allow = tol + sampling_allowance(s_a, s_ref)
          if gap == -math.inf or a - ref - allow > gap - allowed:
            gap, where, allowed = a - ref, f'{r} at eps={e:g}', allow
    if gap > -math.inf:
      checks[name] = _check(gap <= allowed, gap, f'max accuracy({what}) - accuracy({reference}) over eps '
                                                 f'(worst: {where}); tolerance {allowed:.3g}')

  # A cascaded row is the robust accuracy after its attack *and those before it*, never
  # above theirs: comparing it with FGSM or noise would pass by construction.
  # attack_checks compares an iterative attack run on every example instead.
  cascaded = {r['attack'] for r in rows if r.get('cascade')}
  iterative = [r.name for r in recipe_list if r.iterative and r.name not in cascaded]
  gradient = [r.name for r in recipe_list if r.uses_gradient and r.name not in cascaded]
  # The strongest iterative attack per eps against FGSM: masking weakens them
  # all, while one of them alone can fall short of FGSM on an honest, nearly
  # linear model (L2 PGD from a random start turns towards the gradient
  # direction slowly; measured 0.6-1% on the sparse-coding networks).
  if len(iterative) > 1 and all(r in acc for r in iterative):
    eps_all = set.intersection(*(set(acc[r]) for r in iterative))
    acc['best iterative'] = {e: min((acc[r][e] for r in iterative), key=lambda a_s: a_s[0]) for e in eps_all}
    iterative = ['best iterative']
  gap_check('iterative_le_single_step', 'fgsm', iterative, 'iterative attack')
  gap_check('gradient_le_noise', 'noise', gradient, 'gradient attack')
  return checks


def gradient_free_check(recipe_list, verdicts: dict, n: int) -> dict:
  """``gradient_free`` (see the module doc) from the grid's ``suite.Verdicts``
  (``verdicts['clean']`` and ``verdicts['attack@eps']``); empty without a search attack."""
  from geomrobust.evaluation import suite
  searches = [r.name for r in recipe_list if r.searches]
  others = [r.name for r in recipe_list if not r.searches]
  if not searches:
    return {}
  eps_grid = sorted({float(k.rpartition('@')[2]) for k in verdicts if k.startswith(f'{searches[0]}@')})
  tol = tolerance(n)
  worst = None  # (extra - allowed, extra, allowed, broke, eps) at the eps nearest failing
  for eps in eps_grid:
    before = suite.worst_case([verdicts['clean']] + [verdicts[f'{r}@{eps:g}'] for r in others])
    after = suite.worst_case([before] + [verdicts[f'{r}@{eps:g}'] for r in searches])
    clean, a_before, a_after = (suite.accuracy_stats(v) for v in (verdicts['clean'], before, after))
    extra = a_before['accuracy'] - a_after['accuracy']
    broke = clean['accuracy'] - a_before['accuracy']
    allowed = max(tol, GRADIENT_FREE_SHARE * broke) + sampling_allowance(a_before.get('accuracy_se', 0.0),
                                                                          a_after.get('accuracy_se', 0.0))
    if worst is None or extra - allowed > worst[0]:
      worst = (extra - allowed, extra, allowed, broke, eps)
  if worst is None:
    return {}
  _, extra, allowed, broke, eps = worst
  passed = extra <= allowed + 1e-9  # accuracies are float means: k / n exactly at the limit passes
  detail = (f'{"+".join(searches)} broke {100 * extra:.2f}% of the set beyond every other attack at eps={eps:g} '
            f'(they broke {100 * broke:.2f}% together); allowed {allowed:.3g}: the larger of the tolerance and '
            f'{GRADIENT_FREE_SHARE:.0%} of theirs')
  if not passed:
    detail += ('. A gradient-free attack beats the gradient attacks: the gradients are masked, and the gradient '
               "attacks' numbers overstate robustness")
  return {'gradient_free': _check(passed, extra, detail)}


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
                  log=print, tag: str = '', verdicts: dict | None = None, rows: list[dict] | None = None) -> dict:
  """Checks that run attacks of their own (``runner`` is the suite's runner;
  ``verdicts`` the grid's ``suite.Verdicts`` and ``rows`` its rows, which the
  stochastic checks read)."""
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
  # CE and margin PGD, worst case per example: far outside a box, a confident
  # logit gap makes the float32 softmax exactly one-hot, so the CE gradient is
  # exactly 0 (an honest unbounded model, e.g. a ReLU score on generated data,
  # would pass CE-PGD untouched); the margin's gradient never vanishes. The
  # margin PGD runs only when CE-PGD alone would fail the check, and only on
  # what CE-PGD left (usually it is not needed: no extra cost).
  survived = np.asarray(runner.mask(pgd1, large)).copy()
  left = np.flatnonzero(survived)
  if survived.mean() > tol0:
    margin1 = pgd1.replace('pgd_margin_1', options=dict(loss='margin'))
    survived[left] &= np.asarray(runner.mask(margin1, large, subset=left))
  acc = float(survived.mean())
  checks['large_eps_to_zero'] = _check(acc <= tol0, acc, f'accuracy under PGD ({pgd1.steps} steps, CE and margin, '
                                       f'worst case) at eps={large:g}; must be ~0 (<= {tol0:.3g})')
  log(f'{tag}sanity: eps=0 changed {changed:.4f} of verdicts; PGD at eps={large:g}: accuracy {acc:.4f}')
  if check_eps is None:
    return checks

  # 5. Twice the steps and twice the restarts, on what survived everything.
  worst = masks[f'worst_case@{check_eps:g}']
  strong = pgd.replace('pgd_2x', steps=2 * pgd.steps, restarts=2 * pgd.restarts)
  if runner.stochastic:
    checks['doubled_budget'] = _stochastic_doubled_budget(runner, strong, verdicts, check_eps)
    broken = checks['doubled_budget']['detail']
  else:
    survivors = np.flatnonzero(worst)
    n_broken = int((~runner.mask(strong, check_eps, subset=survivors)).sum())
    drop = n_broken / n
    checks['doubled_budget'] = _check(
        drop <= tol, drop, f'PGD {strong.steps} steps x {strong.restarts} restarts broke {n_broken} of the '
        f'{len(survivors)} examples that survived every attack at eps={check_eps:g}: robust accuracy would drop '
        f'by this; tolerance {tol:.3g}')
    broken = f'breaks {n_broken} more'

  # 7. Another batch size: the clean scores, the attack's starts and first steps, its verdicts.
  # In a cascade no iterative attack ran on every example: PGD with one restart does, here,
  # and also stands in for the iterative attacks against FGSM and noise (2 and 3).
  cascade = any(r.get('cascade') for r in rows or [])
  # (The probe mirrors PGD's and APGD's starts and first steps.)
  main = pgd1 if cascade else next((r for r in recipe_list if r.attack in ('pgd', 'apgd')), pgd)
  ref = None if cascade else masks.get(f'{main.name}@{check_eps:g}')
  if ref is None:
    ref = runner.mask(main, check_eps)
  if cascade:
    # At every grid eps (masking can show at one eps only): accuracy of the one-restart PGD on all.
    accuracy = {e: (float(np.mean(ref)) if e == check_eps else float(np.mean(runner.mask(main, e))))
                for e in sorted({float(r['eps']) for r in rows if r['eps'] > 0})}
    for name, check in _all_examples_iterative(rows, main, accuracy, n).items():
      if checks.get(name, {}).get('passed', True):  # a grid failure (FGSM vs noise) stays reported
        checks[name] = check
  devices = runner.mesh.devices.size
  other = runner.batch_size // 2 // devices * devices
  if other < devices or other >= min(runner.batch_size, n):
    other = 2 * runner.batch_size
  probe = runner.batch_probe(main, check_eps, (runner.batch_size, other))
  verdicts = (ref, runner.mask(main, check_eps, batch_size=other))
  checks['batch_size_invariance'] = batch_size_check(
      probe['scores'], probe['starts_equal'], probe['direction_diff'], verdicts,
      sizes=(runner.chunk_size(runner.batch_size, n), runner.chunk_size(other, n)), attack=main.name, eps=check_eps)
  log(f'{tag}sanity at eps={check_eps:g}: doubled PGD: {broken}; '
      f'{checks["batch_size_invariance"]["detail"]}')

  # 6. Stochastic models: frozen noise, and EOT with twice the draws and steps.
  if runner.stochastic:
    checks.update(stochastic_checks(runner, pgd, rows, check_eps, large))
    for name in ('frozen_noise_attack', 'eot_doubled'):
      log(f'{tag}sanity {name}: {checks[name]["detail"]}')
  return checks


def _all_examples_iterative(rows: list[dict], recipe, accuracy: dict, n: int) -> dict:
  """``iterative_le_single_step`` and ``gradient_le_noise`` for a cascaded grid: the
  accuracy of ``recipe`` (an iterative attack run on every example; ``accuracy``
  maps eps to it) against FGSM's and noise's rows (those always run on every
  example); the eps nearest failing is reported."""
  tol, out = tolerance(n), {}
  for name, ref_attack in (('iterative_le_single_step', 'fgsm'), ('gradient_le_noise', 'noise')):
    gaps = [(acc - ref['accuracy'], eps, acc, ref['accuracy']) for eps, acc in accuracy.items()
            if (ref := _row(rows, ref_attack, eps)) is not None]
    if not gaps:
      continue
    gap, eps, acc, ref_acc = max(gaps)
    out[name] = _check(gap <= tol, gap, f'max over eps of accuracy({recipe.name}, {recipe.steps} steps, every '
                       f'example) - accuracy({ref_attack}); worst at eps={eps:g}: {100 * acc:.2f}% vs '
                       f'{100 * ref_acc:.2f}% (the grid cascades, so this one attack runs on all); tolerance {tol:.3g}')
  return out


def _row(rows: list[dict], attack: str, eps: float) -> dict | None:
  return next((r for r in rows if r['attack'] == attack and abs(r['eps'] - eps) < 1e-12), None)


def _stochastic_doubled_budget(runner, strong, verdicts: dict, eps: float) -> dict:
  """``doubled_budget`` for a stochastic model: the doubled PGD joins the
  per-example worst case (``suite.worst_case``) on every example some pass
  still gets right, and the worst-case accuracy (mean over passes) may drop
  by at most the tolerance plus :func:`sampling_allowance`. (Re-attacking only
  majority-vote survivors would count the passes' randomness as breaks.)"""
  from geomrobust.evaluation import suite
  n = runner.n
  old = verdicts[f'worst_case@{eps:g}']
  alive = np.flatnonzero(old.passes.any(1))
  new_passes, new_mask = old.passes.copy(), old.mask.copy()
  if len(alive):
    v = runner.verdicts(strong, eps, subset=alive)
    merged = suite.worst_case([suite.Verdicts(old.mask[alive], old.passes[alive]), v])
    new_passes[alive], new_mask[alive] = merged.passes, merged.mask
  before = suite.accuracy_stats(old)
  after = suite.accuracy_stats(suite.Verdicts(new_mask, new_passes))
  drop = before['accuracy'] - after['accuracy']
  allowed = tolerance(n) + sampling_allowance(before['accuracy_se'], after['accuracy_se'])
  return _check(drop <= allowed, drop, f'PGD {strong.steps} steps x {strong.restarts} restarts ({runner.eot} EOT '
                f'draws) added to the worst case at eps={eps:g} on the {len(alive)} examples some pass gets right: '
                f'robust accuracy {100 * before["accuracy"]:.2f}% -> {100 * after["accuracy"]:.2f}% (mean over '
                f'{before["passes"]} passes); tolerance {allowed:.3g} (incl. 3 standard errors)')


def stochastic_checks(runner, pgd, rows: list[dict], eps: float, large: float) -> dict:
  """``frozen_noise_attack`` and ``eot_doubled`` (evaluation.md check 6; see the module doc)."""
  import jax
  from geomrobust.evaluation import suite
  tol, tol0 = tolerance(runner.n), zero_tolerance(runner.n)
  ref = _row(rows, 'pgd', eps)
  if ref is None:
    ref = suite.accuracy_stats(runner.verdicts(pgd, eps))
  # Frozen: one fixed draw for every call makes the network deterministic; the same PGD must do at
  # least as well there as through the noise with EOT and, at a huge eps, drive it to ~0 like on
  # any deterministic network.
  frozen_key = jax.random.key(int(runner.ev.seed) + 1)
  acc_frozen = float(runner.mask(pgd, eps, model_key=frozen_key).mean())
  acc_frozen_large = float(runner.mask(pgd, large, model_key=frozen_key).mean())
  allowed = tol + sampling_allowance(ref['accuracy_se'])
  frozen_ok = acc_frozen <= ref['accuracy'] + allowed
  large_ok = acc_frozen_large <= tol0
  out = {'frozen_noise_attack': _check(
      frozen_ok and large_ok, max(acc_frozen - ref['accuracy'], acc_frozen_large),
      f'noise frozen to one draw: PGD leaves {100 * acc_frozen:.2f}% at eps={eps:g} (with EOT through the noise: '
      f'{100 * ref["accuracy"]:.2f}%, tolerance {allowed:.3g}'
      + ('' if frozen_ok else ': the attack fails even without randomness') + f') and {100 * acc_frozen_large:.2f}% '
      f'at eps={large:g} (must be ~0, <= {tol0:.3g}'
      + ('' if large_ok else ': the prediction barely depends on the input; what robustness there is comes '
         'from the randomness') + ')')}
  # Twice the EOT draws and twice the steps: the EOT attack has converged if accuracy barely drops.
  double = pgd.replace('pgd_eot2x', steps=2 * pgd.steps, options=dict(eot_samples=2 * runner.eot))
  acc_2x = suite.accuracy_stats(runner.verdicts(double, eps))
  drop = ref['accuracy'] - acc_2x['accuracy']
  allowed = tol + sampling_allowance(ref['accuracy_se'], acc_2x['accuracy_se'])
  out['eot_doubled'] = _check(
      drop <= allowed, drop, f'PGD with {2 * runner.eot} EOT draws and {double.steps} steps: accuracy '
      f'{100 * acc_2x["accuracy"]:.2f}% vs {100 * ref["accuracy"]:.2f}% with {runner.eot} draws and {pgd.steps} '
      f'steps at eps={eps:g} (means over {acc_2x["passes"]} passes); the drop must be <= {allowed:.3g}')
  return out


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
