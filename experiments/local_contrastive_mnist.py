"""Local contrastive learning (Fermi-Bose machine) on 1,000 MNIST images: the d_F sweep vs a backprop MLP.

The paper's reference recipe (../shared/papers/local_contrastive.md): a
784-1000-10 network, no biases, hidden unit (1 + tanh)/2, N(0, 1/fan_in)
init. Stage 1 trains the hidden layer alone with the pairwise boson/fermion
loss (target fermion distance d_F, linear hinge, weight decay lam = 0.01;
Adam 0.01, batch 50, 100 epochs); stage 2 a linear readout on the frozen
representation (cross-entropy, Adam 1e-3, 100 epochs). Training set: the
first 100 training images of each class; clean accuracy: mean over the last
10 readout epochs on the first 400 test images of each class. The baseline
"mlp" is the same network trained end to end with cross-entropy (Adam 1e-3,
batch 50, 100 epochs) over the same seeds.

The whole d_F grid x seeds is one vmapped, compiled program (and the
baseline's seeds another). Every model gets the paper's own protocol (FGSM
and Gaussian noise at eps = 0..0.79 on the first 1,000 test images, areas
R_FGSM and R_noise), a screening shared evaluation (the `quick` profile at
eps = sweep.pgd_eps on the first sweep.screen_examples images) and the
boson/fermion distances of its hidden layer on train and test data; the
baseline and the best d_F also get the strong shared evaluation
(`mnist_linf`: PGD-CE / PGD-margin 100 steps x 5 restarts, APGD-CE/DLR,
APGD-T, Square, FGSM, noise, sanity checks).

COMMAND:
  python launch.py --experiment=local_contrastive_mnist --data_dir=../shared/data

RUNTIME: 19 min 46 s measured on a 2-core CPU (25 d_F values x 3 seeds + 3
MLPs; README has the numbers).  Measured before APGD-T and Square joined the default
profile: they add to the evaluation of every example the other attacks leave
robust (madry_mnist: 424 s -> 1,447 s; README, "Evaluation strength").
`--setting=full` is the paper's grid (d_F step 0.005, 241 values x 5 seeds =
1,205 models) for an accelerator.

EXPECTED (paper): d_F = 0 collapses every representation (chance accuracy);
a broad range of d_F gives clean accuracy in the mid 80s %, comparable to the
MLP, with a non-monotone shape; R_FGSM and R_noise far above the MLP's
(the authors' MLP: R_FGSM = 4.288). Whether that survives PGD is what the
strong evaluation is for. The measured outcome is in README.md.

Variants:
  --config.sweep.grid=0,0.3,0.6 --config.sweep.seeds=2   a smaller grid
  --config.model.hidden=1000,1000                          a deeper machine (each layer its own local loss)
  --config.sweep.chunk_size=8                              bound memory (chunked vmap)
  --config.sweep.stacked=false                             train the members one by one (same numbers, slower)
"""

import ml_collections
import numpy as np

from geomrobust.config import default_config


def _grid(step: float, top: float = 1.2) -> str:
  n = int(round(top / step)) + 1
  return ','.join(f'{v:g}' for v in np.round(np.arange(n) * step, 6))


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.dataset = 'mnist'
  c.data.train_per_class = 100   # 1,000 training images
  c.data.test_per_class = 400    # the 4,000-image balanced clean test set
  c.model = ml_collections.ConfigDict(dict(
      name='mlp', hidden=(1000,), activation='half_tanh', weight_init='normal_fan_in', use_bias=False))
  c.method = ml_collections.ConfigDict(dict(
      name='local_contrastive', d_f=0.5, lam=0.01, readout_epochs=100, readout_lr=1e-3))
  c.probes = ml_collections.ConfigDict({
      'fgsm_noise_areas': {'eps_max': 0.79, 'eps_step': 0.01, 'examples': 1000},  # the paper's protocol
      'pair_distances': {'examples': 1000, 'target_key': 'method.d_f'},
  })
  c.train.epochs = 100           # the local stage (the MLP baseline: all its epochs)
  c.train.batch_size = 50
  c.train.optimizer = 'adam'
  c.train.lr = 0.01
  c.train.checkpoint_every = 20
  c.eval.num_examples = 1000     # the paper's attack/noise set: the first 1,000 test images
  c.eval.batch_size = 500
  c.eval.eps = (0.05, 0.1, 0.2)
  c.sweep = ml_collections.ConfigDict(dict(
      hparam='d_f', grid=tuple(float(v) for v in _grid(0.05).split(',')), seeds=3, stacked=True, chunk_size=0,
      baseline="mlp: method={'name': 'standard'}; train.lr=0.001",
      mean_last_epochs=10, screen_profile='quick', screen_examples=500, pgd_eps=0.05,
      strong=('baseline', 'best:clean_accuracy', 'best:r_fgsm'), strong_seeds=1))
  c.settings = ml_collections.ConfigDict({
      'full': (f'sweep.grid={_grid(0.005)}', 'sweep.seeds=5', 'sweep.chunk_size=128',
               'sweep.screen_examples=1000', 'sweep.strong_seeds=5'),
  })
  c.smoke = ('sweep.grid=0,0.5', 'sweep.seeds=2', 'method.readout_epochs=2', 'sweep.mean_last_epochs=2',
             'sweep.screen_examples=64', 'probes.pair_distances.examples=64', 'probes.fgsm_noise_areas.examples=64',
             'sweep.strong=baseline,best:clean_accuracy')
  return c
