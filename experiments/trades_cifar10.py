"""TRADES (Zhang et al. 2019) on CIFAR-10 with ResNet-18 at eps = 8/255 (for accelerators).

The TRADES paper's CIFAR recipe on the ResNet-18 of the TRADES / ASCL code
bases: beta = 6, the KL attack 10 steps of 0.007 from x + 0.001 N(0, I),
SGD 0.1 momentum 0.9, weight decay 2e-4, batch 128, 100 epochs with the
learning rate /10 at epochs 75 and 90, random crop + flip. Evaluated by the
shared strong profile cifar10_linf at eps 2/255, 4/255, 8/255 on the whole
test set.

CIFAR-10 has no offline copy here: point --data_dir at a folder holding
cifar-10-batches-bin/ (the *binary* version), or let tfds / the download
fetch it on a machine with internet.

COMMAND:
  python launch.py --experiment=trades_cifar10 --data_dir=/path/to/cifar_parent

RUNTIME: hours on one modern GPU; not meant for a CPU (`--smoke` shrinks it
to a sub-minute CPU run on any CIFAR-shaped files).

EXPECTED: ResNet-18 TRADES is commonly reported at about 81-82% clean and
about 49% under AutoAttack at eps 8/255. Not yet measured with this code: no
CIFAR-10 data and no accelerator were available where it was written.
"""

import ml_collections

from geomrobust.config import load_experiment


def get_config() -> ml_collections.ConfigDict:
  c = load_experiment('madry_cifar10')  # the same ResNet-18, data, augmentation and evaluation
  c.method = ml_collections.ConfigDict(dict(name='trades', beta=6.0, eps=8 / 255, step_size=0.007, steps=10,
                                            norm='linf'))
  c.train.weight_decay = 2e-4
  c.train.lr_milestones = (75, 90)
  return c
