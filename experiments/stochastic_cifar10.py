"""Stochastic neurons on CIFAR-10: VOneResNet-18 vs ResNet-18 vs PGD-AT ResNet-18 (for accelerators).

papers/stochastic.md. Three networks, the TRADES/ASCL code bases' ResNet-18
(BatchNorm) trained with SGD 0.1 (momentum 0.9, weight decay 5e-4, batch
128, lr /10 at epochs 50 and 75 of 100, crop + flip):

  resnet18       plain cross-entropy.
  pgd_at         PGD adversarial training, eps 8/255, 10 steps of 2/255.
  vone_resnet18  the fixed VOne Gabor bank (32 simple + 32 complex cells,
                 7x7, stride 1, k_exc 25, each filter on one colour channel)
                 and Poisson-like noise replace the stem; a 1x1 conv to 64
                 channels, then ResNet-18's stages; cross-entropy. Noise on
                 at training, attack and test time.

Evaluation (profile cifar10_linf: PGD-CE / PGD-margin 50 x 2, APGD-CE,
APGD-DLR, FGSM, noise; per-example worst case, sanity checks) at eps 1/255,
2/255, 4/255, 8/255 on the whole test set; the stochastic network with EOT
(8 draws) over 5 passes and its checks (frozen noise, 2x EOT and steps).
Geometry (the paper's demo: eps 1/255, 16 steps): `python launch.py
--analyze=<workdir> --config.geometry.eps=0,0.00392`.

CIFAR-10 has no offline copy here: point --data_dir at a folder holding
cifar-10-batches-bin/ (the binary version).

COMMAND:
  python launch.py --experiment=stochastic_cifar10 --data_dir=/path/to/cifar_parent

RUNTIME: hours on one modern GPU; not meant for a CPU (`--smoke` shrinks
it to a short CPU run on generated CIFAR-shaped files, the only way it has
been run here).

EXPECTED (paper, VOneResNet-18 on CIFAR-10): lower clean accuracy than
ResNet-18 and clearly higher robust accuracy at small eps (1/255 - 2/255)
under EOT attacks; PGD-AT the most robust at 8/255. Not yet measured with
this code: no CIFAR-10 data and no accelerator were available where it was written.
"""

import ml_collections

from geomrobust.config import load_experiment

_RESNET = dict(name='resnet18', width=64, blocks=2, preact=False, weight_init='he')
_VONE = dict(name='vone_resnet18', front_end='vone', noise='poisson', noise_scale=1.0, front_channels=64, front_kernel=7,
             front_stride=1, k_exc=25.0, gabor_seed=0, sf_min=0.1, sf_max=0.3, frozen_noise=False, width=64, blocks=2,
             preact=False, weight_init='he')


def get_config() -> ml_collections.ConfigDict:
  c = load_experiment('madry_cifar10')   # data, optimiser, schedule, augmentation, evaluation
  c.model = ml_collections.ConfigDict(_VONE)
  c.method = ml_collections.ConfigDict(dict(name='standard'))
  c.eval.eps = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
  c.eval.eot_samples = 8
  c.eval.passes = 5
  c.members = (
      f'resnet18: model={_RESNET!r}',
      f'pgd_at: model={_RESNET!r}; method={{"name": "pgd_at", "eps": {8 / 255}, "step_size": {2 / 255}, '
      f'"steps": 10, "random_start": True, "attack": "pgd", "norm": "linf", "eps_warmup_steps": 0}}',
      f'vone_resnet18: model={_VONE!r}',
  )
  # Smoke: the VOneResNet alone (PGD-AT ResNet-18 is madry_cifar10's smoke; the stochastic
  # evaluation and its checks are stochastic_mnist's), narrow, one attack.
  c.smoke = ('only=vone_resnet18', 'model.width=4', 'model.blocks=1', 'model.front_channels=8', 'data.verify=false',
             'eval.attacks=pgd', 'eval.eps=0.0313725', 'eval.sanity=false')
  return c
