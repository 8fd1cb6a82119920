"""Per-example attack objectives; the attacker always MAXIMISES them.

Every loss has the signature ``loss(logits [B, C], labels [B], target_labels=None) -> [B]``.
With ``target_labels=None`` it is the untargeted objective (push away from the
true ``labels``); with ``target_labels`` [B] it is the targeted one (pull
towards the target), still to be maximised, so attacks need a single
ascent code path.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[..., jax.Array]

# Keeps the DLR ratio finite when the top logits tie; as in Croce & Hein (2020).
_DLR_EPS = 1e-12


def _pick(logits: jax.Array, idx: jax.Array) -> jax.Array:
  """[B, C], [B] -> [B]: ``logits[b, idx[b]]``."""
  return jnp.take_along_axis(logits, idx[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _max_other(logits: jax.Array, idx: jax.Array) -> jax.Array:
  """[B, C], [B] -> [B]: the largest logit among classes other than ``idx``."""
  mask = jax.nn.one_hot(idx, logits.shape[-1], dtype=bool)
  return jnp.max(jnp.where(mask, -jnp.inf, logits), axis=-1)


def cross_entropy(logits, labels, target_labels=None):
  """Untargeted: CE(logits, labels). Targeted: -CE(logits, target) = log p_target. [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if target_labels is None:
    return -_pick(logp, labels)
  return _pick(logp, target_labels)


def margin(logits, labels, target_labels=None):
  """Untargeted: ``max_{i != y} z_i - z_y`` (> 0 iff misclassified).

  Targeted: ``z_t - max_{i != t} z_i`` (> 0 iff classified as the target). [B].
  """
  z = logits.astype(jnp.float32)
  if target_labels is None:
    return _max_other(z, labels) - _pick(z, labels)
  return _pick(z, target_labels) - _max_other(z, target_labels)


def dlr(logits, labels, target_labels=None):
  """Difference-of-logits-ratio loss of Croce & Hein (2020). [B].

  Untargeted: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, needs C >= 3.
  Targeted:   ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, needs C >= 4.
  ``z_pi1 >= z_pi2 >= ...`` are the sorted logits. Both are invariant to
  ``z -> a * z + c`` for ``a > 0`` (up to the 1e-12 guard in the denominator).
  """
  z = logits.astype(jnp.float32)
  num_classes = z.shape[-1]
  z_sorted = jnp.sort(z, axis=-1)
  z_y = _pick(z, labels)
  if target_labels is None:
    if num_classes < 3:
      raise ValueError(f'DLR needs at least 3 classes, got {num_classes}')
    denom = z_sorted[:, -1] - z_sorted[:, -3]
    return -(z_y - _max_other(z, labels)) / (denom + _DLR_EPS)
  if num_classes < 4:
    raise ValueError(f'targeted DLR needs at least 4 classes, got {num_classes}')
  denom = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4])
  return -(z_y - _pick(z, target_labels)) / (denom + _DLR_EPS)


LOSSES: dict[str, LossFn] = {'ce': cross_entropy, 'margin': margin, 'dlr': dlr}


def get_loss(name: str) -> LossFn:
  """Looks a loss up by name: one of 'ce', 'margin', 'dlr'."""
  if name not in LOSSES:
    raise ValueError(f'unknown attack loss {name!r}; available: {", ".join(sorted(LOSSES))}')
  return LOSSES[name]
