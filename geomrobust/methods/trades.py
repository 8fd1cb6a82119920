"""TRADES (Zhang et al. 2019): clean cross-entropy plus a KL robustness term.

  L = CE(f(x), y) + beta * mean_batch KL( p(x) || p(x_adv) )

with ``p = softmax(f)``, the KL summed over classes and averaged over the
batch, and the gradient flowing through both ``p(x)`` and ``p(x_adv)`` (as in
the reference code). ``x_adv`` maximises the same KL, with ``p(x)`` held
fixed, inside the eps-ball:

  x_0     = x + 0.001 * N(0, I)                 (projected onto the ball and [0, 1])
  x_{k+1} = P(x_k + step_size * sign(grad_x KL(p(x) || p(x_k))))

It is the project's ``attacks.pgd`` with the KL as a callable loss, the
Gaussian start as ``x_init`` and the last iterate returned, traced into the
compiled train step. The attack runs on the model in eval mode (BatchNorm
running averages, like the reference ``model.eval()``) with ``stop_gradient``
on its parameters; the loss then runs the clean and the adversarial batch
through the train-mode model in two passes (each with its own batch
statistics; the running averages see both, clean first). ``beta = 0`` is
plain cross-entropy on clean examples.

Config (``config.method``):
  beta        weight of the KL term (6.0 in the paper; traced hparam).
  eps         attack radius on the [0, 1] pixel scale (traced hparam).
  step_size   absolute attack step (traced hparam); 0 = 2.5 * eps / steps.
  steps       attack steps per training batch.
  norm        'linf' or 'l2' (the reference is linf).
  eps_warmup_steps  ramp eps and step size linearly over the first W
              optimiser steps (0 = off, the reference; see ``pgd_at``).

Metrics per step: ``loss``, ``ce`` (clean), ``kl``, ``accuracy`` (clean,
train mode) and ``adv_accuracy`` (on x_adv, train mode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geomrobust import attacks
from geomrobust import config as config_lib
from geomrobust.methods import base

# The reference start: x + START_STD * N(0, I).
START_STD = 0.001


def kl_divergence(log_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """``KL(p || softmax(logits_q))`` per example: ``[B, C], [B, C] -> [B]``.

  ``log_p`` are log-probabilities (e.g. ``log_softmax`` of the clean logits);
  working in log space keeps classes with p = 0 finite.
  """
  log_q = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


class Trades(base.Method):
  """CE(clean) + beta * KL(p_clean || p_adv), the attack maximising the KL."""

  BOUNDS = {'beta': config_lib.number(0, example=6.0), 'eps': config_lib.number(0, example=0.3),
            'step_size': config_lib.number(0, example=0.0), 'steps': config_lib.integer(0, example=10),
            'eps_warmup_steps': config_lib.integer(0)}

  def __init__(self, model, config, num_classes):
    super().__init__(model, config, num_classes)
    m = config.method
    self.norm = base.choice(m, 'norm', 'linf', attacks.NORMS)
    self.steps = int(m.get('steps', 10))
    self.eps = float(m.eps)
    self.beta = float(m.get('beta', 6.0))
    step = float(m.get('step_size', 0.0))
    self.step_size = step or 2.5 * self.eps / max(self.steps, 1)
    self.eps_warmup_steps = int(m.get('eps_warmup_steps', 0))

  def hparams(self):
    return {'beta': jnp.float32(self.beta), 'eps': jnp.float32(self.eps),
            'step_size': jnp.float32(self.step_size)}

  def adversarial(self, params, x, labels, rng, hparams):
    """The KL-maximising attack: ``x [B, ...] -> x_adv [B, ...]``.

    Eval-mode model, parameters behind ``stop_gradient``; starts at
    ``x + 0.001 * N(0, I)``, returns the last iterate. ``labels`` only feed
    the attack's bookkeeping (the KL does not read them).
    """
    frozen = jax.lax.stop_gradient(params)
    logits_fn = lambda xx, r: self.apply(frozen, xx, r, train=False)[0]
    k_start, k_clean, k_attack = jax.random.split(rng, 3)
    log_p_clean = jax.lax.stop_gradient(jax.nn.log_softmax(logits_fn(x, k_clean).astype(jnp.float32), -1))

    def kl_to_clean(logits, labels, target_labels=None):  # The attacks' loss signature.
      del labels, target_labels
      return kl_divergence(log_p_clean, logits)

    x_init = x + START_STD * jax.random.normal(k_start, x.shape, x.dtype)
    ramp = base.warmup_fraction(hparams, self.eps_warmup_steps)
    return attacks.pgd(logits_fn, x, labels, k_attack, eps=ramp * hparams['eps'], step_size=ramp * hparams['step_size'],
                       steps=self.steps, norm=self.norm, loss=kl_to_clean, x_init=x_init, return_last=True,
                       box=self.input_box)

  def _loss(self, params, batch, rng, hparams):
    x, y = batch['image'], batch['label']
    k_attack, k_clean, k_adv = jax.random.split(rng, 3)
    x_adv = self.adversarial(params, x, y, k_attack, hparams)
    (logits, _), state = self.apply_with_state(params, x, k_clean, train=True)
    # The adversarial pass starts from the clean pass's running averages, so both update them.
    (logits_adv, _), state = self.apply_with_state(dict(params, **state), x_adv, k_adv, train=True)
    ce = base.cross_entropy(logits, y)
    kl = jnp.mean(kl_divergence(jax.nn.log_softmax(logits.astype(jnp.float32), -1), logits_adv))
    loss = ce + hparams['beta'] * kl
    return loss, {'ce': ce, 'kl': kl, 'accuracy': base.accuracy(logits, y),
                  'adv_accuracy': base.accuracy(logits_adv, y), **state}

  def phases(self):
    return [base.Phase('train', self.config.train.epochs, self._loss)]


METHOD = Trades
