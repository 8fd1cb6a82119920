"""The comparison of compare_mnist on Fashion-MNIST, which none of the five papers used.

Same ten members, same architectures, same budget and the same shared
evaluation and probes as ``compare_mnist`` (see its docstring), on
Fashion-MNIST. Clothing is much less robust than digits at equal L-inf eps,
so the eps grid is 0.05, 0.1, 0.2 and the adversarially trained members
(PGD-AT, TRADES, ASCL, purification) train at eps 0.1 (the common choice for
this dataset); the claims are tested at eps 0.05 and 0.2.

COMMAND:
  python launch.py --experiment=compare_fashion_mnist --data_dir=../shared/data

RUNTIME: 67 min 21 s wall on a 2-core CPU (2026-12-06; the test suite ran beside
it at nice 19), every sanity check passing. Per member: README, "The comparison".

EXPECTED: no paper measured this; the same claims as compare_mnist, tested at
eps 0.05 and 0.2 (README, "The comparison").
"""

import ml_collections

from geomrobust.config import load_experiment, load_experiment_module

TRAIN_EPS = 0.1


def get_config() -> ml_collections.ConfigDict:
  mnist = load_experiment_module('compare_mnist')
  c = load_experiment('compare_mnist')
  c.dataset = 'fashion_mnist'
  c.eval.eps = (0.05, 0.1, 0.2)
  c.members = mnist.members(TRAIN_EPS)
  c.comparison.claims = mnist.claims(0.05, 0.2)
  c.probes.manifold_geometry.eps = (0.0, 0.05)
  c.comparison.geometry = tuple(k.replace('eps0.1', 'eps0.05').replace('eps0.3', 'eps0.2')
                                for k in mnist.GEOMETRY)
  c.settings = ml_collections.ConfigDict({
      'full': (f'members={mnist.members(TRAIN_EPS, full=True)!r}', 'eval.num_examples=0', 'eval.batch_size=500',
               'probes.manifold_geometry.projection_seeds=5', mnist.FULL_ATTACKS),
  })
  return c
