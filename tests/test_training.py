"""The training loop: compiled once, sharded == unsharded, resume == uninterrupted, NaN stops."""

import pathlib
import textwrap

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import config as config_lib
from geomrobust import experiment
from geomrobust import models
from geomrobust import parallel
from geomrobust.data import testing
from geomrobust import runio
from geomrobust.methods import build_method
from geomrobust.training import loop



def tiny_config(**train):
  cfg = config_lib.default_config()
  cfg.model.hidden = (32,)
  cfg.method = ml_collections.ConfigDict(dict(name='isometric', beta=0.01, k=1.0, levels=(),
                                              depth_per_level=1, min_sq_dist=1e-12))
  cfg.train.epochs = 3
  cfg.train.batch_size = 32
  cfg.train.lr = 3e-3
  cfg.eval.batch_size = 64
  for k, v in train.items():
    cfg.train[k] = v
  return cfg


def tiny_data(n=256, seed=0):
  return testing.class_blobs(n, seed)


def _method(cfg):
  return build_method(cfg, models.build_model(cfg.model, 10), 10)


def test_epoch_is_traced_once_across_epochs():
  cfg = tiny_config()
  method = _method(cfg)
  mesh = parallel.make_mesh(1)
  (phase,) = method.phases()
  x, y = tiny_data()
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  tx = loop.phase_optimizer(phase, params, cfg.train, len(y) // 32)
  chex.clear_trace_counter()
  epoch = chex.assert_max_traces(loop.make_epoch(loop.make_train_step(phase.loss_fn, tx), 32, len(y) // 32, mesh), n=1)
  epoch_fn = loop.compile_epoch(epoch, mesh)
  state = loop.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), hparams=method.hparams())
  # As the loop does: state and data placed on the mesh once, then every epoch reuses the program.
  state, x, y = jax.device_put((state, x, y), parallel.replicated(mesh))
  for e in range(3):  # new state objects and new keys every epoch: still one trace
    state, metrics = epoch_fn(state, x, y, jax.random.key(e))
  chex.assert_shape(metrics['loss'], (len(y) // 32,))
  assert int(state.step) == 3 * (len(y) // 32)


def test_loop_compiles_each_phase_once_and_learns(tmp_path):
  cfg = tiny_config(epochs=4)
  x, y = tiny_data()
  res = loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, tmp_path, parallel.make_mesh(1), log=lambda s: None)
  assert res.compilations == {'train': 1}
  log = runio.read_metrics(tmp_path / 'metrics.jsonl')
  assert [r['epoch'] for r in log] == [1, 2, 3, 4]
  assert log[-1]['loss'] < log[0]['loss']
  assert log[-1]['test_accuracy'] > 0.5


def _final(tmp):
  return runio.read_metrics(pathlib.Path(tmp) / 'metrics.jsonl')


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
  cfg = tiny_config(epochs=4, checkpoint_every=1)
  x, y = tiny_data()
  mesh = parallel.make_mesh(1)
  full = loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, tmp_path / 'full', mesh, log=lambda s: None)

  class Killed(Exception):
    pass

  def kill_after_two(done):
    if done == 2:
      raise Killed

  with pytest.raises(Killed):
    loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, tmp_path / 'part', mesh, log=lambda s: None,
               after_epoch=kill_after_two)
  resumed = loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, tmp_path / 'part', mesh, log=lambda s: None)
  assert resumed.resumed_from == 2
  chex.assert_trees_all_close(resumed.params, full.params, rtol=0, atol=0)  # bit-identical on one machine
  a, b = _final(tmp_path / 'full'), _final(tmp_path / 'part')
  assert [r['epoch'] for r in b] == [1, 2, 3, 4]
  for ra, rb in zip(a, b):
    assert ra['loss'] == rb['loss'] and ra['test_accuracy'] == rb['test_accuracy']


def test_resume_across_a_phase_boundary(tmp_path):
  """Hierarchical isometric has two phases; a kill at the boundary resumes exactly."""
  cfg = tiny_config(epochs=2)
  cfg.model.hidden = (16, 16)
  cfg.method.levels = ('0,0,0,0,0,1,1,1,1,1',)
  x, y = tiny_data()
  mesh = parallel.make_mesh(1)
  full = loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, tmp_path / 'full', mesh, log=lambda s: None)

  def kill(done):
    if done in (2, 3):
      raise KeyboardInterrupt

  for _ in range(2):  # killed at the end of phase 1, then inside phase 2
    with pytest.raises(KeyboardInterrupt):
      loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, tmp_path / 'part', mesh, log=lambda s: None,
                 after_epoch=kill)
    kill = (lambda done: (_ for _ in ()).throw(KeyboardInterrupt) if done == 3 else None)
  resumed = loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, tmp_path / 'part', mesh, log=lambda s: None)
  assert resumed.resumed_from == 3
  chex.assert_trees_all_close(resumed.params, full.params, rtol=0, atol=0)


def test_nan_loss_in_the_first_epoch_says_no_checkpoint_and_advises_a_new_folder(tmp_path):
  cfg = tiny_config(epochs=3, lr=1e30)  # diverges in epoch 1
  x, y = tiny_data()
  with pytest.raises(loop.NonFiniteLoss, match=r'non-finite loss .* at step \d+ \(epoch 1, phase .train.\); '
                                               r'no checkpoint was written before it\. .* new --workdir with a '
                                               r'smaller --config\.train\.lr') as e:
    loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, tmp_path, parallel.make_mesh(1), log=lambda s: None)
  assert e.value.workdir == tmp_path
  assert not list((tmp_path / 'checkpoints').glob('[0-9]*'))


def test_nan_keeps_the_last_good_checkpoint(tmp_path):
  # One good epoch is checkpointed; the run then continues with a loss that
  # turns NaN: the error names the step and the epoch-1 checkpoint survives.
  x, y = tiny_data()
  mesh = parallel.make_mesh(1)
  loop.train(_method(tiny_config(epochs=1)), x, y, x[:64], y[:64], tiny_config(epochs=1), tmp_path, mesh,
             log=lambda s: None)
  good, _ = loop.restore_params(tmp_path)
  cfg = tiny_config(epochs=3)
  method = _method(cfg)
  (p,) = method.phases()

  def nan_loss(params, batch, rng, hp):
    loss, aux = p.loss_fn(params, batch, rng, hp)
    return loss * jnp.nan, aux

  method.phases = lambda: [type(p)(p.name, p.epochs, nan_loss)]
  steps = len(y) // 32
  with pytest.raises(loop.TrainingError, match=rf'at step {steps + 1} \(epoch 2.*last good checkpoint: epoch 1'):
    loop.train(method, x, y, x[:64], y[:64], cfg, tmp_path, mesh, log=lambda s: None)
  params, epoch = loop.restore_params(tmp_path)
  assert epoch == 1
  chex.assert_trees_all_equal(params, good)


SHARDED_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r})
    from tests.test_training import tiny_config, tiny_data, _method
    from geomrobust import parallel
    from geomrobust.training import loop
    assert jax.device_count() == 8, jax.devices()
    x, y = tiny_data()
    out = {{}}
    for n in (1, 8):
      cfg = tiny_config(epochs=2)
      res = loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, {tmp!r} + f'/n{{n}}', parallel.make_mesh(n),
                       log=lambda s: None)
      out[n] = [np.asarray(l).tolist() for l in jax.tree.leaves(res.params)]
    json.dump(out, open({tmp!r} + '/out.json', 'w'))
''')


def test_sharded_step_on_8_devices_matches_one_device(run_on_8_cpu_devices):
  out = run_on_8_cpu_devices(SHARDED_SCRIPT)
  for a, b in zip(out['1'], out['8']):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


BATCH_CHECK_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {repo!r})
    from tests.test_training import tiny_config, tiny_data, _method
    from geomrobust import evaluation, parallel
    from geomrobust.training import loop
    assert jax.device_count() == 8, jax.devices()
    mesh = parallel.make_mesh(8)
    out = {{}}

    def attempt(name, fn):
      try:
        fn()
        out[name] = None
      except Exception as e:  # recorded, asserted on by the test
        out[name] = [type(e).__name__, str(e)]

    attempt('check_16', lambda: parallel.check_batch_size(16, mesh))
    attempt('check_12', lambda: parallel.check_batch_size(12, mesh))
    attempt('check_eval_4', lambda: parallel.check_batch_size(4, mesh, 'eval.batch_size'))
    x, y = tiny_data(64)
    cfg = tiny_config(epochs=1, batch_size=12)
    cfg.eval.batch_size = 16
    attempt('train_12', lambda: loop.train(_method(cfg), x, y, x[:16], y[:16], cfg, {tmp!r} + '/run',
                                           mesh, log=lambda s: None))
    ev = cfg.eval
    ev.update(dict(batch_size=12, eps=(0.1,), attacks=('pgd',), pgd_steps=1, pgd_restarts=1, sanity=False,
                   trajectories=0))
    method = _method(cfg)
    params = method.init_params(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    attempt('eval_12', lambda: evaluation.evaluate(method.logits, params, x[:24].astype(np.float32) / 255,
                                                   y[:24], ev, mesh, log=lambda s: None))
    json.dump(out, open({tmp!r} + '/out.json', 'w'))
''')


def test_batch_size_must_divide_over_devices(run_on_8_cpu_devices):
  mesh = parallel.make_mesh(1)
  parallel.check_batch_size(7, mesh)  # one device: anything goes
  with pytest.raises(ValueError, match='parallel.num_devices=3 but only 1 devices'):
    parallel.make_mesh(3)
  # On 8 devices a batch that does not split evenly is refused up front, by
  # the check itself and by training and evaluation before anything compiles.
  out = run_on_8_cpu_devices(BATCH_CHECK_SCRIPT)
  assert out['check_16'] is None
  assert out['check_12'] == ['ValueError', 'train.batch_size=12 is not divisible by the 8 data-parallel devices; '
                             'use a multiple of 8 or set --config.parallel.num_devices']
  assert out['check_eval_4'] is not None and out['check_eval_4'][1].startswith(
      'eval.batch_size=4 is not divisible by the 8 data-parallel devices'), out['check_eval_4']
  assert out['train_12'] == out['check_12'], out['train_12']
  assert out['eval_12'] is not None and out['eval_12'][0] == 'ValueError', out['eval_12']
  assert out['eval_12'][1].startswith('eval.batch_size=12 is not divisible by the 8 data-parallel devices'), \
      out['eval_12']
