"""Feature purification (Allen-Zhu & Li): clean training, then adversarial training from the clean weights.

Spec: ``papers/feature_purification.md``. One run has two step-counted phases:

  clean        ``clean_steps`` optimiser steps on the logistic (two-class
               cross-entropy) loss of fresh clean batches;
  adversarial  ``adv_steps`` steps on the loss of adversarial batches made by
               the project's own attacks inside the compiled step: one-step
               FGM (``attacks.fgsm``: ``tau * g / ||g||`` in L2,
               ``tau * sign(g)`` in L-inf) or PGD (``attacks.pgd``, the last
               iterate), on the eval-mode model behind ``stop_gradient``,
               clipped to the dataset's input box (none for sparse_coding).

Snapshots live in the parameters, so a finished run holds all three weights
the purification principle compares, whatever the model:

  params['init']   theta_0, the initialisation (never trained);
  params['model']  theta, trained by the clean phase (frozen after it): at the
                   end of the run, the clean weights;
  params['delta']  Delta, zero until the adversarial phase trains it.

The classifier uses ``theta + Delta``. Plain SGD (or Adam) on Delta with theta
frozen takes exactly the steps it would take on theta itself (the gradients
are equal), so this is adversarial training *from the clean weights*, and
``Delta`` is the update ``W_adv - W_clean``. (Weight decay is the exception:
it decays Delta, i.e. pulls towards the clean weights, not towards 0.) ``rank=r > 0`` restricts it: every
parameter with two or more axes gets ``Delta = A B^T`` on its
``[prod(shape[:-1]), shape[-1]]`` reshape (``{'a': A, 'b': B}``, ``A`` zeros,
``B`` random orthonormal columns, so Delta starts at 0 and the first steps
are the full update projected onto r directions), the rest (biases) a full
Delta: ``W_adv - W_clean`` has rank at most r.

Options (``config.method``):
  recipe        'clean_then_adversarial' (the paper's: both phases),
                'clean' (the clean phase only) or 'adversarial' (adversarial
                training from scratch, ``clean_steps + adv_steps`` steps: the
                same budget).
  clean_steps, adv_steps   steps of each phase.
  clean_lr, adv_lr  learning rate of each phase (0 = ``train.lr``).
  attack        'fgm' (one step, no random start; the paper's) or 'pgd'.
  norm          'l2' or 'linf'.
  tau           the training radius (traced hparam).
  pgd_steps     steps of the 'pgd' attack (step size ``2.5 tau / pgd_steps``).
  tau_warmup_steps  ramp tau linearly from 0 over the first N steps of
                adversarial training (0, the paper's: none; a deep network at
                a large tau may need it, as madry_mnist's eps warm-up).
  rank          0 = a full update; r > 0 = the rank-r update above.
  linearize     train the model's linearisation at theta_0 (the NTK regime):
                ``f_lin(x) = f(x; theta_0) + J f(x; theta_0) (theta - theta_0)``,
                one ``jax.jvp``, for models without BatchNorm. (A threshold
                under ``stop_gradient``, as symmetric_relu's, has no tangent:
                it keeps its value at theta_0, as in the kernel of gradient
                training.)
  ideal         the ideal classifier f* of the sparse-coding data: the
                symmetric_relu model with neurons the dictionary atoms and
                output weights w* (set from the dataset; nothing is trained;
                with m = c d neurons each atom appears c times, weight w*/c; one
                step of a phase 'fixed' at learning rate 0).

Metrics per step: ``loss``, ``accuracy`` (clean) and in the adversarial phase
``adv_accuracy``; on data with a dictionary (``sparse_coding``) and a model
with a first-layer matrix ``w`` ``[d, m]``, the medians over neurons of its
purity (``purity_top1``), dense-mixture cosine (``dense_cos``) and ``l1_l2``
ratio (``geometry.purification.purity``), so ``metrics.jsonl`` holds the
purity curve over both phases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust import attacks
from geomrobust import config as config_lib
from geomrobust.geometry import purification as geometry
from geomrobust.methods import base

ATTACKS = ('fgm', 'pgd')
RECIPES = ('clean_then_adversarial', 'clean', 'adversarial')
NORMS = ('l2', 'linf')
SNAPSHOT_KEYS = ('init', 'model', 'delta')


def _is_matrix(leaf) -> bool:
  return jnp.ndim(leaf) >= 2


def _as_matrix(leaf):
  """``[..., n] -> [prod(...), n]``: neurons (output units) in the columns."""
  return jnp.reshape(leaf, (-1, jnp.shape(leaf)[-1]))


class Purification(base.Method):
  """Clean phase, then adversarial training of the update Delta (see the module docstring)."""

  BOUNDS = {'clean_steps': config_lib.integer(0, example=2000), 'adv_steps': config_lib.integer(0, example=2000),
            'clean_lr': config_lib.number(0), 'adv_lr': config_lib.number(0),
            'tau': config_lib.number(0, example=0.3), 'pgd_steps': config_lib.integer(1, example=10),
            'rank': config_lib.integer(0, example=4), 'tau_warmup_steps': config_lib.integer(0, example=600)}

  def __init__(self, model, config, num_classes):
    super().__init__(model, config, num_classes)
    m = config.method
    self.attack = base.choice(m, 'attack', 'fgm', ATTACKS)
    self.norm = base.choice(m, 'norm', 'l2', NORMS)
    self.recipe = base.choice(m, 'recipe', 'clean_then_adversarial', RECIPES)
    self.clean_steps, self.adv_steps = int(m.get('clean_steps', 0)), int(m.get('adv_steps', 0))
    self.clean_lr, self.adv_lr = float(m.get('clean_lr', 0.0)), float(m.get('adv_lr', 0.0))
    self.tau, self.pgd_steps, self.rank = float(m.get('tau', 0.0)), int(m.get('pgd_steps', 10)), int(m.get('rank', 0))
    self.linearize, self.ideal = bool(m.get('linearize', False)), bool(m.get('ideal', False))
    self.tau_warmup_steps = int(m.get('tau_warmup_steps', 0))
    if self.ideal and (self.linearize or type(model).__name__ != 'SymmetricReLU'):
      raise ValueError('method.ideal=true is the ideal classifier f*: it needs model.name=symmetric_relu '
                       'and method.linearize=false')
    self._task = geometry.task_of(config)   # (M, w*) of sparse-coding data, else None
    if self.ideal and self._task is None:
      raise ValueError(f'method.ideal=true needs data with a dictionary (dataset=sparse_coding), got '
                       f'dataset={config.dataset!r}')

  # -- parameters ---------------------------------------------------------

  def init_params(self, rng, example_x):
    params = super().init_params(rng, example_x)
    if base.MODEL_STATE in params and self.linearize:
      raise ValueError('method.linearize=true needs a model without BatchNorm state')
    theta = params['model']
    if self.ideal:
      # Each atom a neuron with output weight w*_j; m = c d neurons repeat the
      # atoms c times with weights w*_j / c (the same function f*).
      dictionary, w_star = self._task
      d, m = dictionary.shape[0], theta['w'].shape[-1]
      if theta['w'].shape[0] != d or m % d:
        raise ValueError(f'method.ideal=true needs a multiple of d={d} neurons (model.width=0 gives 2d), got w of '
                         f'shape {tuple(theta["w"].shape)}')
      copies = m // d
      theta = dict(theta, w=jnp.tile(jnp.asarray(dictionary), (1, copies)))
      params = dict(params, **{base.CONSTANTS: {'out': jnp.tile(jnp.asarray(w_star), copies) / copies}})
    params['model'] = theta
    params['init'] = jax.tree.map(jnp.copy, theta)
    params['delta'] = self._zero_delta(jax.random.fold_in(rng, 7), theta)
    return params

  def _zero_delta(self, rng, theta):
    if self.rank <= 0:
      return jax.tree.map(jnp.zeros_like, theta)
    leaves, tree = jax.tree.flatten(theta)
    out = []
    for i, leaf in enumerate(leaves):
      if _is_matrix(leaf):
        rows, cols = _as_matrix(leaf).shape
        r = min(self.rank, rows, cols)
        # Orthonormal columns: at the start, a step on A moves W by the full
        # gradient projected onto span(B) (B^T B = I), at the phase's own lr.
        b = jnp.linalg.qr(jax.random.normal(jax.random.fold_in(rng, i), (cols, r), jnp.float32))[0].astype(leaf.dtype)
        out.append({'a': jnp.zeros((rows, r), leaf.dtype), 'b': b})
      else:
        out.append(jnp.zeros_like(leaf))
    return jax.tree.unflatten(tree, out)

  @staticmethod
  def update(theta, delta):
    """The update Delta as a tree like ``theta`` (low-rank factors multiplied out)."""
    def full(leaf, d):   # d: theta's leaf's part of Delta, an array or {'a', 'b'}
      if isinstance(d, dict):
        return jnp.reshape(d['a'] @ d['b'].T, jnp.shape(leaf))
      return d
    return jax.tree.map(full, theta, delta)

  def effective(self, params):
    """``theta + Delta``: the weights the classifier uses."""
    theta = params['model']
    return jax.tree.map(jnp.add, theta, self.update(theta, params['delta']))

  def weight_snapshots(self, params) -> dict[str, dict]:
    """``{'init': theta_0, 'clean': theta, 'final': theta + Delta}``, each a
    ``{param path: [fan_in, neurons] matrix}`` dict of the parameters with
    two or more axes (a conv kernel ``[h, w, c_in, c_out]`` becomes
    ``[h * w * c_in, c_out]``; ``'shapes'`` has the original shapes), and
    ``'from_clean'``: True when the final weights are adversarial training
    from the clean ones (the principle's setting)."""
    def matrices(tree):
      return {'/'.join(base.path_names(p)): np.asarray(_as_matrix(leaf), np.float32)
              for p, leaf in jax.tree_util.tree_leaves_with_path(tree) if _is_matrix(leaf)}
    return {'init': matrices(params['init']), 'clean': matrices(params['model']),
            'final': matrices(self.effective(params)),
            'shapes': {'/'.join(base.path_names(p)): tuple(jnp.shape(leaf))
                       for p, leaf in jax.tree_util.tree_leaves_with_path(params['model']) if _is_matrix(leaf)},
            'from_clean': self.recipe == 'clean_then_adversarial' and not self.ideal}

  # -- forward --------------------------------------------------------------

  def apply_with_state(self, params, x, rng=None, train=True):
    inner = {k: v for k, v in params.items() if k not in SNAPSHOT_KEYS}
    theta = self.effective(params)
    if not self.linearize:
      return super().apply_with_state(dict(inner, model=theta), x, rng, train=train)
    theta0 = jax.lax.stop_gradient(params['init'])

    def forward(p):
      return super(Purification, self).apply_with_state(dict(inner, model=p), x, rng, train=train)[0]

    tangent = jax.tree.map(jnp.subtract, theta, theta0)
    primal, lin = jax.jvp(forward, (theta0,), (tangent,))
    return jax.tree.map(jnp.add, primal, lin), {}

  # -- training -------------------------------------------------------------

  def hparams(self):
    return {'tau': jnp.float32(self.tau)}

  def adversarial(self, params, x, labels, rng, hparams):
    """The training attack on the frozen eval-mode model: ``x [B, ...] -> x_adv``."""
    frozen = jax.lax.stop_gradient(params)
    logits_fn = lambda xx, r: self.apply(frozen, xx, r, train=False)[0]
    tau = hparams['tau']
    if self.tau_warmup_steps and 'step' in hparams:
      first = self.clean_steps if self.recipe == 'clean_then_adversarial' else 0   # the adversarial phase's first step
      tau = tau * base.warmup_fraction(dict(step=hparams['step'] - first), self.tau_warmup_steps)
    if self.attack == 'fgm':
      return attacks.fgsm(logits_fn, x, labels, rng, eps=tau, norm=self.norm, box=self.input_box)
    return attacks.pgd(logits_fn, x, labels, rng, eps=tau, norm=self.norm, steps=self.pgd_steps,
                       step_size=2.5 * tau / self.pgd_steps, random_start=True, return_last=True,
                       box=self.input_box)

  def _purity_metrics(self, params) -> dict:
    theta = self.effective(params)
    if self._task is None or not isinstance(theta, dict) or 'w' not in theta or jnp.ndim(theta['w']) != 2:
      return {}
    dictionary, w_star = self._task
    if theta['w'].shape[0] != dictionary.shape[0]:
      return {}
    stats = geometry.purity(jax.lax.stop_gradient(theta['w']), jnp.asarray(dictionary), jnp.asarray(w_star))
    return {'purity_top1': jnp.median(stats['top1']), 'dense_cos': jnp.median(stats['dense_cos']),
            'l1_l2': jnp.median(stats['l1_l2'])}

  def _clean_loss(self, params, batch, rng, hparams):
    del hparams
    (logits, _), state = self.apply_with_state(params, batch['image'], rng, train=True)
    return base.cross_entropy(logits, batch['label']), {
        'accuracy': base.accuracy(logits, batch['label']), **self._purity_metrics(params), **state}

  def _adversarial_loss(self, params, batch, rng, hparams):
    x, y = batch['image'], batch['label']
    k_attack, k_model = jax.random.split(rng)
    x_adv = self.adversarial(params, x, y, k_attack, hparams)
    (logits, _), state = self.apply_with_state(params, x_adv, k_model, train=True)
    clean = self.apply(jax.lax.stop_gradient(params), x, k_model, train=False)[0]
    return base.cross_entropy(logits, y), {
        'adv_accuracy': base.accuracy(logits, y), 'accuracy': base.accuracy(clean, y),
        **self._purity_metrics(params), **state}

  def phases(self):
    in_section = lambda key: lambda path: bool(path) and path[0] == key
    if self.ideal:
      # A fixed classifier: one step at learning rate 0 (Delta stays exactly
      # 0), so the run has its checkpoint and metrics like any other.
      return [base.Phase('fixed', 0, self._clean_loss, trainable=in_section('delta'), lr=0.0, steps=1)]
    lr = lambda v: v or None
    clean = 0 if self.recipe == 'adversarial' else self.clean_steps
    adv = {'clean': 0, 'adversarial': self.clean_steps + self.adv_steps}.get(self.recipe, self.adv_steps)
    return [base.Phase('clean', 0, self._clean_loss, trainable=in_section('model'), lr=lr(self.clean_lr),
                       steps=clean),
            base.Phase('adversarial', 0, self._adversarial_loss, trainable=in_section('delta'),
                       lr=lr(self.adv_lr), steps=adv)]


METHOD = Purification
