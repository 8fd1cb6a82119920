"""Feature purification on the sparse-coding task (d = 256, k = 8): one family, one table.

papers/feature_purification.md. Data: x = M z with M a random orthogonal
256 x 256 dictionary, z a 8-sparse +-1 code on average, y = sign(<w*, z>)
for a dense Gaussian w*; fresh batches are drawn on the device inside the
compiled steps, and every member is judged on the same fixed test set.

Members (same data, same optimiser: SGD lr 1, batch 256, no momentum):

  ideal         f*: the symmetric network with neurons = the atoms of M and
                output weights w* (nothing trained).
  clean_nn      the symmetric two-layer ReLU network (m = 2d, init N(0, 0.01^2),
                threshold 0.5 ||w_i||), 4000 clean steps.
  at_nn         the same 4000 clean steps, then 4000 steps of FGM adversarial
                training (L2, tau 0.3) from the clean weights: one run, two phases.
  at_linf       the same with L-inf FGM at tau / sqrt(d) (the same L2 length).
  at_pgd        the same with 10-step PGD instead of FGM.
  at_scratch    8000 steps of FGM adversarial training from the initialisation.
  rank_1 .. rank_16   at_nn with the update restricted to rank r (W = W_clean + A B^T).
  linear_robust logistic regression, 8000 steps of the exact robust loss at tau 0.1.
  poly2_at      degree-2 polynomial, 8000 steps of FGM training at tau 0.1.
  ntk_clean     the network's linearisation at its init, 4000 clean steps.
  ntk_at        the same, then 4000 FGM steps (tau 0.1).

The lower-bound baselines train at tau 0.1 (their best radius is near the
linear one, ~0.67 sqrt(k/d) = 0.12; at 0.3 the robust loss has no
classifier to find); the networks at 0.3.

Evaluation: the shared L2 evaluation (profile l2: FGSM, noise, PGD-CE and
PGD-margin 100 steps x 5 restarts, APGD-CE 100 steps; the DLR loss needs 3
classes) at tau 0.05 ... 0.6 on the first 500 test examples, with sanity
checks; the probe `purification` adds the spec's dense-direction attack (per
example worst case with the shared attacks), the break radius, the purity of
the first layer (init, clean, final), the principle table and the singular
energy of W_adv - W_clean. The family's results.json has the tables `models`,
`principle`, `purity`, `rank`; its report.md the plots.

COMMAND:
  python launch.py --experiment=purification_sparse

RUNTIME: 21 min wall measured on a 2-core CPU partly shared with tests: per member
15-32 s of training and 35-55 s of evaluation (README).

EXPECTED (paper): clean_nn below at_nn in robust accuracy at some tau; the
dense-mixture cosine up in clean training and down under adversarial
training, towards the ideal's; most neurons with rho < 1; linear and NTK
models near chance where at_nn holds; the update W_adv - W_clean
concentrated in few singular directions.

Variants:
  --config.only=ideal,clean_nn,at_nn              three of the members
  --config.data.sparse_coding.dim=512             a larger task (purification_scaling runs 128 ... 1024)
"""

import ml_collections

from geomrobust.config import default_config
from geomrobust.evaluation import profiles

DIM, SPARSITY = 256, 8
CLEAN, ADV = 4000, 4000
TAU = 0.3            # the networks' training radius (L2)
TAU_LOW = 0.1        # the low-complexity baselines' training radius
NETWORK = dict(name='purification', recipe='clean_then_adversarial', clean_steps=CLEAN, adv_steps=ADV, attack='fgm',
               norm='l2', tau=TAU, pgd_steps=10, rank=0, linearize=False, ideal=False)
# L2 attacks for two classes: the DLR loss is undefined below three.
BINARY_L2 = ('fgsm', 'noise', 'pgd', 'pgd_margin', 'apgd_ce')


def members(dim: int = DIM) -> tuple[str, ...]:
  """The family's member specs for input size ``dim``."""
  total = CLEAN + ADV
  return (
      'ideal: method.ideal=true',
      'clean_nn: method.recipe=clean',
      'at_nn: method.attack=fgm',
      f'at_linf: method.norm=linf; method.tau={TAU / dim ** 0.5:.6g}',
      'at_pgd: method.attack=pgd',
      'at_scratch: method.recipe=adversarial',
      *(f'rank_{r}: method.rank={r}' for r in (1, 2, 4, 16)),
      f"linear_robust: model={{'name': 'mlp', 'hidden': ()}}; method={{'name': 'robust_linear', 'tau': {TAU_LOW}, "
      f"'norm': 'l2', 'adv_steps': {total}}}",
      f"poly2_at: model={{'name': 'poly2'}}; method.recipe=adversarial; method.tau={TAU_LOW}",
      'ntk_clean: method.linearize=true; method.recipe=clean',
      f'ntk_at: method.linearize=true; method.tau={TAU_LOW}',
  )


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.dataset = 'sparse_coding'
  c.data.sparse_coding = ml_collections.ConfigDict(dict(dim=DIM, sparsity=SPARSITY, noise=0.0, seed=0,
                                                        steps_per_epoch=100, test_examples=2048, test_seed=1))
  c.model = ml_collections.ConfigDict(dict(name='symmetric_relu', width=0, init_std=0.01, threshold=0.5, smooth=0.0))
  c.method = ml_collections.ConfigDict(NETWORK)
  c.train.update(dict(optimizer='sgd', lr=1.0, momentum=0.0, batch_size=256, steps_per_log=250, eval_every=1))
  profiles.apply_profile(c.eval, 'l2')
  c.eval.update(dict(attacks=BINARY_L2, eps=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6), num_examples=500, batch_size=500))
  c.members = members()
  c.probes = ml_collections.ConfigDict({'purification': {'rank_tau': TAU}})
  c.smoke = ('only=ideal,at_nn,rank_2,linear_robust', 'eval.attacks=pgd', 'eval.sanity=false',
             'method.clean_steps=20', 'method.adv_steps=20', 'train.steps_per_log=10',
             'data.sparse_coding.dim=32', 'data.sparse_coding.test_examples=128', 'eval.num_examples=128',
             'eval.eps=0.2,0.6')
  return c
