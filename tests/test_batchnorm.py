"""BatchNorm state: the train step folds each batch into params['model_state'],
the optimiser never touches it, evaluation does not depend on the batch (and the
evaluation's batch-size check flags a model that does), and a loss that drops
it is an error (see the docstring of geomrobust/methods/base.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import config as config_lib
from geomrobust import evaluation
from geomrobust import parallel
from geomrobust.methods import base
from geomrobust.methods.standard import Standard
from geomrobust.models.mlp import MLP
from geomrobust.models.resnet import ResNet
from geomrobust.training import loop

MOMENTUM, EPS = 0.9, 1e-5  # what the ResNet uses (PyTorch's momentum 0.1)
D, H, C, B = 5, 6, 3, 8


class TinyBN(nn.Module):
  """x [B, D] -> BN -> Dense(H) -> BN -> relu -> Dense(C); returns (logits, (hidden,))."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPS, name=name)
    h = nn.Dense(H, name='hidden')(bn('bn_in')(x.reshape(x.shape[0], -1)))
    h = nn.relu(bn('bn_hidden')(h))
    return nn.Dense(C, name='out')(h), (h,)


def _config(optimizer='sgd', weight_decay=5e-4):
  cfg = config_lib.default_config()
  cfg.method = ml_collections.ConfigDict(dict(name='standard'))
  cfg.train.update(dict(epochs=1, optimizer=optimizer, lr=0.1, momentum=0.9, weight_decay=weight_decay))
  return cfg


def _data(seed, n=B, shape=(D,)):
  rng = np.random.default_rng(seed)
  # Per-feature offsets and scales, so the statistics are far from the initial (0, 1).
  x = rng.normal(0.5, 1.0, (n,) + shape) * rng.uniform(0.5, 3.0, shape) + rng.uniform(-2, 2, shape)
  return {'image': jnp.asarray(x, jnp.float32), 'label': jnp.asarray(rng.integers(0, C, n), jnp.int32)}


def _init(method, example):
  # Jitted, with an 'rbg' key: eager or threefry initialisation compiles many
  # small programs (seconds for the ResNet on CPU).
  return jax.jit(method.init_params)(jax.random.key(0, impl='rbg'), example[:1])


def _setup(module, cfg, example, method_cls=Standard):
  method = method_cls(module, cfg, C)
  params = _init(method, example)
  (phase,) = method.phases()
  tx = loop.phase_optimizer(phase, params, cfg.train, steps_per_epoch=10)
  state = loop.TrainState(step=jnp.int32(0), params=params, opt_state=jax.jit(tx.init)(params),
                          hparams=method.hparams())
  return method, phase, tx, state


def _moments(v):
  """Per-feature batch mean and (biased, as BatchNorm normalises with) variance, float64."""
  v = np.asarray(v, np.float64).reshape(-1, np.shape(v)[-1])
  return v.mean(0), v.var(0)


def _normalise(v, mean, var, bn_params):
  return (v - mean) / np.sqrt(var + EPS) * np.asarray(bn_params['scale']) + np.asarray(bn_params['bias'])


def _expected_stats(params, x):
  """The running statistics after one train step on x from params, computed by hand."""
  model, stats = params['model'], params[base.MODEL_STATE]
  x = np.asarray(x, np.float64)
  m_in, v_in = _moments(x)
  h = _normalise(x, m_in, v_in, model['bn_in']) @ np.asarray(model['hidden']['kernel']) + np.asarray(
      model['hidden']['bias'])
  m_h, v_h = _moments(h)
  fold = lambda old, new: MOMENTUM * np.asarray(old, np.float64) + (1 - MOMENTUM) * new
  return {'bn_in': {'mean': fold(stats['bn_in']['mean'], m_in), 'var': fold(stats['bn_in']['var'], v_in)},
          'bn_hidden': {'mean': fold(stats['bn_hidden']['mean'], m_h), 'var': fold(stats['bn_hidden']['var'], v_h)}}


def _assert_tree_close(actual, expected, **tol):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), e, **tol), actual, expected)


def test_train_step_folds_each_batch_into_the_running_statistics():
  cfg = _config()
  b1, b2 = _data(1), _data(2)
  _, phase, tx, state = _setup(TinyBN(), cfg, b1['image'])
  init = state.params[base.MODEL_STATE]
  _assert_tree_close(init, {'bn_in': {'mean': np.zeros(D), 'var': np.ones(D)},
                            'bn_hidden': {'mean': np.zeros(H), 'var': np.ones(H)}})
  step = jax.jit(loop.make_train_step(phase.loss_fn, tx))
  expected1 = _expected_stats(state.params, b1['image'])
  s1, metrics = step(state, b1, jax.random.key(1))
  assert base.MODEL_STATE not in metrics and set(metrics) == {'loss', 'accuracy'}  # popped, not logged
  _assert_tree_close(s1.params[base.MODEL_STATE], expected1, rtol=1e-4, atol=1e-6)
  # The second step starts from the first one's statistics and reads the
  # hidden layer with the weights the first step trained.
  assert not np.allclose(s1.params['model']['hidden']['kernel'], state.params['model']['hidden']['kernel'])
  expected2 = _expected_stats(s1.params, b2['image'])
  s2, _ = step(s1, b2, jax.random.key(2))
  _assert_tree_close(s2.params[base.MODEL_STATE], expected2, rtol=1e-4, atol=1e-6)


def test_resnet_batchnorm_state():
  """The library's ResNet (one block per stage, width 4): a train step moves every BN
  layer's statistics; its eval-mode logits do not depend on the rest of the batch."""
  cfg = _config()
  batch = _data(3, shape=(8, 8, 3))
  method, phase, tx, state = _setup(ResNet(stage_sizes=(1, 1), width=4, num_classes=C), cfg, batch['image'])
  init = state.params[base.MODEL_STATE]
  assert set(init) == {'stem_bn', 'stage0_block0', 'stage1_block0'}
  assert set(init['stage1_block0']) == {'bn1', 'bn2', 'shortcut_bn'}  # stride 2: projection shortcut
  # Unoptimised code generation: the compile time of this tiny step dominates otherwise.
  fast_jit = lambda f: jax.jit(f, compiler_options={'xla_backend_optimization_level': 0})
  new, _ = fast_jit(loop.make_train_step(phase.loss_fn, tx))(state, batch, jax.random.key(1))
  after = new.params[base.MODEL_STATE]
  for path, old in jax.tree_util.tree_leaves_with_path(init):
    leaf = after
    for name in base.path_names(path):
      leaf = leaf[name]
    assert np.all(np.asarray(leaf) != np.asarray(old)), base.path_names(path)
  # The stem BN sees the stem convolution of this batch (with the weights before the step).
  kernel = state.params['model']['stem_conv']['kernel']
  stem = jax.lax.conv_general_dilated(batch['image'], kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  mean, var = _moments(stem)
  np.testing.assert_allclose(after['stem_bn']['mean'], (1 - MOMENTUM) * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(after['stem_bn']['var'], MOMENTUM + (1 - MOMENTUM) * var, rtol=1e-4, atol=1e-6)
  # Evaluation: each example's logits are the same alone as in the batch.
  x = batch['image'][:4]
  logits = fast_jit(method.logits)
  full = np.asarray(logits(new.params, x))
  for i in range(len(x)):
    np.testing.assert_allclose(np.asarray(logits(new.params, x[i:i + 1]))[0], full[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('optimizer', ['sgd', 'adam', 'adamw'])
def test_optimizer_never_changes_model_state(optimizer):
  cfg = _config(optimizer, weight_decay=0.1)  # weight decay would shrink the statistics
  batch = _data(4)
  method = Standard(TinyBN(), cfg, C)
  params = _init(method, batch['image'])
  params[base.MODEL_STATE] = jax.tree.map(lambda a: a + 2.0, params[base.MODEL_STATE])
  ones = jax.tree.map(jnp.ones_like, params)  # even a (bogus) gradient on the statistics
  (phase,) = method.phases()
  everything = base.Phase(phase.name, phase.epochs, phase.loss_fn, trainable=lambda names: True)
  for ph in (phase, everything):
    tx = loop.phase_optimizer(ph, params, cfg.train, steps_per_epoch=10)
    opt_state = tx.init(params)
    for _ in range(3):  # momentum / Adam moments included
      updates, opt_state = tx.update(ones, opt_state, params)
      for leaf in jax.tree.leaves(updates[base.MODEL_STATE]):
        assert np.all(np.asarray(leaf) == 0.0), (optimizer, ph.trainable)
      assert all(np.any(np.asarray(leaf) != 0.0) for leaf in jax.tree.leaves(updates['model'])), optimizer


def test_eval_logits_use_the_running_averages_not_the_batch():
  cfg = _config()
  x = _data(5, n=6)['image']
  method = Standard(TinyBN(), cfg, C)
  params = _init(method, x)
  rng = np.random.default_rng(6)
  params[base.MODEL_STATE] = jax.tree.map(
      lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32), params[base.MODEL_STATE])
  logits = jax.jit(method.logits)
  full = np.asarray(logits(params, x))
  # One example alone, or beside other examples, gets the same logits.
  other = _data(7, n=6)['image'].at[2].set(x[2])
  for i in range(len(x)):
    np.testing.assert_allclose(np.asarray(logits(params, x[i:i + 1]))[0], full[i], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(logits(params, other))[2], full[2], rtol=1e-5, atol=1e-6)
  # And they are the network with its running averages, computed by hand.
  m, s = params['model'], params[base.MODEL_STATE]
  stat = lambda name: (np.asarray(s[name]['mean']), np.asarray(s[name]['var']), m[name])
  h = _normalise(np.asarray(x, np.float64), *stat('bn_in')) @ np.asarray(m['hidden']['kernel']) + np.asarray(
      m['hidden']['bias'])
  h = np.maximum(_normalise(h, *stat('bn_hidden')), 0.0)
  np.testing.assert_allclose(full, h @ np.asarray(m['out']['kernel']) + np.asarray(m['out']['bias']),
                             rtol=1e-4, atol=1e-5)


def test_batch_size_check_flags_batchnorm_on_batch_statistics():
  """The shared evaluation's ``batch_size_invariance`` check: BatchNorm left in train
  mode normalises each chunk by its own statistics, so an example's logits depend
  on the batch it is evaluated in; the same network in eval mode passes."""
  model = TinyBN()
  x = _data(11, n=64)['image']
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  on_running = lambda v, xx, rng=None: model.apply(v, xx)[0]
  on_batch = lambda v, xx, rng=None: model.apply(v, xx, train=True, mutable=['batch_stats'])[0][0]
  y = jnp.argmax(on_running(variables, x), -1)
  ev = config_lib.default_config().eval
  evaluation.profiles.apply_profile(ev, 'quick')
  ev.update(dict(attacks=('pgd',), eps=(0.5,), check_eps=0.5, pgd_steps=5, noise_samples=2, batch_size=32,
                 trajectories=0))
  checks = {}
  for name, fn in (('running', on_running), ('batch', on_batch)):
    res = evaluation.evaluate(fn, variables, x, y, ev, parallel.make_mesh(1), log=lambda s: None, box=None)
    checks[name] = res['sanity']['batch_size_invariance']
  assert checks['running']['passed'], checks['running']
  assert 'Clean scores: max difference 0, ' in checks['running']['detail'], checks['running']
  assert not checks['batch']['passed'], checks['batch']
  # What gave it away: logits far beyond float rounding between batch sizes 32 and 16.
  rel = float(checks['batch']['detail'].split(' of the score scale')[0].split(', ')[-1])
  assert rel > 1e-2, checks['batch']['detail']


class ForgetsState(Standard):
  """A loss that computes the forward pass in train mode but drops the new statistics."""

  def _loss(self, params, batch, rng, hparams):
    (logits, _), _ = self.apply_with_state(params, batch['image'], train=True)
    return base.cross_entropy(logits, batch['label']), {'accuracy': base.accuracy(logits, batch['label'])}


def test_loss_that_forgets_model_state_is_an_error():
  cfg = _config()
  batch = _data(10)
  _, phase, tx, state = _setup(TinyBN(), cfg, batch['image'], method_cls=ForgetsState)
  with pytest.raises(loop.TrainingError, match=r"the model has BatchNorm statistics but the loss did not return "
                                               r"them: .*Method\.apply_with_state.*metrics\['model_state'\]"):
    jax.jit(loop.make_train_step(phase.loss_fn, tx))(state, batch, jax.random.key(1))
  # A model without BatchNorm has no state to return: the same loss trains.
  _, phase, tx, state = _setup(MLP(hidden=(H,), num_classes=C), cfg, batch['image'], method_cls=ForgetsState)
  assert base.MODEL_STATE not in state.params
  new, metrics = jax.jit(loop.make_train_step(phase.loss_fn, tx))(state, batch, jax.random.key(1))
  assert base.MODEL_STATE not in new.params and np.isfinite(float(metrics['loss']))
