"""The shared phase loop (training.phases.run_phases), tested once for both trainers.

``loop.train`` (one model) and ``sweep.train_sweep`` (stacked, vmapped members)
run the same skeleton: resume after a kill anywhere is bit-identical, a NaN
names its step, metrics.jsonl has one row per round, every phase end stays
restorable, step-counted phases run in compiled chunks, and training can start
from given weights. The method is local contrastive (two phases: 'local' then
'readout'; the sweep varies its traced d_f).
"""

import dataclasses
import inspect
import pathlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import config as config_lib
from geomrobust import models
from geomrobust import parallel
from geomrobust import runio
from geomrobust.data import testing
from geomrobust.methods import base, build_method
from geomrobust.training import loop
from geomrobust.training import phases as phases_lib
from geomrobust.training import sweep as sweep_lib

KINDS = ('loop', 'sweep')
N, BS = 128, 32          # 4 steps per epoch
STEPS_PER_EPOCH = N // BS
TIMING = ('epoch_seconds', 'seconds', 'examples_per_second', 'member_examples_per_second')


def cfg_for(epochs=3, readout_epochs=2, **train):
  cfg = config_lib.default_config()
  cfg.model = ml_collections.ConfigDict(dict(
      name='mlp', hidden=(16,), activation='half_tanh', weight_init='normal_fan_in', use_bias=False))
  cfg.method = ml_collections.ConfigDict(dict(
      name='local_contrastive', d_f=0.5, lam=0.01, readout_epochs=readout_epochs, readout_lr=3e-3,
      paper_eps_max=0.2, paper_eps_step=0.05, paper_examples=64))
  cfg.train.epochs = epochs
  cfg.train.batch_size = BS
  cfg.train.lr = 0.01
  cfg.train.checkpoint_every = 1
  cfg.eval.batch_size = 64
  for k, v in train.items():
    cfg.train[k] = v
  return cfg


def data():
  return testing.class_blobs(N, 0)


def with_rng_term(loss_fn):
  """``loss_fn`` plus a small term drawn from the step key (local contrastive's
  losses ignore their key), so a test sees which key each step got."""

  def loss(params, batch, rng, hp):
    value, aux = loss_fn(params, batch, rng, hp)
    mean = sum(jnp.mean(a) for a in jax.tree.leaves(params['model']))
    return value + 1e-2 * jax.random.normal(rng) * mean, aux

  return loss


def make_method(cfg, steps=None, rng_term=False):
  """The method; ``steps`` = (local, readout) turns both phases step-counted;
  ``rng_term`` makes the losses depend on the step keys."""
  method = build_method(cfg, models.build_model(cfg.model, 10), 10)
  orig = method.phases

  def phases():
    out = orig()
    if rng_term:
      out = [dataclasses.replace(p, loss_fn=with_rng_term(p.loss_fn)) for p in out]
    if steps is not None:
      out = [dataclasses.replace(p, epochs=0, steps=s) for p, s in zip(out, steps)]
    return out

  method.phases = phases
  return method


GRID = sweep_lib.Grid('d_f', (0.2, 0.5), (0,))


def train(kind, cfg, workdir, method=None, **kw):
  """Trains with either trainer; returns (params, result). Sweep params are [1, 2, ...]."""
  x, y = data()
  method = method or make_method(cfg)
  mesh = parallel.make_mesh(1)
  if kind == 'loop':
    res = loop.train(method, x, y, x[:64], y[:64], cfg, workdir, mesh, log=lambda s: None, **kw)
  else:
    res = sweep_lib.train_sweep(method, GRID, x, y, x[:64], y[:64], cfg, workdir, mesh, mean_last=2,
                                log=lambda s: None, **kw)
  return res.params, res


def restore(kind, workdir, **kw):
  fn = loop.restore_params if kind == 'loop' else sweep_lib.restore_stacked_params
  params, r = fn(workdir, **kw)
  if kind == 'sweep':
    params = jax.tree.map(lambda a: a[:, :len(GRID.values)], params)
  return params, r


class Killed(Exception):
  pass


def kill_at(n):
  def hook(done):
    if done == n:
      raise Killed
  return hook


def rows(workdir):
  return runio.read_metrics(pathlib.Path(workdir) / 'metrics.jsonl')


def numbers(rs):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in rs]


def assert_bit_identical(a, b):
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


@pytest.fixture(scope='module', params=KINDS)
def runs(request, tmp_path_factory):
  """An uninterrupted run and one killed after rounds 1, 2 and 3 of 5 (local:
  1-3, readout: 4-5), checkpoints every 2 rounds: the kill after round 1 comes
  before any checkpoint (its row must go), the one after 2 resumes inside
  'local' (optimiser state restored), the one after 3 at the phase boundary."""
  kind = request.param
  tmp = tmp_path_factory.mktemp(kind)
  cfg = cfg_for(checkpoint_every=2)
  full_params, full = train(kind, cfg, tmp / 'full')
  out = dict(kind=kind, cfg=cfg, tmp=tmp, full_params=full_params, full=full, rows_after_kill={})
  part = tmp / 'part'
  for n in (1, 2, 3):
    with pytest.raises(Killed):
      train(kind, cfg, part, after_epoch=kill_at(n))
    out['rows_after_kill'][n] = rows(part)
    if n == 3:
      out['snapshot_local'] = restore(kind, part)  # what the end of 'local' held when it was written
  out['part_params'], out['part'] = train(kind, cfg, part)
  return out


def test_resume_after_kills_mid_phase_and_at_a_boundary_is_bit_identical(runs):
  assert runs['part'].resumed_from == 3
  assert_bit_identical(runs['part_params'], runs['full_params'])


def test_metrics_rows_have_no_duplicates_after_resume(runs):
  # Rows written after the last checkpoint were dropped on resume, then rewritten once.
  for n, rs in runs['rows_after_kill'].items():
    assert [r['epoch'] for r in rs] == list(range(1, n + 1)), (n, [r['epoch'] for r in rs])
  full, part = rows(runs['tmp'] / 'full'), rows(runs['tmp'] / 'part')
  assert [r['epoch'] for r in part] == [1, 2, 3, 4, 5]
  assert [r['phase'] for r in part] == ['local'] * 3 + ['readout'] * 2
  assert numbers(part) == numbers(full)


def test_every_phase_end_stays_restorable(runs):
  # Checkpoints every 2 rounds, the newest kept: round 3 (end of 'local') survives only as a phase end.
  params, r = restore(runs['kind'], runs['tmp'] / 'full', phase='local')
  assert r == 3
  assert_bit_identical(params, runs['snapshot_local'][0])
  final, r = restore(runs['kind'], runs['tmp'] / 'full', phase='readout')
  assert r == 5
  assert_bit_identical(final, runs['full_params'])
  assert runs['full'].phase_ends == {'local': 3, 'readout': 5}
  with pytest.raises(FileNotFoundError, match='no checkpoint 2'):
    restore(runs['kind'], runs['tmp'] / 'full', epoch=2)  # an ordinary checkpoint: gone
  with pytest.raises(ValueError, match="no phase 'nope'.*local, readout"):
    restore(runs['kind'], runs['tmp'] / 'full', phase='nope')


def test_each_phase_is_compiled_once_and_counted_without_private_api(runs):
  assert runs['full'].compilations == {'local': 1, 'readout': 1}
  for mod in (loop, sweep_lib, phases_lib):
    assert '_cache_size' not in inspect.getsource(mod)


@pytest.mark.parametrize('kind', KINDS)
def test_nan_stops_naming_the_step_and_keeps_the_phase_end(kind, tmp_path):
  cfg = cfg_for(epochs=2, readout_epochs=2)
  method = make_method(cfg)
  local, readout = method.phases()

  def nan_loss(params, batch, rng, hp):
    loss, aux = readout.loss_fn(params, batch, rng, hp)
    return loss * jnp.where(hp['step'] >= 2 * STEPS_PER_EPOCH + 1, jnp.nan, 1.0), aux

  method.phases = lambda: [local, dataclasses.replace(readout, loss_fn=nan_loss)]
  # Global step 2 * 4 + 1 is the 2nd step of 'readout' (epoch 3): the message names step 10.
  who = 'for the sweep member seed 0, d_f=0.2 ' if kind == 'sweep' else ''
  with pytest.raises(loop.TrainingError, match=rf"non-finite loss \(nan\) {who}at step 10 \(epoch 3, phase "
                                               r"'readout'\); last good (sweep )?checkpoint: epoch 2"):
    train(kind, cfg, tmp_path, method=method)
  assert [r['epoch'] for r in rows(tmp_path)] == [1, 2]
  assert restore(kind, tmp_path)[1] == 2


@pytest.mark.parametrize('kind', KINDS)
def test_step_counted_phases_run_in_chunks_and_resume_exactly(kind, tmp_path):
  # local: 10 steps in chunks of 4 (4, 4, 2), readout: 6 steps (4, 2) -> rounds 1-3 and 4-5.
  cfg = cfg_for(steps_per_log=4)
  steps = (10, 6)
  method = lambda: make_method(cfg, steps, rng_term=True)
  full_params, full = train(kind, cfg, tmp_path / 'full', method=method())
  assert full.compilations == {'local': 2, 'readout': 2}  # a full chunk and the shorter last one
  assert full.phase_ends == {'local': 3, 'readout': 5}
  rs = rows(tmp_path / 'full')
  assert [r['epoch'] for r in rs] == [1, 2, 3, 4, 5]
  assert [r['phase_step'] for r in rs] == [4, 8, 10, 4, 6]
  if kind == 'loop':
    assert [r['step'] for r in rs] == [4, 8, 10, 14, 16]
  for n in (2, 4):  # inside 'local', then inside 'readout'
    with pytest.raises(Killed):
      train(kind, cfg, tmp_path / 'part', method=method(), after_epoch=kill_at(n))
  part_params, part = train(kind, cfg, tmp_path / 'part', method=method())
  assert part.resumed_from == 4
  assert_bit_identical(part_params, full_params)
  assert numbers(rows(tmp_path / 'part')) == numbers(rs)
  local_end, r = restore(kind, tmp_path / 'full', phase='local')
  assert r == 3


def test_the_step_stream_does_not_depend_on_the_chunk_length(tmp_path):
  cfg4, cfg10 = cfg_for(steps_per_log=4), cfg_for(steps_per_log=10)
  a, _ = train('loop', cfg4, tmp_path / 'a', method=make_method(cfg4, (10, 6), rng_term=True))
  b, res = train('loop', cfg10, tmp_path / 'b', method=make_method(cfg10, (10, 6), rng_term=True))
  assert res.phase_ends == {'local': 1, 'readout': 2}
  assert_bit_identical(a, b)  # same data, same step keys; on CPU even the same bits
  c, _ = train('loop', cfg4, tmp_path / 'c', method=make_method(cfg4, (10, 6)))
  assert not np.array_equal(c['model']['out']['kernel'], a['model']['out']['kernel'])  # the keys matter


def test_a_phase_with_both_epochs_and_steps_is_refused():
  p = base.Phase('x', 2, lambda *a: None, steps=5)
  with pytest.raises(ValueError, match="phase 'x' sets both epochs=2 and steps=5"):
    phases_lib.plan([p], 4, 10)


@pytest.mark.parametrize('kind', KINDS)
def test_init_params_start_the_first_phase(kind, tmp_path):
  cfg = cfg_for(epochs=1, readout_epochs=1, lr=0.0)
  cfg.method.readout_lr = 0.0  # nothing moves: the result is the starting point
  method = make_method(cfg)
  own = method.init_params(jax.random.key(7), jnp.zeros((1, 8, 8, 1)))
  given = jax.tree.map(lambda a: a + 0.5, own)
  params, _ = train(kind, cfg, tmp_path / 'given', method=method, init_params=given)
  if kind == 'sweep':
    for v in range(len(GRID.values)):  # broadcast over every member
      assert_bit_identical(jax.tree.map(lambda a: a[0, v], params), given)
  else:
    assert_bit_identical(params, given)
  bad = jax.tree.map(lambda a: a[..., :1] if a.ndim == 2 else a, given)
  with pytest.raises(ValueError, match=r'init_params: model/hidden_0/kernel has shape \(64, 1\)'):
    train(kind, cfg, tmp_path / 'bad', method=method, init_params=bad)


def test_init_from_a_phase_snapshot(tmp_path):
  """What the runner does for config.init_from: restore a phase end (numpy
  arrays), start a new run from it."""
  params, _ = train('loop', cfg_for(epochs=2, readout_epochs=1), tmp_path / 'first')
  local, r = loop.restore_params(tmp_path / 'first', phase='local')
  assert r == 2
  assert not np.array_equal(local['model']['out']['kernel'], params['model']['out']['kernel'])  # readout moved on
  cfg = cfg_for(epochs=1, readout_epochs=1, lr=0.0)
  cfg.method.readout_lr = 0.0
  again, res = train('loop', cfg, tmp_path / 'second', init_params=local)
  assert res.resumed_from == 0
  assert_bit_identical(again, local)


# --------------------------------------------------------------------------
# Per-round accuracy keys
# --------------------------------------------------------------------------


class NoisyReadout(base.Method):
  """A stochastic toy: logits + N(0, 1) noise drawn from the key."""

  stochastic = True

  def logits(self, params, x, rng=None):
    clean = super().logits(params, x)
    return clean + jax.random.normal(rng, clean.shape)

  def phases(self):
    return []


def test_stochastic_accuracy_uses_per_example_keys_and_ignores_batching():
  cfg = cfg_for()
  model = models.build_model(cfg.model, 10)
  method = NoisyReadout(model, cfg, 10)
  x, y = data()
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  mesh = parallel.make_mesh(1)
  key = jax.random.key(3)
  accs = [float(loop.make_accuracy_fn(method, mesh, bs)(params, x, y, key)) for bs in (8, 128)]
  assert accs[0] == accs[1]
  xf = jnp.asarray(x, jnp.float32) / 255.0
  manual = [int(jnp.argmax(method.logits(params, xf[i:i + 1], jax.random.fold_in(key, i))[0]) == y[i])
            for i in range(len(y))]
  assert accs[0] == pytest.approx(np.mean(manual), abs=1e-6)
  other = float(loop.make_accuracy_fn(method, mesh, 8)(params, x, y, jax.random.key(4)))
  assert other != accs[0]  # the key matters


def test_deterministic_accuracy_is_the_plain_batched_call():
  cfg = cfg_for()
  method = make_method(cfg)
  x, y = data()
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  acc = float(loop.make_accuracy_fn(method, parallel.make_mesh(1), 64)(params, x, y, jax.random.key(5)))
  plain = float(jnp.mean(jnp.argmax(method.logits(params, jnp.asarray(x, jnp.float32) / 255.0), -1) == y))
  assert acc == plain
  assert phases_lib.accuracy_key(jax.random.key(0), 1).shape == ()
