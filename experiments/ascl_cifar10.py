"""ASCL vs PGD-AT vs TRADES on CIFAR-10 with ResNet-18 at eps = 8/255 (for accelerators).

papers/ascl.md's main recipe: the four members of `ascl_mnist` (ascl_leaking,
ascl_all, pgd_at, trades) on the ResNet-18 of the ASCL / TRADES code bases,
all with the training attack PGD L-inf eps 8/255, 10 steps of 0.007, random
start (TRADES: its KL attack, same steps), SGD 0.1 momentum 0.9, weight decay
5e-4, batch 128, 120 epochs with the learning rate x0.1 at epochs 100, 105
and 110. The ASCL members see two crop + flip views of each image (the
contrastive batch is 4B rows: clean and adversarial of both views); PGD-AT
and TRADES the usual one crop + flip view. Evaluated by the shared strong
profile cifar10_linf at eps 2/255, 4/255, 8/255 on the whole test set, with
the latent-space study.

CIFAR-10 has no offline copy here: point --data_dir at a folder holding
cifar-10-batches-bin/ (the binary version), or let tfds / the download fetch
it on a machine with internet.

COMMAND:
  python launch.py --experiment=ascl_cifar10 --data_dir=/path/to/cifar_parent

RUNTIME: hours per member on one modern GPU; not meant for a CPU (`--smoke`
shrinks it to a short CPU run of the ASCL member on any CIFAR-shaped files).

EXPECTED (paper, v1): ASCL about 2.6 points more robust than the strongest
baseline, the leaking selection a further 1.4 points while keeping 42.8% of
the positives and 6.3% of the negatives. Not yet measured with this code: no
CIFAR-10 data and no accelerator were available where it was written.
"""

import ml_collections

from geomrobust.config import load_experiment

EPS = 8 / 255
ATTACK = dict(eps=EPS, step_size=0.007, steps=10, norm='linf', eps_warmup_steps=0)
PGD_AT = dict(name='pgd_at', random_start=True, attack='pgd', **ATTACK)
TRADES = dict(name='trades', beta=6.0, **ATTACK)
# Two views made by the method itself: the loop's own augmentation is off for these members.
ASCL = dict(PGD_AT, name='ascl', selection='leaking', distance='linf', tau=0.2, head_dim=128, objective='main',
            kl_weight=2.0, contrastive_weight=1.0, views=2, view_augment='crop_flip')


def get_config() -> ml_collections.ConfigDict:
  c = load_experiment('madry_cifar10')  # the ResNet-18, data and shared evaluation
  c.method = ml_collections.ConfigDict(ASCL)
  c.train.augment = ''
  c.train.epochs = 120
  c.train.weight_decay = 5e-4
  c.train.lr_milestones = (100, 105, 110)
  c.members = (
      'ascl_leaking: method.selection=leaking',
      'ascl_all: method.selection=all',
      f'pgd_at: method={PGD_AT!r}; train.augment=crop_flip',
      f'trades: method={TRADES!r}; train.augment=crop_flip',
  )
  c.probes = ml_collections.ConfigDict({'latent': {}})
  # Smoke: the ASCL member on a narrow ResNet-10; the sanity checks run in ascl_mnist's and
  # madry_cifar10's smokes (the same method, the same network).
  c.smoke = ('only=ascl_leaking', 'model.width=4', 'model.blocks=1', 'method.steps=2', 'data.verify=false',
             'eval.attacks=pgd,apgd_dlr', 'eval.sanity=false')
  return c
