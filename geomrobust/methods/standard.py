"""Plain cross-entropy training (the undefended baseline).

Config (``config.method``): no hyperparameters. The isometric method with
``beta = 0`` computes the same loss; this one skips the isometry diagnostics
term, so it is the cheapest honest baseline for any architecture.
"""

from geomrobust.methods import base


class Standard(base.Method):

  def _loss(self, params, batch, rng, hparams):
    del hparams
    # state: the new BatchNorm statistics ({} for models without BatchNorm).
    (logits, _), state = self.apply_with_state(params, batch['image'], rng, train=True)
    return base.cross_entropy(logits, batch['label']), {'accuracy': base.accuracy(logits, batch['label']),
                                                         **state}

  def phases(self):
    return [base.Phase('train', self.config.train.epochs, self._loss)]


METHOD = Standard
