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


def _assert_feasible(x_adv, x, eps, norm):
  """x_adv inside the eps-ball around x (per example) and inside [0, 1]."""
  x_adv, x = np.asarray(x_adv), np.asarray(x)
  assert x_adv.shape == x.shape
  assert np.all(x_adv >= 0.0) and np.all(x_adv <= 1.0)
  dist = np.asarray(norms.per_example_norm(jnp.asarray(x_adv - x), norm))
  assert np.all(dist <= np.broadcast_to(eps, dist.shape) + ATOL_BALL), dist.max()


# ----------------------------------------------------------------------------- models


def _linear(num_features, num_classes, seed=0):
  """logits = x @ W + b, as (W, b, logits_fn)."""
  kw, kb = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(kw, (num_features, num_classes))
  b = 0.1 * jax.random.normal(kb, (num_classes,))
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
  keys = jax.random.split(jax.random.key(1), 2)
  params = [(jax.random.normal(keys[0], (dim, 16)) / np.sqrt(dim), jnp.zeros(16)),
            (jax.random.normal(keys[1], (16, classes)) / 4.0, jnp.zeros(classes))]
  opt = optax.adam(3e-2)
  opt_state = opt.init(params)
  xj, yj = jnp.asarray(x), jnp.asarray(y)

  @jax.jit
  def train_step(params, opt_state):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(_mlp_apply(p, xj), yj).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(300):
    params, opt_state = train_step(params, opt_state)
  logits_fn = A.deterministic(functools.partial(_mlp_apply, params))
  acc = float(jnp.mean(jnp.argmax(logits_fn(xj, None), -1) == yj))
  assert acc > 0.95, acc
  return logits_fn, xj[:256], yj[:256]


def _robust_acc(logits_fn, x_adv, y):
  return float(jnp.mean(jnp.argmax(logits_fn(x_adv, None), -1) == y))


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
  project = jax.jit(norms.project, static_argnames='norm')
  for trial in range(50):
    shape = [(8, 5), (4, 3, 3, 2)][trial % 2]
    x = jnp.asarray(rng.uniform(0, 1, shape), jnp.float32)
    x_adv = jnp.asarray(x + rng.normal(0, rng.uniform(0.01, 3.0), shape), jnp.float32)
    # Alternate scalar and per-example eps, including 0.
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
  delta = norms.random_init(jax.random.key(0), x, eps, norm)
  dist = norms.per_example_norm(delta, norm)
  assert np.all(np.asarray(dist) <= eps + 1e-6)
  assert float(dist.mean()) > 0.5 * eps  # genuinely spread through the ball
  surface = norms.random_surface(jax.random.key(1), x, eps, norm)
  np.testing.assert_allclose(norms.per_example_norm(surface, norm), eps, rtol=1e-5)
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


def _linear_setup(num=32, dim=12, seed=0):
  w, b, f = _linear(dim, 2, seed)
  x = jax.random.uniform(jax.random.key(seed + 100), (num, dim), minval=0.3, maxval=0.7)
  y = jnp.argmax(f(x, None), -1)
  # w_y - w_other per example: [B, d].
  w_diff = jnp.where((y == 0)[:, None], w[:, 0] - w[:, 1], w[:, 1] - w[:, 0])
  return f, x, y, w_diff


def test_fgsm_linear_closed_form():
  f, x, y, w_diff = _linear_setup()
  eps = 0.1  # x in [0.3, 0.7]: the box never binds
  for loss in ['ce', 'margin']:
    x_adv = A.fgsm(f, x, y, jax.random.key(0), eps=eps, norm='linf', loss=loss)
    chex.assert_trees_all_close(x_adv, x - eps * jnp.sign(w_diff), atol=1e-6)
  x_adv = A.fgsm(f, x, y, jax.random.key(0), eps=eps, norm='l2', loss='margin')
  unit = w_diff / jnp.linalg.norm(w_diff, axis=1, keepdims=True)
  chex.assert_trees_all_close(x_adv, x - eps * unit, atol=1e-6)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_pgd_linear_reaches_optimal_margin(norm):
  f, x, y, w_diff = _linear_setup()
  eps = 0.1
  dual = {'linf': jnp.sum(jnp.abs(w_diff), 1), 'l2': jnp.linalg.norm(w_diff, axis=1)}[norm]
  optimal = losses.margin(f(x, None), y) + eps * dual
  # For l2, PGD from a random start only rotates onto the optimal direction
  # geometrically fast in step_size / eps, so also try a long step.
  for kwargs in [{}, {'random_start': False}, {'step_size': 0.5 * eps}]:
    if norm == 'l2' and not kwargs:
      continue  # default 2.5 * eps / steps leaves ~1% of the margin gain on the table
    x_adv = jax.jit(functools.partial(A.pgd, f, eps=eps, norm=norm, steps=20, loss='margin',
                                      **kwargs))(x, y, jax.random.key(0))
    _assert_feasible(x_adv, x, eps, norm)
    np.testing.assert_allclose(losses.margin(f(x_adv, None), y), optimal, rtol=1e-3, atol=1e-3)
  x_apgd = jax.jit(functools.partial(A.apgd, f, eps=eps, norm=norm, steps=20, loss='margin'))(
      x, y, jax.random.key(0))
  np.testing.assert_allclose(losses.margin(f(x_apgd, None), y), optimal, rtol=1e-3, atol=1e-3)


def test_targeted_attack_reaches_target_on_linear_model():
  # Class c reads block c of the input: raising block t and lowering the others flips to t.
  dim, classes, num = 16, 4, 32
  w = jnp.kron(jnp.eye(classes), jnp.ones((dim // classes, 1)))
  w = w + 0.05 * jax.random.normal(jax.random.key(0), w.shape)
  f = A.deterministic(lambda x: x @ w)
  x = jax.random.uniform(jax.random.key(1), (num, dim), minval=0.3, maxval=0.7)
  y = jnp.argmax(f(x, None), -1)
  t = (y + 1 + jax.random.randint(jax.random.key(2), (num,), 0, classes - 1)) % classes
  for attack, loss in [(A.pgd, 'ce'), (A.pgd, 'margin'), (A.apgd, 'dlr'), (A.apgd, 'ce')]:
    x_adv = attack(f, x, y, jax.random.key(3), eps=0.3, steps=20, loss=loss, targeted=True,
                   target_labels=t)
    _assert_feasible(x_adv, x, 0.3, 'linf')
    np.testing.assert_array_equal(jnp.argmax(f(x_adv, None), -1), t)
  with pytest.raises(ValueError, match='target_labels'):
    A.pgd(f, x, y, jax.random.key(3), eps=0.3, targeted=True)


# ----------------------------------------------------------------------------- all attacks


def _all_attacks(f, x, y, rng, eps, norm, **extra):
  return {
      'fgsm': A.fgsm(f, x, y, rng, eps=eps, norm=norm, **extra),
      'pgd': A.pgd(f, x, y, rng, eps=eps, norm=norm, steps=5, restarts=2, **extra),
      'apgd': A.apgd(f, x, y, rng, eps=eps, norm=norm, steps=8, restarts=2, **extra),
      'noise': A.random_noise(f, x, y, rng, eps=eps, norm=norm, samples=3, **extra),
  }


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_attack_outputs_feasible_nhwc(norm):
  """Inputs near the box edges, NHWC shape, a nonlinear model: outputs stay feasible."""
  kx, kw = jax.random.split(jax.random.key(5))
  x = jax.random.uniform(kx, (6, 4, 4, 2))
  x = jnp.where(x > 0.5, jnp.minimum(1.0, x + 0.4), jnp.maximum(0.0, x - 0.4))
  w = jax.random.normal(kw, (32, 5))
  f = A.deterministic(lambda v: jnp.tanh(v.reshape(v.shape[0], -1) @ w) @ jnp.eye(5) * 3.0)
  y = jnp.arange(6) % 5
  eps = {'linf': 0.3, 'l2': 1.5}[norm]
  for name, x_adv in _all_attacks(f, x, y, jax.random.key(0), eps, norm).items():
    chex.assert_shape(x_adv, x.shape)
    _assert_feasible(x_adv, x, eps, norm), name


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_eps_zero_returns_input(norm):
  _, _, f = _linear(12, 3)
  x = jax.random.uniform(jax.random.key(0), (8, 12))
  y = jnp.zeros(8, int)
  for name, x_adv in _all_attacks(f, x, y, jax.random.key(1), 0.0, norm).items():
    np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x), err_msg=name)


def test_run_attack_registry():
  _, _, f = _linear(6, 3)
  x = jnp.full((2, 6), 0.5)
  y = jnp.zeros(2, int)
  out = A.run_attack('pgd', f, x, y, jax.random.key(0), eps=0.1, steps=2)
  chex.assert_shape(out, (2, 6))
  with pytest.raises(ValueError, match='apgd, fgsm, noise, pgd'):
    A.run_attack('cw', f, x, y, jax.random.key(0), eps=0.1)


def test_gaussian_noise():
  x = jnp.full((4, 8), 0.5)
  np.testing.assert_array_equal(A.gaussian_noise(x, jax.random.key(0), 0.0), x)
  noisy = A.gaussian_noise(x, jax.random.key(0), 5.0)
  assert np.all((np.asarray(noisy) >= 0) & (np.asarray(noisy) <= 1))
  assert np.any(np.asarray(noisy) == 0.0) and np.any(np.asarray(noisy) == 1.0)


# ----------------------------------------------------------------------------- EOT


def _masked_linear(dim=10, classes=3):
  """logits = (x * mask(rng)) @ W with a Bernoulli(0.5) mask fixed by the key."""
  w = jax.random.normal(jax.random.key(7), (dim, classes))

  def logits_fn(x, rng):
    mask = jax.random.bernoulli(rng, 0.5, x.shape).astype(x.dtype)
    return (x * mask) @ w

  return logits_fn


def test_eot_averages_exactly_k_draws():
  f = _masked_linear()
  x = jax.random.uniform(jax.random.key(0), (5, 10))
  y = jnp.array([0, 1, 2, 0, 1])
  rng = jax.random.key(3)
  k = 6
  loss, grad = A.eot_grad(f, losses.cross_entropy, k)(x, y, rng)
  per_key = [jax.value_and_grad(lambda v, key=key: losses.cross_entropy(f(v, key), y).sum())(x)
             for key in jax.random.split(rng, k)]
  manual_grad = sum(g for _, g in per_key) / k
  manual_loss = sum(losses.cross_entropy(f(x, key), y) for key in jax.random.split(rng, k)) / k
  chex.assert_trees_all_close(grad, manual_grad, atol=1e-6)
  chex.assert_trees_all_close(loss, manual_loss, atol=1e-6)
  chex.assert_shape(grad, x.shape)
  # The mask really varies between draws, so the average differs from any single draw.
  assert not np.allclose(grad, per_key[0][1])
  # Forward-only evaluation uses the same draws.
  out = A.eot_value(f, lambda z: losses.cross_entropy(z, y), k)(x, rng)
  chex.assert_trees_all_close(out.loss, loss, atol=1e-6)
  probs = sum(jax.nn.softmax(f(x, key)) for key in jax.random.split(rng, k)) / k
  chex.assert_trees_all_close(out.probs, probs, atol=1e-6)


def test_eot_k1_is_plain_gradient():
  _, _, f = _linear(10, 3)
  x = jax.random.uniform(jax.random.key(0), (4, 10))
  y = jnp.array([0, 1, 2, 0])
  loss, grad = A.eot_grad(f, losses.margin, 1)(x, y, jax.random.key(1))
  plain = jax.grad(lambda v: losses.margin(f(v, None), y).sum())(x)
  chex.assert_trees_all_close(grad, plain, atol=1e-6)
  chex.assert_trees_all_close(loss, losses.margin(f(x, None), y), atol=1e-6)


def test_stochastic_model_attacks_run_with_eot():
  f = _masked_linear()
  x = jax.random.uniform(jax.random.key(0), (5, 10))
  y = jnp.array([0, 1, 2, 0, 1])
  for name, x_adv in _all_attacks(f, x, y, jax.random.key(1), 0.1, 'linf',
                                  eot_samples=4).items():
    _assert_feasible(x_adv, x, 0.1, 'linf'), name


# ----------------------------------------------------------------------------- strength


def test_restarts_never_weaken(trained_mlp):
  f, x, y = trained_mlp
  eps = 0.08
  attack = jax.jit(functools.partial(A.pgd, f, eps=eps, steps=5, step_size=eps / 4),
                   static_argnames='restarts')
  fooled = {r: np.asarray(jnp.argmax(f(attack(x, y, jax.random.key(0), restarts=r), None), -1)
                          != y) for r in (1, 5)}
  assert 0.05 < fooled[1].mean() < 0.95  # the test is informative
  assert np.all(fooled[5] >= fooled[1])
  assert fooled[5].sum() > fooled[1].sum()


def test_apgd_at_least_as_strong_as_pgd(trained_mlp):
  f, x, y = trained_mlp
  eps, steps = 0.06, 20
  pgd_acc = _robust_acc(f, A.pgd(f, x, y, jax.random.key(0), eps=eps, steps=steps), y)
  assert 0.05 < pgd_acc < 0.95, pgd_acc
  for loss in ['ce', 'dlr']:
    apgd_acc = _robust_acc(f, A.apgd(f, x, y, jax.random.key(0), eps=eps, steps=steps, loss=loss),
                           y)
    assert apgd_acc <= pgd_acc, (loss, apgd_acc, pgd_acc)


def test_apgd_checkpoint_schedule():
  assert A.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
  for steps in range(0, 60):
    ws = A.apgd_checkpoints(steps)
    assert ws == sorted(set(ws)) and all(0 < w < steps for w in ws)


# ----------------------------------------------------------------------------- compilation


def test_traced_eps_compiles_once():
  _, _, f = _linear(12, 3)
  x = jax.random.uniform(jax.random.key(0), (8, 12))
  y = jnp.zeros(8, int)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def attack(x, y, rng, eps):
    return A.pgd(f, x, y, rng, eps=eps, steps=3)

  for eps in [0.0, 0.01, 0.03, 0.1]:
    _assert_feasible(attack(x, y, jax.random.key(1), eps), x, eps, 'linf')

  apply_fn = lambda params, v, rng: v @ params
  run = A.make_attack('apgd', apply_fn, steps=4, norm='l2')
  params = jax.random.normal(jax.random.key(2), (12, 3))
  for eps in [0.0, 0.5, 1.0]:
    _assert_feasible(run(params, x, y, jax.random.key(1), eps), x, eps, 'l2')
  assert run._cache_size() == 1
