"""All five methods on MNIST: one evaluation, one table, one command.

Every member is another experiment's default model, taken by name
(``experiment=NAME`` in its spec, ``geomrobust.config.member_configs``) with
the overrides that put it on a shared architecture and budget; the family
gives every member the same data, the same evaluation and the same probes
(``config.shared``):

  shared MLP 784-1000-10 (half-tanh, no bias: the Fermi-Bose network)
    ce_mlp             plain cross-entropy (standard_mnist's objective)
    isometric          isometric_mnist/beta_1e-1 (beta 0.1, K 1)
    local_contrastive  local_contrastive_mnist (d_F 0.5, then the readout),
                       on the full training set; local learning trains MLPs only
    pgd_at_mlp         madry_mnist's PGD-AT (the adversarial reference for the MLPs)
    purification       clean training, then PGD adversarial training from the
                       clean weights (methods/purification.py), with the
                       (beta, v, rho) decomposition of every weight matrix
  shared CNN conv16-conv32 (5x5) - fc256 (standard_mnist's)
    ce_cnn             standard_mnist (the reference)
    pgd_at             madry_mnist
    trades             trades_mnist
    ascl               ascl_mnist/ascl_leaking
  its own network
    stochastic         stochastic_mnist/vone: the fixed Gabor VOne front end with
                       Poisson-like noise, then the CNN's conv32 - fc256; noise on
                       at test time, so it is attacked with EOT over 8 draws and
                       judged over 5 passes (it never cascades); on the
                       first 50 of the test images (the full setting: all)

The evaluation: profile mnist_linf without APGD-T and Square on a CPU (FGSM,
sign noise, PGD-CE and PGD-margin 100 steps x 5 restarts, APGD-CE, APGD-DLR:
what the measured RUNTIME and tables used; the two take a robust member's
evaluation to about 3.4x), all of it with --setting=full; worst case per example; sanity
checks) at eps 0.1, 0.2, 0.3 on the first ``eval.num_examples`` test images.
The probes: isometry, boson / fermion pair distances, MFTMA of class and
exemplar manifolds at the last hidden layer (clean and eps 0.1), the
latent-space study. ``report.md`` opens with the ranking and each paper's
claim tested on the table (``comparison.claims``).

COMMAND:
  python launch.py --experiment=compare_mnist --data_dir=../shared/data

RUNTIME: 76 min 22 s wall on an otherwise idle 2-core CPU (2026-12-06), every
sanity check passing; the stochastic member's EOT evaluation and probes 31 min,
each adversarially trained CNN 8-10 min. Per member: README, "The comparison".

EXPECTED (the papers): every method above plain CE at small eps; isometric
and local contrastive learning at no clean cost; stochastic neurons above the
CNN at small eps but below PGD-AT at large eps; ASCL and TRADES at or above
PGD-AT; purification as robust as AT from scratch. What the run measured, and
which claims held: README, "The comparison".

Variants:
  --config.only=ce_cnn,pgd_at,stochastic     a subset
  --reuse=runs/madry_mnist,runs/ascl_mnist   reuse finished runs with identical training configs
  --setting=full                             longer training, the whole test set (an accelerator)
  --experiment=compare_fashion_mnist         the same comparison on Fashion-MNIST
"""

import ml_collections

from geomrobust.config import load_experiment
from geomrobust.evaluation import profiles

MLP = dict(name='mlp', hidden=(1000,), activation='half_tanh', weight_init='normal_fan_in', use_bias=False)


def members(train_eps: float = 0.3, *, full: bool = False) -> tuple[str, ...]:
  """The member specs; ``train_eps``: the training attack's eps of the
  adversarial members; ``full``: the longer, accelerator budget."""
  mlp = f'model={MLP!r}'
  ep = (lambda cpu, acc: f'train.epochs={acc if full else cpu}')
  warm = f'method.eps_warmup_steps={0 if full else 600}'
  at = f'method.eps={train_eps}; {warm}'
  steps = 40 if full else 10
  purification = dict(name='purification', recipe='clean_then_adversarial', clean_steps=6000 if full else 3000,
                      adv_steps=6000 if full else 2400, clean_lr=0.0, adv_lr=0.0, attack='pgd', norm='linf',
                      tau=train_eps, pgd_steps=steps, rank=0, linearize=False, ideal=False,
                      tau_warmup_steps=0 if full else 600)
  return (
      f'ce_mlp: experiment=standard_mnist; {mlp}; {ep(10, 20)}',
      f'isometric: experiment=isometric_mnist/beta_1e-1; {mlp}; {ep(10, 20)}',
      f'local_contrastive: experiment=local_contrastive_mnist; {ep(10, 100)}; '
      f'method.readout_epochs={100 if full else 10}; train.checkpoint_every=5',
      f'pgd_at_mlp: experiment=madry_mnist; {mlp}; {at}; method.steps={steps}; {ep(4, 20)}',
      f'purification: experiment=madry_mnist; {mlp}; method={purification!r}; probes.purification={{}}',
      f'ce_cnn: experiment=standard_mnist; {ep(3, 10)}',
      f'pgd_at: experiment=madry_mnist; {at}; method.steps={steps}; {ep(2, 84)}',
      f'trades: experiment=trades_mnist; {at}; method.steps={steps}; {ep(2, 100)}',
      f'ascl: experiment=ascl_mnist/ascl_leaking; {at}; method.steps={steps}; {ep(2, 100)}',
      # EOT makes every attack step 8 gradients (its sanity checks twice that): on a CPU the
      # stochastic member is judged on the first 50 of the shared test images (its standard errors say so).
      f'stochastic: experiment=stochastic_mnist/vone; {ep(2, 10)}' + ('' if full else '; eval.num_examples=50'),
  )


def claims(small: float, large: float) -> tuple[str, ...]:
  """Each paper's claim as a test on the table, ``'text | member OP member |
  metric'`` (``geomrobust/comparison.py``: robust@EPS, clean, or a geometry
  key; OP >, < or ~), at a ``small`` and the ``large`` eps of the grid."""
  lo, hi = f'robust@{small:g}', f'robust@{large:g}'
  return (
      f'Isometric regularisation is more robust than plain CE on the same MLP | isometric > ce_mlp | {lo}',
      'Isometric regularisation costs no clean accuracy against CE | isometric ~ ce_mlp | clean',
      f'Local contrastive (Fermi-Bose) learning is more robust than backprop CE on the same MLP '
      f'| local_contrastive > ce_mlp | {lo}',
      f'Stochastic neurons (VOne + noise) are more robust than the plain CNN | stochastic > ce_cnn | {lo}',
      f'PGD-AT stays more robust than stochastic neurons at the largest eps | pgd_at > stochastic | {hi}',
      f'ASCL is more robust than PGD-AT at equal budget | ascl > pgd_at | {hi}',
      f'TRADES is more robust than PGD-AT at equal budget | trades > pgd_at | {hi}',
      f'Adversarial training from the clean weights (purification) is as robust as AT from scratch on the MLP '
      f'| purification ~ pgd_at_mlp | {hi}',
      f'Adversarial training keeps the perturbation (exemplar) manifolds narrow at the last hidden layer '
      f'| pgd_at < ce_cnn | exemplar_radius_eps{small:g}',
      'Stochastic neurons enlarge the manifolds of clean inputs at the last hidden layer '
      '| stochastic > ce_cnn | class_radius_eps0',
  )


# The geometry columns of the report's table (results.json keeps every number).
GEOMETRY = ('iso_correlation', 'iso_stress', 'boson_distance', 'fermion_distance', 'class_capacity_eps0',
            'class_capacity_eps0.1', 'class_radius_eps0', 'class_radius_eps0.1', 'class_dimension_eps0',
            'class_dimension_eps0.1', 'exemplar_capacity_eps0.1', 'exemplar_radius_eps0.1',
            'exemplar_dimension_eps0.1', 'latent_ratio_clean', 'latent_ratio_adv_eps0.3', 'median_rho_hidden_0',
            'median_beta_hidden_0', 'update_top4_hidden_0')


# The comparison on a CPU: mnist_linf before APGD-T and Square joined it. The full setting: all of it.
CPU_ATTACKS = ('fgsm', 'noise', 'pgd', 'pgd_margin', 'apgd_ce', 'apgd_dlr')
FULL_ATTACKS = 'eval.attacks=' + ','.join(profiles.PROFILES['mnist_linf']['attacks'])


def get_config() -> ml_collections.ConfigDict:
  c = load_experiment('standard_mnist')   # the data and the shared evaluation (mnist_linf)
  c.method = ml_collections.ConfigDict(dict(name='standard'))
  c.eval.num_examples = 200
  c.eval.batch_size = 100
  c.eval.eps = (0.1, 0.2, 0.3)
  c.eval.eot_samples = 8
  c.eval.passes = 5
  # The CPU default keeps the attacks its RUNTIME and the README's tables were measured with:
  # APGD-T and Square (in mnist_linf since) take a robust member's evaluation to ~3.4x
  # (README, "Evaluation strength"); --setting=full runs them.
  c.eval.attacks = CPU_ATTACKS
  c.probes = ml_collections.ConfigDict({
      'isometry': {'examples': 1000, 'scale_key': 'method.k'},
      'pair_distances': {'examples': 1000},
      'manifold_geometry': {'eps': (0.0, 0.1), 'layers': (-2,), 'projection_seeds': 1},
      'latent': {},
  })
  c.shared = ('dataset', 'data', 'eval', 'probes', 'parallel', 'seed')
  c.members = members(0.3)
  c.comparison = ml_collections.ConfigDict(dict(reference='ce_cnn', claims=claims(0.1, 0.3), geometry=GEOMETRY))
  c.settings = ml_collections.ConfigDict({
      'full': (f'members={members(0.3, full=True)!r}', 'eval.num_examples=0', 'eval.batch_size=500',
               'probes.manifold_geometry.projection_seeds=5', FULL_ATTACKS),
  })
  # Two members of the shared MLP run the whole comparison path (--config.only= runs all ten).
  c.smoke = ('only=ce_mlp,isometric', 'train.epochs=2', 'method.readout_epochs=2', 'method.clean_steps=40', 'method.adv_steps=40',
             'probes.isometry.examples=64', 'probes.pair_distances.examples=64',
             "probes.manifold_geometry={'eps': (0.0, 0.1), 'layers': (-2,), 'projection_seeds': 1, 'classes': 4, "
             "'per_class': 4, 'exemplars': 4, 'repeats': 4, 'n_t': 20}")
  return c
