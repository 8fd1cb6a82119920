"""Local contrastive (Fermi-Bose) learning: locality, the pair loss, collapse, vmapped sweeps."""

import textwrap

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import config as config_lib
from geomrobust import models
from geomrobust import parallel
from geomrobust.data import testing
from geomrobust.geometry import pairs
from geomrobust.methods import build_method
from geomrobust.methods import local_contrastive as lc
from geomrobust.training import loop
from geomrobust.training import sweep as sweep_lib



def lc_config(hidden=(32,), d_f=0.5, epochs=3, readout_epochs=2, seed=0):
  cfg = config_lib.default_config()
  cfg.seed = seed
  cfg.model = ml_collections.ConfigDict(dict(
      name='mlp', hidden=tuple(hidden), activation='half_tanh', weight_init='normal_fan_in', use_bias=False))
  cfg.method = ml_collections.ConfigDict(dict(
      name='local_contrastive', d_f=d_f, lam=0.01, readout_epochs=readout_epochs, readout_lr=1e-3))
  cfg.train.epochs = epochs
  cfg.train.batch_size = 32
  cfg.train.lr = 0.01
  cfg.eval.batch_size = 64
  return cfg


def tiny_data(n=256, seed=0):
  return testing.class_blobs(n, seed)


def _method(cfg):
  return build_method(cfg, models.build_model(cfg.model, 10), 10)


def _init(method, seed=0):
  return method.init_params(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))


def test_pair_loss_on_a_hand_computed_batch():
  # Four examples, width N = 2, labels (0, 0, 1, 1).
  h = jnp.array([[0., 0.], [0., 1.], [1., 1.], [2., 1.]])
  labels = jnp.array([0, 0, 1, 1])
  d_f = 1.0
  # d_ij = |h_i - h_j|^2 / 2 for the six pairs i < j:
  # (0,1) boson 1/2; (0,2) fermion 2/2=1; (0,3) fermion 5/2; (1,2) fermion 1/2;
  # (1,3) fermion 4/2=2; (2,3) boson 1/2.
  # bosons contribute d: 0.5 + 0.5; fermions max(0, 1 - d): 0 + 0 + 0.5 + 0 = 0.5.
  expected = (0.5 + 0.5 + 0.5) / 6
  loss, dists = lc.fermi_bose_loss(h, labels, d_f)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  np.testing.assert_allclose(float(dists['boson']), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(dists['fermion']), (1 + 2.5 + 0.5 + 2) / 4, rtol=1e-6)
  # The hinge is linear and one-sided: far-apart fermions cost nothing, and
  # raising d_F only adds (d_F - d) for the fermions below it.
  loss3, _ = lc.fermi_bose_loss(h, labels, 3.0)
  np.testing.assert_allclose(float(loss3), (1.0 + (2 + 0.5 + 2.5 + 1)) / 6, rtol=1e-6)


def test_layer_loss_adds_the_scaled_weight_decay():
  cfg = lc_config(hidden=(16,))
  method = _method(cfg)
  params = _init(method)
  x, y = tiny_data(32)
  batch = {'image': jnp.asarray(x, jnp.float32) / 255.0, 'label': jnp.asarray(y)}
  ((loss, metrics),) = method.layer_losses(params, batch, method.hparams())
  w = params['model']['hidden_0']['kernel']
  np.testing.assert_allclose(float(loss - metrics['pair_loss_0']), 0.5 * 0.01 / 16 * float(jnp.sum(w * w)),
                             rtol=1e-5)
  assert 'bias' not in params['model']['hidden_0']  # the reference recipe has no biases


def test_no_gradient_crosses_a_layer_boundary():
  cfg = lc_config(hidden=(16, 12, 8))
  method = _method(cfg)
  params = _init(method)
  x, y = tiny_data(32)
  batch = {'image': jnp.asarray(x, jnp.float32) / 255.0, 'label': jnp.asarray(y)}
  hp = method.hparams()
  names = list(params['model'])
  assert names == ['hidden_0', 'hidden_1', 'hidden_2', 'out']
  for k in range(3):
    grads = jax.grad(lambda p: method.layer_losses(p, batch, hp)[k][0])(params)
    for name in names:
      norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads['model'][name]))
      if name == f'hidden_{k}':
        assert norm > 0, f'layer {k} gets no gradient from its own loss'
      else:
        assert norm == 0.0, f'layer {k} loss leaks a gradient into {name}'
  # The readout's cross-entropy trains the readout alone.
  grads = jax.grad(lambda p: method.readout_loss(p, batch, None, hp)[0])(params)
  for name in names:
    norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads['model'][name]))
    assert (norm > 0) == (name == 'out'), name
  # The summed local loss is the sum of the layers' own losses (one step trains all).
  total, _ = method.local_loss(params, batch, None, hp)
  np.testing.assert_allclose(float(total), sum(float(l) for l, _ in method.layer_losses(params, batch, hp)),
                             rtol=1e-6)


def test_local_reps_are_the_models_reps():
  cfg = lc_config(hidden=(16, 12))
  method = _method(cfg)
  params = _init(method)
  x = jnp.asarray(tiny_data(8)[0], jnp.float32) / 255.0
  _, reps = method.apply(params, x)
  for a, b in zip(method.local_reps(params, x), reps):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert float(jnp.min(a)) > 0 and float(jnp.max(a)) < 1  # (1 + tanh) / 2


def _sweep(cfg, values, seeds, x, y, workdir=None, **kw):
  grid = sweep_lib.Grid('d_f', tuple(values), tuple(seeds))
  return sweep_lib.train_sweep(_method(cfg), grid, x, y, x[:64], y[:64], cfg, workdir, parallel.make_mesh(1),
                               log=lambda s: None, **kw)


def test_d_f_zero_collapses_and_d_f_sets_the_fermion_distance():
  cfg = lc_config(hidden=(32,), epochs=30, readout_epochs=10)
  cfg.method.readout_lr = 0.02
  x, y = tiny_data(256)
  res = _sweep(cfg, (0.0, 0.3), (0,), x, y, mean_last=1)
  method = _method(cfg)
  xf = jnp.asarray(x, jnp.float32) / 255.0
  dist = {}
  for v, d_f in enumerate((0.0, 0.3)):
    params = jax.tree.map(lambda a: a[0, v], res.params)
    _, (h,) = method.apply(params, xf)
    dist[d_f] = [float(t) for t in pairs.boson_fermion_means(h, jnp.asarray(y))]
  # d_F = 0: nothing pushes fermions apart, everything collapses onto one point ...
  assert max(dist[0.0]) < 1e-3, dist
  assert res.accuracy[0, 0, -1] <= 0.2  # ... and the readout is at chance (10 classes)
  # d_F = 0.3: bosons close, fermions pushed out towards the target.
  boson, fermion = dist[0.3]
  assert fermion > 0.2 and boson < 0.5 * fermion, dist
  assert res.accuracy[0, 1, -1] > 0.8


def test_one_sweep_point_equals_the_same_config_run_alone(tmp_path):
  cfg = lc_config(hidden=(24,), epochs=2, readout_epochs=2)
  x, y = tiny_data(256)
  res = _sweep(cfg, (0.1, 0.4), (0, 1), x, y, mean_last=2)
  assert res.compilations == {'local': 1, 'readout': 1}  # one program per phase for all 4 members
  alone_cfg = lc_config(hidden=(24,), d_f=0.4, epochs=2, readout_epochs=2, seed=1)
  alone = loop.train(_method(alone_cfg), x, y, x[:64], y[:64], alone_cfg, tmp_path, parallel.make_mesh(1),
                     log=lambda s: None)
  member = jax.tree.map(lambda a: a[1, 1], res.params)
  chex.assert_trees_all_close(member, alone.params, rtol=1e-4, atol=1e-5)
  # Members differ where they should: another value, another seed.
  for other in ((1, 0), (0, 1)):
    p = jax.tree.map(lambda a: a[other], res.params)
    assert not np.allclose(p['model']['hidden_0']['kernel'], member['model']['hidden_0']['kernel'])


def test_chunked_sweep_equals_unchunked_and_resume_is_exact(tmp_path):
  cfg = lc_config(hidden=(16,), epochs=2, readout_epochs=2)
  cfg.train.checkpoint_every = 1
  x, y = tiny_data(128)
  values = (0.0, 0.2, 0.4)
  full = _sweep(cfg, values, (0,), x, y, mean_last=2)
  chunked = _sweep(cfg, values, (0,), x, y, mean_last=2, chunk_size=2)  # 2 chunks, one value padded
  chex.assert_trees_all_close(chunked.params, full.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(chunked.accuracy, full.accuracy)

  def kill(done):
    if done == 3:  # inside the readout phase
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _sweep(cfg, values, (0,), x, y, tmp_path, mean_last=2, after_epoch=kill)
  resumed = _sweep(cfg, values, (0,), x, y, tmp_path, mean_last=2)
  assert resumed.resumed_from == 3
  chex.assert_trees_all_close(resumed.params, full.params, rtol=0, atol=0)
  np.testing.assert_array_equal(resumed.accuracy, full.accuracy)


def test_unknown_sweep_hparam_is_a_clear_error():
  cfg = lc_config()
  with pytest.raises(ValueError, match="sweep.hparam='beta' is not a traced hyperparameter.*d_f, lam"):
    sweep_lib.train_sweep(_method(cfg), sweep_lib.Grid('beta', (0.1,), (0,)), *tiny_data(64), *tiny_data(64),
                          cfg, None, parallel.make_mesh(1), log=lambda s: None)


SHARDED_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {repo!r})
    from tests.test_local_contrastive import lc_config, tiny_data, _method, _sweep
    from geomrobust import parallel
    from geomrobust.training import loop
    from geomrobust.training import sweep as sweep_lib
    assert jax.device_count() == 8, jax.devices()
    x, y = tiny_data(256)
    out = {{}}
    # The local loss's pairs span the global batch: a step sharded over 8
    # devices equals the unsharded one.
    for n in (1, 8):
      cfg = lc_config(hidden=(16, 8), epochs=2, readout_epochs=1)
      res = loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, {tmp!r} + f'/n{{n}}', parallel.make_mesh(n),
                       log=lambda s: None)
      out[f'loop{{n}}'] = [np.asarray(l).tolist() for l in jax.tree.leaves(res.params)]
    # A sweep's members sharded over 8 devices equal the single-device sweep.
    cfg = lc_config(hidden=(16,), epochs=2, readout_epochs=1)
    for n in (1, 8):
      grid = sweep_lib.Grid('d_f', (0.0, 0.1, 0.2, 0.3, 0.4), (0,))
      res = sweep_lib.train_sweep(_method(cfg), grid, x, y, x[:64], y[:64], cfg, None, parallel.make_mesh(n),
                                  log=lambda s: None, mean_last=1)
      out[f'sweep{{n}}'] = [np.asarray(l).tolist() for l in jax.tree.leaves(res.params)]
    json.dump(out, open({tmp!r} + '/out.json', 'w'))
''')


def test_sharded_local_step_and_sharded_sweep_match_one_device(run_on_8_cpu_devices):
  out = run_on_8_cpu_devices(SHARDED_SCRIPT)
  for kind in ('loop', 'sweep'):
    for a, b in zip(out[f'{kind}1'], out[f'{kind}8']):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
