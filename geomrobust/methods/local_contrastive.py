"""Local contrastive learning, the "Fermi-Bose machine" (see ../shared/papers/local_contrastive.md).

Hidden layers learn without backpropagation. Each hidden layer k has its own
loss on the all-pairs geometry of its output h_k = act(stop_gradient(h_{k-1}) W_k)
over the batch:

  L_k = sum_{i<j} [ s_ij d_ij + (1 - s_ij) max(0, d_F - d_ij) ] / n_pairs
        + 0.5 * lam / N_k * ||W_k||^2

with d_ij = ||h_i - h_j||^2 / N_k (N_k the layer width), s_ij = 1 for a
same-label pair ("bosons" are pulled together) and 0 otherwise ("fermions" are
pushed at least d_F apart by a linear hinge); both terms share one mean over
all B(B-1)/2 pairs. The stop_gradient on every layer's input is what makes the
losses local: the sum over layers trains all of them in one jitted step, yet
no gradient crosses a layer boundary (tests check the cross-layer gradients
are exactly zero).

The pairs are those of the whole global batch, also when the batch is sharded
over devices: the loss is written on the global ``[B, N]`` representation
inside the jitted step, so XLA's partitioner gathers the (small) ``[B, N]``
activations for the ``[B, B]`` distance matrix; a sharded step computes the
same loss as an unsharded one (tested on 8 CPU devices).

Two phases:
  local    all hidden layers, the sum of their local losses: ``train.epochs``
           epochs at ``train.lr``.
  readout  the linear readout ``out`` only, softmax cross-entropy on the
           frozen last hidden layer: ``method.readout_epochs`` at
           ``method.readout_lr``.

Config (``config.method``):
  d_f             target fermion distance (traced: a sweep vmaps over it).
  lam             weight-decay coefficient of the local loss (traced).
  readout_epochs  epochs of the readout phase.
  readout_lr      Adam learning rate of the readout phase.

The paper's own robustness protocol (FGSM and Gaussian-noise areas) and the
boson / fermion distances are the probes ``fgsm_noise_areas`` and
``pair_distances`` (``geomrobust/probes/``).

The reference recipe pairs it with ``model = mlp(hidden=(1000,),
activation='half_tanh', weight_init='normal_fan_in', use_bias=False)``; more
entries in ``model.hidden`` stack more locally trained layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from geomrobust import config as config_lib
from geomrobust.geometry import pairs
from geomrobust.methods import base
from geomrobust.models import common


def fermi_bose_loss(h: jax.Array, labels: jax.Array, d_f: jax.Array) -> tuple[jax.Array, dict]:
  """The pair term of the local loss (no weight decay).

  Args:
    h: ``[B, N]`` representations of one layer.
    labels: ``[B]`` integer labels.
    d_f: scalar target distance for different-label pairs.

  Returns:
    ``(loss, {'boson': mean same-label d, 'fermion': mean different-label d})``,
    the loss a scalar averaged over all ``B(B-1)/2`` unordered pairs.
  """
  d = pairs.scaled_sq_dists(h)
  boson, fermion = pairs.pair_masks(labels)
  per_pair = jnp.where(boson, d, 0.0) + jnp.where(fermion, jax.nn.relu(d_f - d), 0.0)
  b = h.shape[0]
  loss = jnp.sum(per_pair) / (b * (b - 1) / 2)
  # Batch means for the logs; empty masks (a one-class batch) give 0, not NaN.
  mean = lambda m: jnp.sum(jnp.where(m, d, 0.0)) / jnp.maximum(jnp.sum(m), 1)
  return loss, {'boson': jax.lax.stop_gradient(mean(boson)), 'fermion': jax.lax.stop_gradient(mean(fermion))}


# --------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------


class LocalContrastive(base.Method):
  """Layer-local Fermi-Bose losses on every hidden layer, then a linear readout."""

  BOUNDS = {'d_f': config_lib.number(0, example=0.5), 'lam': config_lib.number(0, example=0.01),
            'readout_epochs': config_lib.integer(1, example=100),  # the readout is the classifier
            'readout_lr': config_lib.number(0, example=1e-3)}

  def __init__(self, model, config, num_classes):
    super().__init__(model, config, num_classes)
    if config.model.name != 'mlp':
      raise ValueError(f'method local_contrastive trains MLP layers; set model.name=mlp '
                       f'(got {config.model.name!r})')
    self.widths = tuple(int(w) for w in config.model.hidden)
    if not self.widths:
      raise ValueError('method local_contrastive needs at least one hidden layer (model.hidden)')
    self.act = common.get_activation(config.model.activation)

  def hparams(self):
    m = self.config.method
    return {'d_f': jnp.float32(m.d_f), 'lam': jnp.float32(m.lam)}

  # -- the network, layer by layer ------------------------------------------

  def _dense(self, p: dict, x: jax.Array) -> jax.Array:
    """The model's Dense layer ``x [B, D] -> [B, D']`` from its params."""
    y = x @ p['kernel']
    return y + p['bias'] if 'bias' in p else y

  def local_reps(self, params, x: jax.Array) -> list[jax.Array]:
    """Hidden representations ``[B, N_k]``, each computed from the *stopped*
    previous one: the same values as ``model.apply``'s reps, no cross-layer
    gradient."""
    h = x.reshape((x.shape[0], -1))
    reps = []
    for k in range(len(self.widths)):
      h = self.act(self._dense(params['model'][f'hidden_{k}'], jax.lax.stop_gradient(h)))
      reps.append(h)
    return reps

  # -- losses ---------------------------------------------------------------

  def layer_losses(self, params, batch, hparams) -> list[tuple[jax.Array, dict]]:
    """Layer k's own loss (pair term + its weight decay) and its metrics, per layer."""
    out = []
    for k, h in enumerate(self.local_reps(params, batch['image'])):
      pair, dists = fermi_bose_loss(h, batch['label'], hparams['d_f'])
      kernel = params['model'][f'hidden_{k}']['kernel']
      decay = 0.5 * hparams['lam'] / self.widths[k] * jnp.sum(kernel * kernel)
      out.append((pair + decay, {f'pair_loss_{k}': pair, f'boson_{k}': dists['boson'],
                                 f'fermion_{k}': dists['fermion']}))
    return out

  def local_loss(self, params, batch, rng, hparams):
    """Sum over hidden layers of each layer's own loss. Returns ``(loss, metrics)``
    with per-layer ``pair_loss_k``, ``boson_k``, ``fermion_k`` (batch means)."""
    del rng
    total, metrics = 0.0, {}
    for loss, m in self.layer_losses(params, batch, hparams):
      total = total + loss
      metrics.update(m)
    return total, metrics

  def readout_loss(self, params, batch, rng, hparams):
    """Cross-entropy of the readout on the frozen (stopped) last hidden layer."""
    del rng, hparams
    h = jax.lax.stop_gradient(self.local_reps(params, batch['image'])[-1])
    logits = self._dense(params['model']['out'], h)
    return base.cross_entropy(logits, batch['label']), {'accuracy': base.accuracy(logits, batch['label'])}

  def phases(self):
    m = self.config.method
    hidden = lambda path: any(p.startswith('hidden_') for p in path)
    readout = lambda path: 'out' in path
    return [base.Phase('local', int(self.config.train.epochs), self.local_loss, hidden),
            base.Phase('readout', int(m.readout_epochs), self.readout_loss, readout, lr=float(m.readout_lr))]


METHOD = LocalContrastive
