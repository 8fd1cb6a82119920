"""One FGSM step on the method's own *training* loss (e.g. CE + beta * iso
for the isometric method), as some papers attack their models. A protocol
probe: a loss with a regulariser can mask the CE gradient, so this number is
reported beside the shared evaluation (whose FGSM is on CE), never instead.

Test examples go in batches of ``train.batch_size`` (a loss may be a batch
quantity); the step is ``eps * sign(grad_x loss)`` with the loss of the last
training phase at the method's hyperparameters, clipped to the data's box.

Options (``config.probes.train_loss_fgsm``):
  eps   the eps grid (default: ``eval.eps``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geomrobust import config as config_lib
from geomrobust.probes import base


class TrainLossFgsm(base.Probe):
  kind = 'protocol'
  BOUNDS = {'eps': config_lib.number(0, example=0.1)}  # each eps

  def _fn(self, method, box):
    loss_fn = method.phases()[-1].loss_fn
    hp = method.hparams()

    def correct(params, x, y, eps, key):
      def one(xyk):
        xb, yb, kb = xyk
        grad = jax.grad(lambda xa: loss_fn(params, {'image': xa, 'label': yb}, kb, hp)[0])(xb)
        xa = xb + eps * jnp.sign(grad)
        if box is not None:
          xa = jnp.clip(xa, box[0], box[1])
        return jnp.argmax(method.logits(params, xa), -1) == yb

      keys = jax.random.split(key, x.shape[0])
      return jax.lax.map(one, (x, y, keys)).mean()

    return jax.jit(correct)

  def __call__(self, inp: base.ProbeInput) -> dict:
    bs = int(inp.config.train.batch_size)
    n = (len(inp.eval_y) // bs) * bs
    if n == 0:
      return {}
    x = jnp.asarray(inp.eval_x[:n]).reshape((n // bs, bs) + inp.eval_x.shape[1:])
    y = jnp.asarray(inp.eval_y[:n]).reshape(n // bs, bs)
    fn = self.compiled((inp.method, inp.box), lambda: self._fn(inp.method, inp.box))
    rows = [dict(attack='fgsm_train_loss', eps=float(e),
                 accuracy=float(fn(inp.params, x, y, jnp.float32(e), inp.key)))
            for e in (self.options.get('eps') or inp.config.eval.eps)]
    return {'fgsm_train_loss': rows, 'examples': int(n)}

  def summary(self, out: dict) -> dict[str, float]:
    return {f'fgsm_train_loss@{r["eps"]:g}': r['accuracy'] for r in out.get('fgsm_train_loss', [])}

  def report(self, out: dict, workdir) -> list[str]:
    rows = out.get('fgsm_train_loss', [])
    if not rows:
      return []
    return ['## FGSM on the training loss (a paper protocol, beside the shared evaluation)', '',
            f'One FGSM step on the method\'s full training loss, batches of the training batch size, '
            f'{out["examples"]} test examples.', '', '| eps | ' + ' | '.join(f'{r["eps"]:g}' for r in rows) + ' |',
            '|---|' + '---|' * len(rows), '| accuracy (%) | ' + ' | '.join(f'{100 * r["accuracy"]:.2f}'
                                                                     for r in rows) + ' |', '']


PROBE = TrainLossFgsm
