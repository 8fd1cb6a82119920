"""Models return (logits, per-layer representations) with the documented shapes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import models


def _cfg(**kw):
  base = dict(name='mlp', hidden=(100,) * 5, activation='tanh', weight_init='torch', use_bias=True)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_mlp_shapes_dtypes_and_torch_init():
  model = models.build_model(_cfg(), 10)
  x = jnp.zeros((3, 28, 28, 1), jnp.float32)
  params = model.init(jax.random.key(0), x)['params']
  logits, reps = model.apply({'params': params}, x)
  chex.assert_shape(logits, (3, 10))
  chex.assert_type(logits, jnp.float32)
  assert len(reps) == 5
  for r in reps:
    chex.assert_shape(r, (3, 100))
    assert float(jnp.abs(r).max()) <= 1.0  # tanh
  # PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
  for name, fan_in in [('hidden_0', 784), ('hidden_1', 100), ('out', 100)]:
    for leaf in params[name].values():
      bound = 1 / np.sqrt(fan_in)
      assert float(jnp.abs(leaf).max()) <= bound
      assert float(jnp.abs(leaf).max()) > 0.9 * bound  # uses the whole range


def test_fermi_bose_activation_and_no_bias():
  model = models.build_model(_cfg(hidden=(50,), activation='half_tanh', weight_init='normal_fan_in',
                                  use_bias=False), 10)
  x = jax.random.uniform(jax.random.key(1), (4, 784))
  params = model.init(jax.random.key(0), x)['params']
  assert 'bias' not in params['hidden_0'] and 'bias' not in params['out']
  _, (h,) = model.apply({'params': params}, x)
  assert float(h.min()) > 0 and float(h.max()) < 1
  # N(0, 1/fan_in): the empirical std is close to 1/sqrt(784).
  np.testing.assert_allclose(float(params['hidden_0']['kernel'].std()), 1 / np.sqrt(784), rtol=0.05)


def test_cnn_shapes():
  cfg = ml_collections.ConfigDict(dict(name='cnn', channels=(8, 16), convs_per_block=2, kernel_size=3,
                                       dense=(32, 32), activation='relu', weight_init='lecun'))
  model = models.build_model(cfg, 10)
  x = jnp.zeros((2, 28, 28, 1))
  params = model.init(jax.random.key(0), x)
  logits, reps = model.apply(params, x)
  chex.assert_shape(logits, (2, 10))
  assert [r.shape for r in reps] == [(2, 14, 14, 8), (2, 7, 7, 16), (2, 32), (2, 32)]


@pytest.mark.parametrize('name', ['resnet18', 'vone_resnet18'])
def test_resnet_blocks_per_stage(name):
  """model.blocks: 2 BasicBlocks per stage by default (ResNet-18), 1 for the smoke's ResNet-10."""
  x = jnp.zeros((1, 32, 32, 3))

  def block_names(**kw):
    cfg = ml_collections.ConfigDict(dict(name=name, width=4, front_channels=8, noise='none', **kw))
    params = jax.eval_shape(models.build_model(cfg, 10).init, jax.random.key(0), x)['params']
    params = params.get('resnet', params)
    return sorted(k for k in params if '_block' in k)

  assert block_names() == [f'stage{s}_block{b}' for s in range(4) for b in range(2)]
  assert block_names(blocks=1) == [f'stage{s}_block0' for s in range(4)]
  with pytest.raises(Exception, match='model.blocks'):
    block_names(blocks=0)


def test_unknown_names_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown model 'vit'; available: audio_cnn, cnn, mlp, poly2, resnet18, symmetric_relu, vone_cnn, vone_resnet18"):
    models.build_model(_cfg(name='vit'), 10)
  model = models.build_model(_cfg(activation='swishy'), 10)
  with pytest.raises(ValueError, match="unknown activation 'swishy'"):
    model.init(jax.random.key(0), jnp.zeros((1, 4)))


@pytest.mark.parametrize('kernel,padding', [(5, 'SAME'), (3, 'SAME'), (4, 'SAME'), (3, 'VALID'),
                                            (3, ((2, 0), (1, 3)))])
def test_conv_gradients_equal_autodiff_and_match_flax(kernel, padding):
  """The loop-friendly conv (models/conv.py): same values and gradients as lax/nn.Conv."""
  from geomrobust.models.conv import Conv
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 9, 8, 4)), jnp.float32)
  ours, ref = Conv(6, (kernel, kernel), padding=padding), nn.Conv(6, (kernel, kernel), padding=padding)
  params = ref.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
  loss = lambda m: (lambda p, xx: jnp.sum(jnp.sin(m.apply(p, xx))))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
  for argnum in (0, 1):
    a = jax.grad(loss(ours), argnums=argnum)(params, x)
    b = jax.grad(loss(ref), argnums=argnum)(params, x)
    chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-4)
  # Inside a loop body (where the rewrite matters) too, and under vmap.
  scanned = jax.lax.scan(lambda c, _: (c + jax.grad(loss(ours), argnums=1)(params, x), None),
                         jnp.zeros_like(x), None, length=2)[0]
  np.testing.assert_allclose(scanned, 2 * jax.grad(loss(ref), argnums=1)(params, x), rtol=1e-4, atol=1e-4)
  per_example = jax.vmap(lambda xi: jax.grad(loss(ours), argnums=1)(params, xi[None])[0])(x)
  np.testing.assert_allclose(per_example, jax.grad(loss(ref), argnums=1)(params, x), rtol=1e-4, atol=1e-4)
