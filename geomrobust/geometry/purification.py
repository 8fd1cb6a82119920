"""Measurements of feature purification (``papers/feature_purification.md``).

Neurons are the *columns* of a weight matrix ``W [n, m]`` (``n`` inputs, ``m``
neurons; a conv kernel is reshaped to ``[h * w * c_in, c_out]``). The
sparse-coding task gives a dictionary ``M [d, d]`` (atoms in the columns) and
a dense label direction ``w* [d]``; its *dense direction* in input space is
``M w*``.

  purity            per neuron, with ``c_i = M^T w_i``: the top-1 share
                    ``max_j |c_ij| / ||c_i||``, the dense-mixture cosine
                    ``|cos(w_i, M w*)|`` and ``||c_i||_1 / ||c_i||_2``.
  decompose         the principle: least-squares ``beta_i`` with
                    ``w_i = beta_i w'_i + v_i`` (``w`` clean, ``w'`` after
                    adversarial training from ``w``), ``rho_i = ||v_i|| /
                    ||beta_i w'_i||``, and cosines to the initialisation.
  singular_energy   the cumulative share of ``sum s^2`` in the top singular
                    directions of an update ``W_adv - W_clean`` (and of a
                    Gaussian matrix of its shape, for reference).
  break_radius      where a robust-accuracy curve crosses 1/2.

Pure functions of arrays (jnp or numpy); the medians the tables report are
over neurons with a non-zero weight vector.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

_TINY = 1e-12


def task_of(config):
  """``(M [d, d], w* [d])`` numpy arrays of ``config.dataset`` when it is a
  generated set with a dictionary (sparse_coding), else None."""
  from geomrobust.data import generated   # late: generated imports the data package
  name = str(config.get('dataset', ''))
  if name not in generated.GENERATORS:
    return None
  source = generated.make_source(name, config.get('data', {}).get(name))
  if not hasattr(source, 'dictionary'):
    return None
  return source.dictionary, source.w_star


def _norms(a, axis=0):
  return jnp.sqrt(jnp.sum(a * a, axis=axis))


def purity(w, dictionary, w_star) -> dict:
  """Per-neuron purity of ``w [d, m]``: ``{'top1', 'dense_cos', 'l1_l2'}``, each ``[m]``."""
  c = dictionary.T @ w                                        # [d, m]: each neuron in the atom basis
  c_norm = _norms(c) + _TINY
  dense = dictionary @ w_star
  dense = dense / (_norms(dense) + _TINY)
  return {'top1': jnp.max(jnp.abs(c), axis=0) / c_norm,
          'dense_cos': jnp.abs(dense @ w) / (_norms(w) + _TINY),
          'l1_l2': jnp.sum(jnp.abs(c), axis=0) / c_norm}


def purity_summary(w, dictionary, w_star) -> dict[str, float]:
  """Medians over the live neurons of :func:`purity` (floats)."""
  w = np.asarray(w, np.float64)
  live = np.linalg.norm(w, axis=0) > _TINY
  stats = purity(w[:, live], np.asarray(dictionary, np.float64), np.asarray(w_star, np.float64))
  return {k: float(np.median(np.asarray(v))) for k, v in stats.items()}


def _cos(a, b):
  """Column-wise cosine of ``a [n, m]`` and ``b [n, m]`` -> ``[m]``."""
  return np.sum(a * b, 0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) + _TINY)


def decompose(w_clean, w_adv, w_init, dense_direction=None) -> dict:
  """The principle's decomposition ``w_i = beta_i w'_i + v_i`` per neuron.

  Args:
    w_clean, w_adv, w_init: ``[n, m]``: after clean training (w), after
      adversarial training from it (w'), at initialisation (w0).
    dense_direction: ``[n]`` (e.g. ``M w*``) for ``|cos(v_i, dense)|``, or None.

  Returns per-neuron ``[m]`` arrays ``beta, rho, cos_w_wadv, cos_w_w0,
  cos_wadv_w0`` (cosines to w0 as absolute values: their sign is arbitrary)
  and, with a dense direction, ``cos_v_dense``. ``rho = ||v|| / ||beta w'||``
  (``inf`` where ``beta w' = 0``).
  """
  w, wp, w0 = (np.asarray(a, np.float64) for a in (w_clean, w_adv, w_init))
  beta = np.sum(w * wp, 0) / (np.sum(wp * wp, 0) + _TINY)
  v = w - beta * wp
  kept = np.linalg.norm(beta * wp, axis=0)
  with np.errstate(divide='ignore'):
    rho = np.where(kept > _TINY, np.linalg.norm(v, axis=0) / np.maximum(kept, _TINY), np.inf)
  out = {'beta': beta, 'rho': rho, 'cos_w_wadv': _cos(w, wp), 'cos_w_w0': np.abs(_cos(w, w0)),
         'cos_wadv_w0': np.abs(_cos(wp, w0))}
  if dense_direction is not None:
    dense = np.asarray(dense_direction, np.float64)[:, None]
    out['cos_v_dense'] = np.abs(_cos(v, np.broadcast_to(dense, v.shape)))
  return out


def principle_summary(w_clean, w_adv, w_init, dense_direction=None) -> dict[str, float]:
  """The principle table: ``median_rho``, ``frac_rho_below_1`` and the median
  cosines of :func:`decompose`, over neurons live in both ``w`` and ``w'``."""
  w, wp = np.asarray(w_clean), np.asarray(w_adv)
  live = (np.linalg.norm(w, axis=0) > _TINY) & (np.linalg.norm(wp, axis=0) > _TINY)
  parts = decompose(w[:, live], wp[:, live], np.asarray(w_init)[:, live], dense_direction)
  out = {'neurons': int(live.sum()), 'median_rho': float(np.median(parts['rho'])),
         'frac_rho_below_1': float(np.mean(parts['rho'] < 1.0)), 'median_beta': float(np.median(parts['beta']))}
  for k in ('cos_w_wadv', 'cos_w_w0', 'cos_wadv_w0', 'cos_v_dense'):
    if k in parts:
      out[k] = float(np.median(parts[k]))
  return out


def singular_energy(update, ranks: Sequence[int] = (1, 2, 4, 16)) -> dict:
  """Singular-value energy of an update ``[n, m]``: ``{'top<r>': share of
  sum s^2 in the top r directions, 'effective_rank': exp(entropy of the
  shares), 'singular_values': the leading 32, 'gaussian': top<r> and
  effective_rank of an i.i.d. Gaussian matrix of the same shape (seed 0)}``."""
  s = np.linalg.svd(np.asarray(update, np.float64), compute_uv=False)
  energy = s ** 2
  total = float(energy.sum())
  if total <= 0:
    return {**{f'top{r}': 0.0 for r in ranks}, 'effective_rank': 0.0, 'singular_values': [], 'gaussian': {}}
  share = energy / total
  nz = share[share > 0]
  # The same numbers for a Gaussian matrix of the same shape: what "no
  # concentration" looks like at this size.
  g = np.linalg.svd(np.random.default_rng(0).standard_normal(np.shape(update)), compute_uv=False) ** 2
  g = g / g.sum()
  return {**{f'top{r}': float(share[:r].sum()) for r in ranks},
          'effective_rank': float(np.exp(-np.sum(nz * np.log(nz)))), 'singular_values': s[:32].tolist(),
          'gaussian': {**{f'top{r}': float(g[:r].sum()) for r in ranks},
                       'effective_rank': float(np.exp(-np.sum(g * np.log(g))))}}


def break_radius(taus: Sequence[float], accuracies: Sequence[float], level: float = 0.5) -> float | None:
  """The radius where robust accuracy falls to ``level``, linearly
  interpolated between the grid's points (give tau = 0 with the clean
  accuracy as the first point); the first tau when the curve starts at or
  below ``level``; None when it never falls that far on the grid (the radius
  is beyond its last tau)."""
  t, a = np.asarray(taus, np.float64), np.asarray(accuracies, np.float64)
  order = np.argsort(t)
  t, a = t[order], a[order]
  if a[0] <= level:
    return float(t[0])
  for i in range(1, len(t)):
    if a[i] <= level:
      frac = (a[i - 1] - level) / (a[i - 1] - a[i])
      return float(t[i - 1] + frac * (t[i] - t[i - 1]))
  return None


def dense_direction_inputs(x, labels, dictionary, w_star, tau):
  """The spec's dense-direction attack: ``x - s * tau * M w* / ||w*||`` with
  ``s = 2 y - 1`` (push every example towards the other class along the
  label's dense direction). ``x [N, d]``, ``labels [N]`` -> ``[N, d]``."""
  direction = np.asarray(dictionary, np.float32) @ np.asarray(w_star, np.float32)
  direction = direction / np.linalg.norm(np.asarray(w_star, np.float64))
  sign = (2.0 * np.asarray(labels, np.float32) - 1.0)[:, None]
  return np.asarray(x, np.float32) - sign * np.float32(tau) * direction[None, :]
