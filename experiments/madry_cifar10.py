"""PGD adversarial training on CIFAR-10 with ResNet-18 at eps = 8/255 (for accelerators).

The standard recipe of the adversarial-training literature (Madry et al.
2018; Rice et al. 2020): ResNet-18 (the TRADES / ASCL code bases' variant,
BatchNorm), SGD 0.1 momentum 0.9, weight decay 5e-4, batch 128, 100 epochs
with the learning rate /10 at epochs 50 and 75, random crop + flip, training
PGD 10 steps of 2/255 with random start, L-inf eps 8/255. Evaluated by the
shared strong profile cifar10_linf (PGD-CE / PGD-margin 50 steps x 2
restarts, APGD-CE, APGD-DLR, APGD-T 100 steps, Square 5,000 queries, FGSM,
noise, sanity checks) at
eps 2/255, 4/255, 8/255 on the whole test set.

CIFAR-10 has no offline copy here: point --data_dir at a folder holding
cifar-10-batches-bin/ (the *binary* version), or let tfds / the download
fetch it on a machine with internet.

COMMAND:
  python launch.py --experiment=madry_cifar10 --data_dir=/path/to/cifar_parent

RUNTIME: hours on one modern GPU; not meant for a CPU (`--smoke` shrinks it
to a sub-minute CPU run on any CIFAR-shaped files).

EXPECTED (evaluation.md): about 80-84% clean and 43-49% under AutoAttack at
eps 8/255. Not yet measured with this code: no CIFAR-10 data and no
accelerator were available where it was written.
"""

import ml_collections

from geomrobust.config import default_config
from geomrobust.evaluation import profiles

EPS = 8 / 255


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.dataset = 'cifar10'
  c.model = ml_collections.ConfigDict(dict(name='resnet18', width=64, blocks=2, preact=False, weight_init='he'))
  c.method = ml_collections.ConfigDict(dict(
      name='pgd_at', eps=EPS, step_size=2 / 255, steps=10, random_start=True, attack='pgd', norm='linf'))
  c.train.epochs = 100
  c.train.batch_size = 128
  c.train.optimizer = 'sgd'
  c.train.lr = 0.1
  c.train.momentum = 0.9
  c.train.weight_decay = 5e-4
  c.train.lr_milestones = (50, 75)
  c.train.lr_decay = 0.1
  c.train.augment = 'crop_flip'
  c.train.checkpoint_every = 5
  profiles.apply_profile(c.eval, 'cifar10_linf')
  c.eval.num_examples = 0
  c.eval.batch_size = 500
  c.eval.eps = (2 / 255, 4 / 255, EPS)
  # Smoke: a narrow ResNet-10, a 2-step training attack and one PGD and one APGD
  # attack (the other losses run in the MNIST smokes) keep the path, not the cost.
  c.smoke = ('model.width=4', 'model.blocks=1', 'method.steps=2', 'data.verify=false', 'eval.attacks=pgd,apgd_dlr')
  return c
