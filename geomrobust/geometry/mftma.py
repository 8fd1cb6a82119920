"""Replica mean-field theoretic manifold analysis (MFTMA), compiled and batched.

Given P manifolds (point clouds ``[N features, M points]``), MFTMA measures how
linearly separable they are (manifold *capacity*: the number of manifolds per
feature a linear readout can split at margin ``kappa``) and the *radius* and
*dimension* of the anchor points that set that capacity (Chung, Lee &
Sompolinsky, PRX 2018; Cohen et al., Nat. Commun. 2020), plus the correlation
of the manifold centers. The steps follow the reference implementation
(``neural_manifolds_replicaMFT``, numpy + cvxopt), see
``shared/papers/stochastic.md``:

1. remove the global mean; center correlation = mean |cosine| between the
   mean-subtracted manifold centers;
2. find a low-rank shared center subspace (K orthonormal directions that
   minimise the residual center correlations, on the Stiefel manifold) and
   project it out of every point;
3. per manifold: subtract its own center, divide by the center's norm,
   reduce to the span when N > M (coordinates in an orthonormal basis of it),
   append a coordinate of ones;
4. for ``n_t`` Gaussian vectors ``t``: the anchor point of the quadratic
   program ``min_v 1/2 |v|^2 - t.v  s.t.  S^T v <= -kappa``, through its dual
   ``min_{alpha>=0} 1/2 |S alpha - t|^2 - kappa sum(alpha)``
   (:func:`solve_anchor_duals`: exact to the KKT tolerance ``_KKT_TOL``);
5. capacity, radius and dimension from the anchor points; capacity averaged
   harmonically over manifolds, radius and dimension arithmetically.

The ``P x n_t`` small problems run at once in float64 inside a scoped
``jax.enable_x64`` (the caller's setting is untouched): a support guessed by
batched ADMM (matrix products with one factorisation per manifold), the exact
solution on it, a KKT check, and the exact active-set method
(:func:`nnls_gram`) for the problems the check rejects. The center search of
step 2 is a small sequential problem and runs in float64 numpy.

Per problem the anchor points match the reference's cvxopt solutions to
~1e-9 relative (see the tests); whole analyses agree within the spread the
random ``t`` and center-search starts give.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np

# Tolerances of the exact solver (float64): a coordinate enters the support
# when its gradient exceeds ``_KKT_TOL`` times the problem's scale, and a
# solution within ``_INTERIOR_EPS`` of t counts as interior (the reference's
# eps).
_KKT_TOL = 1e-10
_INTERIOR_EPS = 1e-8
# The reference's center-subspace search: 10 random starts per K, stop when
# the residual correlation rose three times in a row, K up to (components
# holding 95% of the center variance) + 11.
_CENTER_STARTS = 10
_CENTER_VARIANCE = 0.95
_CENTER_EXTRA_K = 11
_STIEFEL_ITERS = 1000
_STIEFEL_GTOL = 1e-6


# --------------------------------------------------------------------------
# The anchor-point problem
# --------------------------------------------------------------------------


def nnls_gram(gram: jax.Array, b: jax.Array, support: jax.Array | None = None,
              max_iter: int | None = None) -> jax.Array:
  """Exact minimiser of ``1/2 a^T G a - b^T a`` over ``a >= 0`` (Lawson-Hanson active set).

  With ``G = S^T S`` and ``b = S^T t`` this is non-negative least squares
  ``min_{a>=0} |S a - t|^2``; ``b = S^T t + kappa`` gives the margin-kappa dual
  of the anchor problem. Finite: each outer step adds the coordinate with the
  largest positive gradient and solves the equality problem on the support,
  stepping back to feasibility when a coordinate would turn negative.

  Args:
    gram: ``[M, M]`` positive semi-definite (float64 for reference accuracy).
    b: ``[M]``.
    support: optional bool ``[M]`` warm start (a guess of the final support;
      coordinates whose equality solution is not positive are dropped first).
    max_iter: bound on outer steps (default ``3 M``; the method needs at most
      about ``M`` on non-degenerate problems).

  Returns:
    ``a``: ``[M]``, ``a >= 0``. Call it under ``jax.enable_x64(True)`` with
    float64 inputs for reference accuracy (:func:`solve_anchor_duals` does).
  """
  m = b.shape[-1]
  max_iter = 3 * m if max_iter is None else max_iter
  tol = _KKT_TOL * jnp.maximum(1.0, jnp.max(jnp.abs(b)))

  def feasible(state):
    """Move from ``alpha`` towards the support's solution ``z`` until ``z`` is
    positive on the whole support (coordinates that reach zero leave it)."""
    alpha, support, z = state
    bad = support & (z <= 0)
    ratio = jnp.where(bad, alpha / jnp.where(bad, alpha - z, 1.0), jnp.inf)
    theta = jnp.min(ratio)
    alpha = alpha + theta * (z - alpha)
    support = support & (alpha > 0) & ~(bad & (ratio <= theta))
    alpha = jnp.where(support, alpha, 0.0)
    return alpha, support, solve_on_support(gram, b, support)

  def settle(alpha, support):
    z = solve_on_support(gram, b, support)
    alpha, support, z = jax.lax.while_loop(lambda s: jnp.any(s[1] & ~(s[2] > 0)), feasible, (alpha, support, z))
    return z, support

  def outer(state):
    alpha, support, blocked, _, it = state
    w = jnp.where(support | blocked, -jnp.inf, b - gram @ alpha)
    j = jnp.argmax(w)
    grow = w[j] > tol
    new_alpha, new_support = settle(alpha, support.at[j].set(True))
    # A coordinate that cannot enter (rounding: its equality solution is not
    # positive although its gradient is) is not offered again until another
    # one enters, or the loop would re-add it until max_iter.
    entered = grow & new_support[j]
    blocked = jnp.where(entered, False, blocked.at[j].set(blocked[j] | grow))
    return (jnp.where(grow, new_alpha, alpha), jnp.where(grow, new_support, support), blocked, ~grow, it + 1)

  def running(state):
    return ~state[3] & (state[4] < max_iter)

  alpha = jnp.zeros_like(b)
  if support is None:
    support = jnp.zeros(b.shape, bool)
  else:
    # Warm start: shrink the guess to the coordinates whose equality solution
    # is positive, until it is positive on all of them (then a feasible start).
    z = solve_on_support(gram, b, support)

    def shrink(state):
      support_, z_ = state
      support_ = support_ & (z_ > 0)
      return support_, solve_on_support(gram, b, support_)

    support, alpha = jax.lax.while_loop(lambda s: jnp.any(s[0] & ~(s[1] > 0)), shrink, (support, z))
  blocked = jnp.zeros(b.shape, bool)
  alpha, _, _, _, _ = jax.lax.while_loop(running, outer, (alpha, support, blocked, False, 0))
  return alpha


def solve_on_support(gram: jax.Array, b: jax.Array, support: jax.Array) -> jax.Array:
  """``a`` with ``G_SS a_S = b_S`` on the support S and 0 elsewhere. gram ``[M, M]``, b, support ``[M]``."""
  both = support[:, None] & support[None, :]
  a = jnp.where(both, gram, 0.0) + jnp.diag(jnp.where(support, 0.0, 1.0))
  return jnp.where(support, jnp.linalg.solve(a, jnp.where(support, b, 0.0)[:, None])[:, 0], 0.0)


def kkt_ok(gram: jax.Array, b: jax.Array, alpha: jax.Array) -> jax.Array:
  """Whether ``alpha`` (``[..., M]``) is optimal: positive where it is used, and
  no unused coordinate with a gradient above tolerance. Non-finite is not ok."""
  w = b - jnp.einsum('...ij,...j->...i', gram, alpha)
  tol = _KKT_TOL * jnp.maximum(1.0, jnp.max(jnp.abs(b), axis=-1, keepdims=True))
  used = alpha > 0
  ok = jnp.all(jnp.where(used, jnp.abs(w) <= 1e3 * tol, w <= tol), axis=-1)
  return ok & jnp.all(jnp.isfinite(alpha), axis=-1) & jnp.all(alpha >= 0, axis=-1)


@functools.partial(jax.jit, static_argnames=('max_iters', 'check_every'))
def _admm_supports(gram: jax.Array, b: jax.Array, max_iters: int = 300, check_every: int = 10) -> jax.Array:
  """A guess of each problem's support, by ADMM on ``a = z, z >= 0`` with one
  shared factorisation per manifold (matrix products only, no per-problem
  solves), in float32: only the support is kept, the exact solution on it is
  computed afterwards in float64. Stops when no support changed over
  ``check_every`` steps, or after ``max_iters``.

  gram ``[P, M, M]``, b ``[P, n_t, M]`` -> bool ``[P, n_t, M]``.
  """
  m = gram.shape[-1]
  scale = jnp.trace(gram, axis1=1, axis2=2)[:, None, None] / m     # the mean eigenvalue
  g32 = (gram / scale).astype(jnp.float32)                            # rho = 1 after scaling
  b32 = (b / scale).astype(jnp.float32)
  inv = jnp.linalg.inv(g32 + jnp.eye(m, dtype=jnp.float32))          # [P, M, M], symmetric

  def step(_, state):
    z, u = state
    a = jnp.einsum('pnj,pij->pni', b32 + z - u, inv)
    z_new = jnp.maximum(a + u, 0.0)
    return z_new, u + a - z_new

  def block(state):
    z, u, _, it = state
    z, u = jax.lax.fori_loop(0, check_every, step, (z, u))
    return z, u, jnp.any((z > 0) != (state[0] > 0)), it + check_every

  zeros = jnp.zeros_like(b32)
  z, _, _, _ = jax.lax.while_loop(lambda s: s[2] & (s[3] < max_iters), block, (zeros, zeros, True, 0))
  return z > 0


@jax.jit
def _polish(gram: jax.Array, b: jax.Array, support: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The exact solution on each guessed support and whether it is optimal. [P, n_t, M] -> alpha, ok [P, n_t]."""
  alpha = jax.vmap(jax.vmap(solve_on_support, in_axes=(None, 0, 0)))(gram, b, support)
  return alpha, kkt_ok(gram[:, None], b, alpha)


_exact_batch = jax.jit(jax.vmap(nnls_gram))


def solve_anchor_duals(gram: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, dict]:
  """All dual problems ``min_{a>=0} 1/2 a^T G_p a - b_pk^T a`` exactly.

  A support guessed by ADMM (cheap, batched matrix products), the exact
  equality solution on it, a KKT check, and the exact active-set method
  (:func:`nnls_gram`, warm-started from the guess) for every problem whose
  check fails; its results are checked again (``unsolved``). Runs in float64
  (a scoped ``jax.enable_x64``).

  Args:
    gram: ``[P, M, M]`` (computed in float64).
    b: ``[P, n_t, M]``.

  Returns:
    ``alpha [P, n_t, M]`` and stats ``{'problems', 'exact_fallback'`` (problems
    the active-set method solved), ``'unsolved'`` (of those, how many still
    miss the KKT tolerance: reported, never hidden)``}``.
  """
  with jax.enable_x64(True):
    # Stays on the device: only the per-problem verdicts come to the host, to pick the failures.
    gram, b = jnp.asarray(gram, jnp.float64), jnp.asarray(b, jnp.float64)
    support = _admm_supports(gram, b)
    alpha, ok = _polish(gram, b, support)
    ok = np.asarray(ok)
    bad_p, bad_k = np.nonzero(~ok)
    unsolved = 0
    if len(bad_p):
      # Pad to a power of two so the exact solver compiles for few batch sizes.
      size = 1 << int(np.ceil(np.log2(len(bad_p))))
      idx = np.concatenate([np.arange(len(bad_p)), np.zeros(size - len(bad_p), int)])
      g, bb = gram[bad_p[idx]], b[bad_p[idx], bad_k[idx]]
      fixed = _exact_batch(g, bb, support[bad_p[idx], bad_k[idx]])[:len(bad_p)]
      unsolved = int(np.sum(~np.asarray(kkt_ok(g[:len(bad_p)], bb[:len(bad_p)], fixed))))
      alpha = alpha.at[bad_p, bad_k].set(fixed)
    alpha = np.asarray(alpha)
  return alpha, {'problems': int(ok.size), 'exact_fallback': int(len(bad_p)), 'unsolved': unsolved}


def _geometry_from_alphas(s: jax.Array, t: jax.Array, alpha: jax.Array, kappa) -> tuple[jax.Array, ...]:
  """Capacity, radius, dimension of one manifold from its dual solutions.

  s: ``[D+1, M]`` (last coordinate 1), t: ``[n_t, D+1]``, alpha ``[n_t, M]``.
  """
  d = s.shape[0] - 1
  # The point of largest projection on t (ignoring the center coordinate), as the reference picks it.
  best = jnp.argmax(t[:, :d] @ s[:d], axis=1)
  s_max = s[:, best].T.at[:, d].set(1.0)
  g = jnp.sum(t * s_max, axis=1)
  sa = alpha @ s.T                                         # [n_t, D+1] = t - v
  s_tilde = sa / jnp.maximum(jnp.sum(alpha, axis=1, keepdims=True), 1e-300)
  interior = (g + kappa < 0) | (jnp.linalg.norm(sa, axis=1) < _INTERIOR_EPS)
  anchors = jnp.where(interior[:, None], s_max, s_tilde)
  # Capacity (PRX 2018 eqs. 16-17): 1 / E_t[ max(t.s~ + kappa, 0)^2 / |s~|^2 ].
  ts = jnp.maximum(jnp.sum(t * anchors, axis=1) + kappa, 0.0)
  ss = jnp.sum(anchors**2, axis=1)
  capacity = 1.0 / jnp.mean(jnp.where(ss > 0, ts**2 / jnp.where(ss > 0, ss, 1.0), 0.0))
  # Radius (eq. 28): spread of the anchor points around their mean, in units of the center.
  ds = (anchors - jnp.mean(anchors, axis=0))[:, :d] / anchors[:, d:]
  radius = jnp.sqrt(jnp.mean(jnp.sum(ds**2, axis=1)))
  # Dimension (eq. 29): D (E_t[t^ . s^])^2 over the first D coordinates.
  t_hat = t[:, :d] / jnp.linalg.norm(t[:, :d], axis=1, keepdims=True)
  s_hat = anchors[:, :d] / jnp.sqrt(jnp.sum(anchors[:, :d]**2, axis=1, keepdims=True) + 1e-12)
  dimension = d * jnp.mean(jnp.sum(t_hat * s_hat, axis=1))**2
  return capacity, radius, dimension


_all_geometry = jax.jit(jax.vmap(_geometry_from_alphas, in_axes=(0, 0, 0, None)))


@functools.partial(jax.jit, static_argnames=('n_t',))
def _anchor_problems(points: jax.Array, shared: jax.Array, key: jax.Array, kappa, n_t: int):
  """Step 3 and the data of step 4 for every manifold.

  Args:
    points: ``[P, N, M]`` with the global mean removed.
    shared: ``[N, K]`` orthonormal center directions to project out.

  Returns:
    ``s [P, D+1, M]`` (each manifold in its span, centered on its center,
    scaled by the center's norm, last coordinate 1), ``t [P, n_t, D+1]``,
    ``gram [P, M, M]``, ``b [P, n_t, M]`` (the dual problems' data).
  """
  p, n, m = points.shape
  points = points - jnp.einsum('nk,pkm->pnm', shared, jnp.einsum('nk,pnm->pkm', shared, points))
  centers = jnp.mean(points, axis=2, keepdims=True)
  points = (points - centers) / jnp.linalg.norm(centers, axis=1, keepdims=True)
  if n > m:
    # Reduce each manifold to its span: coordinates in the eigenbasis of its
    # M x M Gram matrix, sqrt(L) V^T (an orthonormal basis of the span, like
    # the reference's QR; MFTMA is rotation invariant). XLA's CPU QR of tall
    # [N, M] matrices is ~100x slower than this.
    lam, vec = jnp.linalg.eigh(jnp.einsum('pnm,pnk->pmk', points, points))
    # Fix each eigenvector's sign (largest entry positive), so the coordinates
    # are a function of the Gram matrix alone: invariant to rotations of the
    # features and to the order of the points.
    big = jnp.take_along_axis(vec, jnp.argmax(jnp.abs(vec), axis=1, keepdims=True), axis=1)
    vec = vec * jnp.where(big < 0, -1.0, 1.0)
    points = jnp.sqrt(jnp.clip(lam, 0.0, None))[:, :, None] * jnp.swapaxes(vec, 1, 2)
  s = jnp.concatenate([points, jnp.ones((p, 1, m), points.dtype)], axis=1)
  t = jax.random.normal(key, (p, n_t, s.shape[1]), points.dtype)
  gram = jnp.einsum('pdi,pdj->pij', s, s)
  b = jnp.einsum('pnd,pdm->pnm', t, s) + kappa
  return s, t, gram, b


# --------------------------------------------------------------------------
# Center correlations and the shared center subspace
# --------------------------------------------------------------------------


def _mean_abs_correlation(x: np.ndarray) -> float:
  """Mean |cosine| over distinct pairs of rows of x ``[P, n]``."""
  p = x.shape[0]
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  c = np.abs(xn @ xn.T)
  return float((np.sum(c) - np.trace(c)) / (p * (p - 1)))


def _residual_cost(x: np.ndarray, gram: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The reference's center objective and its Euclidean gradient, for a stack of v.

  ``f(v) = 1/2 sum_pq E_pq^2 / (r_p r_q)`` with ``c = x v``, ``E = x x^T - c c^T``
  and ``r_p = E_pp`` the squared norm center p keeps: the squared
  correlations left after projecting out the columns of v.

  Args:
    x: ``[P, n]`` centers, gram: ``x x^T``, v: ``[R, n, K]``.

  Returns:
    ``f [R]`` and ``df/dv [R, n, K]``.
  """
  c = x @ v                                   # [R, P, K]
  r = np.diagonal(gram)[None] - np.sum(c**2, axis=2)
  e = gram[None] - c @ np.swapaxes(c, 1, 2)
  rr = r[:, :, None] * r[:, None, :]
  a = e / rr
  bp = np.sum(e * a, axis=2)
  f = 0.5 * np.sum(bp, axis=1)
  # df = sum A dE - sum_p (dr_p / r_p) B_p, with dE = -(dc c^T + c dc^T), dr_p = -2 c_p . dc_p.
  dc = -2.0 * a @ c + 2.0 * (bp / r)[:, :, None] * c
  return f, x.T @ dc


def _stiefel_minimize(x: np.ndarray, v0: np.ndarray) -> np.ndarray:
  """Minimises :func:`_residual_cost` over orthonormal v from each start of ``v0 [R, n, K]``.

  Riemannian conjugate gradients (Hestenes-Stiefel, as the reference's
  pymanopt solver) with Armijo backtracking and a QR retraction (by Cholesky), all starts
  at once; a start stops at gradient norm ``_STIEFEL_GTOL``, a vanishing step
  or decrease, or after ``_STIEFEL_ITERS`` steps. float64 numpy: the problem
  is P x (P-1) small and sequential, so compiling it would cost more than it
  saves.
  """
  gram = x @ x.T

  def retract(v):  # The Q of v = QR with R's diagonal positive, by Cholesky (v is near-orthonormal).
    lower = np.linalg.cholesky(np.swapaxes(v, 1, 2) @ v)
    return v @ np.linalg.inv(np.swapaxes(lower, 1, 2))

  def tangent(v, g):  # Projection onto the tangent space at v.
    vg = np.swapaxes(v, 1, 2) @ g
    return g - v @ (0.5 * (vg + np.swapaxes(vg, 1, 2)))

  def dot(a, b):
    return np.sum(a * b, axis=(1, 2))

  v = v0
  f, g = _residual_cost(x, gram, v)
  g = tangent(v, g)
  d = -g
  tau = np.ones(len(v))
  active = np.ones(len(v), bool)
  for _ in range(_STIEFEL_ITERS):
    slope = dot(g, d)
    restart = slope >= 0                      # Not a descent direction: steepest descent.
    d = np.where(restart[:, None, None], -g, d)
    slope = np.where(restart, -dot(g, g), slope)
    step = tau.copy()
    vn = retract(v + step[:, None, None] * d)
    fn, gn = _residual_cost(x, gram, vn)
    while True:
      long = active & (fn > f + 1e-4 * step * slope) & (step > 1e-20)
      if not long.any():
        break
      step = np.where(long, 0.5 * step, step)
      vt = retract(v[long] + step[long][:, None, None] * d[long])
      vn[long] = vt
      fn[long], gn[long] = _residual_cost(x, gram, vt)
    gn = tangent(vn, gn)
    d_moved, y = tangent(vn, d), gn - tangent(vn, g)
    denom = dot(d_moved, y)
    beta = np.maximum(0.0, dot(gn, y) / np.where(denom == 0, 1.0, denom))
    decrease = f - fn
    upd = active[:, None, None]
    v, g = np.where(upd, vn, v), np.where(upd, gn, g)
    d = np.where(upd, -gn + beta[:, None, None] * d_moved, d)
    f, tau = np.where(active, fn, f), np.where(active, 2.0 * step, tau)
    active &= ((np.sqrt(dot(g, g)) > _STIEFEL_GTOL) & (step > 1e-18) & (decrease > 1e-13 * np.abs(f)))
    if not active.any():
      break
  return v


def _best_start(x: np.ndarray, vs: np.ndarray) -> tuple[np.ndarray, float]:
  """Of several solutions ``[R, n, K]``: the most stable one (largest smallest
  residual center norm, as the reference chooses) and its mean |residual correlation|."""
  left = x[None] - (x @ vs) @ np.swapaxes(vs, 1, 2)
  stability = np.min(np.linalg.norm(left, axis=2) / np.linalg.norm(x, axis=1)[None], axis=1)
  best = int(np.argmax(stability))
  return vs[best], float(_mean_abs_correlation(left[best]))


def center_subspace(centers: np.ndarray, seed: int = 0, max_k: int | None = None):
  """The shared low-rank structure of the manifold centers (the reference's search).

  For K = 1, 2, ...: ``_CENTER_STARTS`` random starts (each extending the
  previous K's directions by one), minimised on the Stiefel manifold; the most
  stable solution is kept and scored by its mean |residual correlation|. The
  search stops at ``max_k`` or after three rises in a row; the K with the
  smallest residual correlation wins.

  Args:
    centers: ``[N, P]`` manifold centers (float64).
    seed: seeds the random starts.
    max_k: the largest K tried (default: the reference's rule, the number of
      components holding ``_CENTER_VARIANCE`` of the center variance plus
      ``_CENTER_EXTRA_K``).

  Returns:
    ``(correlation, k, directions)``: mean |cosine| of the mean-subtracted
    centers (before any removal), the chosen K and its ``[N, K]`` orthonormal
    directions (K = 0 with fewer than 3 manifolds: nothing to remove). K is
    at most ``min(N, P-1) - 1`` (the reference's rule can ask for all P-1
    directions of P centers, which would leave nothing to correlate).
  """
  n, p = centers.shape
  xb = (centers - centers.mean(axis=1, keepdims=True)).T      # [P, N]
  q = np.linalg.qr(xb.T)[0][:, :p - 1]                        # a basis of the centers' span
  x = xb @ q                                                  # [P, <= P-1]
  correlation = _mean_abs_correlation(x)
  if x.shape[1] < 2:
    return correlation, 0, np.zeros((n, 0))
  if max_k is None:
    sv = np.linalg.svd(x, compute_uv=False)   # those of xb: x is xb in a basis of its rows
    total = np.cumsum(sv**2) / np.sum(sv**2)
    max_k = int(np.argmax(np.where(total < _CENTER_VARIANCE, total, 0.0))) + _CENTER_EXTRA_K
  max_k = max(1, min(max_k, x.shape[1] - 1))
  rng = np.random.default_rng(seed)
  found, residual, v = [], [], np.zeros((x.shape[1], 0))
  for _ in range(max_k):
    starts = rng.standard_normal((_CENTER_STARTS, p)) @ x           # [R, n]
    starts = np.concatenate([starts[:, :, None], np.broadcast_to(v, (_CENTER_STARTS,) + v.shape)], axis=2)
    v, res = _best_start(x, _stiefel_minimize(x, np.linalg.qr(starts)[0]))
    found.append(v)
    residual.append(res)
    if len(residual) > 4 and residual[-1] > residual[-2] > residual[-3] > residual[-4]:
      break
  k = int(np.argmin(residual)) + 1
  return correlation, k, q @ found[k - 1]


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def projection(n_features: int, max_features: int = 2000, seed: int = 0) -> np.ndarray | None:
  """A Gaussian random projection ``[n_features, max_features]`` with unit-norm
  columns (``features @ P``), or None when ``n_features <= max_features``."""
  if n_features <= max_features:
    return None
  w = np.random.default_rng(seed).standard_normal((n_features, max_features))
  return (w / np.linalg.norm(w, axis=0, keepdims=True)).astype(np.float32)


def _as_array(manifolds) -> np.ndarray:
  if isinstance(manifolds, (list, tuple)):
    if not manifolds:
      raise ValueError('mftma.analyze needs at least two manifolds, got none')
    shapes = {np.shape(m) for m in manifolds}
    if len(shapes) != 1:
      raise ValueError(f'mftma.analyze needs manifolds of one shape [N, M], got {sorted(shapes)}')
    manifolds = np.stack([np.asarray(m) for m in manifolds])
  manifolds = np.asarray(manifolds)
  if manifolds.ndim != 3:
    raise ValueError(f'mftma.analyze needs a list of [N, M] arrays or one [P, N, M] array, got shape '
                     f'{manifolds.shape}')
  p, n, m = manifolds.shape
  if p < 2 or m < 2:
    raise ValueError(f'mftma.analyze needs at least 2 manifolds of at least 2 points, got P={p}, M={m}')
  if not np.all(np.isfinite(manifolds)):
    raise ValueError('mftma.analyze: the manifolds hold NaN or infinite values')
  return manifolds


def data_dimension(points: np.ndarray, fraction: float = 0.9) -> dict:
  """Participation ratio ``(sum l)^2 / sum l^2`` and the number of principal
  components whose cumulative variance stays at or below ``fraction`` (the
  reference's count) of points ``[N, n_points]``."""
  with jax.enable_x64(True):
    x = jnp.asarray(points, jnp.float64)
    x = x - jnp.mean(x, axis=1, keepdims=True)
    small = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
    lam = jnp.clip(jnp.linalg.eigvalsh(small)[::-1], 0.0, None)
    ratio = float(jnp.sum(lam)**2 / jnp.sum(lam**2))
    cumulative = np.asarray(jnp.cumsum(lam) / jnp.sum(lam))
  return {'participation_ratio': ratio, f'dimension_{round(100 * fraction)}': int(np.sum(cumulative <= fraction))}


def analyze(manifolds, kappa: float = 0.0, n_t: int = 200, seed: int = 0, *, max_features: int | None = None,
            projection_seed: int = 0, data_dimensions: bool = True) -> dict:
  """Replica mean-field manifold analysis of P manifolds.

  Args:
    manifolds: a list of ``[N, M]`` arrays (N features x M points) or one
      ``[P, N, M]`` array; all manifolds have the same M.
    kappa: the margin (>= 0; larger margins lower the capacity).
    n_t: Gaussian vectors per manifold.
    seed: seeds the Gaussian vectors and the center-subspace search.
    max_features: when N is larger, points are first projected to this many
      features (:func:`projection`, seeded by ``projection_seed``); None keeps
      all N, as the reference does.
    projection_seed: seed of that projection.
    data_dimensions: also compute the participation ratio and the 90%-variance
      dimension of all P x M points (an eigendecomposition of a
      ``min(N, P M)``-square matrix).

  Returns:
    A dict of floats ``capacity`` (harmonic mean over manifolds), ``radius``,
    ``dimension`` (arithmetic means), ``center_correlation``, int ``K`` (rank of
    the shared center subspace removed), lists ``capacity_all``,
    ``radius_all``, ``dimension_all`` (per manifold), ``features`` (N
    analysed), ``kappa``, ``n_t``, the solver's ``exact_fallback`` and
    ``unsolved`` counts (see :func:`solve_anchor_duals`), and with
    ``data_dimensions`` ``participation_ratio`` and ``dimension_90``.
  """
  if kappa < 0:
    raise ValueError(f'mftma.analyze: kappa must be >= 0, got {kappa}')
  if n_t < 1:
    raise ValueError(f'mftma.analyze: n_t must be >= 1, got {n_t}')
  x = _as_array(manifolds)
  p, n, m = x.shape
  if max_features is not None and n > max_features:
    proj = projection(n, max_features, projection_seed)
    x = np.swapaxes(np.swapaxes(x, 1, 2) @ proj, 1, 2)   # [P, max_features, M]
    n = max_features
  with jax.enable_x64(True):
    x = jnp.asarray(x, jnp.float64)
    x = x - jnp.mean(x, axis=(0, 2), keepdims=True)   # the global mean of all points
    centers = jnp.mean(x, axis=2).T                           # [N, P]
    correlation, k, shared = center_subspace(np.asarray(centers), seed)
    key = jax.random.fold_in(jax.random.key(seed), 1)
    s_, t, gram, b = _anchor_problems(x, jnp.asarray(shared), key, float(kappa), int(n_t))
    alpha, stats = solve_anchor_duals(gram, b)
    capacity, radius, dimension = (np.asarray(a) for a in _all_geometry(s_, t, jnp.asarray(alpha), float(kappa)))
  out = {
      'capacity': float(1.0 / np.mean(1.0 / capacity)),
      'radius': float(np.mean(radius)),
      'dimension': float(np.mean(dimension)),
      'center_correlation': correlation,
      'K': k,
      'capacity_all': capacity.tolist(),
      'radius_all': radius.tolist(),
      'dimension_all': dimension.tolist(),
      'features': int(n),
      'kappa': float(kappa),
      'n_t': int(n_t),
      'exact_fallback': stats['exact_fallback'],
      'unsolved': stats['unsolved'],
  }
  if data_dimensions:
    out.update(data_dimension(np.transpose(np.asarray(x), (1, 0, 2)).reshape(n, p * m)))
  return out
