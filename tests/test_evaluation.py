"""The shared evaluation: worst case, batch invariance, caching, and sanity checks
that pass an honest model and flag gradient-masked ones."""

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
import ml_collections
import numpy as np
import optax
import pytest

from geomrobust import attacks
from geomrobust import config as config_lib
from geomrobust import evaluation
from geomrobust import parallel
from geomrobust.evaluation import recipes, sanity, suite

D, C, N = 20, 4, 96


def _mlp(params, x, rng=None):
  del rng
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params['w1'] + params['b1'])
  return h @ params['w2'] + params['b2']


@pytest.fixture(scope='module')
def honest():
  """A 20-32-4 tanh MLP trained on 4 Gaussian blobs in [0, 1]^20: (params, x, y)."""
  rng = np.random.default_rng(0)
  centers = rng.uniform(0.25, 0.75, (C, D))
  y = np.arange(4 * N) % C
  x = np.clip(centers[y] + rng.normal(0, 0.08, (4 * N, D)), 0, 1).astype(np.float32)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {'w1': jax.random.normal(k1, (D, 32)) / np.sqrt(D), 'b1': jnp.zeros(32),
            'w2': jax.random.normal(k2, (32, C)) / np.sqrt(32), 'b2': jnp.zeros(C)}
  tx = optax.adam(0.02)

  @jax.jit
  def step(params, opt):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(_mlp(p, x), y).mean()
    updates, opt = tx.update(jax.grad(loss)(params), opt)
    return optax.apply_updates(params, updates), opt

  opt = tx.init(params)
  for _ in range(300):
    params, opt = step(params, opt)
  return params, jnp.asarray(x[:N]), jnp.asarray(y[:N], jnp.int32)


def _ev(**changes):
  ev = config_lib.default_config().eval
  evaluation.profiles.apply_profile(ev, 'mnist_linf')
  ev.update(dict(eps=(0.05, 0.1, 0.2), attacks=('pgd', 'apgd_dlr'), pgd_steps=20, pgd_restarts=2,
                 apgd_steps=20, noise_samples=4, batch_size=32, trajectories=0))
  ev.update(changes)
  return ev


def _run(apply_fn, params, x, y, ev, **kw):
  return evaluation.evaluate(apply_fn, params, x, y, ev, parallel.make_mesh(1), log=lambda s: None, **kw)


# Gradient masking the checks must see through. Both keep the honest model's
# decisions on clean inputs, only their gradients are broken.
def _rounded(params, x, rng=None):
  """Inputs quantised to 8 levels: the input gradient is exactly zero."""
  return _mlp(params, jnp.round(x * 8) / 8, rng)


def _saturated(params, x, rng=None):
  """log softmax at temperature 1e4: confident CE gradients underflow to zero."""
  return jax.nn.log_softmax(1e4 * _mlp(params, x, rng))


def test_honest_model_passes_every_check(honest):
  params, x, y = honest
  res = _run(_mlp, params, x, y, _ev(trajectories=4, pgd_steps=40, pgd_restarts=4, apgd_steps=40))
  failed = {k: v for k, v in res['sanity'].items() if not v['passed']}
  assert not failed, failed
  assert set(res['sanity']) == {'monotone_in_eps', 'iterative_le_single_step', 'gradient_le_noise',
                                'eps0_equals_clean', 'large_eps_to_zero', 'doubled_budget', 'batch_size_invariance'}
  assert res['clean_accuracy'] > 0.9
  worst = {r['eps']: r['accuracy'] for r in res['robustness'] if r['attack'] == 'worst_case'}
  assert worst[0.2] < worst[0.05] < res['clean_accuracy']  # the grid spans the interesting range
  # Convergence traces: [examples, restarts, steps + 1] per iterative attack.
  conv = {c['attack']: np.asarray(c['losses']) for c in res['convergence']}
  assert conv["pgd"].shape == (4, 4, 41) and conv["apgd_dlr"].shape == (4, 1, 41)
  assert (conv['apgd_dlr'].max(-1) >= conv['apgd_dlr'][..., 0]).all()


@pytest.mark.parametrize('masked,expected', [
    (_rounded, {'large_eps_to_zero', 'gradient_le_noise'}),
    # Masking by scale: its CE gradients vanish, so CE attacks fall behind
    # noise (flagged); the large-eps check's margin PGD still reaches ~0 (the
    # evaluation's own margin / DLR attacks are not fooled by scale either).
    (_saturated, {'gradient_le_noise'}),
])
def test_gradient_masking_is_flagged(honest, masked, expected):
  params, x, y = honest
  res = _run(masked, params, x, y, _ev())
  failed = {k for k, v in res['sanity'].items() if not v['passed']}
  assert expected <= failed, res['sanity']


def test_worst_case_is_the_per_example_minimum_over_attacks(honest):
  params, x, y = honest
  res = _run(_mlp, params, x, y, _ev(sanity=False, attacks=('fgsm', 'noise', 'pgd')))
  m = res['masks']
  for eps in (0.05, 0.1, 0.2):
    expected = m['clean'] & m[f'fgsm@{eps:g}'] & m[f'noise@{eps:g}'] & m[f'pgd@{eps:g}']
    np.testing.assert_array_equal(m[f'worst_case@{eps:g}'], expected)
    row = next(r for r in res['robustness'] if r['attack'] == 'worst_case' and r['eps'] == eps)
    assert row['accuracy'] == pytest.approx(expected.mean())
  assert 'eps0_equals_clean' not in res['sanity']  # sanity=False: only the checks read off the grid


def test_the_cascade_gives_the_all_examples_worst_case(honest):
  """Iterative attacks on the survivors only: the same per-example worst case
  (and every attack's verdicts, accumulated) as every attack on every example."""
  params, x, y = honest
  attacks_ = ('pgd', 'pgd_margin', 'apgd_ce', 'apgd_dlr', 'apgd_t', 'square')
  budget = dict(apgd_targets=3, square_queries=200)
  full = _run(_mlp, params, x, y, _ev(cascade=False, attacks=attacks_, **budget))
  cascade = _run(_mlp, params, x, y, _ev(cascade=True, attacks=attacks_, **budget))
  order = ('fgsm', 'noise') + attacks_
  for eps in (0.05, 0.1, 0.2):
    np.testing.assert_array_equal(cascade['masks'][f'worst_case@{eps:g}'], full['masks'][f'worst_case@{eps:g}'])
    alive = full['masks']['clean'].copy()
    for name in order:
      alive &= full['masks'][f'{name}@{eps:g}']
      row = next(r for r in cascade['robustness'] if r['attack'] == name and r['eps'] == eps)
      if name in attacks_:  # cumulative: robust after this attack and every one before it
        assert row['cascade'] and row['accuracy'] == pytest.approx(alive.mean()), (name, eps)
        np.testing.assert_array_equal(cascade['masks'][f'{name}@{eps:g}'], alive)
      else:  # FGSM and noise run on every example: their own accuracy
        assert 'cascade' not in row and row['accuracy'] == pytest.approx(full['masks'][f'{name}@{eps:g}'].mean())
  # Faced: what the attacks before it left; the iterative ones faced fewer and fewer examples.
  faced = [r['attacked'] for r in cascade['robustness'] if r.get('cascade') and r['eps'] == 0.1]
  assert faced == sorted(faced, reverse=True) and faced[0] < N
  # The checks keep their names and verdicts (an iterative attack on every example stands in
  # for the grid's per-attack rows).
  assert set(cascade['sanity']) == set(full['sanity'])
  assert all(v['passed'] for v in cascade['sanity'].values()), cascade['sanity']
  assert 'every example' in cascade['sanity']['iterative_le_single_step']['detail']
  assert 'gradient_free' in cascade['sanity']
  row = next(r for r in cascade['robustness'] if r['attack'] == 'apgd_t')
  assert row['targets'] == 3 and next(r for r in cascade['robustness'] if r['attack'] == 'square')['queries'] == 200


def test_square_flags_gradient_masking_the_gradient_attacks_miss(honest):
  """On inputs rounded to 8 levels (zero input gradient) the gradient attacks break almost
  nothing beyond what random starts do; Square breaks what they left: gradient_free fails.
  The honest model's run in the cascade test above passes it."""
  params, x, y = honest
  res = _run(_rounded, params, x, y, _ev(attacks=('pgd', 'apgd_ce', 'square'), square_queries=300, sanity=False))
  check = res['sanity']['gradient_free']
  assert not check['passed'] and 'masked' in check['detail'], check
  assert check['value'] > 0.2


def test_gradient_free_check_thresholds():
  """Square may add the tolerance, or a tenth of what the other attacks broke, whichever is larger."""
  n = 1000
  clean = suite.Verdicts(np.ones(n, bool))
  rl = recipes.resolve(_ev(attacks=('pgd', 'square'), sanity=False))

  def run(g_broke, s_extra):
    pgd = np.ones(n, bool)
    pgd[:g_broke] = False
    sq = pgd.copy()
    sq[g_broke:g_broke + s_extra] = False
    return sanity.gradient_free_check(rl, {'clean': clean, 'pgd@0.1': suite.Verdicts(pgd),
                                           'square@0.1': suite.Verdicts(sq)}, n)['gradient_free']

  assert run(0, 5)['passed'] and not run(0, 6)['passed']          # the tolerance: 0.5% of 1000
  assert run(400, 40)['passed'] and not run(400, 41)['passed']    # 10% of the 40% broken


def test_verdicts_do_not_depend_on_batch_size_subset_or_grid(honest):
  params, x, y = honest
  mesh = parallel.make_mesh(1)
  (pgd,) = [r for r in recipes.resolve(_ev(sanity=False, attacks=('pgd',)))]
  idx = jnp.arange(N, dtype=jnp.int32)
  key = suite.attack_key(0, 'pgd', 0.1)
  full = suite.correct_fn(_mlp, pgd, 32, mesh)(params, x, y, idx, key, jnp.float32(0.1), None)
  other = suite.correct_fn(_mlp, pgd, 24, mesh)(params, x, y, idx, key, jnp.float32(0.1), None)
  np.testing.assert_array_equal(full, other)
  sub = np.arange(5, N, 3)
  part = suite.correct_fn(_mlp, pgd, 32, mesh)(params, x[sub], y[sub], idx[sub], key, jnp.float32(0.1), None)
  np.testing.assert_array_equal(np.asarray(full)[sub], part)
  # A cell's key depends on (attack, eps) only, not on the rest of the grid.
  a = _run(_mlp, params, x, y, _ev(sanity=False, attacks=('pgd',), eps=(0.1,)))['masks']['pgd@0.1']
  b = _run(_mlp, params, x, y, _ev(sanity=False, attacks=('pgd',), eps=(0.05, 0.1)))['masks']['pgd@0.1']
  np.testing.assert_array_equal(a, b)


# Float noise the batch-size check must forgive. XLA tiles a vmapped batch of
# B examples differently for different B, so a gradient that is itself at the
# rounding level (a confident example's CE gradient) can change sign with B
# while the logits stay bit-identical. `_rounding_noise` makes that
# deterministic: the identity, except that under a vmap of B examples the
# gradient flowing back through it gets NOISE * (a +-1 pattern seeded by B).
NOISE = 1e-7  # ~ float32 rounding of an O(1) gradient term


@custom_vmap
def _batch_pattern(g):
  return g


@_batch_pattern.def_vmap
def _batch_pattern_rule(axis_size, in_batched, g):
  if not in_batched[0]:
    return g, False
  pattern = np.random.default_rng(axis_size).choice([-1.0, 1.0], g.shape[1:])
  return g + NOISE * jnp.asarray(pattern, g.dtype), True


@jax.custom_vjp
def _rounding_noise(x):
  return x


_rounding_noise.defvjp(lambda x: (x, None), lambda _, g: (_batch_pattern(g),))


def _confident(params, x, rng=None):
  """The honest MLP with its logits doubled (the same decisions, more confident):
  the CE gradient of many examples falls to ~1e-7 or below, where its sign is the batch's noise."""
  return 2.0 * _mlp(params, _rounding_noise(x), rng)


def test_float_noise_verdict_flips_pass_the_batch_size_check(honest):
  params, x, y = honest
  ev = _ev(attacks=('pgd',), check_eps=0.1, cascade=False)  # the grid's own PGD verdicts on every example
  res = _run(_confident, params, x, y, ev)
  check = res['sanity']['batch_size_invariance']
  # The old check (at most one verdict may change) fails this model: several
  # PGD verdicts change between batch sizes 32 and 16 ...
  (pgd,) = [r for r in recipes.resolve(_ev(attacks=('pgd',), sanity=False))]
  mesh, idx, key = parallel.make_mesh(1), jnp.arange(N, dtype=jnp.int32), suite.attack_key(0, 'pgd', 0.1)

  def pgd_verdicts(fn):
    return [np.asarray(suite.correct_fn(fn, pgd, bs, mesh)(params, x, y, idx, key, jnp.float32(0.1), None))
            for bs in (32, 16)]

  verdicts = pgd_verdicts(_confident)
  flips = np.flatnonzero(verdicts[0] != verdicts[1])
  assert len(flips) >= 2, flips
  np.testing.assert_array_equal(verdicts[0], res['masks']['pgd@0.1'])
  # ... while the logits are bit-identical and every flip is at a float-noise gradient.
  assert check['passed'], check
  assert 'Clean scores: max difference 0, 0 of the score scale' in check['detail'], check
  assert f'verdicts at eps=0.1: {len(flips)} change, {len(flips)} of them at the' in check['detail'], check
  assert '0 elsewhere' in check['detail'], check
  # Without the noise (the same model, its gradient exact at every batch size) nothing flips.
  exact = pgd_verdicts(lambda p, xx, r=None: 2.0 * _mlp(p, xx, r))
  np.testing.assert_array_equal(exact[0], exact[1])


def test_batch_probe_sees_the_attack_start_and_first_step(honest):
  """The probe behind the batch-size check mirrors how PGD starts: the same
  start points and the same first step as the attack itself, and the clean logits."""
  params, x, y = honest
  (pgd,) = [r for r in recipes.resolve(_ev(attacks=('pgd',), sanity=False))]
  eps, mesh, idx = 0.1, parallel.make_mesh(1), jnp.arange(N, dtype=jnp.int32)
  rng = suite.attack_key(0, 'pgd', eps)
  scores, starts, directions = suite.probe_fn(_mlp, pgd, 32, mesh)(params, x, y, idx, suite.attack_key(0, 'clean', 0.0),
                                                                   rng, jnp.float32(eps))
  assert starts.shape == (N, pgd.restarts) and directions.shape == (N, pgd.restarts, D)
  np.testing.assert_allclose(scores, _mlp(params, x), rtol=1e-6, atol=1e-6)
  keys = jax.vmap(jax.random.fold_in, (0, None))(jax.vmap(jax.random.fold_in, (None, 0))(rng, idx), 1)
  logits_fn = lambda xx, r: _mlp(params, xx, r)
  one = lambda xi, yi, ki, **kw: attacks.pgd(logits_fn, xi[None], yi[None], ki, eps=eps, restarts=1, **kw)[0]
  x0 = jax.vmap(lambda xi, yi, ki: one(xi, yi, ki, steps=0))(x, y, keys)  # restart 0's start
  np.testing.assert_array_equal(starts[:, 0], jax.vmap(suite.fingerprint)(x0))
  # One small step from there moves each coordinate away from the ball's and the box's faces by the probe's sign.
  step = 1e-2 * eps
  x1 = jax.vmap(lambda xi, yi, ki: one(xi, yi, ki, steps=1, step_size=step, return_last=True))(x, y, keys)
  free = (np.abs(np.asarray(x0 - x)) < eps - step) & (np.asarray(x0) > step) & (np.asarray(x0) < 1 - step)
  assert free.mean() > 0.5
  np.testing.assert_array_equal(np.sign(np.asarray(x1 - x0))[free], np.asarray(directions[:, 0])[free])


def test_batch_size_check_tolerances():
  """The check's arithmetic on measured arrays: what it forgives and what it does not."""
  n = 10
  s = np.tile(np.array([[4.0, -1.0, 0.5]], np.float32), (n, 1))
  s[1] = [2.0, 2.0, 0.0]  # a top-two tie
  v = np.ones(n, bool)
  same = np.ones(n, bool)
  no_noise = np.zeros(n)

  def check(s_b=s, starts=same, noise=no_noise, v_b=v):
    return sanity.batch_size_check((s, s_b), starts, noise, (v, v_b), sizes=(10, 5), attack='pgd', eps=0.1)

  assert check()['passed']
  # Scores: rounding (1e-6 of the scale) passes; 1e-3 of it (a batch-dependent model) fails.
  assert check(s + 4e-6)['passed'] and not check(s + 4e-3)['passed']
  # A prediction may change at a tie within the tolerance (elsewhere a change needs
  # scores beyond it).
  tied = s.copy()
  tied[1] = [2.0, 2.0 + 1e-4, 0.0]
  assert check(tied)['passed'] and '1 predictions change (1 at a top-two tie' in check(tied)['detail']
  # Starts must be identical.
  assert not check(starts=np.arange(n) != 3)['passed']
  # Verdicts: one unexplained change is allowed, two are not, unless their first steps differ.
  one, two = v.copy(), v.copy()
  one[4] = False
  two[4:6] = False
  assert check(v_b=one)['passed'] and not check(v_b=two)['passed']
  noisy = no_noise.copy()
  noisy[4:6] = 2.0  # a sign of the first step differs
  assert check(v_b=two, noise=noisy)['passed']
  assert check(v_b=two, noise=noisy)['value'] == 0.0 and check(v_b=two)['value'] == pytest.approx(0.2)
  tie_flip = v.copy()
  tie_flip[[1, 4]] = False  # example 1 is a top-two tie: its verdict is rounding too
  assert check(v_b=tie_flip)['passed']


def test_compiled_attacks_are_reused_across_models(honest):
  params, x, y = honest
  ev = _ev(sanity=False, attacks=('pgd',))
  traces = []

  def counted(p, xx, r):  # runs once per trace, never per call
    traces.append(1)
    return _mlp(p, xx, r)

  evaluator = evaluation.Evaluator()
  evaluator.evaluate(counted, params, x, y, ev, parallel.make_mesh(1), log=lambda s: None)
  before = (evaluator.compiled, len(traces))
  assert before[1] > 0
  other = jax.tree.map(lambda a: a * 1.01, params)  # another model of the same architecture
  res = evaluator.evaluate(counted, other, x, y, ev, parallel.make_mesh(1), log=lambda s: None)
  assert (evaluator.compiled, len(traces)) == before
  # ... and it is evaluated, not a cached answer: the same numbers as a fresh evaluator.
  fresh = _run(_mlp, other, x, y, ev)
  np.testing.assert_array_equal(res['masks']['pgd@0.1'], fresh['masks']['pgd@0.1'])
  # A fresh evaluator compiles anew: nothing is cached at module level.
  evaluation.Evaluator().evaluate(counted, other, x, y, ev, parallel.make_mesh(1), log=lambda s: None)
  assert len(traces) > before[1]


def _noisy(params, x, rng):
  """A stochastic model: Gaussian noise on the hidden layer, drawn from rng."""
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params['w1'] + params['b1'])
  h = h + 0.3 * jax.random.normal(rng, h.shape)
  return h @ params['w2'] + params['b2']


def test_stochastic_models_get_eot_and_their_own_checks(honest):
  params, x, y = honest
  with pytest.raises(ValueError, match='eot_samples >= 2'):
    _run(_noisy, params, x, y, _ev(eot_samples=1), stochastic=True)
  with pytest.raises(ValueError, match='eval.passes >= 5'):
    _run(_noisy, params, x, y, _ev(eot_samples=4, passes=4), stochastic=True)
  res = _run(_noisy, params, x, y, _ev(eot_samples=4, attacks=('pgd',), pgd_restarts=1), stochastic=True)
  assert {r['eot'] for r in res['robustness']} == {4}
  assert {'frozen_noise_attack', 'eot_doubled'} <= set(res['sanity'])
  failed = {k: v['detail'] for k, v in res['sanity'].items() if not v['passed']}
  assert not failed, failed   # an honest noisy model passes every check
  # Accuracy over 5 passes: mean, std, majority vote; the worst case too.
  for r in res['robustness']:
    assert r['passes'] == 5 and r['accuracy_std'] >= 0 and 0 <= r['majority_vote_accuracy'] <= 1, r
  assert res['clean_passes'] == 5 and res['clean_accuracy_std'] >= 0
  assert any(r['accuracy_std'] > 0 for r in res['robustness'])   # the noise moves some attacked verdicts
  worst = {r['eps']: r for r in res['robustness'] if r['attack'] == 'worst_case'}
  for r in res['robustness']:
    assert worst[r['eps']]['accuracy'] <= r['accuracy'] + 1e-9
  assert res['sanity']['eps0_equals_clean']['passed']  # same draws for the clean and the eps=0 verdicts
  assert res['clean_accuracy'] > 0.8
  # The EOT attack really attacks: at eps 0.1 PGD leaves ~1/3 of what
  # random noise of the same size leaves (~all), at eps 0.2 nothing.
  acc = {(r['attack'], r['eps']): r['accuracy'] for r in res['robustness']}
  assert acc['pgd', 0.1] < min(res['clean_accuracy'], acc['noise', 0.1]) - 0.3, acc
  assert acc['pgd', 0.2] < 0.1, acc


def _tiny_signal(params, x, rng):
  """Huge noise on a tiny signal: the prediction is nearly a coin flip, so an
  attack barely moves its accuracy; what "robustness" it has is randomness."""
  return 1e-3 * _mlp(params, x) + 3.0 * jax.random.normal(rng, (x.shape[0], C))


def test_frozen_noise_check_flags_robustness_that_is_only_randomness(honest):
  params, x, y = honest
  ev = _ev(eot_samples=4, attacks=('pgd',), pgd_restarts=1, eps=(0.1,))
  res = _run(_tiny_signal, params, x, y, ev, stochastic=True)
  check = res['sanity']['frozen_noise_attack']
  assert not check['passed'] and 'barely depends on the input' in check['detail'], check
  # (The honest noisy model passes it: test_stochastic_models_get_eot_and_their_own_checks.)


def test_frozen_noise_verdicts_use_the_draw_the_attack_used(honest):
  params, x, y = honest
  loud = lambda p, xx, rng: _mlp(p, xx) + 3.0 * jax.random.normal(rng, (xx.shape[0], C))
  ev = _ev(eot_samples=2, attacks=('pgd',), pgd_restarts=1, eps=(0.1,), sanity=False)
  runner = suite._Runner(evaluation.Evaluator(), loud, params, x, y, ev, parallel.make_mesh(1), 2, True, passes=5)
  key = jax.random.key(7)
  recipe = recipes.resolve(ev, 2)[-1]
  v, x_adv = runner.verdicts(recipe, 0.1, model_key=key, with_inputs=True)
  # Each example alone with the frozen key: the call the attack made.
  alone = np.array([int(jnp.argmax(loud(params, jnp.asarray(xa)[None], key)[0])) for xa in x_adv])
  np.testing.assert_array_equal(v.mask, alone == np.asarray(y))
  assert v.passes is None     # frozen: one deterministic pass


def test_pass_statistics_and_the_stochastic_worst_case():
  # 4 examples x 5 passes; cell b gets example 0 right less often than cell a.
  a = suite.Verdicts(np.array([True, True, False, True]),
                     np.array([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0], [1, 1, 0, 1, 0]], bool))
  b = suite.Verdicts(np.array([False, True, False, True]),
                     np.array([[0, 1, 0, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool))
  stats = suite.accuracy_stats(a)
  per_pass = a.passes.mean(0)
  assert stats['accuracy'] == pytest.approx(per_pass.mean())
  assert stats['accuracy_std'] == pytest.approx(per_pass.std(ddof=1))
  assert stats['majority_vote_accuracy'] == 0.75 and stats['passes'] == 5
  q = a.passes.mean(1)
  assert stats['accuracy_se'] == pytest.approx(np.sqrt(np.sum(q * (1 - q)) / 4) / 4)
  w = suite.worst_case([a, b])
  np.testing.assert_array_equal(w.passes, np.stack([b.passes[0], a.passes[1], b.passes[2], a.passes[3]]))
  np.testing.assert_array_equal(w.mask, [False, True, False, True])
  # Deterministic verdicts: the AND of the masks.
  np.testing.assert_array_equal(suite.worst_case([suite.Verdicts(a.mask), suite.Verdicts(b.mask)]).mask,
                                a.mask & b.mask)


def test_majority_vote_is_the_most_frequent_label_over_passes():
  def apply_fn(params, x, key):   # a label drawn from the key: 0, 1 or 2
    return jax.nn.one_hot(jax.random.randint(key, (x.shape[0],), 0, 3), C) * 5.0

  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(64))
  x, y = jnp.zeros((64, 3)), jnp.asarray(np.arange(64) % 3, jnp.int32)
  correct, majority = suite._pass_verdicts(apply_fn, None, x, y, keys, 7)
  labels = np.array([[int(jnp.argmax(apply_fn(None, x[:1], jax.random.fold_in(k, p))[0])) for p in range(7)]
                     for k in keys])
  np.testing.assert_array_equal(correct, labels == np.asarray(y)[:, None])
  mode = np.array([np.argmax(np.bincount(row, minlength=C)) for row in labels])
  np.testing.assert_array_equal(majority, mode == np.asarray(y))
  assert 0 < majority.mean() < 1 and not np.array_equal(majority, correct[:, 0])


def test_grid_checks_allow_for_the_sampling_error_of_stochastic_rows():
  rows = [dict(attack='fgsm', eps=0.1, accuracy=0.50), dict(attack='fgsm', eps=0.2, accuracy=0.52)]
  assert not sanity.grid_checks(0.9, rows, [], 1000)['monotone_in_eps']['passed']
  noisy = [dict(r, accuracy_se=0.01) for r in rows]   # a 2-point rise is within 3 standard errors
  assert sanity.grid_checks(0.9, noisy, [], 1000, clean_se=0.01)['monotone_in_eps']['passed']


def test_check_eps_is_where_the_worst_case_is_half_of_clean():
  rows = [dict(attack='worst_case', eps=e, accuracy=a) for e, a in ((0.1, 0.9), (0.2, 0.55), (0.3, 0.1))]
  ev = ml_collections.ConfigDict(dict(check_eps=0.0))
  assert sanity.choose_check_eps(ev, 0.98, rows) == 0.2
  ev.check_eps = 0.3
  assert sanity.choose_check_eps(ev, 0.98, rows) == 0.3


def test_random_noise_may_rise_with_eps_within_its_sampling_error():
  recipe_list = recipes.resolve(_ev(attacks=('pgd',)))   # sanity adds fgsm and noise
  rows = [dict(attack='noise', eps=0.1, accuracy=0.805), dict(attack='noise', eps=0.2, accuracy=0.835),
          dict(attack='pgd', eps=0.1, accuracy=0.5), dict(attack='pgd', eps=0.2, accuracy=0.3),
          dict(attack='fgsm', eps=0.1, accuracy=0.6), dict(attack='fgsm', eps=0.2, accuracy=0.55)]
  assert sanity.grid_checks(0.9, rows, recipe_list, n=200)['monotone_in_eps']['passed']
  rows[1] = dict(attack='noise', eps=0.2, accuracy=0.95)   # +14.5 points: beyond three standard errors (10.6)
  assert not sanity.grid_checks(0.97, rows, recipe_list, n=200)['monotone_in_eps']['passed']
  rows[1] = dict(attack='noise', eps=0.2, accuracy=0.805)
  rows[3] = dict(attack='pgd', eps=0.2, accuracy=0.53)    # an attack's curve gets no such allowance
  assert not sanity.grid_checks(0.9, rows, recipe_list, n=200)['monotone_in_eps']['passed']


def test_grid_checks_flag_a_non_monotone_curve_and_a_weak_iterative_attack():
  rows = [dict(attack='fgsm', eps=0.1, accuracy=0.5), dict(attack='fgsm', eps=0.2, accuracy=0.3),
          dict(attack='pgd', eps=0.1, accuracy=0.2), dict(attack='pgd', eps=0.2, accuracy=0.4)]
  recipe_list = recipes.resolve(_ev(attacks=('pgd',), sanity=False))
  checks = sanity.grid_checks(0.9, rows, recipe_list, n=1000)
  assert not checks['monotone_in_eps']['passed'] and checks['monotone_in_eps']['value'] == pytest.approx(0.2)
  assert not checks['iterative_le_single_step']['passed']
  assert checks['iterative_le_single_step']['value'] == pytest.approx(0.1)
  # With several iterative attacks the strongest one per eps counts: a weak
  # PGD beside an APGD as strong as FGSM is no sign of masking; all weak is.
  two = recipes.resolve(_ev(attacks=('pgd', 'apgd_ce'), sanity=False))
  strong = rows + [dict(attack='apgd_ce', eps=0.1, accuracy=0.2), dict(attack='apgd_ce', eps=0.2, accuracy=0.29)]
  assert sanity.grid_checks(0.9, strong, two, n=1000)['iterative_le_single_step']['passed']
  weak = rows + [dict(attack='apgd_ce', eps=0.1, accuracy=0.2), dict(attack='apgd_ce', eps=0.2, accuracy=0.35)]
  check = sanity.grid_checks(0.9, weak, two, n=1000)['iterative_le_single_step']
  assert not check['passed'] and check['value'] == pytest.approx(0.05) and 'best iterative at eps=0.2' in check['detail']


@pytest.mark.parametrize('changes,message', [
    (dict(attacks=('pgd', 'cw')), "unknown eval.attacks entry 'cw'; available: fgsm, noise, pgd"),
    (dict(attacks=('pgd', 'pgd')), 'lists an attack twice'),
    (dict(attacks=()), 'eval.attacks is empty'),
    (dict(pgd_steps=0), "eval.pgd_steps=0"),
    (dict(norm='l1'), "unknown eval.norm 'l1'"),
    (dict(attacks=('square',), square_queries=0), 'eval.square_queries=0'),
    (dict(attacks=('apgd_t',), apgd_targets=0), 'eval.apgd_targets=0'),
])
def test_bad_eval_configs_are_one_clear_error(changes, message):
  with pytest.raises(ValueError, match=message):
    recipes.resolve(_ev(**changes))


def test_sanity_adds_fgsm_and_noise_and_profiles_apply_first():
  names = [r.name for r in recipes.resolve(_ev(attacks=('apgd_ce',)))]
  assert names == ['fgsm', 'noise', 'apgd_ce']
  cfg = config_lib.apply_overrides(config_lib.default_config(),
                                   [('eval.pgd_steps', '7'), ('eval.profile', 'quick')])
  assert cfg.eval.profile == 'quick' and cfg.eval.pgd_steps == 7 and cfg.eval.attacks == ('fgsm', 'noise', 'pgd',
                                                                                           'apgd_dlr')
  # Square goes after every gradient attack whatever the order given (the gradient_free check).
  assert [r.name for r in recipes.resolve(_ev(attacks=('square', 'apgd_t')))] == ['fgsm', 'noise', 'apgd_t', 'square']
  aa = config_lib.apply_overrides(config_lib.default_config(), [('eval.profile', 'autoattack')])
  assert [r.name for r in recipes.resolve(aa.eval)] == ['fgsm', 'noise', 'apgd_ce', 'apgd_t', 'square']
  assert {r.name: r.budget for r in recipes.resolve(aa.eval)}['apgd_t'] == {'targets': 9}
  with pytest.raises(config_lib.ConfigError, match="unknown eval.profile 'strong'"):
    config_lib.apply_overrides(config_lib.default_config(), [('eval.profile', 'strong')])
