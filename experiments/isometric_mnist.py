"""Isometric regularisation on MNIST: the beta family vs plain cross-entropy.

Beshkov et al. 2022 (see ../shared/papers/isometric.md). Seven models share
every line of code: plain CE (beta = 0), beta in {1e-3, 1e-2, 1e-1, 1, 10}
with K = 1, and (beta = 0.1, K = 10). Network 784-100x5(tanh)-10, PyTorch
uniform init, Adam 1e-3, batch 100, 10 epochs on the full 60k training set
(the paper says 5; 5 left plain CE at 96.8%, short of the 97% a converged
baseline reaches). Every model gets the shared strong evaluation (profile
mnist_linf: FGSM, noise, PGD-CE and PGD-margin 100 steps x 5 restarts,
APGD-CE, APGD-DLR, APGD-T, Square; worst case per example; sanity checks) on the first 2,000
test images at the paper's FGSM grid logspace(-2, 0, 10) up to eps = 0.36
(beyond it every model is at 0%), the authors' own FGSM on the training
loss at the whole grid, and isometry diagnostics per hidden layer.

COMMAND:
  python launch.py --experiment=isometric_mnist --data_dir=../shared/data

RUNTIME: 13 min 21 s measured on a 2-core CPU (README has the numbers).  Measured before APGD-T and Square joined the default
profile: they add to the evaluation of every example the other attacks leave
robust (madry_mnist: 424 s -> 1,447 s; README, "Evaluation strength").

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
from geomrobust.evaluation import profiles


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
  profiles.apply_profile(c.eval, 'mnist_linf')
  c.eval.num_examples = 2000  # The strong profile on 10k x 7 models does not fit 20 CPU minutes.
  c.eval.batch_size = 1000
  grid = tuple(float(f'{e:.4g}') for e in np.logspace(-2, 0, 10))
  c.eval.eps = tuple(e for e in grid if e < 0.4)
  c.probes = ml_collections.ConfigDict({
      'isometry': {'examples': 2000, 'scale_key': 'method.k'},
      'train_loss_fgsm': {'eps': grid},  # The authors' FGSM (cheap) runs on the whole grid.
  })
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
