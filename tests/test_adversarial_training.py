"""PGD-AT and TRADES: the attack inside the step, the losses, and that AT buys robustness."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import attacks
from geomrobust import config as config_lib
from geomrobust import models
from geomrobust import parallel
from geomrobust.methods import build_method
from geomrobust.methods import trades as trades_lib
from geomrobust.training import loop


def at_config(method: dict, epochs=20, hidden=(64,)):
  cfg = config_lib.default_config()
  cfg.model.hidden = hidden
  cfg.method = ml_collections.ConfigDict(method)
  cfg.train.epochs = epochs
  cfg.train.batch_size = 32
  cfg.train.lr = 3e-3
  cfg.train.eval_every = 0
  cfg.eval.batch_size = 64
  return cfg


PGD_AT = dict(name='pgd_at', eps=0.15, step_size=0.0, steps=7, random_start=True, attack='pgd', norm='linf')
TRADES = dict(name='trades', beta=6.0, eps=0.15, step_size=0.0, steps=7, norm='linf')


def synthetic(n=512, seed=0):
  """Two classes in 8x8 images: one *robust* feature (pixel 0 at 0.2 vs 0.8,
  margin 0.3) and 63 *non-robust* ones (0.5 +- 0.04, each weakly but jointly
  strongly predictive). Plain CE leans on the many small ones, which an
  eps = 0.15 attack flips; the robust feature survives it."""
  rng = np.random.default_rng(seed)
  y = (np.arange(n) % 2).astype(np.int32)
  sign = 2.0 * y - 1.0
  x = 0.5 + 0.04 * sign[:, None] + rng.normal(0, 0.03, size=(n, 64))
  x[:, 0] = 0.5 + 0.3 * sign + rng.normal(0, 0.03, size=n)
  x = np.clip(x, 0, 1).reshape(n, 8, 8, 1)
  return (x * 255).round().astype(np.uint8), y


def _method(cfg, num_classes=2):
  return build_method(cfg, models.build_model(cfg.model, num_classes), num_classes)


def _robust_accuracy(method, params, x, y, eps):
  xf = jnp.asarray(x, jnp.float32) / 255.0
  f = lambda xx, r: method.logits(params, xx)
  x_adv = attacks.pgd(f, xf, jnp.asarray(y), jax.random.key(1), eps=eps, steps=50, restarts=3)
  return float(jnp.mean(jnp.argmax(method.logits(params, x_adv), -1) == y))


def _train(cfg, x, y, tmp_path):
  method = _method(cfg)
  res = loop.train(method, x, y, x[:64], y[:64], cfg, tmp_path, parallel.make_mesh(1), log=lambda s: None)
  return method, res.params


@pytest.mark.parametrize('spec', [PGD_AT, TRADES], ids=['pgd_at', 'trades'])
def test_adversarial_training_beats_ce_under_attack(spec, tmp_path):
  x, y = synthetic()
  xt, yt = synthetic(256, seed=1)
  ce_method, ce_params = _train(at_config(dict(name='standard')), x, y, tmp_path / 'ce')
  at_method, at_params = _train(at_config(spec), x, y, tmp_path / 'at')
  ce_robust = _robust_accuracy(ce_method, ce_params, xt, yt, 0.15)
  at_robust = _robust_accuracy(at_method, at_params, xt, yt, 0.15)
  at_clean = _robust_accuracy(at_method, at_params, xt, yt, 0.0)
  assert ce_robust < 0.6, ce_robust     # CE relies on the non-robust features ...
  assert at_robust > 0.9, at_robust     # ... AT on the robust one,
  assert at_clean > 0.9, at_clean       # at little clean cost here.


def _ce(method, params, x, y):
  return -jnp.mean(jax.nn.log_softmax(method.logits(params, x))[jnp.arange(len(y)), y])


def _batch(x, y):
  return {'image': jnp.asarray(x, jnp.float32) / 255.0, 'label': jnp.asarray(y)}


def test_pgd_at_loss_is_ce_at_the_stopped_attack_point():
  cfg = at_config(PGD_AT)
  method = _method(cfg)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  batch = _batch(*synthetic(32))
  hp = method.hparams()
  rng = jax.random.key(3)
  (phase,) = method.phases()
  loss, metrics = phase.loss_fn(params, batch, rng, hp)
  grads = jax.grad(lambda p: phase.loss_fn(p, batch, rng, hp)[0])(params)
  # The same attack point (same key), then CE there with the point held fixed:
  k_attack, _ = jax.random.split(rng)
  x_adv = method.adversarial(params, batch['image'], batch['label'], k_attack, hp)
  ce = lambda p: _ce(method, p, x_adv, batch['label'])
  np.testing.assert_allclose(float(loss), float(ce(params)), rtol=1e-5)
  # No gradient flows through the attack into the weights.
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(jax.grad(ce)(params))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # The training example is in the ball and in [0, 1], and the attack hurts.
  gap = jnp.max(jnp.abs(x_adv - batch['image']))
  assert float(gap) <= 0.15 + 1e-6 and float(jnp.min(x_adv)) >= 0 and float(jnp.max(x_adv)) <= 1
  clean_loss = _ce(method, params, batch['image'], batch['label'])
  assert float(loss) > float(clean_loss)
  assert method.step_size == pytest.approx(2.5 * 0.15 / 7)


def test_eps_warmup_scales_the_training_attack():
  from geomrobust.methods import base
  assert float(base.warmup_fraction({'step': jnp.int32(0)}, 4)) == pytest.approx(0.25)
  assert float(base.warmup_fraction({'step': jnp.int32(9)}, 4)) == 1.0
  assert float(base.warmup_fraction({}, 4)) == 1.0  # outside training: the full radius
  cfg = at_config(dict(PGD_AT, eps_warmup_steps=10))
  method = _method(cfg)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  batch = _batch(*synthetic(32))
  hp = dict(method.hparams(), step=jnp.int32(1))  # 2/10 of the ramp: radius 0.03
  x_adv = method.adversarial(params, batch['image'], batch['label'], jax.random.key(1), hp)
  gap = float(jnp.max(jnp.abs(x_adv - batch['image'])))
  assert 0.02 < gap <= 0.03 + 1e-6


def test_fast_at_takes_one_random_start_step():
  cfg = at_config(dict(PGD_AT, attack='fgsm_rs'))
  method = _method(cfg)
  assert method.steps == 1 and method.random_start and method.step_size == pytest.approx(1.25 * 0.15)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  batch = _batch(*synthetic(32))
  x_adv = method.adversarial(params, batch['image'], batch['label'], jax.random.key(1), method.hparams())
  assert float(jnp.max(jnp.abs(x_adv - batch['image']))) <= 0.15 + 1e-6


def test_kl_divergence_matches_numpy_and_handles_zero_probabilities():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
  q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
  expected = np.sum(p * (np.log(p) - np.log(q)), -1)
  got = trades_lib.kl_divergence(jax.nn.log_softmax(jnp.asarray(a)), jnp.asarray(b))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
  # p with a (numerically) zero class: finite, and zero against itself.
  log_p = jax.nn.log_softmax(jnp.array([[100.0, -100.0, 0.0]]))
  assert np.isfinite(float(trades_lib.kl_divergence(log_p, jnp.array([[1.0, 2.0, 3.0]]))[0]))
  assert float(trades_lib.kl_divergence(log_p, jnp.array([[100.0, -100.0, 0.0]]))[0]) == pytest.approx(0, abs=1e-6)


def test_trades_loss_terms_and_its_attack():
  cfg = at_config(TRADES)
  method = _method(cfg)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  batch = _batch(*synthetic(32))
  hp = method.hparams()
  (phase,) = method.phases()
  loss, m = phase.loss_fn(params, batch, jax.random.key(2), hp)
  np.testing.assert_allclose(float(loss), float(m['ce'] + 6.0 * m['kl']), rtol=1e-5)
  assert float(m['kl']) > 0
  # beta = 0 is exactly clean cross-entropy.
  loss0, m0 = phase.loss_fn(params, batch, jax.random.key(2), dict(hp, beta=jnp.float32(0)))
  clean = _ce(method, params, batch['image'], batch['label'])
  np.testing.assert_allclose(float(loss0), float(clean), rtol=1e-6)
  # The attack climbs the KL: far above the KL of its 0.001-noise start, inside the ball.
  x = batch['image']
  x_adv = method.adversarial(params, x, batch['label'], jax.random.key(4), hp)
  log_p = jax.nn.log_softmax(method.logits(params, x))
  kl_adv = trades_lib.kl_divergence(log_p, method.logits(params, x_adv))
  x_start = jnp.clip(x + trades_lib.START_STD * jax.random.normal(jax.random.key(5), x.shape), 0, 1)
  kl_start = trades_lib.kl_divergence(log_p, method.logits(params, x_start))
  assert float(jnp.mean(kl_adv)) > 10 * float(jnp.mean(kl_start))
  assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.15 + 1e-6


@pytest.mark.parametrize('spec,message', [
    (dict(PGD_AT, attack='cw'), "unknown method.attack 'cw'"),
    (dict(PGD_AT, norm='l1'), "unknown method.norm 'l1'"),
    (dict(PGD_AT, eps=-0.1), 'method.eps=-0.1 is out of range'),
    (dict(TRADES, beta=-1.0), 'method.beta=-1 is out of range'),
])
def test_bad_adversarial_training_configs_are_clear_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    _method(at_config(spec))
