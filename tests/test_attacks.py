"""Tests for geomrobust.attacks: closed forms on linear models, geometry, EOT, restarts, APGD."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geomrobust import attacks as A
from geomrobust.attacks import losses, norms

ATOL_BALL = 1e-5  # float32 rounding of x + delta - x on the [0, 1] scale
# XLA's CPU compile time dominates this file (~30 small programs); unoptimised
# code generation roughly halves it and these programs are tiny.
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _key(seed):
  # The attacks work with any key type; 'rbg' keys compile several times faster
  # than threefry on CPU (~0.2 s vs ~1.3 s per program), which dominates runtime here.
  return jax.random.key(seed, impl='rbg')


def _uniform(seed, shape, lo=0.0, hi=1.0):
  return jnp.asarray(np.random.default_rng(seed).uniform(lo, hi, shape), jnp.float32)


@functools.cache
def _jitted(name, logits_fn, **static):
  """One compiled ``(x, labels, rng, eps, **arrays) -> x_adv`` per attack configuration."""
  attack = A.ATTACKS[name]
  return _jit(lambda x, y, rng, eps, **arrays: attack(logits_fn, x, y, rng, eps=eps, **static,
                                                      **arrays))


def _assert_feasible(x_adv, x, eps, norm, msg=''):
  """x_adv inside the eps-ball around x (per example) and inside [0, 1]."""
  x_adv, x = np.asarray(x_adv), np.asarray(x)
  assert x_adv.shape == x.shape, msg
  assert np.all(x_adv >= 0.0) and np.all(x_adv <= 1.0), msg
  # Measured in float64 with numpy, independently of the library's norms.
  delta = (x_adv.astype(np.float64) - x).reshape(len(x), -1)
  dist = np.abs(delta).max(1) if norm == 'linf' else np.sqrt((delta ** 2).sum(1))
  assert np.all(dist <= np.broadcast_to(eps, dist.shape) + ATOL_BALL), (msg, dist.max())


@functools.cache
def _predictor(logits_fn):
  return _jit(lambda x: jnp.argmax(logits_fn(x, None), -1))


def _predict(logits_fn, x):
  return np.asarray(_predictor(logits_fn)(x))


# ----------------------------------------------------------------------------- models


def _linear(num_features, num_classes, seed=0):
  """logits = x @ W + b, as (W, b, logits_fn)."""
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.standard_normal((num_features, num_classes)), jnp.float32)
  b = jnp.asarray(0.1 * rng.standard_normal(num_classes), jnp.float32)
  return w, b, A.deterministic(lambda x: x.reshape(x.shape[0], -1) @ w + b)


def _mlp_apply(params, x):
  h = x.reshape(x.shape[0], -1)
  for w, b in params[:-1]:
    h = jnp.tanh(h @ w + b)
  w, b = params[-1]
  return h @ w + b


@pytest.fixture(scope='module')
def trained_mlp():
  """A 20-16-4 tanh MLP trained on 4 Gaussian blobs in [0, 1]^20; returns (logits_fn, x, y)."""
  dim, classes, n = 20, 4, 512
  rng = np.random.default_rng(0)
  centers = rng.uniform(0.3, 0.7, (classes, dim))
  y = rng.integers(0, classes, n)
  x = np.clip(centers[y] + 0.12 * rng.standard_normal((n, dim)), 0, 1).astype(np.float32)
  params = [(jnp.asarray(rng.standard_normal((dim, 16)) / np.sqrt(dim), jnp.float32),
             jnp.zeros(16)),
            (jnp.asarray(rng.standard_normal((16, classes)) / 4.0, jnp.float32),
             jnp.zeros(classes))]
  opt = optax.adam(3e-2)
  xj, yj = jnp.asarray(x), jnp.asarray(y)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
          _mlp_apply(p, xj), yj).mean())(params)
      updates, opt_state = opt.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(step, (params, opt.init(params)), length=300)[0][0]

  logits_fn = A.deterministic(functools.partial(_mlp_apply, train(params)))
  acc = float(np.mean(_predict(logits_fn, xj) == y))
  assert acc > 0.95, acc
  return logits_fn, xj[:256], yj[:256]


# ----------------------------------------------------------------------------- losses


def test_losses_hand_values():
  z = jnp.array([[3.0, 1.0, 0.0, -1.0]])
  y = jnp.array([0])
  t = jnp.array([2])
  np.testing.assert_allclose(losses.margin(z, y), [1.0 - 3.0])
  np.testing.assert_allclose(losses.margin(z, y, t), [0.0 - 3.0])
  logsumexp = np.log(np.exp([3.0, 1.0, 0.0, -1.0]).sum())
  np.testing.assert_allclose(losses.cross_entropy(z, y), [logsumexp - 3.0], rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(z, y, t), [0.0 - logsumexp], rtol=1e-6)
  # DLR: -(z_y - max_other) / (z_pi1 - z_pi3) = -(3 - 1) / (3 - 0).
  np.testing.assert_allclose(losses.dlr(z, y), [-2.0 / 3.0], rtol=1e-6)
  # Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(3 - 0) / (3 + 0.5).
  np.testing.assert_allclose(losses.dlr(z, y, t), [-3.0 / 3.5], rtol=1e-6)
  chex.assert_shape(losses.dlr(jnp.zeros((5, 7)) + jnp.arange(7.0), jnp.zeros(5, int)), (5,))


def test_dlr_invariant_to_scale_and_shift():
  rng = np.random.default_rng(0)
  for _ in range(20):
    z = jnp.asarray(rng.standard_normal((16, 10)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 16))
    t = jnp.asarray((np.asarray(y) + rng.integers(1, 10, 16)) % 10)
    a, c = float(rng.uniform(0.1, 10.0)), float(rng.uniform(-5, 5))
    chex.assert_trees_all_close(losses.dlr(a * z + c, y), losses.dlr(z, y), rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(losses.dlr(a * z + c, y, t), losses.dlr(z, y, t), rtol=1e-4,
                                atol=1e-5)


def test_loss_registry_and_class_checks():
  assert losses.get_loss('ce') is losses.cross_entropy
  with pytest.raises(ValueError, match='dlr'):
    losses.get_loss('hinge')
  with pytest.raises(ValueError, match='3 classes'):
    losses.dlr(jnp.zeros((2, 2)), jnp.zeros(2, int))
  with pytest.raises(ValueError, match='4 classes'):
    losses.dlr(jnp.zeros((2, 3)), jnp.zeros(2, int), jnp.ones(2, int))


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_projection_stays_in_ball_and_box(norm):
  rng = np.random.default_rng(1)
  project = _jit(norms.project, static_argnames='norm')
  for trial in range(60):
    shape = [(8, 5), (4, 3, 3, 2)][trial % 2]
    x = jnp.asarray(rng.uniform(0, 1, shape), jnp.float32)
    x_adv = jnp.asarray(x + rng.normal(0, rng.uniform(0.01, 3.0), shape), jnp.float32)
    # Per-example eps (with a zero) on some trials, a scalar on others.
    eps = rng.uniform(0, 2.0, shape[0]).astype(np.float32)
    eps[0] = 0.0
    if trial % 3 == 0:
      eps = np.float32(rng.uniform(0, 2.0))
    out = project(x_adv, x, eps, norm=norm)
    _assert_feasible(out, x, eps, norm)
    # Points already feasible are left alone.
    chex.assert_trees_all_close(project(out, x, eps, norm=norm), out, atol=1e-6)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_random_init_and_surface(norm):
  x = jnp.full((64, 3, 4, 2), 0.5)
  eps = 0.2

  @_jit
  def draw(x):
    delta = norms.random_init(_key(0), x, eps, norm)
    surface = norms.random_surface(_key(1), x, eps, norm)
    return (norms.per_example_norm(delta, norm), surface, norms.per_example_norm(surface, norm))

  dist, surface, surface_dist = draw(x)
  assert np.all(np.asarray(dist) <= eps + 1e-6)
  assert float(dist.mean()) > 0.5 * eps  # genuinely spread through the ball
  np.testing.assert_allclose(surface_dist, eps, rtol=1e-5)
  if norm == 'linf':
    np.testing.assert_allclose(np.abs(surface), eps)  # corners of the cube


def test_step_direction_safe_at_zero():
  g = jnp.zeros((3, 4)).at[1].set(jnp.array([3.0, 0.0, 4.0, 0.0]))
  d = norms.step_direction(g, 'l2')
  assert np.all(np.isfinite(np.asarray(d)))
  np.testing.assert_allclose(d[1], [0.6, 0.0, 0.8, 0.0], rtol=1e-6)
  np.testing.assert_allclose(d[0], 0.0)
  np.testing.assert_allclose(norms.step_direction(g, 'linf')[1], [1.0, 0.0, 1.0, 0.0])
  with pytest.raises(ValueError, match='linf'):
    norms.step_direction(g, 'l1')


# ----------------------------------------------------------------------------- linear closed forms


def _binary_linear_setup(num=32, dim=12, seed=0):
  """Two-class linear model, points in [0.3, 0.7]^d, and w_y - w_other per example [B, d]."""
  w, _, f = _linear(dim, 2, seed)
  x = _uniform(seed + 100, (num, dim), 0.3, 0.7)
  y = jnp.asarray(_predict(f, x))
  w_diff = jnp.where((y == 0)[:, None], w[:, 0] - w[:, 1], w[:, 1] - w[:, 0])
  return f, x, y, w_diff


def test_fgsm_linear_closed_form():
  f, x, y, w_diff = _binary_linear_setup()
  eps = 0.1  # x in [0.3, 0.7]: the box never binds
  for loss in ['ce', 'margin']:
    x_adv = _jitted('fgsm', f, norm='linf', loss=loss)(x, y, _key(0), eps)
    chex.assert_trees_all_close(x_adv, x - eps * jnp.sign(w_diff), atol=1e-6)
  x_adv = _jitted('fgsm', f, norm='l2', loss='margin')(x, y, _key(0), eps)
  unit = w_diff / jnp.linalg.norm(w_diff, axis=1, keepdims=True)
  chex.assert_trees_all_close(x_adv, x - eps * unit, atol=1e-6)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_pgd_and_apgd_reach_optimal_linear_margin(norm):
  f, x, y, w_diff = _binary_linear_setup()
  eps = 0.1
  dual = {'linf': jnp.sum(jnp.abs(w_diff), 1), 'l2': jnp.linalg.norm(w_diff, axis=1)}[norm]
  optimal = losses.margin(f(x, None), y) + eps * dual
  # From a random start, l2 PGD rotates onto the optimal direction only
  # geometrically fast in step_size / eps: the default 2.5 * eps / steps leaves
  # ~1% of the margin gain after 20 steps, so l2 is checked with a long step.
  configs = {'linf': [('pgd', {}), ('pgd', {'random_start': False})],
             'l2': [('pgd', {'random_start': False}), ('pgd', {'step_size': 0.5 * eps})]}[norm]
  for name, kwargs in configs + [('apgd', {})]:
    step_size = kwargs.pop('step_size', None)
    arrays = {} if step_size is None else {'step_size': step_size}
    x_adv = _jitted(name, f, norm=norm, steps=20, loss='margin', **kwargs)(x, y, _key(0), eps,
                                                                           **arrays)
    _assert_feasible(x_adv, x, eps, norm, name)
    np.testing.assert_allclose(losses.margin(f(x_adv, None), y), optimal, rtol=1e-3, atol=1e-3,
                               err_msg=f'{name} {kwargs}')


def test_targeted_attack_reaches_target_on_linear_model():
  # Class c reads block c of the input: raising block t and lowering the others flips to t.
  dim, classes, num = 16, 4, 32
  rng = np.random.default_rng(0)
  w = np.kron(np.eye(classes), np.ones((dim // classes, 1))) + 0.05 * rng.standard_normal((dim, 4))
  w = jnp.asarray(w, jnp.float32)
  f = A.deterministic(lambda x: x @ w)
  x = _uniform(1, (num, dim), 0.3, 0.7)
  y = jnp.asarray(_predict(f, x))
  t = (y + jnp.asarray(rng.integers(1, classes, num))) % classes
  for name, loss in [('pgd', 'ce'), ('pgd', 'margin'), ('apgd', 'dlr')]:
    x_adv = _jitted(name, f, steps=20, loss=loss, targeted=True)(x, y, _key(3), 0.3,
                                                                target_labels=t)
    _assert_feasible(x_adv, x, 0.3, 'linf', name)
    np.testing.assert_array_equal(_predict(f, x_adv), t, err_msg=f'{name} {loss}')
  with pytest.raises(ValueError, match='target_labels'):
    A.pgd(f, x, y, _key(3), eps=0.3, targeted=True)


# ----------------------------------------------------------------------------- all attacks

_SETTINGS = {'fgsm': {}, 'pgd': {'steps': 5, 'restarts': 2}, 'apgd': {'steps': 8, 'restarts': 2},
             'apgd_t': {'steps': 4, 'num_targets': 2}, 'square': {'queries': 30}, 'noise': {'samples': 3}}


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_attacks_feasible_and_identity_at_eps_zero(norm):
  """NHWC inputs near the box edges, a nonlinear model, every attack, eps in {0, eps}."""
  x = _uniform(5, (6, 4, 4, 2))
  x = jnp.where(x > 0.5, jnp.minimum(1.0, x + 0.4), jnp.maximum(0.0, x - 0.4))
  w = jnp.asarray(np.random.default_rng(6).standard_normal((32, 5)), jnp.float32)
  f = A.deterministic(lambda v: 3.0 * jnp.tanh(v.reshape(v.shape[0], -1) @ w))
  y = jnp.arange(6) % 5
  eps = {'linf': 0.3, 'l2': 1.5}[norm]
  for name, settings in _SETTINGS.items():
    attack = _jitted(name, f, norm=norm, **settings)
    x_adv = attack(x, y, _key(0), eps)
    chex.assert_shape(x_adv, x.shape)
    _assert_feasible(x_adv, x, eps, norm, name)
    # eps = 0 gives back x exactly, so accuracy at eps 0 is the clean accuracy.
    np.testing.assert_array_equal(np.asarray(attack(x, y, _key(1), 0.0)), np.asarray(x),
                                  err_msg=name)


def test_run_attack_registry():
  _, _, f = _linear(6, 3)
  x = jnp.full((2, 6), 0.5)
  y = jnp.zeros(2, int)
  out = _jit(lambda x, y, rng: A.run_attack('fgsm', f, x, y, rng, eps=0.1))(x, y, _key(0))
  chex.assert_shape(out, (2, 6))
  with pytest.raises(ValueError, match='apgd, apgd_t, fgsm, noise, pgd, square'):
    A.run_attack('cw', f, x, y, _key(0), eps=0.1)


def test_gaussian_noise():
  x = jnp.full((4, 8), 0.5)
  np.testing.assert_array_equal(A.gaussian_noise(x, _key(0), 0.0), x)
  noisy = np.asarray(A.gaussian_noise(x, _key(0), 5.0))
  assert np.all((noisy >= 0) & (noisy <= 1))
  assert np.any(noisy == 0.0) and np.any(noisy == 1.0)


# ----------------------------------------------------------------------------- APGD-T and Square


def _dominant_linear(dim=12, classes=5, seed=0):
  """A linear model whose class 0 wins by a wide bias margin everywhere near x in [0.3, 0.7]^d."""
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.standard_normal((dim, classes)), jnp.float32)
  b = jnp.asarray([20.0] + [0.0] * (classes - 1), jnp.float32)
  return w, b, A.deterministic(lambda x: x @ w + b)


def test_apgd_targeted_reaches_the_closed_form_targeted_optimum():
  """With a linear targeted loss (the targeted margin z_t - z_y while y stays on top), the best
  over targets is max_t (z_t - z_y)(x) + eps ||w_t - w_y||_1: each target's APGD reaches its
  optimum and the merge keeps the best target."""
  w, b, f = _dominant_linear()
  x = _uniform(3, (16, 12), 0.3, 0.7)
  y = jnp.zeros(16, jnp.int32)
  eps = 0.05  # class 0 stays on top: the loss is linear and the box never binds
  z = f(x, None)
  gain = eps * jnp.sum(jnp.abs(w[:, 1:] - w[:, :1]), axis=0)                     # [C - 1]
  optimum = jnp.max(z[:, 1:] - z[:, :1] + gain, axis=1)
  x_adv = _jitted('apgd_t', f, steps=20, num_targets=4, loss='margin')(x, y, _key(0), eps)
  _assert_feasible(x_adv, x, eps, 'linf')
  z_adv = f(x_adv, None)
  np.testing.assert_allclose(jnp.max(z_adv[:, 1:] - z_adv[:, :1], axis=1), optimum, rtol=1e-4, atol=1e-4)
  # One target: only the most likely other class is attacked, and its optimum is reached.
  top = jnp.argmax(z[:, 1:], axis=1) + 1
  x_one = _jitted('apgd_t', f, steps=20, num_targets=1, loss='margin')(x, y, _key(0), eps)
  reached = jnp.take_along_axis(f(x_one, None), top[:, None], 1)[:, 0] - f(x_one, None)[:, 0]
  np.testing.assert_allclose(reached, jnp.take_along_axis(z, top[:, None], 1)[:, 0] - z[:, 0]
                             + gain[top - 1], rtol=1e-4, atol=1e-4)
  # Running the targets vmapped changes nothing (same keys per target).
  x_vmapped = _jitted('apgd_t', f, steps=20, num_targets=4, loss='margin', target_batch=4)(x, y, _key(0), eps)
  np.testing.assert_allclose(x_vmapped, x_adv, atol=1e-6)


def test_apgd_targeted_attacks_the_most_likely_other_classes_first():
  """Class 1 (ranked second by the clean logits) cannot be reached, class 2 (third) can:
  one target fails, two targets succeed, and success is any misclassification."""
  dim = 8
  w = np.zeros((dim, 4), np.float32)
  w[:, 2] = 1.0                                  # only class 2 moves with the input
  b = jnp.asarray([3.0, 2.5, -1.0, -5.0])
  f = A.deterministic(lambda x: x @ jnp.asarray(w) + b)
  x = jnp.full((4, dim), 0.3)
  y = jnp.zeros(4, jnp.int32)                   # clean logits [3, 2.5, 1.4, -5]: ranks 1, 2 = classes 1, 2
  eps = 0.3                                     # class 2 can gain 8 * 0.3 = 2.4 > 3 - 1.4
  one = _jitted('apgd_t', f, steps=10, num_targets=1)(x, y, _key(0), eps)
  two = _jitted('apgd_t', f, steps=10, num_targets=2)(x, y, _key(0), eps)
  np.testing.assert_array_equal(_predict(f, one), 0)
  np.testing.assert_array_equal(_predict(f, two), 2)
  with pytest.raises(ValueError, match='num_targets'):
    A.apgd_targeted(f, x, y, _key(0), eps=eps, num_targets=0)


def test_square_window_schedule():
  from geomrobust.attacks.square import window_fraction, window_sizes
  # The published schedule on a 10,000-query budget, and its rescaling.
  assert window_fraction(10, 10000, 0.8) == 0.8 and window_fraction(11, 10000, 0.8) == 0.4
  assert window_fraction(8001, 10000, 0.8) == pytest.approx(0.8 / 512)
  assert window_fraction(5, 1000, 0.8) == 0.4                       # 5 / 1000 = 50 / 10,000
  sizes = window_sizes(1000, 0.8, 28, 28)
  assert tuple(sizes[0]) == (25, 25) and tuple(sizes[-1]) == (1, 1)        # round(sqrt(0.8) * 28) = 25
  assert (np.diff(sizes[:, 0]) <= 0).all()
  runs = window_sizes(1000, 0.8, 1, 100)                             # a vector: runs of entries
  assert tuple(runs[0]) == (1, 80) and tuple(runs[-1]) == (1, 1)


@pytest.mark.parametrize('shape,norm', [((6, 5, 5, 3), 'linf'), ((6, 7, 5), 'linf'), ((6, 40), 'linf'),
                                        ((6, 6, 5, 3), 'l2'), ((6, 9, 7), 'l2')])
def test_square_attack_contract(shape, norm):
  """Inside the eps-ball and the box for images, [B, H, W] and (L-inf) vectors, whatever the
  start; the accepted margin never decreases; identity at eps 0."""
  x = _uniform(5, shape)
  x = jnp.where(x > 0.5, jnp.minimum(1.0, x + 0.4), jnp.maximum(0.0, x - 0.4))   # many entries at the box edges
  d = int(np.prod(shape[1:]))
  w = jnp.asarray(np.random.default_rng(6).standard_normal((d, 5)), jnp.float32)
  f = A.deterministic(lambda v: 3.0 * jnp.tanh(v.reshape(v.shape[0], -1) @ w))
  y = jnp.asarray(_predict(f, x))
  eps = {'linf': 0.1, 'l2': 0.5}[norm]
  run = _jitted('square', f, queries=60, return_losses=True, norm=norm)
  x_adv, trace = run(x, y, _key(0), eps)
  _assert_feasible(x_adv, x, eps, norm)
  trace = np.asarray(trace)                                                  # [restarts, queries, B]
  assert trace.shape == (1, 60, shape[0]) and (np.diff(trace, axis=1) >= 0).all()
  assert trace[0, -1].sum() > trace[0, 0].sum()                              # it made progress
  np.testing.assert_allclose(losses.margin(f(x_adv, None), y), trace[0, -1], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(run(x, y, _key(1), 0.0)[0]), np.asarray(x))
  if len(shape) == 2:
    with pytest.raises(ValueError, match='L2 Square attack takes 2-D inputs'):
      A.square(f, x, y, _key(0), eps=0.1, norm='l2')


@pytest.mark.parametrize('norm,eps', [('linf', 0.1), ('l2', 0.8)])
def test_square_breaks_a_gradient_masked_model_the_gradient_attacks_cannot(norm, eps):
  """Logits of rounded inputs: the input gradient is exactly zero, so PGD and APGD never
  move from their (harmless) random starts, while Square, from forward passes only, breaks
  the examples a linear attack could."""
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.choice([-1.0, 1.0], (64, 3)), jnp.float32)
  honest = A.deterministic(lambda v: v.reshape(v.shape[0], -1) @ w)
  masked = A.deterministic(lambda v: jnp.round(v.reshape(v.shape[0], -1) * 8) / 8 @ w)
  x = _uniform(2, (32, 8, 8), 0.3, 0.7)
  y = jnp.asarray(_predict(masked, x))
  linear_pgd = _jitted('pgd', honest, steps=20, norm=norm, random_start=False)(x, y, _key(0), eps)
  assert (_predict(masked, linear_pgd) != y).mean() > 0.8
  for name, settings in [('pgd', {'steps': 20, 'restarts': 2}), ('apgd', {'steps': 20})]:
    fooled = _predict(masked, _jitted(name, masked, norm=norm, **settings)(x, y, _key(0), eps)) != y
    assert fooled.mean() < 0.2, name
  x_sq = _jitted('square', masked, queries=1000, norm=norm)(x, y, _key(0), eps)
  _assert_feasible(x_sq, x, eps, norm)
  assert (_predict(masked, x_sq) != y).mean() > 0.8


# ----------------------------------------------------------------------------- EOT


def _masked_linear(dim=10, classes=3):
  """logits = (x * mask(rng)) @ W with a Bernoulli(0.5) mask fixed by the key."""
  w = jnp.asarray(np.random.default_rng(7).standard_normal((dim, classes)), jnp.float32)

  def logits_fn(x, rng):
    mask = jax.random.bernoulli(rng, 0.5, x.shape).astype(x.dtype)
    return (x * mask) @ w

  return logits_fn


def test_eot_averages_exactly_k_draws():
  f = _masked_linear()
  x = _uniform(0, (5, 10))
  y = jnp.array([0, 1, 2, 0, 1])
  # Threefry (JAX's default) on purpose: its draws are the same under vmap as
  # in a Python loop, which 'rbg' keys do not promise.
  rng = jax.random.key(3)
  k = 6

  @_jit
  def manual(x, rng):
    """A plain Python loop over the k split keys."""
    keys = jax.random.split(rng, k)
    grads = [jax.grad(lambda v, key=key: losses.cross_entropy(f(v, key), y).sum())(x)
             for key in keys]
    loss = sum(losses.cross_entropy(f(x, key), y) for key in keys) / k
    probs = sum(jax.nn.softmax(f(x, key)) for key in keys) / k
    return loss, sum(grads) / k, probs, grads[0]

  loss, grad = _jit(A.eot_grad(f, losses.cross_entropy, k))(x, y, rng)
  manual_loss, manual_grad, manual_probs, first_grad = manual(x, rng)
  chex.assert_shape(grad, x.shape)
  chex.assert_trees_all_close((loss, grad), (manual_loss, manual_grad), atol=1e-6)
  # The mask really varies between draws, so the average differs from a single draw.
  assert not np.allclose(grad, first_grad)
  # Forward-only evaluation sees the same draws; probs are averaged over them.
  out = _jit(A.eot_value(f, lambda z: losses.cross_entropy(z, y), k))(x, rng)
  chex.assert_trees_all_close((out.loss, out.probs), (manual_loss, manual_probs), atol=1e-6)


def test_eot_k1_is_plain_gradient():
  _, _, f = _linear(10, 3)
  x = _uniform(0, (4, 10))
  y = jnp.array([0, 1, 2, 0])
  loss, grad = _jit(A.eot_grad(f, losses.margin, 1))(x, y, _key(1))
  plain = _jit(jax.grad(lambda v: losses.margin(f(v, None), y).sum()))(x)
  chex.assert_trees_all_close(grad, plain, atol=1e-6)
  chex.assert_trees_all_close(loss, losses.margin(f(x, None), y), atol=1e-6)


def test_stochastic_model_attacks_with_eot():
  f = _masked_linear()
  x = _uniform(0, (16, 10))
  # The expected loss and the vote over many draws (fixed keys, not the
  # attack's): common random numbers for the clean and the attacked inputs.
  probe = _jit(lambda v, y: A.eot_value(f, lambda z: losses.cross_entropy(z, y), 512)(v, jax.random.key(99)))
  clean = probe(x, jnp.zeros(16, jnp.int32))
  y = jnp.argmax(clean.probs, -1)  # labels = the model's own vote: clean accuracy 1
  clean_loss = np.asarray(probe(x, y).loss)
  budgets = dict(_SETTINGS, square={'queries': 300})   # Square: forward passes only, each averaged over the draws
  for name in ['pgd', 'apgd', 'square']:
    x_adv = _jitted(name, f, eot_samples=4, **budgets[name])(x, y, _key(1), 0.1)
    _assert_feasible(x_adv, x, 0.1, 'linf', name)
    adv = probe(x_adv, y)
    # eps = 0.1 raises every example's expected loss by ~0.12 or more (0.18 on
    # average) and flips the vote on most of them; x itself would change neither.
    gain = np.asarray(adv.loss) - clean_loss
    assert gain.min() > 0.05, (name, gain)
    accuracy = float(np.mean(np.asarray(jnp.argmax(adv.probs, -1)) == np.asarray(y)))
    assert accuracy <= 0.6, (name, accuracy)


# ----------------------------------------------------------------------------- strength


def test_restarts_never_weaken(trained_mlp):
  f, x, y = trained_mlp
  eps = 0.08
  fooled = {}
  for restarts in (1, 5):
    attack = _jitted('pgd', f, steps=5, restarts=restarts)
    fooled[restarts] = _predict(f, attack(x, y, _key(0), eps, step_size=eps / 4)) != np.asarray(y)
  assert 0.05 < fooled[1].mean() < 0.95  # the comparison is informative
  # Restart 0 is the same run for both, and the best is kept per example.
  assert np.all(fooled[5] >= fooled[1])
  assert fooled[5].sum() > fooled[1].sum()


def test_apgd_at_least_as_strong_as_pgd(trained_mlp):
  f, x, y = trained_mlp
  eps, steps = 0.06, 20
  robust_acc = lambda x_adv: float(np.mean(_predict(f, x_adv) == np.asarray(y)))
  # Same loss, same number of updates (APGD spends one extra gradient, at its start).
  for loss in ['ce', 'dlr']:
    pgd_acc = robust_acc(_jitted('pgd', f, steps=steps, loss=loss)(x, y, _key(0), eps))
    apgd_acc = robust_acc(_jitted('apgd', f, steps=steps, loss=loss)(x, y, _key(0), eps))
    assert 0.05 < pgd_acc < 0.95, pgd_acc  # the comparison is informative
    assert apgd_acc <= pgd_acc, (loss, apgd_acc, pgd_acc)


def _apgd_reference(loss_and_grad, is_success, x, eps, steps, rho=0.75, alpha=0.75):
  """A literal one-example-at-a-time transcription of APGD (linf, no random start).

  loss_and_grad(x [1, d]) -> (loss, grad [1, d]); returns the lexicographically
  best point [B, d] and, per example, how often the step size was halved.
  """
  checkpoints = A.apgd_checkpoints(steps)
  project = lambda v, x0: np.clip(np.clip(v, x0 - eps, x0 + eps), 0.0, 1.0)
  out, halvings = [], []
  for x0 in np.asarray(x)[:, None, :]:
    f0, g0 = loss_and_grad(x0)
    eta, x_cur, x_prev, g_cur, f_cur = 2 * eps, x0, x0, g0, f0
    x_max, f_max, g_max = x0, f0, g0
    best = (is_success(x0), f0, x0)
    n_increase, f_max_at_check, reduced_at_check, last_check, n_halved = 0, f0, False, 0, 0
    for k in range(1, steps + 1):
      a = 1.0 if k == 1 else alpha
      z = project(x_cur + eta * np.sign(g_cur), x0)
      x_new = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x0)
      f_new, g_new = loss_and_grad(x_new)
      if (is_success(x_new), f_new) > best[:2]:
        best = (is_success(x_new), f_new, x_new)
      n_increase += f_new > f_cur
      if f_new > f_max:
        x_max, f_max, g_max = x_new, f_new, g_new
      x_prev, x_cur, g_cur, f_cur = x_cur, x_new, g_new, f_new
      if k in checkpoints:
        reduce = (n_increase < rho * (k - last_check)) or (not reduced_at_check and
                                                           f_max <= f_max_at_check)
        if reduce:
          eta, n_halved = eta / 2, n_halved + 1
          x_cur, x_prev, g_cur, f_cur = x_max, x_max, g_max, f_max
        n_increase, f_max_at_check, reduced_at_check, last_check = 0, f_max, reduce, k
    out.append(best[2][0])
    halvings.append(n_halved)
  return np.stack(out), np.array(halvings)


@pytest.mark.parametrize('loss', ['ce', 'dlr'])
def test_apgd_matches_per_example_reference(trained_mlp, loss):
  f, x, y = trained_mlp
  x, y = x[:12], y[:12]
  eps, steps = 0.08, 25
  loss_fn = losses.get_loss(loss)
  value_and_grad = _jit(jax.value_and_grad(lambda u, label: loss_fn(f(u, None), label)[0]))

  def loss_and_grad(v, label):
    value, grad = value_and_grad(jnp.asarray(v, jnp.float32), jnp.array([label]))
    return float(value), np.asarray(grad)

  ref, halvings = [], []
  for i in range(len(y)):
    label = int(y[i])
    r, h = _apgd_reference(lambda v: loss_and_grad(v, label),
                           lambda v: int(_predict(f, jnp.asarray(v, jnp.float32))[0]) != label,
                           x[i:i + 1], eps, steps)
    ref.append(r[0])
    halvings.append(h[0])
  assert len(set(halvings)) > 1  # step-size control acts differently per example
  x_adv = _jitted('apgd', f, steps=steps, loss=loss, random_start=False)(x, y, _key(0), eps)
  ref = jnp.asarray(np.stack(ref))
  np.testing.assert_array_equal(_predict(f, x_adv), _predict(f, ref))
  # Batched and one-example float32 losses differ by ~1e-6. That can flip which
  # of two near-equal iterates is "best", and on a flat or ill-conditioned
  # (DLR with near-tied top logits) example steer the run elsewhere; a logic
  # error would instead show on most examples.
  same = np.all(np.abs(np.asarray(x_adv) - np.asarray(ref)) < 1e-5, axis=1)
  assert same.mean() >= 0.75, same


def test_apgd_checkpoint_schedule():
  assert A.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
  for steps in range(0, 60):
    ws = A.apgd_checkpoints(steps)
    assert ws == sorted(set(ws)) and all(0 < w < steps for w in ws)


# ----------------------------------------------------------------------------- compilation


def test_traced_eps_compiles_once():
  _, _, f = _linear(12, 3)
  x = _uniform(0, (8, 12))
  y = jnp.zeros(8, int)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def attack(x, y, rng, eps):
    return A.pgd(f, x, y, rng, eps=eps, steps=3)

  for eps in [0.0, 0.01, 0.03, 0.1]:
    _assert_feasible(attack(x, y, _key(1), eps), x, eps, 'linf')

  # make_attack: params and eps are arguments, so new values reuse the program.
  traces = []

  def linear(params, v, rng):  # runs once per trace of the attack program
    traces.append(1)
    return v @ params

  run = A.make_attack('apgd', linear, steps=4, norm='l2')
  for seed, eps in enumerate([0.0, 0.5, 1.0]):
    params = jnp.asarray(np.random.default_rng(seed).standard_normal((12, 3)), jnp.float32)
    _assert_feasible(run(params, x, y, _key(1), eps), x, eps, 'l2')
    if seed == 0:
      first = len(traces)
  assert first > 0 and len(traces) == first  # new params and eps: no retrace
