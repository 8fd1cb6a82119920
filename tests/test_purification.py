"""Feature purification: the models, the purification and robust_linear methods, the measurements, the probe."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import config as config_lib
from geomrobust import data
from geomrobust import evaluation
from geomrobust import experiment
from geomrobust import methods
from geomrobust import models
from geomrobust import parallel
from geomrobust.geometry import purification as geometry
from geomrobust.methods import base
from geomrobust.probes import purification as probe_lib

DIM = 16


def _config(method=None, model=None, dim=DIM, **data_opts):
  cfg = config_lib.default_config()
  cfg.dataset = 'sparse_coding'
  cfg.data.sparse_coding = ml_collections.ConfigDict(dict(dim=dim, sparsity=3, test_examples=256, **data_opts))
  cfg.model = ml_collections.ConfigDict(model or dict(name='symmetric_relu', width=0, init_std=0.01, threshold=0.5,
                                                      smooth=0.0))
  cfg.method = ml_collections.ConfigDict(method or dict(name='purification', clean_steps=5, adv_steps=5, tau=0.3))
  return cfg


def _method(cfg):
  return methods.build_method(cfg, models.build_model(cfg.model, 2), 2)


def _source(cfg):
  return data.make_source('sparse_coding', cfg.data.sparse_coding)


# --- the models -----------------------------------------------------------------------


@pytest.mark.parametrize('smooth', [0.0, 0.3])
def test_the_symmetric_network_is_odd_and_matches_its_formula(smooth):
  net = models.build_model(ml_collections.ConfigDict(dict(name='symmetric_relu', width=24, init_std=0.5,
                                                          threshold=0.5, smooth=smooth)), 2)
  x = jax.random.normal(jax.random.key(0), (32, DIM))
  variables = net.init(jax.random.key(1), x)
  (logits, (h,)), _ = net.apply(variables, x), None
  neg = net.apply(variables, -x)[0]
  np.testing.assert_allclose(neg, -logits, atol=1e-5)             # f(-x) = -f(x)
  np.testing.assert_allclose(logits[:, 0], -logits[:, 1], atol=1e-6)
  w = np.asarray(variables['params']['w'], np.float64)
  b = 0.5 * np.linalg.norm(w, axis=0)
  pre = np.asarray(x, np.float64) @ w
  act = lambda z: np.maximum(z, 0) if not smooth else np.where(z <= 0, 0, np.where(z < smooth, z * z / (2 * smooth),
                                                                                      z - smooth / 2))
  f = (act(pre - b) - act(-pre - b)).sum(1)
  np.testing.assert_allclose(logits[:, 1] - logits[:, 0], f, rtol=1e-4, atol=1e-5)
  assert h.shape == (32, 24)
  # The threshold passes no gradient: d f / d w only through <w, x>.
  grad = jax.grad(lambda p: net.apply({**variables, 'params': p}, x)[0][:, 1].sum())(variables['params'])['w']
  active = (pre - b > 0) | (-pre - b > 0)
  if not smooth:
    expected = np.asarray(x, np.float64).T @ (0.5 * active)   # d f / d<w, x> = 1 on either side
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


def test_two_class_models_refuse_other_class_counts():
  with pytest.raises(ValueError, match='two-class model'):
    models.build_model(ml_collections.ConfigDict(dict(name='symmetric_relu')), 10)
  with pytest.raises(ValueError, match='two-class model'):
    models.build_model(ml_collections.ConfigDict(dict(name='poly2')), 3)


def test_poly2_is_a_degree_two_polynomial():
  net = models.build_model(ml_collections.ConfigDict(dict(name='poly2', init_std=0.3)), 2)
  x = jax.random.normal(jax.random.key(0), (8, DIM))
  v = net.init(jax.random.key(1), x)
  p = v['params']
  f = lambda xx: np.asarray(net.apply(v, xx)[0][:, 1] * 2)
  expected = np.asarray(x @ p['linear'] + jnp.einsum('bi,ij,bj->b', x, p['quadratic'], x) + p['bias'])
  np.testing.assert_allclose(f(x), expected, rtol=1e-4, atol=1e-5)
  # Third differences along a line vanish for a quadratic.
  d = jax.random.normal(jax.random.key(2), (1, DIM))
  vals = [f(x[:1] + t * d)[0] for t in range(4)]
  assert abs(vals[3] - 3 * vals[2] + 3 * vals[1] - vals[0]) < 1e-3 * max(1.0, abs(vals[0]))


def test_the_ideal_classifier_is_f_star_and_classifies_the_test_set():
  cfg = _config(dict(name='purification', ideal=True))
  method, src = _method(cfg), _source(cfg)
  x, y = src.test
  params = method.init_params(jax.random.key(0), jnp.asarray(x[:2]))
  logits = method.logits(params, jnp.asarray(x))
  assert np.mean(np.argmax(logits, 1) == y) >= 0.99
  # f*(x) = sum_j w*_j [relu(z_j - 1/2) - relu(-z_j - 1/2)] = <w*, z> / 2 on clean data.
  z = x @ src.dictionary
  np.testing.assert_allclose(np.asarray(logits[:, 1] - logits[:, 0]), 0.5 * z @ src.w_star, atol=1e-4)
  assert [p.name for p in method.phases()] == ['fixed'] and method.phases()[0].lr == 0.0
  with pytest.raises(ValueError, match='multiple of d=16'):
    _method(_config(dict(name='purification', ideal=True), dict(name='symmetric_relu', width=20))).init_params(
        jax.random.key(0), jnp.asarray(x[:2]))


# --- the method -----------------------------------------------------------------------


@pytest.mark.parametrize('attack,norm', [('fgm', 'l2'), ('fgm', 'linf'), ('pgd', 'l2'), ('pgd', 'linf')])
def test_training_attacks_stay_within_tau_and_are_not_clipped_to_a_box(attack, norm):
  cfg = _config(dict(name='purification', attack=attack, norm=norm, tau=0.4, clean_steps=1, adv_steps=1,
                     pgd_steps=5), dict(name='symmetric_relu', init_std=0.3))
  method, src = _method(cfg), _source(cfg)
  x, y = src.test
  x, y = jnp.asarray(x[:64]), jnp.asarray(y[:64])
  params = method.init_params(jax.random.key(0), x)
  x_adv = method.adversarial(params, x, y, jax.random.key(1), method.hparams())
  delta = np.asarray(x_adv - x).reshape(64, -1)
  size = np.linalg.norm(delta, axis=1) if norm == 'l2' else np.abs(delta).max(1)
  assert size.max() <= 0.4 * (1 + 1e-5) and np.mean(size > 0.1) > 0.8   # 0 only where no neuron fires
  assert method.input_box is None and float(x_adv.min()) < 0.0   # sparse data has no [0, 1] box
  if attack == 'fgm':   # one full step: on the sphere (L2) or a corner (L-inf) of the ball
    np.testing.assert_allclose(size[size > 0], 0.4, rtol=1e-4)
    margin = lambda xx: np.asarray(jnp.take_along_axis(method.logits(params, xx), y[:, None], 1)[:, 0] * 2)
    assert np.mean(margin(x_adv) <= margin(x) + 1e-6) > 0.95          # it ascends the loss


def test_tau_warms_up_from_the_first_adversarial_step():
  cfg = _config(dict(name='purification', attack='fgm', norm='linf', tau=0.4, clean_steps=100, adv_steps=50,
                     tau_warmup_steps=40), dict(name='symmetric_relu', init_std=0.3))
  method, src = _method(cfg), _source(cfg)
  x, y = src.test
  x, y = jnp.asarray(x[:64]), jnp.asarray(y[:64])
  params = method.init_params(jax.random.key(0), x)

  def size(step):
    hp = dict(method.hparams(), step=jnp.int32(step))
    return float(jnp.abs(method.adversarial(params, x, y, jax.random.key(1), hp) - x).max())

  # The adversarial phase starts at step 100 (after the clean phase): tau / 40 there, all of tau 39 steps later.
  assert size(100) == pytest.approx(0.4 / 40, rel=1e-4) and size(119) == pytest.approx(0.4 / 2, rel=1e-4)
  assert size(139) == pytest.approx(0.4, rel=1e-4) and size(149) == pytest.approx(0.4, rel=1e-4)


def _train(cfg, tmp_path, name='run'):
  res = experiment.run_experiment(cfg, tmp_path / name, None, log=lambda s: None)
  return res, experiment.load_run(tmp_path / name)


def _tiny(cfg, **method):
  cfg.method.update(method)
  cfg.train.update(dict(optimizer='sgd', lr=1.0, momentum=0.0, batch_size=64, steps_per_log=5))
  cfg.eval.update(dict(attacks=('pgd',), pgd_steps=3, pgd_restarts=1, norm='l2', eps=(0.3,), num_examples=64,
                       sanity=False))
  return cfg


def test_phases_keep_the_snapshots_and_delta_is_the_adversarial_update(tmp_path):
  cfg = _tiny(_config(), clean_steps=10, adv_steps=10)
  _, run = _train(cfg, tmp_path)
  p, method = run.params, run.method
  assert method.phases()[0].name == 'clean' and method.phases()[1].name == 'adversarial'
  init = method.init_params(jax.random.key(0), jnp.zeros((2, DIM)))   # same tree, another draw
  assert jax.tree.structure(init) == jax.tree.structure(p)
  # The clean snapshot is the end of the clean phase; the init snapshot never moves.
  clean = experiment.pipeline.restore_member_params(tmp_path / 'run', phase='clean')[0]
  np.testing.assert_array_equal(p['model']['w'], clean['model']['w'])
  np.testing.assert_array_equal(p['init']['w'], clean['init']['w'])
  assert not np.array_equal(p['init']['w'], p['model']['w']) and np.abs(p['delta']['w']).max() > 0
  np.testing.assert_array_equal(clean['delta']['w'], 0.0)            # zero until the adversarial phase
  snaps = method.weight_snapshots(p)
  np.testing.assert_allclose(snaps['final']['w'] - snaps['clean']['w'], p['delta']['w'], atol=1e-6)
  assert snaps['from_clean']
  # The metrics log the purity curve over both phases.
  rows = [r for r in experiment.runio.read_metrics(tmp_path / 'run' / 'metrics.jsonl')]
  assert [r['phase'] for r in rows] == ['clean', 'clean', 'adversarial', 'adversarial']
  assert all(0 < r['dense_cos'] <= 1 and 0 < r['purity_top1'] <= 1 for r in rows)


def test_delta_training_takes_the_steps_training_w_directly_would():
  # Plain SGD on Delta with theta frozen == plain SGD on theta: equal gradients.
  cfg = _config()
  method, src = _method(cfg), _source(cfg)
  x, y = (jnp.asarray(a[:64]) for a in src.test)
  params = method.init_params(jax.random.key(0), x)
  params['model'] = jax.tree.map(lambda a: a * 20.0, params['model'])   # neurons that fire
  loss = method.phases()[1].loss_fn
  g = jax.grad(lambda p: loss(p, {'image': x, 'label': y}, jax.random.key(1), method.hparams())[0])(params)
  np.testing.assert_allclose(g['delta']['w'], g['model']['w'], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('rank', [3])
def test_rank_r_training_changes_w_only_by_a_rank_r_update(tmp_path, rank):
  cfg = _tiny(_config(), clean_steps=10, adv_steps=15, rank=rank)
  _, run = _train(cfg, tmp_path)
  snaps = run.method.weight_snapshots(run.params)
  update = snaps['final']['w'] - snaps['clean']['w']
  s = np.linalg.svd(update, compute_uv=False)
  assert s[rank - 1] > 1e-4 * s[0] and s[rank:].max() <= 1e-5 * s[0]     # rank exactly r
  a, b = run.params['delta']['w']['a'], run.params['delta']['w']['b']
  assert a.shape == (DIM, rank) and b.shape == (2 * DIM, rank)
  clean = experiment.pipeline.restore_member_params(tmp_path / 'run', phase='clean')[0]
  np.testing.assert_array_equal(run.params['model']['w'], clean['model']['w'])   # W_clean frozen


def test_the_linearised_model_equals_the_network_to_first_order_at_init():
  model = dict(name='symmetric_relu', init_std=0.3, smooth=0.5)   # smooth: the remainder is O(eps^2)
  cfg = _config(dict(name='purification', linearize=True), model)
  lin = _method(cfg)
  net = _method(_config(dict(name='purification'), model))
  x = jnp.asarray(_source(cfg).test[0][:128])
  params = lin.init_params(jax.random.key(0), x)
  np.testing.assert_allclose(lin.logits(params, x), net.logits(params, x), atol=1e-6)   # equal at theta_0
  w0 = np.asarray(params['init']['w'], np.float64)
  b0 = 0.5 * np.linalg.norm(w0, axis=0)   # the stop_gradient threshold has no tangent: it stays at theta_0's

  def network(w):   # the network with the threshold held at b0, in float64
    pre = np.asarray(x, np.float64) @ w
    act = lambda z: np.where(z <= 0, 0, np.where(z < 0.5, z * z, z - 0.25))
    return (act(pre - b0) - act(-pre - b0)).sum(1)

  direction = np.asarray(jax.random.normal(jax.random.key(3), w0.shape)) * 0.3
  gaps, firsts = [], []
  for eps in (2e-2, 1e-2):
    moved = dict(params, model={'w': jnp.asarray(w0 + eps * direction, jnp.float32)})
    f_lin = np.asarray(lin.logits(moved, x)[:, 1] * 2, np.float64)
    gaps.append(np.abs(f_lin - network(w0 + eps * direction)).max())
    firsts.append(np.abs(f_lin - network(w0)).max())
  assert gaps[1] < 0.3 * gaps[0]            # second order: halving the step quarters the gap
  assert gaps[1] < 0.05 * firsts[1]         # small against the first-order change itself


def test_method_options_are_checked():
  with pytest.raises(ValueError, match="unknown method.attack 'bim'"):
    _method(_config(dict(name='purification', attack='bim')))
  with pytest.raises(ValueError, match="unknown method.recipe 'both'"):
    _method(_config(dict(name='purification', recipe='both')))
  with pytest.raises(ValueError, match='needs data with a dictionary'):
    cfg = _config(dict(name='purification', ideal=True))
    cfg.dataset = 'mnist'
    _method(cfg)
  steps = lambda recipe: [p.steps for p in _method(_config(dict(name='purification', recipe=recipe, clean_steps=3,
                                                                 adv_steps=4))).phases()]
  assert steps('clean_then_adversarial') == [3, 4] and steps('clean') == [3, 0] and steps('adversarial') == [0, 7]


# --- the exact robust linear baseline --------------------------------------------------


def test_robust_linear_loss_is_the_worst_case_over_the_ball():
  cfg = _config(dict(name='robust_linear', tau=0.3, norm='l2', adv_steps=10), dict(name='mlp', hidden=()))
  method, src = _method(cfg), _source(cfg)
  x, y = (jnp.asarray(a[:64]) for a in src.test)
  params = method.init_params(jax.random.key(0), x)
  loss, _ = method.phases()[0].loss_fn(params, {'image': x, 'label': y}, jax.random.key(1), method.hparams())
  v = method.direction(params)
  s = (2 * y - 1)[:, None]
  worst = x - 0.3 * s * v / jnp.linalg.norm(v)   # the maximiser, in closed form
  logits = method.logits(params, worst)
  np.testing.assert_allclose(loss, base.cross_entropy(logits, y), rtol=1e-5)
  # No other point of the ball does worse (random directions, same length).
  for k in range(3):
    d = jax.random.normal(jax.random.key(k), x.shape)
    d = 0.3 * d / jnp.linalg.norm(d, axis=1, keepdims=True)
    assert float(base.cross_entropy(method.logits(params, x + d), y)) <= float(loss) + 1e-6
  with pytest.raises(ValueError, match='two-class linear model'):
    _method(_config(dict(name='robust_linear'), dict(name='mlp', hidden=(8,))))


def test_the_shared_pgd_reaches_the_closed_form_robust_accuracy_of_a_linear_model():
  cfg = _config(dict(name='robust_linear', tau=0.1), dict(name='mlp', hidden=()))
  method, src = _method(cfg), _source(cfg)
  x, y = src.test
  params = method.init_params(jax.random.key(0), jnp.asarray(x[:2]))
  kernel = np.zeros((DIM, 2), np.float32)
  kernel[:, 1] = src.dictionary @ src.w_star / np.linalg.norm(src.w_star)  # the best linear direction
  params['model']['out'] = {'kernel': jnp.asarray(kernel), 'bias': jnp.zeros(2)}
  taus = (0.1, 0.2, 0.3)
  ev = config_lib.default_config().eval
  ev.update(dict(norm='l2', attacks=('pgd',), pgd_steps=40, pgd_restarts=1, eps=taus, sanity=False))
  res = evaluation.evaluate(method.logits, params, x, y, ev, parallel.make_mesh(1), log=lambda s: None, box=None)
  score = x @ kernel[:, 1]
  for tau in taus:
    exact = float(np.mean((2 * y - 1) * score > tau))    # ||v|| = 1
    pgd = next(r['accuracy'] for r in res['robustness'] if r['attack'] == 'pgd' and r['eps'] == tau)
    assert abs(pgd - exact) <= 1 / len(y), (tau, pgd, exact)
    assert 0.05 < exact < 0.95


# --- the measurements -------------------------------------------------------------------


def test_purity_of_hand_built_neurons():
  rng = np.random.default_rng(0)
  m_dict = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0]
  w_star = rng.standard_normal(DIM)
  dense = m_dict @ w_star
  w = np.stack([3 * m_dict[:, 2], dense, m_dict[:, 0] + m_dict[:, 1]], 1)
  p = {k: np.asarray(v) for k, v in geometry.purity(w, m_dict, w_star).items()}
  np.testing.assert_allclose(p['top1'][[0, 2]], [1.0, 1 / np.sqrt(2)], rtol=1e-6)
  np.testing.assert_allclose(p['l1_l2'][[0, 2]], [1.0, np.sqrt(2)], rtol=1e-6)
  np.testing.assert_allclose(p['dense_cos'][0], abs(w_star[2]) / np.linalg.norm(w_star), rtol=1e-6)
  np.testing.assert_allclose(p['dense_cos'][1], 1.0, rtol=1e-6)
  np.testing.assert_allclose(p['top1'][1], np.abs(w_star).max() / np.linalg.norm(w_star), rtol=1e-6)


def test_the_decomposition_recovers_a_known_dense_part():
  rng = np.random.default_rng(1)
  m_dict = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0]
  w_star = rng.standard_normal(DIM)
  dense = m_dict @ w_star / np.linalg.norm(w_star)
  atoms = m_dict[:, :3] * np.array([2.0, 1.0, 4.0])           # the purified neurons w'
  dense_perp = [dense - (dense @ a) / (a @ a) * a for a in atoms.T]
  parts = np.stack([c * d / np.linalg.norm(d) for c, d in zip((0.5, 3.0, 1.0), dense_perp)], 1)
  w = 1.5 * atoms + parts                                       # w = beta w' + v, v orthogonal to w'
  out = geometry.decompose(w, atoms, rng.standard_normal(w.shape), dense)
  np.testing.assert_allclose(out['beta'], 1.5, rtol=1e-6)
  expected_rho = np.array([0.5, 3.0, 1.0]) / (1.5 * np.array([2.0, 1.0, 4.0]))
  np.testing.assert_allclose(out['rho'], expected_rho, rtol=1e-6)
  np.testing.assert_allclose(out['cos_v_dense'], [abs(d @ dense) / np.linalg.norm(d) for d in dense_perp], rtol=1e-6)
  s = geometry.principle_summary(w, atoms, rng.standard_normal(w.shape), dense)
  assert s['frac_rho_below_1'] == pytest.approx(2 / 3) and s['median_rho'] == pytest.approx(np.median(expected_rho))


def test_singular_energy_and_break_radius():
  u = np.linalg.qr(np.random.default_rng(2).standard_normal((20, 20)))[0]
  update = u[:, :3] @ np.diag([3.0, 2.0, 1.0]) @ u[:, 3:6].T
  e = geometry.singular_energy(update, ranks=(1, 2, 4))
  assert e['top1'] == pytest.approx(9 / 14) and e['top2'] == pytest.approx(13 / 14) and e['top4'] == pytest.approx(1)
  assert geometry.singular_energy(np.zeros((4, 4)))['top1'] == 0.0
  assert geometry.break_radius([0, 0.1, 0.2], [0.9, 0.7, 0.3]) == pytest.approx(0.15)
  assert geometry.break_radius([0, 0.1], [0.9, 0.6]) is None         # beyond the grid
  assert geometry.break_radius([0, 0.1], [0.4, 0.1]) == 0.0          # below 50% when clean
  x = np.eye(2, dtype=np.float32)
  shifted = geometry.dense_direction_inputs(x, np.array([1, 0]), np.eye(2), np.array([3.0, 4.0]), 0.5)
  np.testing.assert_allclose(shifted, [[1 - 0.3, -0.4], [0.3, 1 + 0.4]], rtol=1e-6)


def test_family_tables_follow_the_contract():
  def out(dim, rank=0, recipe='clean_then_adversarial', accs=(0.8, 0.4), purity=None, principle=None):
    o = {'recipe': {'model': 'symmetric_relu', 'method': 'purification', 'dim': dim, 'recipe': recipe, 'rank': rank},
         'roles': {'clean': 'clean_nn', 'adversarial': 'at_nn', 'ideal': 'ideal'}, 'rank_tau': 0.0,
         'clean_accuracy': 0.9, 'robust': [{'tau': t, 'accuracy': a} for t, a in zip((0.1, 0.3), accs)],
         'break_radius': 0.2, 'break_radius_shared': 0.25}
    if purity:
      o['purity'] = {s: {'top1': purity, 'dense_cos': 1 - purity, 'l1_l2': 1.0} for s in ('init', 'clean', 'final')}
    if principle:
      o['principle'] = dict(neurons=4, median_rho=0.5, frac_rho_below_1=0.75, median_beta=1.0, cos_w_wadv=0.9,
                            cos_w_w0=0.1, cos_wadv_w0=0.1, cos_v_dense=0.7)
      o['update'] = {'top1': 0.5, 'top2': 0.6, 'top4': 0.7, 'top16': 0.9, 'effective_rank': 3.0}
    return o
  outs = {'ideal': out(8, recipe='clean', purity=0.9), 'clean_nn': out(8, recipe='clean', purity=0.6),
          'at_nn': out(8, purity=0.8, principle=True), 'rank_2': out(8, rank=2, accs=(0.7, 0.2)),
          'rank_1': out(8, rank=1, accs=(0.6, 0.1))}
  top = probe_lib.Purification.family_results(outs)
  assert [m['name'] for m in top['models']] == list(outs)
  assert set(top['models'][0]) >= {'name', 'clean_accuracy', 'robust', 'break_radius'}
  assert top['principle']['median_rho'] == 0.5 and top['principle']['member'] == 'at_nn'
  assert top['purity']['dense_cos_clean'] == pytest.approx(0.4) and top['purity']['dense_cos_at'] == pytest.approx(0.2)
  assert top['purity']['dense_cos_ideal'] == pytest.approx(0.1)
  # The rank table: the rank-r members of at_nn's recipe in order, full last, at the middle tau.
  assert [(r['rank'], r['robust_accuracy']) for r in top['rank']] == [(1, 0.1), (2, 0.2), ('full', 0.4)]
  assert 'scaling' not in top
  outs['at_nn_d16'] = out(16)
  assert {(r['model'], r['dim']) for r in probe_lib.Purification.family_results(outs)['scaling']} >= {('at_nn', 16)}


def test_the_large_eps_check_passes_an_unbounded_network_whose_ce_saturates():
  # A confident ReLU score far outside any box: the float32 softmax is one-hot
  # there and CE-PGD sees a zero gradient; the margin loss still breaks it.
  cfg = _config(dict(name='purification'), dict(name='symmetric_relu', init_std=1.0))
  method, src = _method(cfg), _source(cfg)
  x, y = src.test
  params = method.init_params(jax.random.key(0), jnp.asarray(x[:2]))
  ev = config_lib.default_config().eval
  ev.update(dict(norm='l2', attacks=('pgd',), pgd_steps=20, pgd_restarts=1, eps=(0.1,), num_examples=128, sanity=True,
                 check_eps=0.1))
  res = evaluation.evaluate(method.logits, params, x[:128], y[:128], ev, parallel.make_mesh(1), log=lambda s: None,
                            box=None)
  assert res['sanity']['large_eps_to_zero']['passed'], res['sanity']['large_eps_to_zero']


def test_dlr_attacks_are_refused_for_two_classes_before_training():
  cfg = _config()
  cfg.eval.attacks = ('pgd', 'apgd_dlr')
  with pytest.raises(config_lib.ConfigError, match="apgd_dlr but sparse_coding has 2 classes.*eval.attacks="):
    experiment.pipeline.validate(cfg)


@pytest.mark.parametrize('name', ['pgd_at', 'trades'])
def test_adversarial_training_attacks_clip_to_the_datasets_own_box(name):
  # Generated data has no box: the training attack must not clip to [0, 1];
  # images keep theirs.
  method_cfg = dict(name=name, eps=0.5, steps=3, norm='l2', step_size=0.0)
  cfg = _config(method_cfg, dict(name='symmetric_relu', init_std=0.3))
  method, src = _method(cfg), _source(cfg)
  x, y = (jnp.asarray(a[:64]) for a in src.test)
  params = method.init_params(jax.random.key(0), x)
  x_adv = method.adversarial(params, x, y, jax.random.key(1), method.hparams())
  assert method.input_box is None and float(x_adv.min()) < -0.05 and float(x_adv.max()) > 1.05
  assert float(jnp.linalg.norm(x_adv - x, axis=1).max()) <= 0.5 * (1 + 1e-5)
  images = config_lib.default_config()
  images.method = ml_collections.ConfigDict(method_cfg)
  mnist = methods.build_method(images, models.build_model(images.model, 10), 10)
  xi = jax.random.uniform(jax.random.key(2), (8, 28, 28, 1))
  p = mnist.init_params(jax.random.key(0), xi)
  xi_adv = mnist.adversarial(p, xi, jnp.zeros(8, jnp.int32), jax.random.key(1), mnist.hparams())
  assert mnist.input_box == (0.0, 1.0) and 0.0 <= float(xi_adv.min()) and float(xi_adv.max()) <= 1.0
