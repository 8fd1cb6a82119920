"""TRADES (Zhang et al. 2019) on MNIST at eps = 0.3.

Loss CE(clean) + beta * KL(p(clean) || p(adv)), the attack maximising the KL
from x + 0.001 N(0, I) (the project's PGD with the KL as its loss, compiled
into the train step). Same network and reduced budget as `madry_mnist`;
`--setting=full` is the TRADES paper's MNIST recipe:

                 default (2-core CPU)           full (Zhang et al.)
  network        conv16-conv32-fc256            their CNN: 2x conv32 - 2x conv64 (3x3) - fc200 - fc200
  beta           6                              6 (their MNIST run: 1/lambda = 6)
  training PGD   10 steps of 0.075              40 steps of 0.01
  optimiser      Adam 1e-3, batch 100, 6 ep.    SGD 0.01 mom. 0.9, batch 128, 100 ep., /10 at 55, 75, 90
  evaluation     first 500 test images          whole test set

Judged by the shared strong evaluation (profile mnist_linf) at eps 0.1, 0.2, 0.3.

COMMAND:
  python launch.py --experiment=trades_mnist --data_dir=../shared/data

RUNTIME: 43 min measured on a 2-core CPU (23 min training, partly beside
other jobs; 20 min evaluating with APGD-T and Square in the profile, 7 min
with the profile before them; README has the numbers).

EXPECTED: published (full budget, their CNN): about 99.5% clean and 96% under
their PGD-40 at eps 0.3. The reduced budget lands below; the measured
numbers are in README.md.
"""

import ml_collections

from geomrobust.config import load_experiment


def get_config() -> ml_collections.ConfigDict:
  c = load_experiment('standard_mnist')  # the same CNN, data and evaluation; another objective
  c.method = ml_collections.ConfigDict(dict(name='trades', beta=6.0, eps=0.3, step_size=0.0, steps=10, norm='linf',
                                            eps_warmup_steps=0))
  c.train.epochs = 6
  c.settings = ml_collections.ConfigDict({
      'full': ('model.channels=32,64', 'model.convs_per_block=2', 'model.kernel_size=3', 'model.dense=200,200',
               'method.steps=40', 'method.step_size=0.01', 'train.optimizer=sgd', 'train.lr=0.01',
               'train.momentum=0.9', 'train.batch_size=128', 'train.epochs=100', 'train.lr_milestones=55,75,90',
               'eval.num_examples=0'),
  })
  c.smoke = ('method.steps=2',)
  return c
