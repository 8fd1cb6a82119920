"""The isometric method: loss by hand, beta=0 is CE, NaN-free, exact freezing, diagnostics."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from geomrobust import config as config_lib
from geomrobust import models
from geomrobust.geometry import isometry
from geomrobust.methods import base
from geomrobust.methods import isometric


def test_penalty_on_a_hand_computed_batch():
  # Three points, labels (0, 0, 1). Same-class pairs: (0,1),(1,0) and the diagonal.
  x = jnp.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])   # |x0-x1| = 5
  h = jnp.array([[0.0], [2.0], [7.0]])                  # |h0-h1| = 2
  y = jnp.array([0, 0, 1])
  k = 1.5
  # (K*2 - 5)^2 = 4 for two entries; diagonals ~0; cross-class entries 0; mean over 9.
  expected = 2 * (k * 2 - 5) ** 2 / 9
  got = isometric.isometry_penalty(h, x, y, jnp.float32(k), min_sq=1e-12)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5, atol=1e-5)


def test_penalty_gradient_is_finite_with_duplicate_points():
  h = jnp.zeros((4, 3))  # all distances zero: sqrt'(0) would be inf without the clip
  x = jnp.ones((4, 5))
  g = jax.grad(lambda h: isometric.isometry_penalty(h, x, jnp.zeros(4, jnp.int32), jnp.float32(1)))(h)
  assert bool(jnp.all(jnp.isfinite(g)))


def _method(**method_kw):
  cfg = config_lib.load_experiment('isometric_mnist')
  cfg.model.hidden = method_kw.pop('hidden', (16, 16))
  for k, v in method_kw.items():
    cfg.method[k] = v
  model = models.build_model(cfg.model, 10)
  return isometric.Isometric(model, cfg, 10), cfg


def test_beta_zero_is_exactly_cross_entropy():
  method, _ = _method(beta=0.0)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
  y = jnp.arange(8) % 3
  (phase,) = method.phases()
  loss, aux = phase.loss_fn(params, {'image': x, 'label': y}, jax.random.key(2), method.hparams())
  logits, _ = method.apply(params, x)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  np.testing.assert_allclose(float(loss), float(ce), rtol=1e-6)
  assert float(aux['iso']) > 0  # measured even when it does not count


def test_hierarchical_levels_freeze_earlier_blocks_exactly():
  method, cfg = _method(beta=0.1, levels=('0,0,0,0,0,1,1,1,1,1',), depth_per_level=1)
  phases = method.phases()
  assert [p.name for p in phases] == ['level_0', 'level_1']
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 784)))
  assert params['heads']['level_0']['kernel'].shape == (16, 2)
  from geomrobust.training import loop
  x = jax.random.uniform(jax.random.key(1), (16, 784))
  y = jnp.arange(16) % 10
  batch = {'image': x, 'label': y}
  # Train level 1 for a few Adam steps: level-0 block and head must not move at all.
  tx = loop.phase_optimizer(phases[1], params, cfg.train, 10)
  step = jax.jit(loop.make_train_step(phases[1].loss_fn, tx))
  state = loop.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), hparams=method.hparams())
  for i in range(3):
    state, _ = step(state, batch, jax.random.key(i))
  new = state.params
  chex.assert_trees_all_equal(new['model']['hidden_0'], params['model']['hidden_0'])
  chex.assert_trees_all_equal(new['heads'], params['heads'])
  assert not np.allclose(new['model']['hidden_1']['kernel'], params['model']['hidden_1']['kernel'])
  assert not np.allclose(new['model']['out']['kernel'], params['model']['out']['kernel'])


def test_hierarchy_depth_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match='needs 4 hidden layers'):
    _method(levels=('0,0,0,0,0,1,1,1,1,1',), depth_per_level=2, hidden=(8, 8, 8))


def test_diagnostics_perfect_isometry_and_collapse():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(60, 20)).astype(np.float32)
  y = np.arange(60) % 3
  perfect = isometry.isometry_diagnostics(x, (x,), y, 3, k=1.0)['layers'][0]
  np.testing.assert_allclose(perfect['correlation'], 1.0, atol=1e-5)
  np.testing.assert_allclose(perfect['stress'], 0.0, atol=1e-5)
  np.testing.assert_allclose(perfect['max_ratio'], 1.0, atol=1e-5)
  # A representation that shrinks within-class distances 10x: ratio 10, stress ~0.81.
  shrunk = isometry.isometry_diagnostics(x, (x / 10,), y, 3)['layers'][0]
  np.testing.assert_allclose(shrunk['max_ratio'], 10.0, rtol=1e-4)
  np.testing.assert_allclose(shrunk['stress'], 0.81, rtol=1e-4)
