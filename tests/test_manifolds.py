"""Manifold builders (geometry.manifolds): shapes, projection, attacked repeats,
stochastic models, and the probe's option rules."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import config as config_lib
from geomrobust import experiment
from geomrobust import models
from geomrobust.geometry import manifolds
from geomrobust.geometry import mftma
from geomrobust.methods import build_method
from geomrobust.probes import manifold_geometry


def _method(model):
  cfg = config_lib.default_config()
  cfg.method = ml_collections.ConfigDict(dict(name='standard'))
  return build_method(cfg, model, 10)


def _mlp():
  return _method(models.build_model(ml_collections.ConfigDict(dict(
      name='mlp', hidden=(32, 16), activation='relu', weight_init='lecun')), 10))


def _cnn():
  # Widths: pixels 784, layer1 14*14*4 = 784, layer2 7*7*8 = 392, layer3 16, logits 10.
  return _method(models.build_model(ml_collections.ConfigDict(dict(
      name='cnn', channels=(4, 8), convs_per_block=1, kernel_size=3, dense=(16,), activation='relu',
      weight_init='lecun')), 10))


class NoisyMLP(nn.Module):
  """A stochastic model: Gaussian noise after its first layer (as the paper's noise layer)."""
  stochastic = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    h = h + 0.5 * jax.random.normal(self.make_rng('noise'), h.shape)
    return nn.Dense(10)(h), (h,)


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  return rng.uniform(size=(60, 28, 28, 1)).astype(np.float32), np.arange(60) % 10


def _params(method, x):
  return method.init_params(jax.random.key(0), jnp.asarray(x[:2]))


@pytest.mark.parametrize('which', ['mlp', 'cnn'])
def test_builders_give_the_documented_shapes(which, images):
  x, y = images
  method = _mlp() if which == 'mlp' else _cnn()
  params = _params(method, x)
  # max_features 500: the 784-wide layers are projected (S = 2), the rest kept whole (S = 1).
  b = manifolds.ManifoldBuilder(method, steps=2, batch_size=16, max_features=500, projection_seeds=2)
  widths = {'mlp': dict(pixels=784, layer1=32, layer2=16, logits=10),
            'cnn': dict(pixels=784, layer1=784, layer2=392, layer3=16, logits=10)}[which]
  assert [l.name for l in b.layers(params, x)] == list(widths)
  cls = b.class_manifolds(params, x, y, classes=3, per_class=4, eps=0.1, key=jax.random.key(1))
  ex = b.exemplar_manifolds(params, x, y, exemplars=5, repeats=3, eps=0.1, key=jax.random.key(2))
  for clouds, p, m in ((cls, 3, 4), (ex, 5, 3)):
    assert list(clouds) == list(widths)
    for name, n in widths.items():
      s, n_out = (2, 500) if n > 500 else (1, n)
      chex.assert_shape(clouds[name], (s, p, n_out, m))
      chex.assert_type(clouds[name], np.float32)
      assert np.all(np.isfinite(clouds[name]))


def test_wide_layers_are_projected_with_mftma_projection(images):
  x, y = images
  method = _cnn()
  params = _params(method, x)
  b = manifolds.ManifoldBuilder(method, batch_size=7, max_features=300, projection_seeds=3)
  clouds = b.class_manifolds(params, x, y, classes=2, per_class=3, eps=0.0, key=jax.random.key(0))
  xs, _ = manifolds.select_class_examples(x, y, 2, 3)
  flat = xs.reshape(6, -1)                                   # [P*M, 784], manifold-major
  for s in range(3):
    want = (flat @ mftma.projection(784, 300, s)).reshape(2, 3, 300).transpose(0, 2, 1)
    np.testing.assert_allclose(clouds['pixels'][s], want, rtol=1e-4, atol=1e-5)
  # Layers that fit are the features themselves, once.
  _, reps = method.apply(params, jnp.asarray(xs))
  chex.assert_shape(clouds['layer3'], (1, 2, 16, 3))
  np.testing.assert_allclose(clouds['layer3'][0], np.asarray(reps[2]).reshape(2, 3, 16).transpose(0, 2, 1),
                             rtol=1e-5, atol=1e-6)


def test_exemplar_repeats_differ_inside_the_ball_and_box(images):
  x, y = images
  method = _mlp()
  params = _params(method, x)
  eps = 0.1
  b = manifolds.ManifoldBuilder(method, steps=3, batch_size=8)
  clouds = b.exemplar_manifolds(params, x, y, exemplars=4, repeats=5, eps=eps, key=jax.random.key(0))
  pix = clouds['pixels'][0]                                  # [P, 784, M]
  for p in range(4):
    pts = pix[p].T                                           # [M, 784]
    gaps = np.abs(pts[:, None] - pts[None]).max(-1)
    assert np.all(gaps[~np.eye(5, dtype=bool)] > 1e-3), 'two repeats of one image got the same attack'
    assert np.abs(pts - x[p].reshape(1, -1)).max() <= eps + 1e-6
    assert pts.min() >= 0.0 and pts.max() <= 1.0
  assert not manifolds.collapsed(pix).any()
  # eps 0, deterministic: every exemplar manifold is one point.
  flat = b.exemplar_manifolds(params, x, y, exemplars=4, repeats=5, eps=0.0, key=jax.random.key(0))
  assert all(manifolds.collapsed(c[0]).all() for c in flat.values())


def test_stochastic_models_get_fresh_noise_per_repeat_and_eot(images):
  x, y = images
  method = _method(NoisyMLP())
  assert method.stochastic
  params = _params(method, x)
  b = manifolds.ManifoldBuilder(method, eot_samples=3, batch_size=8)
  assert b.eot_samples == 3
  assert manifolds.ManifoldBuilder(_mlp(), eot_samples=3).eot_samples == 1   # nothing to average
  clouds = b.exemplar_manifolds(params, x, y, exemplars=3, repeats=4, eps=0.0, key=jax.random.key(0))
  # The input is one point per image; after the noise the repeats spread.
  assert manifolds.collapsed(clouds['pixels'][0]).all()
  assert not manifolds.collapsed(clouds['layer1'][0]).any()
  assert not manifolds.collapsed(clouds['logits'][0]).any()


def test_attack_and_feature_pass_compile_once_across_eps(images):
  x, y = images
  traces = []
  method = _mlp()
  apply = method.apply
  method.apply = lambda *a, **k: (traces.append(1), apply(*a, **k))[1]   # runs at trace time only under jit
  params = _params(method, x)
  b = manifolds.ManifoldBuilder(method, steps=2, batch_size=8)
  b.class_manifolds(params, x, y, classes=2, per_class=4, eps=0.1, key=jax.random.key(0))
  first = len(traces)
  for eps in (0.05, 0.2):
    b.class_manifolds(params, x, y, classes=2, per_class=4, eps=eps, key=jax.random.key(0))
  assert len(traces) == first


def test_class_selection_is_first_m_per_class_and_says_when_short(images):
  x, y = images
  xs, ys = manifolds.select_class_examples(x, y, 3, 4)
  np.testing.assert_array_equal(ys, np.repeat(np.arange(3), 4))
  np.testing.assert_array_equal(xs[4], x[1])                 # class 1's first image
  with pytest.raises(ValueError, match='class 0 has 6 of the 7 images per class'):
    manifolds.select_class_examples(x, y, 3, 7)


def test_geometry_options_precedence_and_errors():
  run = {'n_t': 10, 'classes': 3, 'eps': [0, 0.1]}          # as stored in config.json
  opts = experiment.geometry_options(run, [('geometry.n_t', '20'), ('geometry.kinds', 'exemplar')])
  assert opts['n_t'] == 20 and opts['classes'] == 3 and opts['eps'] == (0.0, 0.1)
  assert opts['kinds'] == ('exemplar',) and opts['per_class'] == manifold_geometry.DEFAULTS['per_class']
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'geometry.nt'"):
    experiment.geometry_options({}, [('geometry.nt', '5')])
  with pytest.raises(config_lib.ConfigError, match=r'--config.geometry.repeats=1 is out of range.*>= 2'):
    experiment.geometry_options({}, [('geometry.repeats', '1')])
  with pytest.raises(config_lib.ConfigError, match="unknown manifold_geometry option 'nt'"):
    manifold_geometry.resolve_options({'nt': 5})
  with pytest.raises(config_lib.ConfigError, match='probes.manifold_geometry.n_t=0 is out of range'):
    manifold_geometry.PROBE('manifold_geometry', ml_collections.ConfigDict({'n_t': 0}))


def test_collapsed_manifolds_are_measured_as_points():
  rng = np.random.default_rng(0)
  cloud = rng.standard_normal((1, 4, 20, 6)).astype(np.float32)
  # Manifold 2: six copies of one point, apart only by float noise.
  cloud[0, 2] = cloud[0, 2, :, :1] + 1e-8 * rng.standard_normal((20, 6)).astype(np.float32)
  probe = manifold_geometry.PROBE('manifold_geometry', ml_collections.ConfigDict({'n_t': 50}))
  out = probe._analyze(cloud, probe.opts)
  assert out['collapsed'] == 1 and '1 of 4 manifolds are one point' in out['note']
  assert all(np.isfinite(out[m]) for m in manifold_geometry.METRICS)
  # MFTMA's point limit, not the shape of the noise: no radius, no dimension.
  assert out['radius_all'][2] < 1e-6 and out['dimension_all'][2] < 1e-6
  assert min(out['radius_all'][i] for i in (0, 1, 3)) > 0.1
  cloud[0, :] = cloud[0, :, :, :1]
  assert 'all 4 manifolds are one point' in probe._analyze(cloud, probe.opts)['skipped']
