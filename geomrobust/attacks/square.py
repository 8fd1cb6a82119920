"""Square attack (Andriushchenko et al., ECCV 2020), L-inf: random search with square updates.

Gradient-free: only forward passes, so it is blind to gradient masking
(a rounding step, a saturated softmax, shattered gradients). That makes it
the evaluation's backstop: a model that resists every gradient attack but
not this one has masked gradients (``evaluation/sanity.py``, ``gradient_free``).

The algorithm, per example: start at vertical stripes (each column of each
channel gets ``+eps`` or ``-eps``), then for every query propose one window of
``s x s`` pixels set to a fresh ``+-eps`` per channel, evaluate the margin
loss there, and keep the proposal only if it raises the loss. The window's
area ``p`` (a fraction of the image) starts at ``p_init`` and halves on the
published schedule (after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
queries of a 10,000-query budget, rescaled to ``queries``). Differences from
the reference code, deliberate:
  * compiled: a ``while_loop`` over queries, stopping when every example of
    the batch is misclassified; an example that is stops accepting updates;
  * a window anywhere in the image (the reference never places one on the
    last row or column);
  * a proposal that would leave the window unchanged (after clipping to the
    box) flips one random channel instead of being redrawn, so every query
    tries a new point;
  * inputs of any rank: ``[B, H, W, C]`` images, ``[B, H, W]`` (e.g. audio
    features, one channel) and ``[B, D]`` vectors, where the "square" is a
    run of ``round(p * D)`` consecutive entries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust.attacks import common
from geomrobust.attacks.eot import LogitsFn, eot_value
from geomrobust.attacks.norms import UNIT_BOX, Box, check_norm, clip_to_box, expand_to

# Queries (of a 10,000-query budget) after which the window's area halves.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
# Clipped values closer than this count as unchanged (the reference's threshold).
_SAME = 1e-7


def window_fraction(query: int, queries: int, p_init: float) -> float:
  """The fraction of the image a window covers at query ``query`` (0-based) of ``queries``."""
  scaled = int(query / queries * 10000)
  return p_init / 2 ** sum(scaled > h for h in _HALVINGS)


def window_sizes(queries: int, p_init: float, height: int, width: int) -> np.ndarray:
  """int32 [queries, 2]: the window (rows, columns) of every query.

  2-D inputs: a square of side ``round(sqrt(p * height * width))`` (at least
  1, at most the shorter side). One row or one column: a run of ``round(p * length)``.
  """
  out = np.ones((queries, 2), np.int32)
  for i in range(queries):
    p = window_fraction(i, queries, p_init)
    if height > 1 and width > 1:
      s = min(max(int(round(math.sqrt(p * height * width))), 1), height, width)
      out[i] = (s, s)
    else:
      length = max(height, width)
      s = min(max(int(round(p * length)), 1), length)
      out[i] = (s, 1) if height > 1 else (1, s)
  return out


def _as_hwc(x: jax.Array) -> jax.Array:
  """[B, ...] -> [B, H, W, C] (see the module doc)."""
  if x.ndim == 4:
    return x
  if x.ndim == 3:
    return x[..., None]
  if x.ndim == 2:
    return x[:, None, :, None]
  raise ValueError(f'the Square attack takes [B, D], [B, H, W] or [B, H, W, C] inputs, got shape {x.shape}')


def square(logits_fn: LogitsFn, x, labels, rng, *, eps, norm: str = 'linf', queries: int = 5000,
           p_init: float = 0.8, restarts: int = 1, loss: str = 'margin', eot_samples: int = 1,
           targeted: bool = False, target_labels=None, return_losses: bool = False, box: Box = UNIT_BOX):
  """The Square attack. x: [B, ...], labels: [B] -> x_adv [B, ...] (see the module doc).

  ``queries`` forward evaluations per restart (the start included), each
  averaged over ``eot_samples`` model draws (EOT, for stochastic models; the
  draws of query ``i`` are ``split(fold_in(model key, i), eot_samples)``).
  ``loss`` is maximised (default: the margin ``max_{i != y} z_i - z_y``); the
  accepted loss never decreases, and an example stops moving once it is
  misclassified (or, ``targeted``, classified as its target). Every point is
  in the eps-ball and clipped to ``box``. Returns, over restarts, the best
  accepted point (successful first, then higher loss); with ``return_losses``
  ``(x_adv, losses [restarts, queries, B])``, the accepted loss after each query.
  """
  check_norm(norm)
  if norm != 'linf':
    raise ValueError("the Square attack is built for norm='linf' only; for l2 use the gradient attacks "
                     "(eval.attacks without 'square')")
  if queries < 1:
    raise ValueError(f'the Square attack needs at least one query, got {queries}')
  if not 0.0 < p_init <= 1.0:
    raise ValueError(f'p_init is a fraction of the image in (0, 1], got {p_init}')
  x = common.as_input(x)
  goal = common.make_goal(loss, labels, targeted, target_labels)
  value = eot_value(logits_fn, goal.objective, eot_samples)
  x4 = _as_hwc(x)
  batch, height, width, channels = x4.shape
  sizes = jnp.asarray(window_sizes(queries, p_init, height, width))    # [queries, 2]
  eps4 = expand_to(eps, x4)
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]

  def point(delta4):
    return clip_to_box(x + delta4.reshape(x.shape), box)

  def run_one(key):
    k_init, k_model, k_query = jax.random.split(key, 3)
    delta = jnp.broadcast_to(eps4 * jax.random.rademacher(k_init, (batch, 1, width, channels), x.dtype), x4.shape)
    x0 = point(delta)
    out0 = value(x0, jax.random.fold_in(k_model, 0))
    success0 = goal.is_success(out0.probs)
    losses = jnp.zeros((queries, batch), jnp.float32).at[0].set(out0.loss)

    def propose(i, delta):
      """A new ``delta`` [B, H, W, C]: one window of ``delta`` set to ``+-eps`` per channel."""
      k_row, k_col, k_sign, k_flip = jax.random.split(jax.random.fold_in(k_query, i), 4)
      s_h, s_w = sizes[i, 0], sizes[i, 1]
      top = jax.random.randint(k_row, (batch, 1, 1, 1), 0, height - s_h + 1)
      left = jax.random.randint(k_col, (batch, 1, 1, 1), 0, width - s_w + 1)
      window = (rows >= top) & (rows < top + s_h) & (cols >= left) & (cols < left + s_w)   # [B, H, W, 1]
      sign = jax.random.rademacher(k_sign, (batch, 1, 1, channels), x.dtype)
      current = point(delta)
      same = jnp.abs(point(jnp.where(window, eps4 * sign, delta)) - current).reshape(x4.shape) < _SAME
      unchanged = jnp.all(same | ~window, axis=(1, 2, 3))                                    # [B]
      flip = jax.nn.one_hot(jax.random.randint(k_flip, (batch,), 0, channels), channels, dtype=bool)
      sign = jnp.where(unchanged[:, None, None, None] & flip[:, None, None, :], -sign, sign)
      return jnp.where(window, eps4 * sign, delta)

    def cond(carry):
      i, _, _, success, _ = carry
      return (i < queries) & ~jnp.all(success)

    def body(carry):
      i, delta, loss, success, losses = carry
      candidate = propose(i, delta)
      out = value(point(candidate), jax.random.fold_in(k_model, i))
      accept = ~success & (out.loss > loss)
      delta = jnp.where(accept[:, None, None, None], candidate, delta)
      loss = jnp.where(accept, out.loss, loss)
      success = success | (accept & goal.is_success(out.probs))
      return i + 1, delta, loss, success, losses.at[i].set(loss)

    i, delta, loss, success, losses = jax.lax.while_loop(
        cond, body, (jnp.asarray(1), delta, out0.loss, success0, losses))
    # Queries skipped because every example was already misclassified keep the last loss.
    losses = jnp.where(jnp.arange(queries)[:, None] >= i, loss[None], losses)
    # The accepted point: the highest loss found, misclassified as soon as one was.
    return common.Best(point(delta), loss, success), losses

  best, losses = common.run_restarts(run_one, x, rng, restarts)
  x_adv = jax.lax.stop_gradient(best.x)
  return (x_adv, losses) if return_losses else x_adv
