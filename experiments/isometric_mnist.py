"""Isometric regularisation on MNIST: the beta family vs plain cross-entropy.

Beshkov et al. 2022 (see ../shared/papers/isometric.md). Seven models share
every line of code: plain CE (beta = 0), beta in {1e-3, 1e-2, 1e-1, 1, 10}
with K = 1, and (beta = 0.1, K = 10). Network 784-100x5(tanh)-10, PyTorch
uniform init, Adam 1e-3, batch 100, 5 epochs on the full 60k training set.
Every model is evaluated on the full 10k test set by FGSM and PGD-40
(2 restarts) at eps = 0 and logspace(-2, 0, 10) (the paper's FGSM grid),
worst case per example, plus isometry diagnostics per hidden layer.

COMMAND:
  python launch.py --experiment=isometric_mnist --data_dir=../shared/data

RUNTIME: about 15 minutes on a 2-core CPU (measured: see README).

EXPECTED (paper): moderate beta keeps clean accuracy within about a point of
CE (>= 97%) and lifts the accuracy curve for eps ~ 0.03-0.3; CE collapses
within-class distances (low max-ratio / high stress), the isometric nets keep
them. The measured outcome is in README.md.

Variants:
  --config.only=ce,beta_0.1           a subset of the family
  --config.method.levels='0,0,0,0,0,1,1,1,1,1','0,0,1,1,2,2,3,3,4,4'
  --config.method.depth_per_level=2 --config.model.hidden=100,100,100,100,100,100
                                      the hierarchical (stacked) variant
"""

import ml_collections
import numpy as np

from geomrobust.config import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.dataset = 'mnist'
  c.model = ml_collections.ConfigDict(dict(
      name='mlp', hidden=(100,) * 5, activation='tanh', weight_init='torch', use_bias=True))
  c.method = ml_collections.ConfigDict(dict(
      name='isometric', beta=0.0, k=1.0, levels=(), depth_per_level=1, min_sq_dist=1e-12))
  c.train.epochs = 10  # The paper says 5; see the docstring.
  c.train.batch_size = 100
  c.train.optimizer = 'adam'
  c.train.lr = 1e-3
  c.eval.num_examples = 0  # The full test set.
  c.eval.batch_size = 1000
  c.eval.eps = (0.0,) + tuple(float(f'{e:.4g}') for e in np.logspace(-2, 0, 10))
  c.eval.attacks = ('fgsm', 'pgd')
  c.eval.pgd_steps = 40
  c.eval.pgd_restarts = 2
  c.members = (
      'ce: method.beta=0',
      'beta_1e-3: method.beta=1e-3',
      'beta_1e-2: method.beta=1e-2',
      'beta_1e-1: method.beta=0.1',
      'beta_1: method.beta=1',
      'beta_10: method.beta=10',
      'beta_1e-1_k10: method.beta=0.1; method.k=10',
  )
  return c
