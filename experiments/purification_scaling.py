"""Feature purification vs input size: the break radius of each model for d = 128, 256, 512, 1024.

papers/feature_purification.md ("Scaling"). The members of purification_sparse
that bound the claim, at four input sizes (k = 8 non-zeros throughout; m = 2d
neurons), named ``<model>_d<d>``:

  ideal         f* (nothing trained; the same threshold as the networks).
  clean_nn      the symmetric ReLU network, clean training only.
  at_nn         clean training, then FGM adversarial training (L2, tau 0.3).
  linear_robust logistic regression with the exact robust loss (tau 0.1).
  poly2_at      degree-2 polynomial, FGM training (tau 0.1).
  ntk_at        the network's linearisation at init, clean then FGM (tau 0.1).

Every member trains 3000 + 3000 steps (batch 256, SGD lr 1); the threshold
factor is 0.5 sqrt(256 / d) (see ``threshold``). The break
radius is where robust accuracy (the shared evaluation's worst case and the
dense-direction attack, per example) crosses 50%, interpolated on the tau
grid. The theory predicts linear and NTK radii shrinking like sqrt(k/d) while
the adversarially trained network stays near the ideal's; the family's
report.md plots them on log-log axes, its results.json has them under
``scaling``.

Evaluation: the *quick* L2 screen (FGSM, noise, PGD-CE 40 steps, APGD-CE 40
steps; DLR needs 3 classes) on the first 200 test examples: the d = 1024
networks cost ~0.1 s per attack step on a 2-core CPU, and the strong profile
over the 10-point grid would take half an hour per model. A screen can only
over-state robustness, so its radii are upper bounds; purification_sparse
gives the strong numbers at d = 256.

COMMAND:
  python launch.py --experiment=purification_scaling

RUNTIME: 47 min wall measured on a 2-core CPU partly shared with tests; the
d = 1024 networks train 4-6 min each (README).

EXPECTED (paper): the break radius of linear_robust, poly2_at and ntk_at
falls like sqrt(k/d); at_nn stays near ideal at every d.

Variants:
  --config.only=at_nn_d256,linear_robust_d256     any subset of the members
"""

import ml_collections

from geomrobust.config import default_config
from geomrobust.evaluation import profiles

DIMS = (128, 256, 512, 1024)
STEPS = 3000
TAU, TAU_LOW = 0.3, 0.1


def threshold(d: int) -> float:
  """0.5 at d = 256, scaled by sqrt(256 / d): a neuron at init fires when
  |cos(w_i, x)| > threshold / ||x|| with ||x|| ~ sqrt(k) and cos ~ N(0, 1/d),
  so this keeps the fraction firing at init (2.8 standard deviations) the
  same at every d. At 0.5 a d = 1024 network never fires at init (5.7
  standard deviations: no gradient, measured stuck at loss log 2)."""
  return 0.5 * (256 / d) ** 0.5


def _members() -> tuple[str, ...]:
  out = []
  for d in DIMS:
    size = f'data.sparse_coding.dim={d}; model.threshold={threshold(d):.6g}'
    out += [
        f'ideal_d{d}: {size}; method.ideal=true',
        f'clean_nn_d{d}: {size}; method.recipe=clean',
        f'at_nn_d{d}: {size}',
        f"linear_robust_d{d}: {size}; model={{'name': 'mlp', 'hidden': ()}}; method={{'name': 'robust_linear', "
        f"'tau': {TAU_LOW}, 'norm': 'l2', 'adv_steps': {2 * STEPS}}}",
        f"poly2_at_d{d}: {size}; model={{'name': 'poly2'}}; method.recipe=adversarial; method.tau={TAU_LOW}",
        f'ntk_at_d{d}: {size}; method.linearize=true; method.tau={TAU_LOW}',
    ]
  return tuple(out)


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.dataset = 'sparse_coding'
  c.data.sparse_coding = ml_collections.ConfigDict(dict(dim=256, sparsity=8, noise=0.0, seed=0, steps_per_epoch=100,
                                                        test_examples=2048, test_seed=1))
  c.model = ml_collections.ConfigDict(dict(name='symmetric_relu', width=0, init_std=0.01, threshold=0.5, smooth=0.0))
  c.method = ml_collections.ConfigDict(dict(
      name='purification', recipe='clean_then_adversarial', clean_steps=STEPS, adv_steps=STEPS, attack='fgm',
      norm='l2', tau=TAU, pgd_steps=10, rank=0, linearize=False, ideal=False))
  c.train.update(dict(optimizer='sgd', lr=1.0, momentum=0.0, batch_size=256, steps_per_log=500, eval_every=1))
  profiles.apply_profile(c.eval, 'quick')
  c.eval.update(dict(norm='l2', attacks=('fgsm', 'noise', 'pgd', 'apgd_ce'),
                     eps=(0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6), num_examples=200, batch_size=200))
  c.members = _members()
  c.probes = ml_collections.ConfigDict({'purification': {'clean_member': 'clean_nn_d256', 'at_member': 'at_nn_d256',
                                                          'ideal_member': 'ideal_d256'}})
  c.smoke = ('only=at_nn_d128,linear_robust_d256', 'method.clean_steps=10', 'method.adv_steps=10',
             'train.steps_per_log=10', 'data.sparse_coding.test_examples=64', 'eval.num_examples=64',
             'eval.eps=0.1,0.4', 'eval.sanity=false')
  return c
