"""PGD adversarial training (Madry et al. 2018) on MNIST at eps = 0.3.

Cross-entropy on PGD examples only, the attack (the project's own PGD, L-inf,
random start, the last iterate) compiled into the train step. The CPU default
is a reduced budget of the published recipe; `--setting=full` is the
published one:

                 default (2-core CPU)           full (Madry et al.)
  network        conv16-conv32-fc256            conv32-conv64-fc1024
  training PGD   10 steps of 0.075 (2.5 eps/10) 40 steps of 0.01
  eps warm-up    linear over the first 2 epochs none
  optimiser      Adam 1e-3, batch 100, 6 ep.    Adam 1e-4, batch 50, 84 ep. (100k steps)
  evaluation     first 500 test images          whole test set

Both are judged by the shared strong evaluation (profile mnist_linf: FGSM,
sign noise, PGD-CE and PGD-margin 100 steps x 5 restarts, APGD-CE, APGD-DLR,
APGD-T (9 targets), Square (5,000 queries), per-example worst case, sanity
checks) at eps 0.1, 0.2, 0.3.

COMMAND:
  python launch.py --experiment=madry_mnist --data_dir=../shared/data

RUNTIME: about 42 min on a 2-core CPU: 24 min 07 s measured with the earlier
evaluation, whose 424 s became 1,447 s when APGD-T and Square joined the
default profile (measured 2026-12-07, same checkpoint; README has the numbers).

EXPECTED: published (full budget): about 98.5% clean, 89% under PGD and
88.5% under AutoAttack at eps 0.3. The reduced budget lands below that; the
measured numbers and their budget are in README.md.

Variants:
  --config.method.attack=fgsm_rs    "fast" adversarial training (FGSM, random start)
  --config.method.steps=40 --config.method.step_size=0.01   Madry's training attack
"""

import ml_collections

from geomrobust.config import load_experiment

FULL_MODEL = ('model.channels=32,64', 'model.dense=1024')


def get_config() -> ml_collections.ConfigDict:
  c = load_experiment('standard_mnist')  # the same CNN, data and evaluation; another objective
  c.method = ml_collections.ConfigDict(dict(
      name='pgd_at', eps=0.3, step_size=0.0, steps=10, random_start=True, attack='pgd', norm='linf',
      # Without it this small CNN sat at chance (loss 2.30) for two epochs at eps = 0.3.
      eps_warmup_steps=1200))
  c.train.epochs = 6
  c.settings = ml_collections.ConfigDict({
      'full': FULL_MODEL + ('method.steps=40', 'method.step_size=0.01', 'method.eps_warmup_steps=0', 'train.lr=1e-4',
                            'train.batch_size=50', 'train.epochs=84', 'eval.num_examples=0'),
  })
  c.smoke = ('method.steps=2',)
  return c
