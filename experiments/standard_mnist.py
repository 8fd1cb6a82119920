"""Plain cross-entropy on MNIST with the small CNN: the undefended baseline.

The reference point every defence is compared with: the same CNN as
`madry_mnist` and `trades_mnist` (conv16-conv32 5x5 with 2x2 max-pool,
fc256, ReLU: Madry et al.'s MNIST network at half its width, sized for a
CPU), trained with plain cross-entropy, judged by the shared strong
evaluation (profile mnist_linf: FGSM, sign noise, PGD-CE and PGD-margin 100
steps x 5 restarts, APGD-CE, APGD-DLR, APGD-T, Square, per-example worst case,
sanity checks)
at eps 0.1, 0.2, 0.3 on the first `eval.num_examples` test images.

COMMAND:
  python launch.py --experiment=standard_mnist --data_dir=../shared/data

RUNTIME: 10 min 35 s measured on a 2-core CPU (README has the numbers).  Measured before APGD-T and Square joined the default
profile: they add to the evaluation of every example the other attacks leave
robust (madry_mnist: 424 s -> 1,447 s; README, "Evaluation strength").
`--setting=full` is Madry et al.'s network (conv32-conv64-fc1024) evaluated
on the whole test set, for an accelerator.

EXPECTED: about 99% clean; an undefended network falls to ~0% at eps 0.3
(evaluation.md), and most of the way already at 0.1-0.2.
"""

import ml_collections

from geomrobust.config import default_config
from geomrobust.evaluation import profiles

# Madry et al.'s MNIST CNN; the CPU default halves its width (see docstring).
FULL_MODEL = ('model.channels=32,64', 'model.dense=1024')


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.dataset = 'mnist'
  c.model = ml_collections.ConfigDict(dict(
      name='cnn', channels=(16, 32), convs_per_block=1, kernel_size=5, dense=(256,), activation='relu',
      weight_init='lecun'))
  c.method = ml_collections.ConfigDict(dict(name='standard'))
  c.train.epochs = 5
  c.train.batch_size = 100
  c.train.optimizer = 'adam'
  c.train.lr = 1e-3
  profiles.apply_profile(c.eval, 'mnist_linf')
  c.eval.num_examples = 500    # the strong profile costs ~1,200 CNN gradients per example and eps on a CPU
  c.eval.batch_size = 100     # 50 per CPU device: the attacks run fastest at this size (geomrobust.bench)
  c.eval.eps = (0.1, 0.2, 0.3)
  c.settings = ml_collections.ConfigDict({'full': FULL_MODEL + ('eval.num_examples=0', 'train.epochs=10')})
  return c
