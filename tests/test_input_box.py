"""The valid input box: attacks clip to ``box`` (default [0, 1]) or, with
``box=None``, are held by the eps-ball only; the default is bit-identical to
``box=(0., 1.)``; ``evaluate(..., box=None)`` on unbounded float data."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import attacks as A
from geomrobust import config as config_lib
from geomrobust import evaluation
from geomrobust import parallel
from geomrobust.evaluation import sanity

ATOL_BALL = 1e-5
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _key(seed):
  return jax.random.key(seed, impl='rbg')  # compiles much faster than threefry on CPU


def _up(x, rng=None):
  """A linear 2-class model on [B, D]: logits (-sum x, sum x). For label 0 every
  attack pushes every coordinate up (the steepest direction is +1 everywhere)."""
  s = x.reshape(x.shape[0], -1).sum(1)
  return jnp.stack([-s, s], -1)


_SETTINGS = {'fgsm': {}, 'pgd': dict(steps=5, restarts=1), 'apgd': dict(steps=5),
             'noise': dict(samples=8)}


@functools.cache
def _attack(name, norm, **static):
  attack = A.ATTACKS[name]
  return _jit(lambda x, y, rng, eps: attack(_up, x, y, rng, eps=eps, norm=norm, **_SETTINGS[name], **static))


def _dist(x_adv, x, norm):
  d = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).reshape(len(x), -1)
  return np.abs(d).max(1) if norm == 'linf' else np.sqrt((d ** 2).sum(1))


# ----------------------------------------------------------------------------- (1) box=None leaves [0, 1]

@pytest.mark.parametrize('name', ['fgsm', 'pgd', 'apgd', 'noise'])
def test_no_box_leaves_unit_box_but_stays_in_ball(name):
  x = jnp.full((3, 4), 0.99, jnp.float32)
  y = jnp.zeros(3, jnp.int32)
  eps = jnp.float32(0.1)
  free = np.asarray(_attack(name, 'linf', box=None)(x, y, _key(0), eps))
  clipped = np.asarray(_attack(name, 'linf')(x, y, _key(0), eps))
  custom = np.asarray(_attack(name, 'linf', box=(-1.0, 1.05))(x, y, _key(0), eps))
  assert np.all(_dist(free, x, 'linf') <= 0.1 + ATOL_BALL)
  assert free.max() == pytest.approx(1.09, abs=1e-6)  # 0.99 + eps: outside [0, 1]
  if name != 'noise':  # the gradient attacks find the optimum: every coordinate at 1.09
    np.testing.assert_allclose(free, 1.09, atol=1e-6)
  assert clipped.max() == 1.0 and np.all(_dist(clipped, x, 'linf') <= 0.1 + ATOL_BALL)  # the default box clips
  assert custom.max() == pytest.approx(1.05) and custom.max() <= np.float32(1.05)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_project_and_gaussian_noise_without_box(norm):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 1, (5, 6)), jnp.float32)
  far = x + jnp.asarray(rng.normal(0, 3, (5, 6)), jnp.float32)
  free = np.asarray(A.project(far, x, 0.5, norm, box=None))
  boxed = np.asarray(A.project(far, x, 0.5, norm))
  assert free.min() < 0 and free.max() > 1  # not clipped
  assert np.all(_dist(free, x, norm) <= 0.5 + ATOL_BALL)
  assert boxed.min() >= 0 and boxed.max() <= 1
  # Composable: ball then box is the box clip of the ball-only projection.
  np.testing.assert_array_equal(boxed, np.clip(free, 0.0, 1.0))
  g = np.asarray(A.gaussian_noise(x, _key(1), 2.0, box=None))
  assert g.min() < 0 and g.max() > 1
  g01 = np.asarray(A.gaussian_noise(x, _key(1), 2.0))
  np.testing.assert_array_equal(g01, np.clip(g, 0.0, 1.0))


def test_box_is_static_and_checked():
  fn = A.make_attack('pgd', lambda p, x, r: _up(x * p), steps=3, box=None)
  x = jnp.full((2, 3), 0.99, jnp.float32)
  out = np.asarray(fn(jnp.float32(1.0), x, jnp.zeros(2, jnp.int32), _key(0), jnp.float32(0.1)))
  assert out.max() > 1.0
  assert A.check_box([0, 1]) == (0.0, 1.0) and A.check_box(None) is None
  for bad in ((1.0, 0.0), (0.5, 0.5), (0.0,), 'ab'):
    with pytest.raises(ValueError, match='box'):
      A.check_box(bad)


# ----------------------------------------------------------------------------- (2) default == (0., 1.)

def _mlp_params():
  rng = np.random.default_rng(1)
  return (jnp.asarray(rng.normal(size=(12, 16)), jnp.float32), jnp.asarray(rng.normal(size=(16, 3)), jnp.float32))


_W1, _W2 = _mlp_params()


def _mlp(x, rng=None):
  return jnp.tanh(x @ _W1) @ _W2


@functools.cache
def _attack_mlp(name, norm, **static):
  attack = A.ATTACKS[name]
  kw = dict(_SETTINGS[name], restarts=2) if name == 'pgd' else _SETTINGS[name]
  return _jit(lambda x, y, rng, eps: attack(_mlp, x, y, rng, eps=eps, norm=norm, **kw, **static))


@pytest.mark.parametrize('norm,eps', [('linf', 0.3), ('l2', 1.5)])
@pytest.mark.parametrize('name', ['fgsm', 'pgd', 'apgd', 'noise'])
def test_default_box_is_bit_identical_to_explicit_unit_box(name, norm, eps):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.uniform(0, 1, (16, 12)), jnp.float32)  # large eps: the box is active
  y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
  default = np.asarray(_attack_mlp(name, norm)(x, y, _key(3), jnp.float32(eps)))
  explicit = np.asarray(_attack_mlp(name, norm, box=(0., 1.))(x, y, _key(3), jnp.float32(eps)))
  free = np.asarray(_attack_mlp(name, norm, box=None)(x, y, _key(3), jnp.float32(eps)))
  np.testing.assert_array_equal(default, explicit)
  assert default.min() >= 0 and default.max() <= 1
  assert not np.array_equal(default, free)  # the box did something here


# ----------------------------------------------------------------------------- (3) evaluate on unbounded data

C0 = -0.5  # the linear model's boundary: class 1 iff x_1 > C0


def _linear(params, x, rng=None):
  del rng
  return x @ params['w'] + params['b']


@pytest.fixture(scope='module')
def blobs():
  """Two 2-D Gaussian blobs far outside [0, 1] (centres (-3, 0) and (3, 0), std
  0.5) and the linear model ``logits = (-(x_1 - C0), x_1 - C0)``: (params, x, y).
  Its worst case is known exactly: under linf eps an example is robust iff
  |x_1 - C0| > eps. Every point of [0, 1]^2 is class 1."""
  rng = np.random.default_rng(0)
  n = 64
  y = np.arange(n) % 2
  x = (np.where(y[:, None] == 0, [-3.0, 0.0], [3.0, 0.0]) + rng.normal(0, 0.5, (n, 2))).astype(np.float32)
  params = {'w': jnp.asarray([[-1.0, 1.0], [0.0, 0.0]]), 'b': jnp.asarray([C0, -C0])}
  return params, jnp.asarray(x), jnp.asarray(y, jnp.int32)


def _ev(**changes) -> ml_collections.ConfigDict:
  ev = config_lib.default_config().eval
  evaluation.profiles.apply_profile(ev, 'quick')
  ev.update(dict(eps=(1.0, 2.5, 4.0), attacks=('pgd', 'apgd_ce'), pgd_steps=10, apgd_steps=10, noise_samples=2,
                 batch_size=32, trajectories=2))
  ev.update(changes)
  return ev


def _evaluate(blobs, box, **changes):
  params, x, y = blobs
  return evaluation.evaluate(_linear, params, x, y, _ev(**changes), parallel.make_mesh(1), log=lambda s: None,
                             box=box)


def test_evaluate_without_box_on_unbounded_data(blobs):
  params, x, y = blobs
  res = _evaluate(blobs, None)
  assert res['clean_accuracy'] == 1.0
  failed = {k: v for k, v in res['sanity'].items() if not v['passed']}
  assert not failed, failed
  # The huge eps is 10 x max |x| (no box), and it drives the accuracy to ~0.
  large = res['sanity']['large_eps_to_zero']
  assert f'eps={10 * float(jnp.abs(x).max()):g}' in large['detail']
  assert large['value'] <= sanity.zero_tolerance(len(y))
  # The grid matches the exact linear worst case: nothing was clipped to [0, 1].
  margin = np.abs(np.asarray(x)[:, 0] - C0)
  for row in res['robustness']:
    if row['attack'] in ('fgsm', 'pgd', 'apgd_ce', 'worst_case'):
      assert row['accuracy'] == pytest.approx(np.mean(margin > row['eps']), abs=1.0 / len(y)), row
  conv = {c['attack']: np.asarray(c['losses']) for c in res['convergence']}
  assert set(conv) == {'pgd', 'apgd_ce'}


def test_unit_box_on_unbounded_data_fails_the_large_eps_check(blobs):
  """The same problem clipped to [0, 1]: the attacks cannot leave [0, 1]^2, where
  every point is class 1, so the class-1 half survives any eps and the check
  flags it. This is what test_evaluate_without_box_on_unbounded_data guards."""
  res = _evaluate(blobs, (0.0, 1.0), eps=(1.0,), attacks=('pgd',), trajectories=0)
  check = res['sanity']['large_eps_to_zero']
  assert not check['passed'] and check['value'] == pytest.approx(0.5)


def test_large_eps_default():
  x = np.zeros((5, 3, 4), np.float32)
  x[2, 1, 1] = -7.0
  ev = ml_collections.ConfigDict(dict(norm='linf', large_eps=0.0))
  assert sanity.large_eps(ev, (0.0, 1.0), x) == 1.0
  assert sanity.large_eps(ev, (-2.0, 3.0), x) == 5.0
  assert sanity.large_eps(ev, None, x) == 70.0
  assert sanity.large_eps(ev, None, np.zeros_like(x)) == 10.0
  ev.norm = 'l2'
  assert sanity.large_eps(ev, (0.0, 1.0), x) == pytest.approx(np.sqrt(12))
  assert sanity.large_eps(ev, None, x) == pytest.approx(70.0 * np.sqrt(12))
  ev.large_eps = 3.0
  assert sanity.large_eps(ev, None, x) == 3.0 and sanity.large_eps(ev, (0.0, 1.0), x) == 3.0
