"""Attack recipes: the names in ``eval.attacks`` resolved to attack settings.

  fgsm        one signed-gradient step of size eps (CE loss); the papers' attack.
  noise       worst of ``eval.noise_samples`` random points on the eps-sphere
              (sign noise for linf, a Gaussian direction for l2): the floor
              every gradient attack must beat.
  pgd         PGD, CE loss, ``eval.pgd_steps`` x ``eval.pgd_restarts``, step
              ``eval.pgd_step_size * eps / steps``, uniform random start.
  pgd_margin  the same with the margin loss (max other logit - true logit).
  pgd_dlr     the same with the scale-invariant DLR loss.
  apgd_ce     APGD (Croce & Hein 2020), CE loss, ``eval.apgd_steps`` x
              ``eval.apgd_restarts``: step-size free, momentum 0.75.
  apgd_dlr    APGD with the DLR loss (defeats logit-scale masking).
  apgd_t      APGD-T: APGD on the targeted DLR loss against each of the
              ``eval.apgd_targets`` most likely other classes, ``eval.apgd_steps``
              x ``eval.apgd_restarts`` per target (AutoAttack's strongest part).
  square      the Square attack (Andriushchenko et al. 2020): gradient-free
              random search, ``eval.square_queries`` forward passes per
              example, window area starting at ``eval.square_p_init`` of the
              image (L-inf; L2 on 2-D inputs). The backstop against gradient masking: it
              always runs after the gradient attacks, and the sanity check
              ``gradient_free`` counts what it breaks that they did not.
"""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A named attack with its settings resolved from the eval config.

  Hashable, so compiled attack programs can be cached per recipe.
  """

  name: str
  attack: str                       # key of attacks.ATTACKS
  options: tuple = ()               # static keyword arguments, as sorted (key, value) pairs
  steps: int = 0                    # gradient steps per restart (0: no gradient)
  restarts: int = 1                 # restarts (apgd_t: per target; noise: samples)
  step_size_factor: float | None = None  # step = factor * eps / steps (PGD only)
  queries: int = 0                  # forward passes per restart of a gradient-free search (square)

  @property
  def kwargs(self) -> dict:
    return dict(self.options)

  @property
  def iterative(self) -> bool:
    """An iterative gradient attack (PGD, APGD, APGD-T)."""
    return self.attack in ('pgd', 'apgd', 'apgd_t')

  @property
  def uses_gradient(self) -> bool:
    return self.attack not in ('noise', 'square')

  @property
  def searches(self) -> bool:
    """A gradient-free search (Square): cascades like an iterative attack."""
    return self.attack == 'square'

  @property
  def cascades(self) -> bool:
    """Runs, in a cascade, only on the examples still robust (the costly attacks)."""
    return self.iterative or self.searches

  @property
  def budget(self) -> dict:
    """What a result row adds about this attack's budget: ``targets`` (APGD-T), ``queries`` (Square)."""
    out = {}
    if 'num_targets' in self.kwargs:
      out['targets'] = int(self.kwargs['num_targets'])
    if self.queries:
      out['queries'] = int(self.queries)
    return out

  @property
  def random_baseline(self) -> bool:
    """Random noise: a fresh sample at every eps, not one attack curve."""
    return self.attack == 'noise'

  def replace(self, name: str | None = None, **changes) -> 'Recipe':
    """A variant with other steps / restarts / options (``options`` given as a dict)."""
    opts = dict(self.options)
    opts.update(changes.pop('options', {}))
    for key in ('steps', 'restarts'):
      if key in changes and key in opts:
        opts[key] = changes[key]
    return dataclasses.replace(self, name=name or self.name, options=tuple(sorted(opts.items())), **changes)


def _recipe(name: str, attack: str, steps: int, restarts: int, factor: float | None, options: dict,
            queries: int = 0) -> Recipe:
  return Recipe(name, attack, tuple(sorted(options.items())), steps, restarts, factor, queries)


def available(ev: ml_collections.ConfigDict) -> dict[str, Recipe]:
  """Every recipe name with the settings ``ev`` gives it (norm and EOT not yet set)."""
  steps, restarts, factor = int(ev.pgd_steps), int(ev.pgd_restarts), float(ev.pgd_step_size)
  a_steps, a_restarts = int(ev.apgd_steps), int(ev.apgd_restarts)
  samples = max(int(ev.noise_samples), 1)
  targets = int(ev.get('apgd_targets', 9))
  queries, p_init = int(ev.get('square_queries', 5000)), float(ev.get('square_p_init', 0.8))

  def pgd(name, loss):
    return _recipe(name, 'pgd', steps, restarts, factor, dict(loss=loss, steps=steps, restarts=restarts))

  def apgd(name, loss):
    return _recipe(name, 'apgd', a_steps, a_restarts, None, dict(loss=loss, steps=a_steps, restarts=a_restarts))

  return {
      'fgsm': _recipe('fgsm', 'fgsm', 1, 1, None, dict(loss='ce')),
      'noise': _recipe('noise', 'noise', 0, samples, None, dict(samples=samples)),
      'pgd': pgd('pgd', 'ce'),
      'pgd_margin': pgd('pgd_margin', 'margin'),
      'pgd_dlr': pgd('pgd_dlr', 'dlr'),
      'apgd_ce': apgd('apgd_ce', 'ce'),
      'apgd_dlr': apgd('apgd_dlr', 'dlr'),
      'apgd_t': _recipe('apgd_t', 'apgd_t', a_steps, a_restarts, None,
                        dict(loss='dlr', steps=a_steps, restarts=a_restarts, num_targets=targets)),
      'square': _recipe('square', 'square', 0, 1, None, dict(queries=queries, p_init=p_init), queries=queries),
  }


def smoke_attacks(ev: ml_collections.ConfigDict) -> tuple[str, ...]:
  """What ``--smoke`` keeps of ``ev.attacks``: the single-step ones and the
  first and last of the costly (cascading) ones, in their order.

  A smoke run checks the path, not the numbers: the cascade, a gradient
  attack, the last attack of the list (Square in the profiles, with its
  ``gradient_free`` check) and every sanity check still run, while each
  further attack is one more compiled program (most of a smoke run on a
  CPU: madry_mnist's, 111 s with the mnist_linf list, 65 s with this one).
  Names this table does not know are kept, for :func:`resolve` to refuse.
  """
  table = available(ev)
  names = list(ev.attacks)
  costly = [n for n in names if n in table and table[n].cascades]
  keep = set(costly[:1] + costly[-1:])
  return tuple(n for n in names if n not in costly or n in keep)


def resolve(ev: ml_collections.ConfigDict, eot_samples: int = 1) -> list[Recipe]:
  """Resolves ``eval.attacks`` into recipes, in order; unknown names, bad
  budgets and duplicates are one error line naming the valid choices.

  With ``eval.sanity`` on, ``fgsm`` and ``noise`` are added when missing:
  the checks "iterative <= single step" and "gradient <= noise" need them,
  and both are cheap. A gradient-free search (``square``) is moved after
  every gradient attack, so that in a cascade it faces only what they left
  (its row's ``broke`` is then what the ``gradient_free`` check reads).
  """
  table = available(ev)
  if ev.norm not in ('linf', 'l2'):
    raise ValueError(f'unknown eval.norm {ev.norm!r}; available: linf, l2')
  names = list(ev.attacks)
  if not names:
    raise ValueError(f'eval.attacks is empty; choose from: {", ".join(table)} (or set eval.profile)')
  if len(set(names)) != len(names):
    raise ValueError(f'eval.attacks lists an attack twice: {names}')
  for name in names:
    if name not in table:
      raise ValueError(f'unknown eval.attacks entry {name!r}; available: {", ".join(table)}')
  if bool(ev.get('sanity', True)):
    names = [n for n in ('fgsm', 'noise') if n not in names] + names
  names = [n for n in names if not table[n].searches] + [n for n in names if table[n].searches]
  out = []
  for name in names:
    r = table[name]
    if r.iterative and (r.steps < 1 or r.restarts < 1):
      family = 'pgd' if r.attack == 'pgd' else 'apgd'
      raise ValueError(f'eval.attacks has {name!r} but eval.{family}_steps={r.steps}, eval.{family}_restarts='
                       f'{r.restarts}; both must be >= 1')
    if r.attack == 'apgd_t' and r.kwargs['num_targets'] < 1:
      raise ValueError(f'eval.attacks has apgd_t but eval.apgd_targets={r.kwargs["num_targets"]}; it must be >= 1 '
                       f'(9 for 10 classes)')
    if r.searches:
      if r.queries < 1:
        raise ValueError(f'eval.attacks has square but eval.square_queries={r.queries}; it must be >= 1 (5000 is '
                         f'the standard budget)')
    out.append(r.replace(options=dict(norm=ev.norm, eot_samples=eot_samples)))
  return out


def loss_name(recipe: Recipe) -> str:
  """The attack loss a recipe maximises ('ce', 'margin', 'dlr' (apgd_t: targeted); '' for noise)."""
  default = 'margin' if recipe.searches else 'ce' if recipe.uses_gradient else ''
  return str(recipe.kwargs.get('loss', default))
