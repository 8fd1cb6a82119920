"""Stochastic neurons on MNIST: standard vs PGD-AT vs VOne + noise vs conv + noise, and the noise-level sweep.

papers/stochastic.md. Four networks share one back end (conv32 5x5 - pool -
fc256) after a first block of 16 channels, 7x7, then a 2x2 max-pool:

  standard     learned conv, ReLU; cross-entropy.
  pgd_at       the same network, PGD adversarial training at eps 0.3
               (10 steps, eps warm-up, as madry_mnist).
  vone         the fixed Gabor VOne bank (8 simple + 8 complex cells,
               k_exc 25), then Poisson-like noise (s 0.35, l 0.07), ReLU;
               cross-entropy. Noise on at training, attack and test time.
  conv_noise   the ablation: a learned first conv, then the same noise.

All four get the shared evaluation; the stochastic ones with EOT (8 draws
per gradient) and 5 evaluation passes (mean ± std and majority vote), and
the stochastic sanity checks (frozen noise, 2x EOT draws and steps). The
attacks are the paper's PGD (64 steps of eps/4, CE) plus APGD-DLR (100
steps), FGSM and noise, per-example worst case, at eps 0.05, 0.1, 0.2, 0.3
on the first 100 test images (EOT makes every attack step 8 gradients).

The noise-level sweep (`sweep`, into <workdir>/noise_sweep): the vone
network at noise_scale 0, 0.5, 1, 2 (the noise's std multiplied by it) x 2
seeds, trained as one vmapped program, each screened by the `quick` profile
(EOT) at eps 0.1 on the first 100 test images; the top results.json's `noise_sweep` table and the
report's tradeoff plot give clean vs robust accuracy per noise level.

Geometry (class and exemplar manifolds, per layer incl. the noise layer's
pre-ReLU output, clean vs adversarial), per member after training; the
family's report.md then compares the members (`geometry_comparison.png`):
  python launch.py --analyze=<workdir>/vone --data_dir=../shared/data \
      --config.geometry.eps=0,0.1 --config.geometry.projection_seeds=2
(likewise standard, pgd_at, conv_noise; 3-14 min each on 2 cores; the
default 5 eps x 5 projections costs about 5x that).

COMMAND:
  python launch.py --experiment=stochastic_mnist --data_dir=../shared/data

RUNTIME: 82 min wall on a 2-core CPU shared with other jobs (all four
networks, the sweep and every evaluation).

EXPECTED (paper): noise raises robust accuracy well above the standard
network's at small eps and costs some clean accuracy (more noise: more of
both); PGD-AT stays the most robust at large eps. At the noise layer the
manifolds' radius and dimension go up and the center correlation goes down.

Variants:
  --config.only=standard,vone                 two of the networks (the sweep still runs)
  --config.sweep.grid=0,0.5,1 --config.sweep.seeds=1   a smaller sweep
  --setting=full                              the whole training and test sets, more epochs
"""

import ml_collections

from geomrobust.config import load_experiment

# The four first blocks (the back end is the same for all).
_CONV = 'model.front_end=conv; model.noise=none'


def get_config() -> ml_collections.ConfigDict:
  c = load_experiment('standard_mnist')
  c.model = ml_collections.ConfigDict(dict(
      name='vone_cnn', front_end='vone', noise='poisson', noise_scale=1.0, front_channels=16, front_kernel=7,
      front_stride=1, k_exc=25.0, gabor_seed=0, sf_min=0.1, sf_max=0.3, frozen_noise=False, channels=(32,),
      kernel_size=5, dense=(256,), weight_init='lecun'))
  c.method = ml_collections.ConfigDict(dict(name='standard'))
  c.data.train_examples = 20000
  c.train.epochs = 4
  c.eval.num_examples = 100      # EOT attacks cost 8 gradients a step: ~10 min per stochastic model on 2 cores
  c.eval.batch_size = 100
  c.eval.eps = (0.05, 0.1, 0.2, 0.3)
  c.eval.attacks = ('pgd', 'apgd_dlr')
  c.eval.pgd_steps = 64
  c.eval.pgd_restarts = 1
  c.eval.pgd_step_size = 16.0     # step = 16 eps / 64 = eps / 4, the paper's
  c.eval.eot_samples = 8
  c.eval.passes = 5
  c.members = (
      f'standard: {_CONV}',
      f'pgd_at: {_CONV}; method={{"name": "pgd_at", "eps": 0.3, "step_size": 0.0, "steps": 10, '
      f'"random_start": True, "attack": "pgd", "norm": "linf", "eps_warmup_steps": 400}}',
      'vone: model.front_end=vone; model.noise=poisson',
      'conv_noise: model.front_end=conv; model.noise=poisson',
  )
  c.sweep = ml_collections.ConfigDict(dict(
      member='vone', name='noise_sweep', hparam='model.noise_scale', grid=(0.0, 0.5, 1.0, 2.0), seeds=2,
      stacked=True, chunk_size=0, baseline='', mean_last_epochs=1, screen_profile='quick', screen_examples=100,
      pgd_eps=0.1, strong=(), strong_seeds=1))
  c.probes = ml_collections.ConfigDict()
  c.settings = ml_collections.ConfigDict({
      'full': ('data.train_examples=0', 'train.epochs=10', 'eval.num_examples=1000', 'sweep.seeds=3',
               'sweep.screen_examples=1000'),
  })
  # Smoke: the stochastic member and its noise sweep (PGD-AT's path runs in
  # madry_mnist's and stochastic_spoken_digit's smokes).
  c.smoke = ('only=vone', 'model.front_channels=8', 'model.channels=8', 'model.dense=32', 'sweep.grid=0,1',
             'sweep.seeds=1', 'sweep.screen_examples=32', 'sweep.mean_last_epochs=1', 'eval.eps=0.1',
             'eval.attacks=pgd')
  return c
