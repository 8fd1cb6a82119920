"""Stochastic neurons in audition: spoken digits, standard vs stochastic vs PGD-AT, attacked in the waveform.

papers/stochastic.md, "Auditory domain". The Free Spoken Digit Dataset
(8 kHz, 6 speakers; recordings 0-4 of each speaker and digit are the 300
test examples, the other 2,700 train), each recording cropped or padded to
1 s and scaled to peak 0.5. One network (models/audio.py): a fixed log-mel
front end in JAX (32 ms frames, 10 ms hop, 40 mel bands, log(1 + mel /
1e-4)), the noise layer on its output, ReLU, conv16-conv32 (3x3, pool)
and fc128:

  standard   no noise; cross-entropy.
  stochastic Poisson-like noise (s 0.35, l 0.07) on the front end's output,
             on at training, attack and test time; cross-entropy.
  pgd_at     no noise; PGD adversarial training at eps 0.005 (-40 dB).

Attacks act on the waveform (valid box [-1, 1]), L-inf, eps 0.0005,
0.0016, 0.005 (-60, -50, -40 dB relative to the 0.5 peak; results rows
carry `eps_db`): the paper's PGD (64 steps of eps/4, CE) and APGD-DLR (50
steps), FGSM and noise, per-example worst case, on the first 100 test
recordings (10 per digit); the stochastic network with EOT (8 draws) over 5
passes, and its sanity checks.

Geometry, per member (the MNIST default eps grid is far too large for
waveforms; the family's report.md then compares the members):
  python launch.py --analyze=<workdir>/stochastic --data_dir=../shared/data \
      --config.geometry.eps=0,0.0016 --config.geometry.projection_seeds=2 \
      --config.geometry.per_class=30    # the test split has 30 recordings per digit

COMMAND:
  python launch.py --experiment=stochastic_spoken_digit --data_dir=../shared/data

RUNTIME: about 100 min on a 2-core CPU shared with other jobs (the members'
timings: PGD-AT training 37 min, the stochastic network's EOT evaluation
54 min, 39 of them its sanity checks; the standard network 5 min).

EXPECTED (paper): the same pattern as in vision: the stochastic network is
more robust than the standard one at small eps, at some cost in clean accuracy.
"""

import ml_collections

from geomrobust.config import default_config
from geomrobust.evaluation import profiles

EPS = (0.0005, 0.0016, 0.005)


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.dataset = 'spoken_digit'
  c.model = ml_collections.ConfigDict(dict(
      name='audio_cnn', rate=8000, frame=256, hop=80, n_mels=40, fmin=20.0, fmax=4000.0, ref_power=1e-4, gain=1.0,
      noise='none', noise_scale=1.0, frozen_noise=False, channels=(16, 32), kernel_size=3, dense=(128,),
      weight_init='lecun'))
  c.method = ml_collections.ConfigDict(dict(name='standard'))
  c.train.epochs = 15
  c.train.batch_size = 50
  c.train.optimizer = 'adam'
  c.train.lr = 1e-3
  profiles.apply_profile(c.eval, 'mnist_linf')
  c.eval.num_examples = 100
  c.eval.batch_size = 100
  c.eval.eps = EPS
  c.eval.attacks = ('pgd', 'apgd_dlr')
  c.eval.pgd_steps = 64
  c.eval.pgd_restarts = 1
  c.eval.pgd_step_size = 16.0    # eps / 4 per step
  c.eval.apgd_steps = 50
  c.eval.eot_samples = 8
  c.eval.passes = 5
  c.members = (
      'standard: model.noise=none',
      'stochastic: model.noise=poisson',
      f'pgd_at: model.noise=none; method={{"name": "pgd_at", "eps": {EPS[-1]}, "step_size": 0.0, "steps": 10, '
      f'"random_start": True, "attack": "pgd", "norm": "linf", "eps_warmup_steps": 0}}',
  )
  c.settings = ml_collections.ConfigDict({'full': ('train.epochs=30', 'eval.num_examples=300')})
  # Smoke: the stochastic network and PGD-AT on waveforms (2 attack steps); the stochastic checks run in
  # stochastic_mnist's.
  c.smoke = ('only=stochastic,pgd_at', 'model.channels=4,8', 'model.dense=16', 'eval.eps=0.005', 'method.steps=2',
             'eval.attacks=pgd', 'eval.sanity=false')
  return c
