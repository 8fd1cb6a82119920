"""What an experiment trains: its members, in groups an executor trains together.

An experiment config expands to groups of members:

  single model     one group, one member named '' (the workdir itself);
  family           ``config.members`` ('name: key=value; ...'): one group whose
                   members are trained one by one, each with its own config
                   (any section may differ, the dataset too);
  sweep            a ``sweep`` section: a grid of ``method.<sweep.hparam>`` x
                   seeds (and a baseline over the same seeds), each a group
                   trained either *stacked* (one vmapped program per group,
                   ``sweep.stacked=true``, the default) or one by one
                   (``sweep.stacked=false``: each member an ordinary run
                   folder; slower, but any config works).

Sweep fields (``config.sweep``):
  hparam            the swept traced hyperparameter (``method.<hparam>``), or
                    ``model.<field>`` for a field the model keeps as a
                    constant (``models.traced_fields``, e.g. model.noise_scale).
  grid              its values.  seeds: seeds ``config.seed, config.seed+1, ...`` (a count).
  stacked           train each group as one vmapped program (else one by one).
  chunk_size        values per vmapped chunk (0 = chosen: one per device on a CPU, the
                    whole grid on an accelerator; training/sweep.py auto_chunk_size).
  baseline          a member spec ``'name: key=value; ...'`` trained over the same seeds ('' = none).
  member, name      in a *family* experiment: sweep that member's config
                    (``member_sweep``) into ``<workdir>/<name>`` after the
                    family, its table under ``name`` in the top results.json.
  mean_last_epochs  clean accuracy = mean test accuracy (``data.test_*`` split)
                    after each of the last K epochs of the final phase.
  screen_profile, screen_examples, pgd_eps
                    the shared evaluation run on *every* member (a cheap
                    profile, the first N eval examples, one eps).
  strong            members also evaluated with ``config.eval`` (strong profile,
                    sanity checks), by role: ``baseline`` or ``best:<column>``
                    (the value with the best mean of a table column).
  strong_seeds      how many seeds of each strong role (first ones).

Valid ranges: ``SWEEP_BOUNDS`` (and ``sweep.grid``: each value in the range of
``method.<hparam>``), checked with the whole config by ``validate``.
"""

from __future__ import annotations

import copy
import dataclasses

import ml_collections

from geomrobust import config as config_lib
from geomrobust import data as data_lib
from geomrobust import evaluation
from geomrobust import models
from geomrobust import pipeline
from geomrobust.training import sweep as sweep_lib

SWEEP_BOUNDS = {
    'seeds': config_lib.integer(1, example=3), 'chunk_size': config_lib.integer(0),
    'mean_last_epochs': config_lib.integer(0, example=10), 'screen_examples': config_lib.integer(1, example=500),
    'pgd_eps': config_lib.number(0, example=0.1), 'strong_seeds': config_lib.integer(1),
}


@dataclasses.dataclass
class Group:
  """Members an executor trains together."""
  name: str                     # the stacked group's folder under stacked/ ('' for unstacked groups)
  role: str                     # 'single', 'member', 'sweep' or 'baseline'
  config: ml_collections.ConfigDict
  stacked: bool
  grid: sweep_lib.Grid | None = None
  overrides: dict = dataclasses.field(default_factory=dict)   # shared by every member (baseline spec)
  members: list['Member'] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Member:
  name: str                     # folder under the workdir ('' = the workdir itself)
  group: Group
  config: ml_collections.ConfigDict   # trains this member alone
  overrides: dict
  seed_index: int = 0
  value_index: int = 0

  @property
  def seed(self) -> int:
    return int(self.config.seed)

  @property
  def value(self):
    return self.group.grid.values[self.value_index] if self.group.grid else None


def _strip(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config without the experiment-level sections: what trains one member alone."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    for key in ('sweep', 'settings', 'smoke'):
      if key in cfg:
        del cfg[key]
  return cfg


def _fmt(value) -> str:
  return f'{float(value):g}'


def _sweep_groups(config: ml_collections.ConfigDict) -> list[Group]:
  sw = config.sweep
  hparam = str(sw.hparam)
  values = tuple(float(v) for v in sw.grid)
  if not values:
    raise config_lib.ConfigError('sweep.grid is empty: list the grid, e.g. --config.sweep.grid=0,0.5,1')
  if len(set(values)) != len(values):
    raise config_lib.ConfigError(f'sweep.grid has duplicates: {values}')
  field = sweep_lib.model_field(hparam)
  if field:
    traced = models.traced_fields(str(config.model.name))
    if field not in traced or field not in config.model:
      raise config_lib.ConfigError(f'sweep.hparam={hparam!r}: model {config.model.name!r} has no traced field '
                                   f'{field!r} (traced: {", ".join("model." + k for k in traced) or "none"})')
  elif hparam not in config.method:
    raise config_lib.ConfigError(f'sweep.hparam={hparam!r} is not a field of config.method '
                                 f'({", ".join(k for k in config.method if k != "name")}) nor a traced model '
                                 'field (model.<field>)')
  seeds = tuple(int(config.seed) + i for i in range(int(sw.seeds)))
  stacked = bool(sw.get('stacked', True))
  base = _strip(config)
  groups = [Group(field or hparam, 'sweep', base, stacked, sweep_lib.Grid(hparam, values, seeds))]
  if str(sw.get('baseline', '') or ''):
    name, overrides = config_lib.parse_member(str(sw.baseline))
    baseline = config_lib.apply_overrides(base, overrides, where='sweep.baseline')
    groups.append(Group(name, 'baseline', baseline, stacked, sweep_lib.Grid('', (None,), seeds), dict(overrides)))
  for g in groups:
    for si, seed in enumerate(g.grid.seeds):
      for vi, value in enumerate(g.grid.values):
        overrides = dict(g.overrides)
        if g.grid.hparam:
          field = sweep_lib.model_field(g.grid.hparam)
          overrides[g.grid.hparam if field else f'method.{g.grid.hparam}'] = _fmt(value)
          name = f'{field or g.grid.hparam}_{_fmt(value)}_seed{seed}'
        else:
          name = f'{g.name}_seed{seed}'
        overrides['seed'] = str(seed)
        cfg = config_lib.apply_overrides(g.config, [(k, v) for k, v in overrides.items() if k not in g.overrides],
                                         where=f'sweep member {name!r}')
        g.members.append(Member(name, g, cfg, overrides, si, vi))
  return groups


def member_sweep(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """A family's sweep of one of its members (``sweep.member = NAME``): the
  plain sweep experiment config it runs (that member's config with the
  ``sweep`` section), or None when the experiment has no such sweep. The
  family runs it into ``<workdir>/<sweep.name>`` and puts its table in the
  top ``results.json`` under ``sweep.name``."""
  sw = config.get('sweep')
  member = str(sw.get('member', '') or '') if sw else ''
  if not member:
    return None
  specs = dict(config_lib.parse_member(spec) for spec in (config.get('members') or ()))
  if member not in specs:
    raise config_lib.ConfigError(f'sweep.member={member!r} is not a member of the family; members: '
                                 f'{", ".join(specs) or "none"}')
  base = copy.deepcopy(config)
  with base.unlocked():
    base.members, base.only = (), ''
    base.sweep.member = ''
  out = config_lib.apply_overrides(base, specs[member], where=f'member {member!r}')
  with out.unlocked():
    for key in ('settings', 'smoke'):
      if key in out:
        del out[key]
  return out


def sweep_name(config: ml_collections.ConfigDict) -> str:
  """The folder and top results.json key of a family's member sweep."""
  return str(config.sweep.get('name', '') or 'sweep')


def expand(config: ml_collections.ConfigDict) -> list[Group]:
  """The groups (and their members) of an experiment config (its values
  range-checked first: ``config.check_values``). A family with a member
  sweep (:func:`member_sweep`) expands to its family group; the sweep is a
  sub-experiment of its own."""
  config_lib.check_values(config)
  if config.get('sweep') and member_sweep(config) is None:
    return _sweep_groups(config)
  family = [(name, overrides, _without_sweep(cfg)) for name, overrides, cfg in config_lib.member_configs(config)]
  if len(family) == 1 and family[0][0] == '':
    group = Group('', 'single', family[0][2], stacked=False)
  else:
    group = Group('', 'member', _strip(config), stacked=False)
  group.members = [Member(name, group, cfg, overrides) for name, overrides, cfg in family]
  return [group]


def _without_sweep(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  if 'sweep' not in config:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    del config['sweep']
  return config


def validate(config: ml_collections.ConfigDict, groups: list[Group]) -> None:
  """Fails fast (before data or training) on out-of-range values (the whole
  config, each group's and each family member's), unknown names and bad combinations."""
  # (The experiment config itself was checked by expand.)
  sub = member_sweep(config)
  if sub is not None:
    validate(sub, expand(sub))
  for g in groups:
    config_lib.check_values(g.config)
    for m in (g.members if g.role == 'member' else ()):
      config_lib.check_values(m.config, where=f'member {m.name!r}')
  for g in groups:
    for m in (g.members if g.role == 'member' else g.members[:1]):
      pipeline.validate(m.config)
  if not config.get('sweep') or sub is not None:
    return
  sw = config.sweep
  num_classes = data_lib.get_spec(config.dataset).num_classes
  method = pipeline._build(groups[0].config, num_classes)
  if not sweep_lib.model_field(str(sw.hparam)) and str(sw.hparam) not in method.hparams():
    raise config_lib.ConfigError(f'sweep.hparam={sw.hparam!r} is not a traced hyperparameter of method '
                                 f'{config.method.name!r} (it has: {", ".join(method.hparams()) or "none"})')
  for role in sw.strong:
    if role != 'baseline' and not (role.startswith('best:') and role[5:]):
      raise config_lib.ConfigError(f'unknown sweep.strong role {role!r}; use baseline or best:<table column>, '
                                   'e.g. best:clean_accuracy')
  evaluation.recipes.resolve(screen_eval_config(config))


def screen_eval_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.eval`` with the sweep's screening profile, one eps, no extra sanity attacks."""
  ev = copy.deepcopy(config.eval)
  evaluation.profiles.apply_profile(ev, str(config.sweep.screen_profile))
  with ev.unlocked(), ev.ignore_type():
    ev.eps = (float(config.sweep.pgd_eps),)
    ev.sanity = False
    ev.trajectories = 0
  return ev
