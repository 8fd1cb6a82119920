"""Adversarial supervised contrastive learning (ASCL; papers/ascl.md).

Adversarial training plus a supervised contrastive loss on the latent space,
where clean *and* adversarial examples are anchors. Per training batch of B
examples (V augmented views of each, V = ``views``, 1 on MNIST):

  x_adv  = PGD(x)                          the shared PGD, CE loss, last iterate (as ``pgd_at``)
  z      = penultimate representation      ``model.apply(...)[1][-1]``, ``[VB, D]``
  h      = normalise(head(z))              rows ``[z(x); z(x_adv)]`` -> ``[N, d]``, N = 2VB
  s_ij   = -dist(h_i, h_j) / tau           dist: linf (default), l1, l2; or cos(h_i, h_j) / tau
  L_ASCL = (1/N) sum_i -(1/max(|P_i|, 1)) sum_{p in P_i} log( exp(s_ip) / sum_{a in A_i} exp(s_ia) )

and the total, ``objective='main'``:
  CE(f(x_adv), y) + kl_weight * mean_batch KL(p(x) || p(x_adv)) / C + contrastive_weight * L_ASCL
or ``objective='one_view'`` (the spec's simpler variant):
  CE(f(x), y) + CE(f(x_adv), y) + contrastive_weight * L_ASCL.

The classifier reads z (the head only feeds the contrastive loss, and the
shared evaluation attacks the classifier), so ``params['head']`` sits next to
``params['model']``. Each row's own prediction ``yhat_i = argmax f(row i)``
picks its positives P_i and its softmax set A_i = P_i U N_i
(:func:`selection_masks`):

  leaking  P_i: same label, same prediction; N_i: other label, same prediction (the default)
  soft     P_i: same label;                  N_i: other label, same prediction
  hard     P_i: same label;                  N_i: other label, predicted as the anchor's *label*
  all      P_i: same label;                  N_i: other label  (plain SupCon: "ASCL without selection")

(The spec names only the negatives of ``soft`` and ``hard``; their positives
are all same-label rows.) The masks come from integer labels and argmaxes,
so no gradient flows through them; masked entries get a large finite
negative, not -inf, so an anchor with an empty set gives a finite 0.

The contrastive batch is the *global* batch: the loss is written on the
whole ``[N, d]`` matrix inside the jitted step, and with the batch sharded
over the mesh XLA gathers the (small) projections for the ``[N, N]``
similarities, so every anchor sees every row on every device (tested: 8
devices == 1 device, and != a per-device loss).

Config (``config.method``), besides the training attack's fields of
``pgd_at`` (eps, step_size, steps, random_start, attack, norm, eps_warmup_steps):
  selection           leaking | soft | hard | all.
  distance            linf | l1 | l2 | cosine.
  tau                 temperature (0.2 with linf; the paper's cosine uses 0.07; traced).
  head_dim            width of the linear projection head (128); 0 = no head
                      (the contrastive loss reads normalised z).
  objective           main | one_view.
  kl_weight           weight of KL / C in 'main' (2.0; traced).
  contrastive_weight  weight of L_ASCL (1.0; traced; 0 = the objective without ASCL).
  views               augmented views per image (1; 2 = the CIFAR recipe, the
                      rows become 4B); needs ``view_augment``.
  view_augment        the augmentation making the views (a ``training.augment``
                      name, e.g. crop_flip; set ``train.augment=''`` then, the
                      method augments the raw batch itself).

Metrics per step (the log averages them per epoch): ``loss``, ``classification`` (the
classification part), ``kl``, ``contrastive``, ``accuracy`` (clean) and
``adv_accuracy`` (train mode), and the paper's kept fractions
``pos_fraction = |P_leak| / |P_all|`` and ``neg_fraction = |N_leak| / |N_all|``
over the batch's N rows: what the leaking selection keeps (for the other
selections: what it would keep; the numbers describe the model's
predictions, not the loss).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from geomrobust import config as config_lib
from geomrobust.methods import base
from geomrobust.methods import pgd_at
from geomrobust.methods.trades import kl_divergence
from geomrobust.training import augment as augment_lib

SELECTIONS = ('leaking', 'soft', 'hard', 'all')
DISTANCES = ('linf', 'l1', 'l2', 'cosine')
OBJECTIVES = ('main', 'one_view')
# Masked logits: exp() of it is exactly 0 in float32, yet an all-masked row stays finite.
MASKED = -1e9


def normalize(z: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm: ``[N, d] -> [N, d]`` (a zero row stays 0)."""
  norm = jnp.sqrt(jnp.sum(z * z, axis=-1, keepdims=True))
  return z / jnp.maximum(norm, 1e-12)


def similarity(h: jax.Array, distance: str, tau) -> jax.Array:
  """``s_ij``: ``-dist(h_i, h_j) / tau``, or ``h_i . h_j / tau`` for cosine.

  Args:
    h: ``[N, d]`` (L2-normalised) projections.
    distance: one of :data:`DISTANCES`.
    tau: scalar temperature.

  Returns:
    ``[N, N]`` float32 similarities (the diagonal is never used by the loss).
  """
  if distance == 'cosine':
    return (h @ h.T) / tau
  if distance not in DISTANCES:
    raise ValueError(f'unknown method.distance {distance!r}; available: {", ".join(DISTANCES)}')
  # Differences, not the Gram form: exact for near-duplicate rows (a clean row and its adversarial
  # one), which float32 cancellation would put ~1e-3 apart; linf and l1 need them anyway.
  diff = jnp.abs(h[:, None, :] - h[None, :, :])        # [N, N, d]
  if distance == 'linf':
    dist = jnp.max(diff, axis=-1)
  elif distance == 'l1':
    dist = jnp.sum(diff, axis=-1)
  else:   # l2; sqrt has an infinite slope at 0 (the diagonal, duplicate rows): keep the gradient finite
    sq = jnp.sum(diff * diff, axis=-1)
    dist = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  return -dist / tau


def selection_masks(labels: jax.Array, preds: jax.Array, selection: str) -> tuple[jax.Array, jax.Array]:
  """Which pairs each anchor uses.

  Args:
    labels: int ``[N]`` true labels of the rows.
    preds: int ``[N]`` each row's own predicted label.
    selection: one of :data:`SELECTIONS` (module docstring).

  Returns:
    ``(positive, contrast)``, bool ``[N, N]``: row i's positives P_i and its
    softmax set A_i = P_i U N_i; never the anchor itself.
  """
  n = labels.shape[0]
  other = ~jnp.eye(n, dtype=bool)
  same_label = labels[:, None] == labels[None, :]
  same_pred = preds[:, None] == preds[None, :]
  pos_all, neg_all = same_label & other, ~same_label
  if selection == 'all':
    pos, neg = pos_all, neg_all
  elif selection == 'leaking':
    pos, neg = pos_all & same_pred, neg_all & same_pred
  elif selection == 'soft':
    pos, neg = pos_all, neg_all & same_pred
  elif selection == 'hard':
    pos, neg = pos_all, neg_all & (preds[None, :] == labels[:, None])
  else:
    raise ValueError(f'unknown method.selection {selection!r}; available: {", ".join(SELECTIONS)}')
  return pos, pos | neg


def contrastive_loss(sim: jax.Array, positive: jax.Array, contrast: jax.Array) -> jax.Array:
  """L_ASCL: ``[N, N]`` similarities and masks -> scalar.

  The mean over all N anchors of ``-(1/max(|P_i|, 1)) sum_{p in P_i} log
  softmax_{A_i}(s_i)_p``; an anchor with no positive contributes 0 and still
  counts in the mean. ``positive`` must lie inside ``contrast``.
  """
  logits = jnp.where(contrast, sim, MASKED)
  log_prob = sim - jax.nn.logsumexp(logits, axis=1, keepdims=True)
  n_pos = jnp.sum(positive, axis=1)
  per_anchor = -jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) / jnp.maximum(n_pos, 1)
  return jnp.mean(per_anchor)


def kept_fractions(labels: jax.Array, preds: jax.Array) -> dict[str, jax.Array]:
  """``{'pos_fraction': |P_leak| / |P_all|, 'neg_fraction': |N_leak| / |N_all|}``
  summed over the N anchors of ``labels, preds [N]`` (0 when the 'all' set is empty)."""
  pos_leak, contrast_leak = selection_masks(labels, preds, 'leaking')
  pos_all, contrast_all = selection_masks(labels, preds, 'all')
  count = lambda m: jnp.sum(m, dtype=jnp.float32)
  ratio = lambda a, b: count(a) / jnp.maximum(count(b), 1.0)
  return {'pos_fraction': ratio(pos_leak, pos_all),
          'neg_fraction': ratio(contrast_leak & ~pos_leak, contrast_all & ~pos_all)}


class Ascl(pgd_at.PgdAT):
  """PGD-trained classifier + projection head + the selected supervised contrastive loss."""

  BOUNDS = {**pgd_at.PgdAT.BOUNDS, 'tau': config_lib.number(above=0, example=0.2),
            'head_dim': config_lib.integer(0, example=128), 'kl_weight': config_lib.number(0, example=2.0),
            'contrastive_weight': config_lib.number(0, example=1.0), 'views': config_lib.integer(1, 2)}

  def __init__(self, model, config, num_classes):
    super().__init__(model, config, num_classes)
    m = config.method
    self.selection = str(m.get('selection', 'leaking'))
    self.distance = str(m.get('distance', 'linf'))
    self.objective = str(m.get('objective', 'main'))
    for field, value, allowed in (('selection', self.selection, SELECTIONS), ('distance', self.distance, DISTANCES),
                                  ('objective', self.objective, OBJECTIVES)):
      if value not in allowed:
        raise ValueError(f'unknown method.{field} {value!r}; available: {", ".join(allowed)}')
    self.head_dim = int(m.get('head_dim', 128))
    self.views = int(m.get('views', 1))
    self.view_augment = augment_lib.get_augment(str(m.get('view_augment', '') or ''))
    if self.views > 1 and self.view_augment is None:
      raise ValueError(f'method.views={self.views} needs method.view_augment (e.g. crop_flip): '
                       'identical views add nothing')
    if self.views > 1 and str(config.train.get('augment', '') or '') not in ('', 'none'):
      raise ValueError(f'method.views={self.views} augments each view itself; set --config.train.augment= '
                       f'(got train.augment={config.train.augment!r}, which would augment twice)')

  def hparams(self):
    m = self.config.method
    return {**super().hparams(), 'tau': jnp.float32(m.get('tau', 0.2)),
            'kl_weight': jnp.float32(m.get('kl_weight', 2.0)),
            'contrastive_weight': jnp.float32(m.get('contrastive_weight', 1.0))}

  # -- parameters -----------------------------------------------------------

  def init_params(self, rng, example_x):
    params = super().init_params(rng, example_x)
    if self.head_dim:
      (_, reps), _ = jax.eval_shape(lambda p: self.apply_with_state(p, example_x, rng, train=False), params)
      z = jnp.zeros((1, reps[-1].shape[-1]), jnp.float32)
      params['head'] = nn.Dense(self.head_dim).init(jax.random.fold_in(rng, 2), z)['params']
    return params

  def project(self, params, z: jax.Array) -> jax.Array:
    """The contrastive loss's rows: penultimate ``z [N, ...]`` -> normalised ``[N, head_dim]``."""
    z = z.reshape((z.shape[0], -1)).astype(jnp.float32)
    if self.head_dim:
      z = nn.Dense(self.head_dim).apply({'params': params['head']}, z)
    return normalize(z)

  # -- the loss -------------------------------------------------------------

  def _views(self, x: jax.Array, rng: jax.Array) -> jax.Array:
    """``[B, ...] -> [V*B, ...]``: the augmented views, stacked view-major."""
    if self.views == 1:
      return x
    return jnp.concatenate([self.view_augment(jax.random.fold_in(rng, v), x) for v in range(self.views)])

  def _loss(self, params, batch, rng, hparams):
    k_view, k_attack, k_clean, k_adv = jax.random.split(rng, 4)
    x = self._views(batch['image'], k_view)
    y = jnp.tile(batch['label'], self.views)
    x_adv = self.adversarial(params, x, y, k_attack, hparams)
    (logits, reps), state = self.apply_with_state(params, x, k_clean, train=True)
    # The adversarial pass starts from the clean pass's running averages (as TRADES).
    (logits_adv, reps_adv), state = self.apply_with_state(dict(params, **state), x_adv, k_adv, train=True)

    ce_adv = base.cross_entropy(logits_adv, y)
    if self.objective == 'main':
      kl = jnp.mean(kl_divergence(jax.nn.log_softmax(logits.astype(jnp.float32), -1), logits_adv))
      classification = ce_adv + hparams['kl_weight'] * kl / self.num_classes
    else:
      kl = jnp.float32(0.0)
      classification = base.cross_entropy(logits, y) + ce_adv

    h = self.project(params, jnp.concatenate([reps[-1], reps_adv[-1]]))
    labels = jnp.concatenate([y, y])
    preds = jax.lax.stop_gradient(jnp.argmax(jnp.concatenate([logits, logits_adv]), -1))
    positive, contrast = selection_masks(labels, preds, self.selection)
    con = contrastive_loss(similarity(h, self.distance, hparams['tau']), positive, contrast)
    loss = classification + hparams['contrastive_weight'] * con
    return loss, {'classification': classification, 'kl': kl, 'contrastive': con, 'accuracy': base.accuracy(logits, y),
                  'adv_accuracy': base.accuracy(logits_adv, y), **kept_fractions(labels, preds), **state}


METHOD = Ascl
