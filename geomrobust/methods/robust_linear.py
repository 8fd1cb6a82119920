"""Logistic regression trained with the *exact* robust loss (the linear lower bound).

For a two-class linear score ``f(x) = <v, x> + c`` (an ``mlp`` with no hidden
layer: ``v`` is the difference of its two output columns), the worst case of
the logistic loss over ``||delta|| <= tau`` is closed-form:

  max_delta log(1 + exp(-s f(x + delta))) = log(1 + exp(-(s f(x) - tau ||v||_*)))

with ``s = 2y - 1`` and ``||.||_*`` the dual norm (l2 for an L2 attack, l1 for
L-inf). So this is the best a linear classifier can do under adversarial
training at radius tau, with no attack in the loop to be weak
(``papers/feature_purification.md``, "Baselines for the lower bound").

Options (``config.method``): ``tau`` (traced hparam), ``norm`` ('l2' or
'linf'), ``adv_steps`` (optimiser steps of the one phase, on fresh or stored
batches). Metrics per step: ``accuracy`` (clean), ``robust_accuracy``
(exact: the fraction with ``s f(x) > tau ||v||_*``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geomrobust import config as config_lib
from geomrobust.methods import base

DUAL = {'l2': 2, 'linf': 1}


def robust_margin(score, labels, v, tau, norm: str):
  """``s f(x) - tau ||v||_*``: ``score [B]``, integer ``labels [B]``, ``v [d]`` -> ``[B]``."""
  s = 2.0 * labels.astype(score.dtype) - 1.0
  return s * score - tau * jnp.linalg.norm(v, ord=DUAL[norm])


class RobustLinear(base.Method):
  """Exact robust logistic regression (see the module docstring)."""

  BOUNDS = {'tau': config_lib.number(0, example=0.1), 'adv_steps': config_lib.integer(1, example=2000)}

  def __init__(self, model, config, num_classes):
    super().__init__(model, config, num_classes)
    m = config.method
    if num_classes != 2 or type(model).__name__ != 'MLP' or tuple(model.hidden):
      raise ValueError('method robust_linear needs a two-class linear model: model.name=mlp with model.hidden=() '
                       f'on a two-class dataset (got model {config.model.name!r}, {num_classes} classes)')
    self.norm = base.choice(m, 'norm', 'l2', DUAL)
    self.tau, self.steps = float(m.get('tau', 0.0)), int(m.get('adv_steps', 1000))

  def hparams(self):
    return {'tau': jnp.float32(self.tau)}

  @staticmethod
  def direction(params) -> jax.Array:
    """``v [d]``: the gradient of the score ``f = logit_1 - logit_0`` in x."""
    kernel = params['model']['out']['kernel']
    return kernel[:, 1] - kernel[:, 0]

  def _loss(self, params, batch, rng, hparams):
    x, y = batch['image'], batch['label']
    logits = self.apply(params, x, rng, train=True)[0]
    score = logits[:, 1] - logits[:, 0]
    margin = robust_margin(score, y, self.direction(params), hparams['tau'], self.norm)
    return jnp.mean(jax.nn.softplus(-margin)), {'accuracy': base.accuracy(logits, y),
                                                'robust_accuracy': jnp.mean(margin > 0)}

  def phases(self):
    return [base.Phase('train', 0, self._loss, steps=self.steps)]


METHOD = RobustLinear
