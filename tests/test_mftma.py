"""MFTMA (geometry/mftma.py): the anchor problems against the reference's
solver, the fast solver against the exact one, limits and relations the
theory fixes, invariances, and the float64 scope."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomrobust.geometry import mftma


def _reference_case():
  """Three low-rank, off-center manifolds in span coordinates (ones row
  appended) and 16 t vectors each: s [3, 10, 12], t [3, 16, 10]."""
  rng = np.random.default_rng(2026)
  p, d, m, n_t = 3, 9, 12, 16
  s = rng.standard_normal((p, d, 3)) @ rng.standard_normal((p, 3, m)) * 0.4 + 0.3 * rng.standard_normal((p, d, 1))
  s = np.concatenate([s, np.ones((p, 1, m))], axis=1)
  return s, rng.standard_normal((p, n_t, d + 1))


# (capacity, radius, dimension) per manifold of _reference_case, computed once
# with the reference implementation (neural_manifolds_replicaMFT,
# each_manifold_analysis_D1 with these t vectors; cvxopt QP at 1e-12).
_REFERENCE = {
    0.0: [[0.640366976614, 1.579759320393, 1.069650173304],
          [0.561715852921, 2.224260058161, 1.526948230088],
          [0.655213092771, 1.852171403242, 2.434004497469]],
    0.4: [[0.481935952825, 1.463276279952, 1.108010433979],
          [0.426988498969, 2.09833465063, 1.610814986481],
          [0.500498829926, 1.664358582283, 2.52755245647]],
}


def _geometry(s, t, kappa):
  with jax.enable_x64(True):
    gram = np.einsum('pdi,pdj->pij', s, s)
    b = np.einsum('pnd,pdm->pnm', t, s) + kappa
    alpha, stats = mftma.solve_anchor_duals(gram, b)
    out = mftma._all_geometry(jnp.asarray(s), jnp.asarray(t), jnp.asarray(alpha), kappa)
    return np.stack([np.asarray(a) for a in out], axis=1), stats


@pytest.mark.parametrize('kappa', [0.0, 0.4])
def test_anchor_geometry_matches_the_reference_solver(kappa):
  s, t = _reference_case()
  got, _ = _geometry(s, t, kappa)
  np.testing.assert_allclose(got, _REFERENCE[kappa], rtol=1e-8)


def _random_problems(rng, p=6, m=20, d=8, n_t=40, kappa=0.0):
  """Dual problems of low-rank manifolds (D+1 < M: rank-deficient Gram)."""
  s = rng.standard_normal((p, d, 2)) @ rng.standard_normal((p, 2, m)) + 0.5 * rng.standard_normal((p, d, 1))
  s = np.concatenate([s + 0.05 * rng.standard_normal((p, d, m)), np.ones((p, 1, m))], axis=1)
  t = rng.standard_normal((p, n_t, d + 1))
  return s, np.einsum('pdi,pdj->pij', s, s), np.einsum('pnd,pdm->pnm', t, s) + kappa


@pytest.mark.parametrize('kappa', [0.0, 0.3])
def test_fast_solver_agrees_with_the_exact_active_set_method(kappa):
  rng = np.random.default_rng(0)
  s, gram, b = _random_problems(rng, kappa=kappa)
  with jax.enable_x64(True):
    fast, stats = mftma.solve_anchor_duals(gram, b)
    p, n_t, m = b.shape
    exact = np.asarray(jax.vmap(mftma.nnls_gram)(jnp.repeat(jnp.asarray(gram), n_t, axis=0),
                                                 jnp.asarray(b.reshape(p * n_t, m)))).reshape(p, n_t, m)
    assert np.asarray(mftma.kkt_ok(jnp.asarray(gram)[:, None], jnp.asarray(b), jnp.asarray(exact))).all()
    assert np.asarray(mftma.kkt_ok(jnp.asarray(gram)[:, None], jnp.asarray(b), jnp.asarray(fast))).all()
  assert stats['problems'] == p * n_t and stats['unsolved'] == 0
  # The rank-deficient duals have many optimal alphas; S alpha (= t - v) is unique.
  np.testing.assert_allclose(np.einsum('pdm,pnm->pnd', s, fast), np.einsum('pdm,pnm->pnd', s, exact),
                             atol=1e-9)
  obj = lambda a: 0.5 * np.einsum('pni,pij,pnj->pn', a, gram, a) - np.sum(b * a, axis=2)
  np.testing.assert_allclose(obj(fast), obj(exact), atol=1e-9)


def test_exact_solver_matches_an_independent_nnls():
  optimize = pytest.importorskip('scipy.optimize')
  rng = np.random.default_rng(1)
  solve = jax.jit(mftma.nnls_gram)
  for _ in range(20):
    a = rng.standard_normal((15, 10)) @ np.diag(10.0 ** rng.uniform(-3, 1, 10))   # ill-conditioned
    t = rng.standard_normal(15)
    with jax.enable_x64(True):
      got = np.asarray(solve(jnp.asarray(a.T @ a), jnp.asarray(a.T @ t)))
    want, _ = optimize.nnls(a, t)
    np.testing.assert_allclose(a @ got, a @ want, atol=1e-8)
    assert (got >= 0).all()


def test_warm_started_exact_solver_drops_a_wrong_support():
  rng = np.random.default_rng(2)
  _, gram, b = _random_problems(rng, p=1, n_t=8)
  with jax.enable_x64(True):
    cold = jax.vmap(mftma.nnls_gram, in_axes=(None, 0))(gram[0], b[0])
    every = jnp.ones(b[0].shape, bool)   # a support far too large: most coordinates must leave
    warm = jax.vmap(mftma.nnls_gram, in_axes=(None, 0, 0))(gram[0], b[0], every)
    assert np.asarray(mftma.kkt_ok(jnp.asarray(gram[0]), jnp.asarray(b[0]), warm)).all()
  obj = lambda a: 0.5 * np.einsum('ni,ij,nj->n', a, gram[0], a) - np.sum(b[0] * a, axis=1)
  np.testing.assert_allclose(obj(np.asarray(warm)), obj(np.asarray(cold)), atol=1e-9)


def _manifolds(rng, p=8, n=60, m=15, spread=1.0):
  centers = 2.0 * rng.standard_normal((p, n, 1))
  return centers + spread * rng.standard_normal((p, n, m))


def test_manifolds_shrunk_to_points_reach_the_point_capacity_two():
  # A point manifold's anchor is the point itself: capacity 1 / E[max(t_0, 0)^2] = 2 at kappa 0.
  x = _manifolds(np.random.default_rng(3), spread=1e-6)
  out = mftma.analyze(x, n_t=2000, data_dimensions=False)
  assert out['capacity'] == pytest.approx(2.0, rel=0.05)
  assert out['radius'] < 1e-4


def test_capacity_follows_radius_and_dimension_on_random_data():
  # Large-D theory: capacity ~ (1 + R^-2) / D (PRX 2018); the reference README case satisfies it to ~2%.
  x = np.random.default_rng(4).standard_normal((10, 400, 30))
  out = mftma.analyze(x, n_t=200, data_dimensions=False)
  assert out['capacity'] == pytest.approx((1 + out['radius']**-2) / out['dimension'], rel=0.1)
  assert out['K'] >= 1 and 0 < out['center_correlation'] < 0.2


def test_invariant_to_rotation_scale_and_point_order():
  rng = np.random.default_rng(5)
  x = _manifolds(rng)
  base = mftma.analyze(x, n_t=100, data_dimensions=False)
  rotation = np.linalg.qr(rng.standard_normal((60, 60)))[0]
  order = rng.permutation(15)
  for changed in (np.einsum('ij,pjm->pim', rotation, x), 7.3 * x, x[:, :, order]):
    out = mftma.analyze(changed, n_t=100, data_dimensions=False)
    assert out['K'] == base['K']
    assert out['center_correlation'] == pytest.approx(base['center_correlation'], rel=1e-9)
    for key in ('capacity_all', 'radius_all', 'dimension_all'):
      np.testing.assert_allclose(out[key], base[key], rtol=1e-5)


def test_manifold_order_changes_only_the_sampling():
  rng = np.random.default_rng(6)
  x = _manifolds(rng)
  base = mftma.analyze(x, n_t=100, data_dimensions=False)
  out = mftma.analyze(x[::-1], n_t=100, data_dimensions=False)
  assert out['center_correlation'] == pytest.approx(base['center_correlation'], rel=1e-9)
  assert out['K'] == base['K']
  for key in ('capacity', 'radius', 'dimension'):
    assert out[key] == pytest.approx(base[key], rel=0.1)


def test_a_margin_lowers_every_capacity():
  x = _manifolds(np.random.default_rng(7))
  zero = mftma.analyze(x, kappa=0.0, n_t=100, data_dimensions=False)
  margin = mftma.analyze(x, kappa=0.5, n_t=100, data_dimensions=False)
  assert (np.array(margin['capacity_all']) < np.array(zero['capacity_all'])).all()


def test_runs_in_float64_and_leaves_the_callers_setting(monkeypatch):
  seen = []
  solve = mftma.solve_anchor_duals
  monkeypatch.setattr(mftma, 'solve_anchor_duals', lambda g, b: seen.append((g.dtype, b.dtype)) or solve(g, b))
  x = _manifolds(np.random.default_rng(8)).astype(np.float32)
  assert not jax.config.jax_enable_x64
  mftma.analyze(x, n_t=100, data_dimensions=False)
  assert seen == [(np.float64, np.float64)]
  assert not jax.config.jax_enable_x64
  assert jnp.ones(2).dtype == jnp.float32
  with jax.enable_x64(True):
    mftma.analyze(x, n_t=100, data_dimensions=False)
    assert jax.config.jax_enable_x64


def test_data_dimension_of_known_spectra():
  basis = np.linalg.qr(np.random.default_rng(9).standard_normal((30, 8)))[0]     # 8 orthonormal directions
  signs = np.array([[1, -1] * 8]).reshape(1, 16)
  points = basis @ np.kron(np.eye(8), np.ones((1, 2))) * signs                     # equal variance on each
  out = mftma.data_dimension(points)
  assert out['participation_ratio'] == pytest.approx(8.0, rel=1e-9)
  assert out['dimension_90'] == 7                                                 # 7/8 <= 0.9 < 8/8
  two = np.stack([2.0 * np.array([1, -1, 1, -1]), np.array([1, 1, -1, -1])])     # variances 4 and 1
  assert mftma.data_dimension(two)['participation_ratio'] == pytest.approx(25 / 17)


def test_center_objective_gradient_matches_autodiff():
  rng = np.random.default_rng(10)
  x = rng.standard_normal((9, 8))
  v = np.linalg.qr(rng.standard_normal((2, 8, 3)))[0]
  f, g = mftma._residual_cost(x, x @ x.T, v)

  def cost(vv):
    c = x @ vv
    r = np.sum(x**2, axis=1) - jnp.sum(c**2, axis=1)
    return 0.5 * jnp.sum((x @ x.T - c @ c.T)**2 / jnp.outer(r, r))

  with jax.enable_x64(True):
    for i in range(2):
      assert f[i] == pytest.approx(float(cost(jnp.asarray(v[i]))), rel=1e-10)
      np.testing.assert_allclose(g[i], np.asarray(jax.grad(cost)(jnp.asarray(v[i]))), rtol=1e-8, atol=1e-10)


def test_center_search_finds_a_planted_shared_direction():
  rng = np.random.default_rng(11)
  direction = rng.standard_normal((200, 1))
  centers = direction @ rng.standard_normal((1, 30)) * 5 + rng.standard_normal((200, 30))
  correlation, k, found = mftma.center_subspace(centers, seed=0)
  assert correlation > 0.5 and k >= 1
  np.testing.assert_allclose(found.T @ found, np.eye(k), atol=1e-8)
  unit = direction[:, 0] / np.linalg.norm(direction)
  assert np.linalg.norm(found.T @ unit) > 0.95         # the planted direction lies in the found subspace


def test_projection_and_input_errors():
  assert mftma.projection(100, 200) is None
  w = mftma.projection(300, 50, seed=1)
  assert w.shape == (300, 50)
  np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, rtol=1e-5)
  out = mftma.analyze(_manifolds(np.random.default_rng(12)), n_t=20, max_features=40)
  assert out['features'] == 40 and {'participation_ratio', 'dimension_90'} <= set(out)
  with pytest.raises(ValueError, match='one shape'):
    mftma.analyze([np.zeros((5, 3)), np.zeros((5, 4))])
  with pytest.raises(ValueError, match='at least 2 manifolds'):
    mftma.analyze(np.zeros((1, 5, 3)))
  with pytest.raises(ValueError, match='NaN'):
    mftma.analyze(np.full((2, 5, 3), np.nan))
  with pytest.raises(ValueError, match='kappa'):
    mftma.analyze(np.ones((2, 5, 3)), kappa=-1)


@pytest.mark.parametrize('kappa', [0.0, 0.5])
def test_analyze_is_the_checked_anchor_stage_on_its_own_problems(kappa):
  # analyze() = center removal + span reduction + the anchor stage checked against the reference above.
  x = _manifolds(np.random.default_rng(13))
  out = mftma.analyze(x, kappa=kappa, n_t=100, seed=3, data_dimensions=False)
  with jax.enable_x64(True):
    x64 = jnp.asarray(x, jnp.float64)
    x64 = x64 - jnp.mean(x64, axis=(0, 2), keepdims=True)
    _, k, shared = mftma.center_subspace(np.asarray(jnp.mean(x64, axis=2).T), 3)
    s, t, gram, b = mftma._anchor_problems(x64, jnp.asarray(shared), jax.random.fold_in(jax.random.key(3), 1),
                                          kappa, 100)
    s, t = np.asarray(s), np.asarray(t)
  assert k == out['K']
  np.testing.assert_allclose(np.asarray(b), np.einsum('pnd,pdm->pnm', t, s) + kappa, rtol=1e-12)
  np.testing.assert_allclose(s[:, -1], 1.0)
  np.testing.assert_allclose(np.mean(s[:, :-1], axis=2), 0.0, atol=1e-7)   # each manifold about its center
  # Its points are the data with the shared center directions removed, centered, in units of the center's norm.
  kept = np.asarray(x64) - np.einsum('nk,pkm->pnm', shared, np.einsum('nk,pnm->pkm', shared, np.asarray(x64)))
  center = kept.mean(axis=2, keepdims=True)
  np.testing.assert_allclose(np.linalg.norm(s[:, :-1], axis=1),
                             np.linalg.norm(kept - center, axis=1) / np.linalg.norm(center, axis=1), rtol=1e-8)
  want, _ = _geometry(s, t, kappa)
  np.testing.assert_allclose(np.stack([out['capacity_all'], out['radius_all'], out['dimension_all']], 1), want,
                             rtol=1e-10)


def test_whole_analysis_agrees_with_the_reference_on_correlated_centers():
  # 20 manifolds (4-dim clouds, 30 points, 300 features) around centers sharing a 2-d structure.
  # The reference's manifold_analysis_corr over 5 seeds gave (mean +- sd): capacity 0.3904 +- 0.0084,
  # radius 1.264 +- 0.017, dimension 3.128 +- 0.036, center correlation 0.43023, K = 2 (4 seeds), 3 (1).
  rng = np.random.default_rng(7)
  p, n, m = 20, 300, 30
  shared = rng.standard_normal((n, 2))
  centers = shared @ rng.standard_normal((2, p)) * 2 + rng.standard_normal((n, p))
  x = np.stack([centers[:, [i]] + 0.6 * rng.standard_normal((n, 4)) @ rng.standard_normal((4, m)) for i in range(p)])
  out = mftma.analyze(x, kappa=0.0, n_t=200, seed=0, data_dimensions=False)
  assert out['center_correlation'] == pytest.approx(0.430229020152418, rel=1e-9)
  assert out['K'] in (2, 3)
  assert out['capacity'] == pytest.approx(0.3904, abs=3 * 0.0106)
  assert out['radius'] == pytest.approx(1.264, abs=3 * 0.017)
  assert out['dimension'] == pytest.approx(3.128, abs=3 * 0.043)
