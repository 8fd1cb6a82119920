"""Square attack (Andriushchenko et al., ECCV 2020), L-inf and L2: random search with square updates.

Gradient-free: only forward passes, so it is blind to gradient masking
(a rounding step, a saturated softmax, shattered gradients). That makes it
the evaluation's backstop: a model that resists every gradient attack but
not this one has masked gradients (``evaluation/sanity.py``, ``gradient_free``).

The algorithm, per example: start somewhere on the sphere of radius eps,
then for every query propose a change inside one window of ``s x s`` pixels,
evaluate the margin loss there, and keep the proposal only if it raises the
loss. The window's area ``p`` (a fraction of the image) starts at ``p_init``
and halves on the published schedule (after 10, 50, 200, 500, 1000, 2000,
4000, 6000 and 8000 queries of a 10,000-query budget, rescaled to ``queries``).

  L-inf: the start is vertical stripes (each column of each channel gets
  ``+eps`` or ``-eps``); a proposal sets the window to a fresh ``+-eps`` per
  channel.
  L2: the start is a grid of tiles (side ``H // 5``), each holding a
  "meta pseudo-Gaussian" pattern (a positive bump over a negative one, in a
  random orientation) with a random sign per channel; a proposal moves the
  perturbation's mass from a second random window into the first, where it
  adds such a pattern to the window's normalised content, and rescales the
  whole perturbation to norm eps (then clips it to the box). Windows have an
  odd side of at least 3. 2-D inputs only (sides >= 3).

Differences from the reference code, deliberate:
  * compiled: a ``while_loop`` over queries, stopping when every example of
    the batch is misclassified; an example that is stops accepting updates;
  * a window anywhere in the image (the reference never places one on the
    last row or column);
  * a proposal that would leave the window unchanged (after clipping to the
    box) flips one random channel instead of being redrawn, so every query
    tries a new point;
  * inputs of any rank: ``[B, H, W, C]`` images, ``[B, H, W]`` (e.g. audio
    features, one channel) and, in L-inf, ``[B, D]`` vectors, where the
    "square" is a run of ``round(p * D)`` consecutive entries;
  * L2: the pattern of a window is computed in closed form on the whole
    image (window sides vary per query while shapes must be static), and the
    initial tiles' orientations are random per example, not per batch.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

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


def l2_window_sizes(queries: int, p_init: float, height: int, width: int) -> np.ndarray:
  """int32 [queries]: the L2 windows' side per query, ``round(sqrt(p * H * W))``
  made odd, at least 3, at most the shorter side."""
  out = np.zeros(queries, np.int32)
  for i in range(queries):
    s = max(int(round(math.sqrt(window_fraction(i, queries, p_init) * height * width))), 3)
    s += 1 - s % 2
    out[i] = min(s, min(height, width) - 1 + min(height, width) % 2)
  return out


# Partial sums of 1 / q^2 (q = 1..n): a pseudo-Gaussian bump's value is a difference of two.
_INV_SQ = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, 4097) ** 2)]).astype(np.float32)


def _bump(i, j, rows, cols):
  """The unnormalised pseudo-Gaussian bump of a ``rows x cols`` block at (i, j):
  concentric rectangles around the centre (rows // 2, cols // 2), ring k
  weighted 1 / (k + 1)^2 and every ring containing the point summed, i.e.
  ``sum_{k = m}^{K - 1} 1 / (k + 1)^2`` with ``m`` the point's ring (Chebyshev
  distance to the centre) and ``K = max(rows, cols) // 2 + 1``. Works on
  numpy or jax integer arrays (broadcast); 0 outside ``[0, rows) x [0, cols)``."""
  xp = jnp if isinstance(i, jax.Array) or isinstance(rows, jax.Array) else np
  m = xp.maximum(xp.abs(i - rows // 2), xp.abs(j - cols // 2))
  k = xp.maximum(rows // 2 + 1, cols // 2 + 1)
  table = xp.asarray(_INV_SQ)
  inside = (i >= 0) & (i < rows) & (j >= 0) & (j < cols) & (m < k)
  return xp.where(inside, table[xp.minimum(k, len(_INV_SQ) - 1)] - table[xp.minimum(m, len(_INV_SQ) - 1)], 0.0)


def _unit(v, axes):
  """``v / ||v||_2`` over ``axes`` (0 where v is 0); numpy or jax."""
  xp = jnp if isinstance(v, jax.Array) else np
  return v / xp.maximum(xp.sqrt(xp.sum(v * v, axis=axes, keepdims=True)), 1e-12)


def meta_pattern(i, j, s, transpose, axes):
  """The meta pseudo-Gaussian pattern of an ``s x s`` window at local
  coordinates (i, j) (numpy or jax arrays, broadcast; 0 outside the window):
  a bump over the top ``s // 2`` rows minus a bump over the other rows, each
  of unit L2 norm over ``axes`` (the grid's row and column axes), the whole
  divided by sqrt(2), so of unit norm; ``transpose`` swaps rows and columns."""
  xp = jnp if any(isinstance(v, jax.Array) for v in (i, j, s, transpose)) else np
  i, j = xp.where(transpose, j, i), xp.where(transpose, i, j)
  top = s // 2
  up = _unit(_bump(i, j, top, s), axes)
  down = _unit(_bump(i - top, j, s - top, s), axes)
  return (up - down) / math.sqrt(2.0)


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

  With ``eot_samples > 1`` (a stochastic model) every query also evaluates
  the current point, on the same draws as the proposal, and keeps whichever
  scores higher there. Comparing a fresh noisy estimate with the best one seen
  so far would favour lucky draws: the stored loss would ratchet up on noise
  and reject real gains, and one lucky draw would stop an example for good.
  So there an example keeps climbing to the end of the budget; it counts as
  misclassified when its point is on that query's draws (the loop ends early
  only when every example is at once), and ``losses`` holds these paired,
  noisy estimates (not monotone). Each query then costs two EOT evaluations.
  """
  check_norm(norm)
  if queries < 1:
    raise ValueError(f'the Square attack needs at least one query, got {queries}')
  if not 0.0 < p_init <= 1.0:
    raise ValueError(f'p_init is a fraction of the image in (0, 1], got {p_init}')
  x = common.as_input(x)
  goal = common.make_goal(loss, labels, targeted, target_labels)
  value = eot_value(logits_fn, goal.objective, eot_samples)
  paired = eot_samples > 1
  parts = (_linf_parts if norm == 'linf' else _l2_parts)(x, eps, queries, p_init, box)

  def run_one(key):
    k_init, k_model, k_query = jax.random.split(key, 3)
    delta = parts.start(k_init)
    out0 = value(parts.point(delta), jax.random.fold_in(k_model, 0))
    success0 = goal.is_success(out0.probs)
    losses = jnp.zeros((queries, x.shape[0]), jnp.float32).at[0].set(out0.loss)

    def cond(carry):
      i, _, _, success, _ = carry
      return (i < queries) & ~jnp.all(success)

    def body(carry):
      i, delta, loss, success, losses = carry
      candidate = parts.propose(jax.random.fold_in(k_query, i), i, delta)
      draws = jax.random.fold_in(k_model, i)
      out = value(parts.point(candidate), draws)
      if paired:   # the current point on the proposal's draws (see the docstring)
        now = value(parts.point(delta), draws)
        accept = out.loss > now.loss
        loss = jnp.where(accept, out.loss, now.loss)
        success = goal.is_success(jnp.where(accept[:, None], out.probs, now.probs))
      else:
        accept = ~success & (out.loss > loss)
        loss = jnp.where(accept, out.loss, loss)
        success = success | (accept & goal.is_success(out.probs))
      delta = jnp.where(accept[:, None, None, None], parts.settle(candidate), delta)
      return i + 1, delta, loss, success, losses.at[i].set(loss)

    i, delta, loss, success, losses = jax.lax.while_loop(
        cond, body, (jnp.asarray(1), delta, out0.loss, success0, losses))
    # Queries skipped because every example was already misclassified keep the last loss.
    losses = jnp.where(jnp.arange(queries)[:, None] >= i, loss[None], losses)
    # The accepted point: the highest loss found, misclassified as soon as one was.
    return common.Best(parts.point(delta), loss, success), losses

  best, losses = common.run_restarts(run_one, x, rng, restarts)
  x_adv = jax.lax.stop_gradient(best.x)
  return (x_adv, losses) if return_losses else x_adv


class _Parts(NamedTuple):
  """One norm's Square: ``start(key) -> delta``, ``propose(key, query, delta) -> delta``
  (``delta`` [B, H, W, C], the state), ``point(delta) -> x`` [B, ...] (the input
  evaluated), ``settle(delta) -> delta`` (the state an accepted proposal leaves)."""

  start: Callable
  propose: Callable
  point: Callable
  settle: Callable


def _grid(height, width):
  return jnp.arange(height)[None, :, None, None], jnp.arange(width)[None, None, :, None]


def _window(key, side_h, side_w, height, width, batch):
  """A random window per example: (mask bool [B, H, W, 1], top [B, 1, 1, 1], left [B, 1, 1, 1])."""
  k_row, k_col = jax.random.split(key)
  rows, cols = _grid(height, width)
  top = jax.random.randint(k_row, (batch, 1, 1, 1), 0, height - side_h + 1)
  left = jax.random.randint(k_col, (batch, 1, 1, 1), 0, width - side_w + 1)
  return (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w), top, left


def _linf_parts(x, eps, queries, p_init, box) -> _Parts:
  """L-inf: ``delta`` holds +-eps everywhere (before clipping to the box)."""
  x4 = _as_hwc(x)
  batch, height, width, channels = x4.shape
  sizes = jnp.asarray(window_sizes(queries, p_init, height, width))    # [queries, 2]
  eps4 = expand_to(eps, x4)

  def point(delta):
    return clip_to_box(x + delta.reshape(x.shape), box)

  def start(key):  # vertical stripes
    return jnp.broadcast_to(eps4 * jax.random.rademacher(key, (batch, 1, width, channels), x.dtype), x4.shape)

  def propose(key, i, delta):  # one window set to +-eps per channel
    k_window, k_sign, k_flip = jax.random.split(key, 3)
    window, _, _ = _window(k_window, sizes[i, 0], sizes[i, 1], height, width, batch)
    sign = jax.random.rademacher(k_sign, (batch, 1, 1, channels), x.dtype)
    same = jnp.abs(point(jnp.where(window, eps4 * sign, delta)) - point(delta)).reshape(x4.shape) < _SAME
    unchanged = jnp.all(same | ~window, axis=(1, 2, 3))                                    # [B]
    flip = jax.nn.one_hot(jax.random.randint(k_flip, (batch,), 0, channels), channels, dtype=bool)
    sign = jnp.where(unchanged[:, None, None, None] & flip[:, None, None, :], -sign, sign)
    return jnp.where(window, eps4 * sign, delta)

  return _Parts(start, propose, point, lambda delta: delta)


def _l2_parts(x, eps, queries, p_init, box) -> _Parts:
  """L2: ``delta`` is the perturbation of the evaluated point (after the box)."""
  if x.ndim not in (3, 4) or min(x.shape[1:3]) < 3:
    raise ValueError(f'the L2 Square attack takes 2-D inputs ([B, H, W] or [B, H, W, C], sides >= 3), '
                     f'got shape {x.shape}')
  x4 = _as_hwc(x)
  batch, height, width, channels = x4.shape
  sizes = jnp.asarray(l2_window_sizes(queries, p_init, height, width))  # [queries]
  eps4 = expand_to(eps, x4)
  rows, cols = _grid(height, width)
  space = (1, 2)

  def point(delta):
    return clip_to_box(x + delta.reshape(x.shape), box)

  def on_sphere(delta):  # scaled to norm eps (the box then only shrinks it)
    return eps4 * _unit(delta, (1, 2, 3))

  # The start: tiles of side H // 5 from row and column (H - 5 * side) // 2, as in the paper's code.
  side = max(height // 5, 1)
  offset = max((height - 5 * side) // 2, 0)
  local_r, local_c = (np.arange(n) - offset for n in (height, width))
  tile_r = np.where(local_r >= 0, local_r // side, -1)
  tile_c = np.where(local_c >= 0, local_c // side, -1)
  n_r, n_c = height // side, width // side
  tile_r[tile_r >= n_r], tile_c[tile_c >= n_c] = -1, -1
  inside = (tile_r[:, None] >= 0) & (tile_c[None, :] >= 0)
  # Every tile holds the same pattern (normalised over all tiles at once: the scale is set by point()).
  patterns = [np.where(inside, meta_pattern((local_r % side)[:, None], (local_c % side)[None, :], side, t,
                                            None), 0.0) for t in (False, True)]
  tile_index = np.clip(tile_r, 0, None)[:, None] * n_c + np.clip(tile_c, 0, None)[None, :]   # [H, W]

  def start(key):
    k_orient, k_sign = jax.random.split(key)
    orient = jax.random.bernoulli(k_orient, 0.5, (batch, n_r * n_c))[:, tile_index]           # [B, H, W]
    sign = jax.random.rademacher(k_sign, (batch, n_r * n_c, channels), x.dtype)[:, tile_index]  # [B, H, W, C]
    pattern = jnp.where(orient, patterns[1], patterns[0])[..., None] * jnp.asarray(inside)[None, :, :, None]
    return (point(on_sphere(pattern * sign)) - x).reshape(x4.shape)

  def propose(key, i, delta):  # move the mass of window 2 into window 1, add a pattern there, rescale
    k_w1, k_w2, k_orient, k_sign = jax.random.split(key, 4)
    s = sizes[i]
    w1, top, left = _window(k_w1, s, s, height, width, batch)
    w2, _, _ = _window(k_w2, s, s, height, width, batch)
    norm_w1 = jnp.sqrt(jnp.sum(jnp.where(w1, delta, 0.0) ** 2, axis=space, keepdims=True))      # [B, 1, 1, C]
    norm_both = jnp.sqrt(jnp.sum(jnp.where(w1 | w2, delta, 0.0) ** 2, axis=space, keepdims=True))
    norm_all = jnp.sqrt(jnp.sum(delta ** 2, axis=(1, 2, 3), keepdims=True))                    # [B, 1, 1, 1]
    orient = jax.random.bernoulli(k_orient, 0.5, (batch, 1, 1, 1))
    pattern = meta_pattern(rows - top, cols - left, s, orient, space)                          # [B, H, W, 1]
    sign = jax.random.rademacher(k_sign, (batch, 1, 1, channels), x.dtype)
    new = jnp.where(w1, pattern * sign + delta / (norm_w1 + 1e-12), 0.0)
    budget = jnp.sqrt(jnp.maximum(eps4 ** 2 - norm_all ** 2, 0.0) / channels + norm_both ** 2)
    new = _unit(new, space) * budget
    return on_sphere(jnp.where(w1, new, jnp.where(w2, 0.0, delta)))

  return _Parts(start, propose, point, lambda delta: (point(delta) - x).reshape(x4.shape))
