"""Training data sources: stored uint8 / float arrays, and generators run inside the compiled epoch."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import config as config_lib
from geomrobust import data
from geomrobust import models
from geomrobust import parallel
from geomrobust import runio
from geomrobust.data import generated
from geomrobust.data import source as source_lib
from geomrobust.data import testing
from geomrobust.methods import build_method
from geomrobust.training import loop
from geomrobust.training import sweep as sweep_lib

# --- stored sources --------------------------------------------------------------------


def test_stored_uint8_batches_are_the_loops_exact_conversion():
  x, y = testing.class_blobs(64, 0)
  src = source_lib.StoredSource(x, y)
  assert src.box == (0.0, 1.0) and src.example_shape == (8, 8, 1) and src.steps_per_epoch(16) == 4
  idx = jnp.asarray([3, 1, 60])
  bx, by = src.batch((jnp.asarray(x), jnp.asarray(y)), idx, 3)
  assert bx.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(bx), np.asarray(jnp.asarray(x)[idx].astype(jnp.float32) / 255.0))
  np.testing.assert_array_equal(np.asarray(by), y[[3, 1, 60]])
  every = jnp.arange(256, dtype=jnp.uint8)
  np.testing.assert_array_equal(np.asarray(jax.jit(source_lib.to_model_input)(every)),
                                np.asarray(jax.jit(lambda v: v.astype(jnp.float32) / 255.0)(every)))


def test_stored_float_inputs_of_any_shape_are_used_as_they_are():
  feats = np.random.default_rng(0).normal(size=(10, 5, 3)).astype(np.float32) * 7  # e.g. [N, T, F] audio
  src = source_lib.StoredSource(feats, np.arange(10, dtype=np.int32) % 2)
  assert src.box is None and src.example_shape == (5, 3)
  bx, _ = src.batch(src.arrays, jnp.asarray([4, 2]), 2)
  np.testing.assert_array_equal(np.asarray(bx), feats[[4, 2]])
  assert source_lib.StoredSource(feats, np.zeros(10, np.int32), box=(-1.0, 1.0)).box == (-1.0, 1.0)
  with pytest.raises(data.DataError, match='uint8 .* or float32'):
    source_lib.StoredSource(feats.astype(np.float64), np.zeros(10, np.int32))
  with pytest.raises(ValueError, match='labels=None with a TrainSource'):
    source_lib.as_source(src, np.zeros(10, np.int32))


def test_stored_stream_is_a_sequence_of_epochs_independent_of_chunking():
  x, y = testing.class_blobs(40, 0)
  arrays, key, bs, spe = (jnp.asarray(x), jnp.asarray(y)), jax.random.key(1), 4, 10
  plan = lambda start, n: np.asarray(source_lib.StoredSource.stream_plan(arrays, key, start, n, bs, spe))
  whole = plan(0, 27)
  np.testing.assert_array_equal(np.concatenate([plan(0, 7), plan(7, 13), plan(20, 7)]), whole)
  for k in range(2):  # each full stream epoch visits every example once
    assert sorted(whole[k * spe:(k + 1) * spe].ravel()) == list(range(40))
  first = source_lib.StoredSource.epoch_plan(arrays, jax.random.fold_in(key, 0), bs, spe)
  np.testing.assert_array_equal(whole[:spe], np.asarray(first))
  # jit-able with a traced start: one program for every chunk.
  jitted = jax.jit(lambda s: source_lib.StoredSource.stream_plan(arrays, key, s, 7, bs, spe))
  np.testing.assert_array_equal(np.asarray(jitted(jnp.int32(7))), plan(7, 7))


def test_datasets_know_their_input_box():
  assert data.get_spec('mnist').box == (0.0, 1.0) and not data.get_spec('mnist').generated
  spec = data.get_spec('sparse_coding')
  assert spec.box is None and spec.num_classes == 2 and spec.generated
  images = np.zeros((2, 4, 4, 1), np.uint8)
  ds = data.Dataset('x', images, np.zeros(2, np.int32), images, np.zeros(2, np.int32), 10, 'test')
  assert ds.box == (0.0, 1.0) and ds.train_source().box == (0.0, 1.0)
  feats = np.zeros((3, 6), np.float32)
  fds = data.Dataset('f', feats, np.zeros(3, np.int32), feats, np.zeros(3, np.int32), 2, 'test')
  assert fds.box is None and fds.image_shape == (6,)
  with pytest.raises(data.DataError, match='uint8 \\[N, H, W, C\\] or float32'):
    data.Dataset('f', feats.astype(np.float16), np.zeros(3, np.int32), feats, np.zeros(3, np.int32), 2, 'test')
  assert 'sparse_coding' not in data.available_datasets()  # those are files; generated ones apart
  assert data.generated_datasets() == ['sparse_coding']
  with pytest.raises(data.DataError, match="'sparse_coding' is a generated dataset.*make_source"):
    data.load_dataset('sparse_coding')


# --- the sparse-coding generator -------------------------------------------------------


def test_sparse_coding_samples_follow_the_documented_model():
  src = data.make_source('sparse_coding', {'dim': 32, 'sparsity': 4})
  assert src.example_shape == (32,) and src.num_classes == 2 and src.box is None
  x, y = jax.jit(src.sample, static_argnums=1)(jax.random.key(0), 512)
  chex.assert_shape(x, (512, 32))
  assert x.dtype == jnp.float32 and y.dtype == jnp.int32
  z = np.asarray(x) @ src.dictionary  # M orthogonal: the code is M^T x
  np.testing.assert_allclose(src.dictionary.T @ src.dictionary, np.eye(32), atol=1e-5)
  np.testing.assert_allclose(np.abs(z)[np.abs(z) > 0.5], 1.0, atol=1e-4)  # entries in {-1, 0, +1}
  assert 2.5 < (np.abs(z) > 0.5).sum(1).mean() < 5.5  # about k = 4 non-zeros
  code = np.round(z)
  np.testing.assert_array_equal(np.asarray(y), (code @ src.w_star > 0).astype(np.int32))
  assert 0.3 < np.asarray(y).mean() < 0.7


def test_sparse_coding_test_set_is_fixed_and_options_are_checked():
  a = data.make_source('sparse_coding', ml_collections.ConfigDict({'dim': 16, 'test_examples': 64}))
  b = data.make_source('sparse_coding', {'dim': 16, 'test_examples': 64})
  np.testing.assert_array_equal(a.test[0], b.test[0])
  assert a.test[0].shape == (64, 16) and a.test is a.test  # drawn once
  c = data.make_source('sparse_coding', {'dim': 16, 'test_examples': 64, 'seed': 1})
  assert not np.array_equal(a.dictionary, c.dictionary)
  noisy = data.make_source('sparse_coding', {'dim': 16, 'noise': 0.1})
  x, _ = noisy.sample(jax.random.key(0), 8)
  assert np.abs(np.asarray(x) @ noisy.dictionary - np.round(np.asarray(x) @ noisy.dictionary)).max() > 1e-3
  with pytest.raises(data.DataError, match='unknown option data.sparse_coding.dims; available: dim,'):
    data.make_source('sparse_coding', {'dims': 16})
  with pytest.raises(data.DataError, match='not a generated dataset'):
    data.make_source('mnist')
  assert dict(generated.GENERATORS['sparse_coding'].defaults)['dim'] == 256


# --- training on sources ---------------------------------------------------------------


def mlp_config(steps=None, **train):
  cfg = config_lib.default_config()
  cfg.model.hidden = (32,)
  cfg.method = ml_collections.ConfigDict(dict(name='standard'))
  cfg.train.epochs = 0 if steps else 2
  cfg.train.batch_size = 64
  cfg.train.lr = 3e-3
  cfg.train.checkpoint_every = 1
  cfg.eval.batch_size = 256
  for k, v in train.items():
    cfg.train[k] = v
  return cfg


def step_method(cfg, num_classes, steps):
  import dataclasses

  method = build_method(cfg, models.build_model(cfg.model, num_classes), num_classes)
  (phase,) = method.phases()
  method.phases = lambda: [dataclasses.replace(phase, epochs=0, steps=steps)]
  return method


def test_generated_data_trains_in_compiled_chunks_without_host_transfers(tmp_path):
  src = data.make_source('sparse_coding', {'dim': 16, 'sparsity': 3, 'test_examples': 512})
  cfg = mlp_config(steps=60, steps_per_log=20)
  res = loop.train(step_method(cfg, 2, 60), src, None, None, None, cfg, tmp_path, parallel.make_mesh(1),
                   log=lambda s: None, transfer_guard='disallow')
  assert res.compilations == {'train': 1}  # three chunks, one traced program
  rows = runio.read_metrics(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in rows] == [20, 40, 60] and [r['epoch'] for r in rows] == [1, 2, 3]
  # The fixed test set measures the accuracy: a linear rule of x, learnt.
  assert rows[-1]['test_accuracy'] > 0.8
  assert rows[-1]['loss'] < rows[0]['loss']


def test_a_generator_chunk_is_traced_once_and_never_leaves_the_device():
  src = data.make_source('sparse_coding', {'dim': 16, 'sparsity': 3})
  cfg = mlp_config()
  method = build_method(cfg, models.build_model(cfg.model, 2), 2)
  (phase,) = method.phases()
  mesh = parallel.make_mesh(1)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 16)))
  tx = loop.phase_optimizer(phase, params, cfg.train, 10)
  chex.clear_trace_counter()
  chunk = chex.assert_max_traces(loop.make_chunk(loop.make_train_step(phase.loss_fn, tx), 64, 5, 10, mesh,
                                                 source=src), n=1)
  fn = loop.compile_epoch(chunk, mesh)
  rep = parallel.replicated(mesh)
  state = jax.device_put(loop.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                                         hparams=method.hparams()), rep)
  key = jax.device_put(jax.random.key(1), rep)
  # Nothing in the program talks to the host (no callback, infeed/outfeed, send/recv).
  hlo = fn.lower(state, key, jax.device_put(np.int32(0), rep)).as_text()
  for word in ('callback', 'infeed', 'outfeed', 'stablehlo.send', 'stablehlo.recv'):
    assert word not in hlo, word
  for start in (0, 5, 10):
    s = jax.device_put(np.int32(start), rep)
    with jax.transfer_guard('disallow'):  # no host<->device transfer inside the compiled chunk
      state, metrics = fn(state, key, s)
  chex.assert_shape(metrics['loss'], (5,))
  assert int(state.step) == 15


def test_a_generated_sweep_trains_every_member(tmp_path):
  src = data.make_source('sparse_coding', {'dim': 16, 'sparsity': 3, 'test_examples': 256})
  cfg = mlp_config(steps=20, steps_per_log=10)
  cfg.model.hidden = (8,)
  grid = sweep_lib.Grid('', (None,), (0, 1))
  res = sweep_lib.train_sweep(step_method(cfg, 2, 20), grid, src, None, None, None, cfg, tmp_path,
                              parallel.make_mesh(1), mean_last=1, log=lambda s: None, transfer_guard='disallow')
  assert res.compilations == {'train': 1} and res.accuracy.shape == (2, 1, 1)
  one = loop.train(step_method(cfg, 2, 20), src, None, None, None, cfg, tmp_path / 'one', parallel.make_mesh(1),
                   log=lambda s: None)
  # Member (seed 0) is the same config run alone.
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[0, 0], res.params), one.params, rtol=1e-5, atol=1e-6)


def test_float_vectors_train_and_are_not_rescaled(tmp_path):
  x8, y = testing.class_blobs(256, 0)
  xf = (x8.astype(np.float32) / 255.0).reshape(256, 64)  # [N, D] float vectors
  cfg = mlp_config(epochs=4, batch_size=32, lr=1e-2)
  method = build_method(cfg, models.build_model(cfg.model, 10), 10)
  mesh = parallel.make_mesh(1)
  res = loop.train(method, xf, y, xf[:64], y[:64], cfg, tmp_path / 'f', mesh, log=lambda s: None)
  rows = runio.read_metrics(tmp_path / 'f' / 'metrics.jsonl')
  assert rows[-1]['loss'] < rows[0]['loss'] and rows[-1]['test_accuracy'] > 0.5
  # The same numbers as the uint8 images the vectors came from (scaled once, by the loader here).
  ref = loop.train(method, x8, y, x8[:64], y[:64], cfg, tmp_path / 'u', mesh, log=lambda s: None)
  chex.assert_trees_all_close(res.params, ref.params, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='larger than the 256 training examples'):
    loop.train(method, xf, y, xf, y, mlp_config(batch_size=512), tmp_path / 'g', mesh, log=lambda s: None)


SHARDED_SCRIPT = '''
import json, sys
import jax, numpy as np
sys.path.insert(0, {repo!r})
from tests.test_sources import mlp_config, step_method
from geomrobust import data, parallel
from geomrobust.training import loop
assert jax.device_count() == 8, jax.devices()
out = {{}}
for n in (1, 8):
  src = data.make_source('sparse_coding', {{'dim': 16, 'sparsity': 3, 'test_examples': 256}})
  cfg = mlp_config(steps=12, steps_per_log=5)
  res = loop.train(step_method(cfg, 2, 12), src, None, None, None, cfg, {tmp!r} + f'/n{{n}}',
                   parallel.make_mesh(n), log=lambda s: None)
  out[n] = [np.asarray(l).tolist() for l in jax.tree.leaves(res.params)]
json.dump(out, open({tmp!r} + '/out.json', 'w'))
'''


def test_generated_step_phase_on_8_devices_matches_one_device(run_on_8_cpu_devices):
  out = run_on_8_cpu_devices(SHARDED_SCRIPT)
  for a, b in zip(out['1'], out['8']):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
