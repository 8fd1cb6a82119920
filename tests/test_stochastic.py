"""Stochastic neurons: the noise layer's statistics and keys, the fixed VOne
front end, EOT on a noise that averages out, and sharding invariance."""

import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import attacks
from geomrobust import config as config_lib
from geomrobust import models
from geomrobust import parallel
from geomrobust.data import testing
from geomrobust.methods import base, build_method
from geomrobust.models import stochastic
from geomrobust.training import loop


def tiny_config(**model):
  cfg = config_lib.default_config()
  cfg.model = ml_collections.ConfigDict(dict(
      name='vone_cnn', front_end='vone', noise='poisson', noise_scale=1.0, front_channels=8, front_kernel=5,
      channels=(8,), dense=(16,)))
  cfg.model.update(model)
  cfg.method = ml_collections.ConfigDict(dict(name='standard'))
  cfg.train.update(dict(epochs=2, batch_size=32, lr=3e-3))
  cfg.eval.batch_size = 64
  return cfg


def tiny_method(cfg):
  return build_method(cfg, models.build_model(cfg.model, 10), 10)


@pytest.mark.parametrize('kind', ['poisson', 'gaussian'])
def test_noise_mean_and_variance_match_the_formula(kind):
  x = jnp.asarray(np.linspace(-0.5, 3.0, 8), jnp.float32)[None, :]    # a grid of inputs, below and above -l/s
  layer = stochastic.NoiseLayer(kind, scale=1.0)
  params = layer.init({'params': jax.random.key(0), 'noise': jax.random.key(1)}, x)
  draws = jax.vmap(lambda k: layer.apply(params, jnp.broadcast_to(x, (64,) + x.shape[1:]), rngs={'noise': k}))(
      jax.random.split(jax.random.key(2), 500)).reshape(-1, x.shape[1])     # 32,000 draws per input
  var = (stochastic.poisson_like_variance(x[0]) if kind == 'poisson'
         else np.full(x.shape[1], stochastic.GAUSSIAN_SIGMA ** 2))
  n = draws.shape[0]
  np.testing.assert_allclose(np.mean(draws, 0), x[0], atol=5 * np.sqrt(var / n).max())
  np.testing.assert_allclose(np.var(draws, 0), var, rtol=0.05)
  # Poisson-like: the variance grows with the mean (above the rectification point).
  if kind == 'poisson':
    assert np.all(np.diff(var[x[0] > 0]) > 0)
  # noise_scale multiplies the noise: the variance by its square.
  half = layer.apply({'constants': {'noise_scale': jnp.float32(0.5)}}, jnp.broadcast_to(x, (20000, x.shape[1])),
                     rngs={'noise': jax.random.key(3)})
  np.testing.assert_allclose(np.var(half, 0), 0.25 * var, rtol=0.08)


def test_keys_decide_the_draw_and_frozen_mode_is_deterministic():
  cfg = tiny_config()
  method = tiny_method(cfg)
  x = jnp.asarray(testing.class_blobs(6, 0)[0], jnp.float32) / 255
  params = method.init_params(jax.random.key(0), x[:1])
  assert method.stochastic
  a, b, c = (method.logits(params, x, jax.random.key(k)) for k in (1, 1, 2))
  chex.assert_trees_all_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-3
  with pytest.raises(ValueError, match='pass a key'):
    method.logits(params, x)
  # Frozen: one fixed draw whatever the key; the model is deterministic.
  frozen = tiny_method(tiny_config(frozen_noise=True))
  assert not frozen.stochastic
  f1, f2 = (frozen.logits(params, x, jax.random.key(k)) for k in (1, 2))
  chex.assert_trees_all_equal(f1, f2)
  # Per-example keys: an example's draw depends on its position, not on the rest of the batch.
  alone = method.logits(params, x[:3], jax.random.key(1))
  np.testing.assert_allclose(alone, a[:3], rtol=1e-5, atol=1e-6)


def test_the_front_end_never_trains_and_the_noise_scale_is_a_frozen_constant(tmp_path):
  cfg = tiny_config()
  method = tiny_method(cfg)
  x, y = testing.class_blobs(128, 0)
  before = method.init_params(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  paths = [base.path_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(before['model'])]
  assert not any('vone' in p for path in paths for p in path), paths   # the Gabor bank is not a parameter
  assert 'conv' not in before['model'].get('first', {})
  (phase,) = method.phases()
  tx = loop.phase_optimizer(phase, before, cfg.train, 4)
  opt_leaves = jax.tree_util.tree_leaves_with_path(tx.init(before))
  assert not any('constants' in base.path_names(p) for p, _ in opt_leaves)   # no optimiser state for it
  res = loop.train(method, x, y, x[:64], y[:64], cfg, tmp_path, parallel.make_mesh(1), log=lambda s: None)
  chex.assert_trees_all_equal(res.params['constants'], before['constants'])
  assert float(jnp.abs(res.params['model']['out']['kernel'] - before['model']['out']['kernel']).max()) > 0
  # The bank's response to an input is the same before and after training.
  bank = stochastic.VOneBank(8, 5)
  img = jnp.asarray(x[:4], jnp.float32) / 255
  chex.assert_trees_all_equal(bank.apply({}, img), bank.apply({}, img))
  # The learned-conv ablation trains its first conv.
  conv = tiny_method(tiny_config(front_end='conv'))
  p = conv.init_params(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  assert 'conv' in p['model']['first']


def test_gabor_bank_is_below_nyquist_quadrature_and_zero_mean():
  bank, info = stochastic.gabor_bank(16, 9, 1, seed=3, sf_min=0.1, sf_max=0.3)
  assert bank.shape == (9, 9, 1, 8 + 2 * 8)
  assert np.all(info['sf'] < 0.5) and np.all(info['sf'] >= 0.1) and np.all(info['sf'] <= 0.3)
  np.testing.assert_allclose(bank.sum((0, 1, 2)), 0, atol=1e-6)     # zero DC
  # The energy of every filter sits below Nyquist, near its own frequency.
  spec = np.abs(np.fft.fft2(bank[:, :, 0, :].transpose(2, 0, 1), s=(64, 64)))
  f = np.fft.fftfreq(64)
  radius = np.hypot(f[:, None], f[None, :])
  peak = np.array([radius.reshape(-1)[np.argmax(s.reshape(-1))] for s in spec])
  sf = np.concatenate([info['sf'], info['sf'][8:]])
  assert np.all(peak < 0.5) and np.all(np.abs(peak - sf) < 0.12), (peak, sf)
  # A complex cell's pair is in quadrature: the two filters are nearly orthogonal.
  q0, q1 = bank[:, :, 0, 8:16].reshape(81, 8), bank[:, :, 0, 16:].reshape(81, 8)
  cos = np.sum(q0 * q1, 0) / np.linalg.norm(q0, axis=0) / np.linalg.norm(q1, axis=0)
  assert np.all(np.abs(cos) < 0.3), cos
  with pytest.raises(ValueError, match='Nyquist'):
    stochastic.gabor_bank(16, 9, sf_max=0.5)


class _NoisyLinear(nn.Module):
  """``w . poisson_noise(x)``: E over the noise of the input gradient is exactly ``w``."""

  @nn.compact
  def __call__(self, x):
    h = stochastic.NoiseLayer('poisson')(x.reshape(x.shape[0], -1))
    w = jnp.linspace(-1.0, 1.0, h.shape[-1])
    return jnp.stack([h @ w, jnp.zeros(h.shape[0])], -1)


def test_eot_gradient_of_a_noise_that_averages_out_is_the_expected_gradient():
  model = _NoisyLinear()
  x = jnp.full((1, 16), 0.8, jnp.float32)
  params = model.init({'params': jax.random.key(0), 'noise': jax.random.key(1)}, x)
  logits_fn = lambda xx, r: model.apply(params, xx, rngs={'noise': r})
  k = 4096
  out = jax.jit(attacks.eot_value_and_grad(logits_fn, lambda z: z[:, 0], k))(x, jax.random.key(5))
  w = np.linspace(-1.0, 1.0, 16)
  # One draw's gradient is w * (1 + e / (2 sqrt(s x + l + 1e-4))); its mean over draws is w.
  spread = np.abs(w) / (2 * np.sqrt(stochastic.POISSON_S * 0.8 + stochastic.POISSON_L + 1e-4))
  np.testing.assert_allclose(out.grad[0], w, atol=float(5 * spread.max() / np.sqrt(k)))
  one = jax.jit(attacks.eot_value_and_grad(logits_fn, lambda z: z[:, 0], 1))(x, jax.random.key(5))
  assert np.abs(one.grad[0] - w).max() > 5 * spread.max() / np.sqrt(k)   # a single draw is not the mean


SHARDED_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r})
    from tests.test_stochastic import tiny_config, tiny_method
    from geomrobust import parallel
    from geomrobust.data import testing
    from geomrobust.training import loop
    assert jax.device_count() == 8, jax.devices()
    x, y = testing.class_blobs(128, 0)
    out = {{}}
    for n in (1, 8):
      cfg = tiny_config()
      method = tiny_method(cfg)
      res = loop.train(method, x, y, x[:64], y[:64], cfg, {tmp!r} + f'/n{{n}}', parallel.make_mesh(n),
                       log=lambda s: None)
      logits = method.logits(res.params, x[:16].astype(np.float32) / 255, jax.random.key(3))
      out[n] = [np.asarray(l).tolist() for l in jax.tree.leaves(res.params)] + [np.asarray(logits).tolist()]
    json.dump(out, open({tmp!r} + '/out.json', 'w'))
''')


def test_a_stochastic_model_trains_the_same_on_8_devices_as_on_one(run_on_8_cpu_devices):
  out = run_on_8_cpu_devices(SHARDED_SCRIPT)
  for a, b in zip(out['1'], out['8']):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_a_stacked_noise_level_sweep_member_equals_the_same_config_run_alone(tmp_path):
  from geomrobust.training import sweep as sweep_lib
  cfg = tiny_config()
  x, y = testing.class_blobs(128, 0)
  grid = sweep_lib.Grid('model.noise_scale', (0.0, 2.0), (0,))
  res = sweep_lib.train_sweep(tiny_method(cfg), grid, x, y, x[:64], y[:64], cfg, None, parallel.make_mesh(1),
                              mean_last=1, log=lambda s: None)
  assert res.compilations == {'train': 1}          # one program for both noise levels
  np.testing.assert_array_equal(np.asarray(res.params['constants']['first']['noise']['noise_scale']), [[0.0, 2.0]])
  alone_cfg = tiny_config(noise_scale=2.0)
  alone = loop.train(tiny_method(alone_cfg), x, y, x[:64], y[:64], alone_cfg, tmp_path, parallel.make_mesh(1),
                     log=lambda s: None)
  member = jax.tree.map(lambda a: a[0, 1], res.params)
  chex.assert_trees_all_close(member, alone.params, rtol=1e-4, atol=1e-5)
  quiet = jax.tree.map(lambda a: a[0, 0], res.params)
  assert not np.allclose(quiet['model']['out']['kernel'], member['model']['out']['kernel'])


def test_sweep_of_a_model_field_needs_a_traced_field_and_a_family_member():
  from geomrobust import members as members_lib
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.sweep = ml_collections.ConfigDict(dict(
        hparam='model.front_kernel', grid=(3.0, 5.0), seeds=1, stacked=True, chunk_size=0, baseline='',
        mean_last_epochs=1, screen_profile='quick', screen_examples=8, pgd_eps=0.1, strong=(), strong_seeds=1))
  with pytest.raises(config_lib.ConfigError, match="no traced field 'front_kernel'.*model.noise_scale"):
    members_lib.expand(cfg)
  cfg.sweep.hparam = 'model.noise_scale'
  assert [m.name for m in members_lib.expand(cfg)[0].members] == ['noise_scale_3_seed0', 'noise_scale_5_seed0']
  cfg.sweep.member = 'vone'
  with pytest.raises(config_lib.ConfigError, match="sweep.member='vone' is not a member"):
    members_lib.expand(cfg)
  cfg.members = ('plain: model.noise=none', 'vone: model.noise_scale=0.5')
  groups = members_lib.expand(cfg)
  assert [m.name for m in groups[0].members] == ['plain', 'vone'] and 'sweep' not in groups[0].members[0].config
  sub = members_lib.member_sweep(cfg)
  assert sub.model.noise_scale == 0.5 and sub.sweep.member == '' and not sub.members
