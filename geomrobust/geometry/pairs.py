"""Same-label ("boson") and different-label ("fermion") pair distances.

The local-contrastive (Fermi-Bose) papers measure a representation by the
squared Euclidean distance between two examples divided by the width,
``d_ij = ||h_i - h_j||^2 / N``: their loss targets it (bosons to 0, fermions
to at least d_F) and their geometry plots show its class-conditional means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust.geometry import distances


def scaled_sq_dists(h: jax.Array) -> jax.Array:
  """``[B, ...] -> [B, B]``: ``||h_i - h_j||^2 / N`` with N the flattened width.

  The Gram form costs one ``[B, N] x [N, B]`` matmul instead of a ``[B, B, N]``
  difference tensor (which a vmapped sweep of many members could not afford).
  Its weakness is cancellation: ``|h_i|^2 + |h_j|^2 - 2 h_i.h_j`` subtracts
  numbers of order N from each other to get distances that the loss drives
  towards 0. Centring the batch first (distances are translation invariant)
  and asking for full float32 matmul precision (accelerators otherwise use
  TF32/bf16 passes) keep the error at float32 rounding of the distances
  themselves.
  """
  h = distances.flatten(h)
  h = h - jnp.mean(h, axis=0, keepdims=True)
  sq = jnp.sum(h * h, axis=-1)
  gram = jnp.matmul(h, h.T, precision=jax.lax.Precision.HIGHEST)
  d = sq[:, None] + sq[None, :] - 2.0 * gram
  return jnp.maximum(d, 0.0) / h.shape[-1]


def pair_masks(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Boolean ``[B, B]`` masks of the unordered pairs i < j: (same label, different label)."""
  b = labels.shape[0]
  upper = jnp.triu(jnp.ones((b, b), bool), k=1)
  same = labels[:, None] == labels[None, :]
  return upper & same, upper & ~same


def boson_fermion_means(h: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean scaled distance over same-label and over different-label pairs.

  Args:
    h: ``[B, ...]`` representations.
    labels: ``[B]`` integer labels.

  Returns:
    ``(boson_mean, fermion_mean)``, scalars (NaN when a kind of pair is absent).
  """
  d = scaled_sq_dists(h)
  boson, fermion = pair_masks(labels)
  mean = lambda m: jnp.sum(jnp.where(m, d, 0.0)) / jnp.sum(m)
  return mean(boson), mean(fermion)


_boson_fermion_means = jax.jit(boson_fermion_means)


def layer_pair_distances(reps, labels) -> list[dict]:
  """Per layer: mean boson and fermion distance, as JSON-able floats.

  Args:
    reps: sequence of ``[B, ...]`` representations (one per layer).
    labels: ``[B]`` integer labels.

  Returns:
    ``[{'layer': k, 'boson_distance': float, 'fermion_distance': float}, ...]``.
  """
  labels = jnp.asarray(np.asarray(labels), jnp.int32)
  out = []
  for k, h in enumerate(reps):
    boson, fermion = _boson_fermion_means(jnp.asarray(h), labels)
    out.append(dict(layer=k, boson_distance=float(boson), fermion_distance=float(fermion)))
  return out
