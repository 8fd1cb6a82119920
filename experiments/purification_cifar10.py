"""Feature purification on CIFAR-10: ResNet-18 clean training, then PGD adversarial fine-tuning from the clean weights.

papers/feature_purification.md ("For accelerators"). One run per member,
two phases (``methods/purification.py``): 100 epochs of clean SGD (lr 0.1,
momentum 0.9, weight decay 5e-4, /10 at epochs 50 and 75, crop + flip), then
20 epochs of PGD-AT fine-tuning (L-inf 8/255, 10 steps of 2/255, random
start; lr 0.01) of the update Delta = W_adv - W_clean, with the clean
weights and the initialisation kept in the parameters. Members:

  clean         the clean phase only.
  at            clean, then full adversarial fine-tuning.
  rank_1, rank_4, rank_16   the fine-tuning restricted to a rank-r update of
                every conv / dense kernel (on its [h*w*c_in, c_out] reshape).

The probe `purification` decomposes every kernel's neurons (output channels)
as w = beta w' + v (median rho, fraction rho < 1, cosines to the init) and
gives the singular energy of each layer's update; the shared evaluation is
the cifar10_linf profile at 2/255, 4/255, 8/255 on the whole test set.
Weight decay in the fine-tuning phase acts on Delta (it pulls towards the
clean weights, not towards 0).

COMMAND:
  python launch.py --experiment=purification_cifar10 --data_dir=DIR_WITH_cifar10

RUNTIME: hours per member on one modern GPU; not meant for a CPU (`--smoke`
runs the path on generated CIFAR-shaped files).

EXPECTED (paper): most channels with rho < 1, clean and adversarial kernels
far from the initialisation; a low-rank update recovering much of the
full fine-tuning's robustness.
"""

import ml_collections

from geomrobust.config import default_config
from geomrobust.evaluation import profiles

EPS = 8 / 255
SPE = 50000 // 128   # steps per epoch at batch 128


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.dataset = 'cifar10'
  c.model = ml_collections.ConfigDict(dict(name='resnet18', width=64, blocks=2, preact=False, weight_init='he'))
  c.method = ml_collections.ConfigDict(dict(
      name='purification', recipe='clean_then_adversarial', clean_steps=100 * SPE, adv_steps=20 * SPE,
      clean_lr=0.1, adv_lr=0.01, attack='pgd', norm='linf', tau=EPS, pgd_steps=10, rank=0, linearize=False,
      ideal=False))
  c.train.update(dict(batch_size=128, optimizer='sgd', lr=0.1, momentum=0.9, weight_decay=5e-4,
                      lr_milestones=(50, 75), lr_decay=0.1, augment='crop_flip', steps_per_log=SPE,
                      checkpoint_every=5))
  profiles.apply_profile(c.eval, 'cifar10_linf')
  c.eval.update(dict(num_examples=0, batch_size=500, eps=(2 / 255, 4 / 255, EPS)))
  c.members = ('clean: method.recipe=clean', 'at: method.rank=0',
               *(f'rank_{r}: method.rank={r}' for r in (1, 4, 16)))
  c.probes = ml_collections.ConfigDict({'purification': {'clean_member': 'clean', 'at_member': 'at',
                                                          'ideal_member': ''}})
  c.smoke = ('only=rank_4', 'model.width=4', 'model.blocks=1', 'method.clean_steps=4', 'method.adv_steps=4',
             'method.pgd_steps=2', 'train.steps_per_log=2', 'data.verify=false', 'eval.attacks=pgd', 'eval.sanity=false')
  return c
