"""PGD adversarial training (Madry et al. 2018): cross-entropy on adversarial examples only.

Each training step attacks its own batch, then descends on the attacked batch:

  x_adv = attack(f_eval, x, y)           maximise CE(f(x'), y) over ||x' - x|| <= eps
  L     = CE(f_train(x_adv), y)

The attack is the project's own ``attacks.pgd``, traced into the compiled
train step (no separate program, no host round trip). It runs on the model in
eval mode (BatchNorm running averages, as the TRADES reference code does)
with ``stop_gradient`` on the parameters it attacks, so no gradient flows
through the attack into the weights; the loss is then computed in train mode
(batch statistics, which also update the running averages). Like Madry et
al.'s code, the training example is the *last* PGD iterate, not the best one
(``attacks.pgd(..., return_last=True)``).

``attack='fgsm_rs'`` is "fast adversarial training" (Wong, Rice & Kolter
2020): a uniform random start in the eps-ball, one signed-gradient step of
``step_size`` (default 1.25 * eps), projection onto the ball and [0, 1].

Config (``config.method``):
  eps           attack radius on the [0, 1] pixel scale (traced hparam).
  step_size     absolute attack step (traced hparam); 0 = the default:
                2.5 * eps / steps for 'pgd', 1.25 * eps for 'fgsm_rs'.
  steps         PGD steps per training batch ('pgd' only; 'fgsm_rs' takes 1).
  random_start  start PGD at a uniform point of the ball ('pgd' only;
                'fgsm_rs' always starts at random).
  attack        'pgd' (Madry et al.) or 'fgsm_rs' (Wong et al.).
  norm          'linf' or 'l2'.
  eps_warmup_steps  ramp eps (and the step size with it) linearly from
                eps / W to eps over the first W optimiser steps (0 = off).
                A small network trained at MNIST's eps = 0.3 from the start
                can sit at chance (loss 2.30, measured here for two epochs);
                the ramp lets it learn the clean task first.

Metrics per step: ``loss`` (the adversarial CE) and ``adv_accuracy``, the
training batch's accuracy on its adversarial examples (train mode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geomrobust import attacks
from geomrobust import config as config_lib
from geomrobust.methods import base

TRAIN_ATTACKS = ('pgd', 'fgsm_rs')


class PgdAT(base.Method):
  """Madry PGD-AT (or fast AT with ``attack='fgsm_rs'``)."""

  BOUNDS = {'eps': config_lib.number(0, example=0.3), 'step_size': config_lib.number(0, example=0.0),
            'steps': config_lib.integer(1, example=10), 'eps_warmup_steps': config_lib.integer(0)}

  def __init__(self, model, config, num_classes):
    super().__init__(model, config, num_classes)
    m = config.method
    self.attack = base.choice(m, 'attack', 'pgd', TRAIN_ATTACKS)
    self.norm = base.choice(m, 'norm', 'linf', attacks.NORMS)
    fast = self.attack == 'fgsm_rs'
    self.steps = 1 if fast else int(m.get('steps', 40))
    self.random_start = True if fast else bool(m.get('random_start', True))
    self.eps = float(m.eps)
    step = float(m.get('step_size', 0.0))
    self.step_size = step or (1.25 * self.eps if fast else 2.5 * self.eps / self.steps)
    self.eps_warmup_steps = int(m.get('eps_warmup_steps', 0))

  def hparams(self):
    return {'eps': jnp.float32(self.eps), 'step_size': jnp.float32(self.step_size)}

  def adversarial(self, params, x, labels, rng, hparams):
    """The training-time attack: ``x [B, ...], labels [B] -> x_adv [B, ...]``.

    Eval-mode model, parameters behind ``stop_gradient``; the last iterate,
    clipped to the dataset's input box; eps and step size scaled by the
    warm-up ramp during its first steps.
    """
    frozen = jax.lax.stop_gradient(params)
    logits_fn = lambda xx, r: self.apply(frozen, xx, r, train=False)[0]
    ramp = base.warmup_fraction(hparams, self.eps_warmup_steps)
    return attacks.pgd(logits_fn, x, labels, rng, eps=ramp * hparams['eps'], step_size=ramp * hparams['step_size'],
                       steps=self.steps, norm=self.norm, random_start=self.random_start, loss='ce',
                       return_last=True, box=self.input_box)

  def _loss(self, params, batch, rng, hparams):
    x, y = batch['image'], batch['label']
    k_attack, k_model = jax.random.split(rng)
    x_adv = self.adversarial(params, x, y, k_attack, hparams)
    (logits, _), state = self.apply_with_state(params, x_adv, k_model, train=True)
    return base.cross_entropy(logits, y), {'adv_accuracy': base.accuracy(logits, y), **state}

  def phases(self):
    return [base.Phase('train', self.config.train.epochs, self._loss)]


METHOD = PgdAT
