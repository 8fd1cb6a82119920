"""Experiment configs: loading by name, ``--config.a.b=value`` overrides, smoke.

An experiment is a Python file ``experiments/<name>.py`` with ``get_config()``
returning an ``ml_collections.ConfigDict`` and a module docstring that holds its
COMMAND, expected runtime and expected result (big_vision style).

An experiment name is a registry name (letters, digits, ``_``), never a path:
it is looked up in ``experiments/`` and, when given, a user folder
(``experiments_dir``); no other file is ever executed.

Overrides are parsed here rather than by ``ml_collections.config_flags`` so that
every bad override is one actionable line (an unknown key lists the valid keys,
a bad value names the expected type) instead of a traceback. Every numeric
field has a valid range (``BOUNDS`` here; the open sections' owners declare
theirs, see ``field_bounds``): an override is range-checked at once, and the
whole config by ``check_values`` (``members.validate``) before any data is loaded.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import json
import math
import numbers
import pathlib
import re
from typing import Any, Iterable, Mapping

import ml_collections

from geomrobust.evaluation import profiles
from geomrobust.evaluation import recipes

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent.parent / 'experiments'


class ConfigError(ValueError):
  """A user-facing configuration error; its message is one actionable line."""


def default_config() -> ml_collections.ConfigDict:
  """Fields every experiment has; experiments change what they need.

  Field docs (``python launch.py --experiment=NAME --show_config`` prints the
  resolved values):

  seed                 fixes init, data order and attack randomness.
  init_from            start from another run's weights instead of an init:
                       'RUN_DIR' (its final weights; a member's folder for a
                       family or sweep member) or 'RUN_DIR@PHASE' (the
                       weights at the end of that phase). '' = a fresh init.
  dataset              a name from ``geomrobust.data.available_datasets()``,
                       or a generated one (``geomrobust.data.generated``, its
                       options under ``data.<name>``, e.g. data.sparse_coding.dim).
  data.verify          check file checksums and example counts (off only for
                       generated test files).
  data.train_examples  use the first N training examples (0 = all).
  data.train_per_class use the first N training examples of each class (0 = off).
  data.test_examples / data.test_per_class   the same for the test split.
  model.*              see ``geomrobust.models`` (name: mlp | cnn | resnet18 |
                       vone_cnn | vone_resnet18 | audio_cnn | symmetric_relu |
                       poly2; the stochastic ones' fields in models/stochastic.py
                       and models/audio.py, the two-class ones' in models/sparse.py).
  method.name          a module of ``geomrobust.methods``; its other fields are
                       that method's hyperparameters (documented there).
  train.epochs, train.batch_size (global, split over devices), train.optimizer
                       (adam | sgd | adamw), train.lr, train.momentum,
                       train.weight_decay, train.lr_milestones (epochs) and
                       train.lr_decay (multiplier at each milestone).
  train.checkpoint_every  epochs between checkpoints (resume granularity).
  train.steps_per_log  a phase that counts steps (not epochs) runs in compiled
                       chunks of this many steps: one metrics row, checkpoint
                       and resume point per chunk.
  train.eval_every     epochs between clean test-accuracy logs (0 = never).
  train.augment        data augmentation inside the compiled epoch ('' = none,
                       crop_flip = pad-4 random crop + horizontal flip; see
                       ``geomrobust.training.augment``).
  eval.profile         a named bundle of the attack fields below
                       (``geomrobust.evaluation.profiles``: mnist_linf,
                       cifar10_linf, l2, autoattack, quick); --config.eval.profile=NAME
                       applies it before other eval overrides.
  eval.num_examples    evaluate on the first N test examples (0 = all).
  eval.batch_size      attack batch size (examples per compiled chunk).
  eval.norm            linf | l2.
  eval.eps             the eps grid (pixel scale, inputs in [0,1]).
  eval.attacks         attacks run at every eps: fgsm, noise, pgd (CE),
                       pgd_margin, pgd_dlr, apgd_ce, apgd_dlr, apgd_t (targeted),
                       square (gradient-free). Robust accuracy is the
                       per-example worst case over all of them.
  eval.cascade         run each iterative attack (and square) only on the examples every
                       earlier attack left robust (the worst case is the same,
                       at a fraction of the cost); rows then give the robust
                       accuracy after each attack. False: every attack on
                       every example (each attack's own accuracy). Stochastic
                       models never cascade: their worst case is per example
                       over all attacks' pass verdicts (evaluation/suite.py).
  eval.pgd_steps, eval.pgd_restarts, eval.pgd_step_size (step = this x eps /
                       steps)      PGD settings (all pgd_* attacks).
  eval.apgd_steps, eval.apgd_restarts   APGD settings (apgd_ce, apgd_dlr; apgd_t
                       per target).
  eval.apgd_targets    APGD-T's target classes: the most likely other classes by
                       clean score (9 for 10 classes: all of them).
  eval.square_queries, eval.square_p_init   the Square attack: forward passes per
                       example (5000), and the window's starting area as a
                       fraction of the image (0.8, halving on the published
                       schedule).
  eval.noise_samples   random points on the eps-sphere per example (worst kept).
  eval.eot_samples     gradient draws averaged per attack step for stochastic
                       models (EOT, >= 2 for them).
  eval.passes          evaluation passes of a stochastic model (>= 5): each
                       predicts every (attacked) example with one fresh noise
                       draw; rows report the mean and std over passes and the
                       majority vote.
  eval.sanity          run the extra attacks behind the sanity checks (eps = 0,
                       a huge eps, doubled steps and restarts, another batch
                       size; stochastic models: frozen noise, 2x EOT).
  eval.large_eps       eps of the "huge eps drives accuracy to ~0" check
                       (0 = 1.0 for linf, sqrt(input size) for l2: the whole
                       [0, 1] box; evaluations with no input box use 10 x
                       max |x| instead, see evaluation/sanity.py).
  eval.check_eps       eps of the doubled-budget and batch-size checks (0 =
                       the grid eps whose worst-case accuracy is nearest half
                       the clean accuracy, where a stronger attack shows most).
  eval.trajectories    examples whose PGD loss per step is recorded (plot).
  eval.seed            attack randomness.
  parallel.num_devices data-parallel devices (0 = all local devices).
  parallel.distributed call jax.distributed.initialize() (multi-host).
  probes               named measurements every member gets after the shared
                       evaluation: ``{probe name: {its options}}`` (a module of
                       ``geomrobust.probes``; options in its docstring), e.g.
                       ``--config.probes.isometry.examples=500``.
  members              'name: key=value; ...' strings, for experiments that train a
                       family (key=value as in --config.key=value; a section takes
                       a dict literal: 'cnn: model={"name": "cnn", ...}'). A member
                       may start from another experiment's config:
                       'pgd_at: experiment=madry_mnist; train.epochs=2' (or
                       experiment=NAME/MEMBER, plus setting=S); it then takes
                       the sections listed in ``shared`` from this config.
  shared               (families with experiment= members) the sections such
                       members take from the family: default dataset, data,
                       eval, probes, parallel, seed (``SHARED_SECTIONS``).
  only                 comma-separated member names to run (empty = all).
  settings             named bundles of overrides an experiment offers, e.g.
                       ``{'full': ('train.epochs=100', ...)}``; ``--setting=full``
                       applies one (before any ``--config.*`` override).
  setting              the applied setting's name ('' = the default).
  """
  c = ml_collections.ConfigDict()
  c.experiment = ''
  c.seed = 0
  c.dataset = 'mnist'
  c.data = ml_collections.ConfigDict(dict(
      verify=True, train_examples=0, train_per_class=0, test_examples=0, test_per_class=0))
  c.model = ml_collections.ConfigDict(dict(
      name='mlp', hidden=(100,), activation='relu', weight_init='lecun', use_bias=True))
  c.method = ml_collections.ConfigDict(dict(name='isometric'))
  c.train = ml_collections.ConfigDict(dict(
      epochs=5, batch_size=100, optimizer='adam', lr=1e-3, momentum=0.9, weight_decay=0.0,
      lr_milestones=(), lr_decay=0.1, checkpoint_every=1, eval_every=1, augment='', steps_per_log=100))
  c.init_from = ''
  c.eval = ml_collections.ConfigDict(dict(
      profile='', num_examples=0, batch_size=500, norm='linf', eps=(0.1, 0.2, 0.3), attacks=(),
      pgd_steps=0, pgd_restarts=0, pgd_step_size=0.0, apgd_steps=0, apgd_restarts=0, apgd_targets=0,
      square_queries=0, square_p_init=0.8, noise_samples=0, eot_samples=16, passes=5, sanity=True, large_eps=0.0, check_eps=0.0, trajectories=16, seed=0))
  profiles.apply_profile(c.eval, 'mnist_linf')
  c.parallel = ml_collections.ConfigDict(dict(num_devices=0, distributed=False))
  c.probes = ml_collections.ConfigDict()
  c.members = ()
  c.only = ''
  c.settings = ml_collections.ConfigDict()
  c.setting = ''
  c.smoke_run = False
  return c


# --------------------------------------------------------------------------
# Valid ranges of numeric fields, checked before any data is loaded
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Range:
  """The valid values of a numeric field (of each entry, for a sequence).

  ``lo`` / ``hi``: bounds (None = unbounded), excluded when ``lo_open`` /
  ``hi_open``; ``integer``: whole numbers only. inf and NaN are never valid.
  ``example``: a valid value error messages suggest (default: the field's
  value before the bad override, its ``default_config()`` value, or a bound).
  Build with :func:`integer` and :func:`number`.
  """

  lo: float | None = None
  hi: float | None = None
  integer: bool = False
  lo_open: bool = False
  hi_open: bool = False
  example: Any = None

  def __contains__(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      return False
    if not isinstance(value, numbers.Integral):
      value = float(value)
      if not math.isfinite(value) or (self.integer and not value.is_integer()):
        return False
    if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
      return False
    return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

  def describe(self) -> str:
    kind = 'an integer' if self.integer else 'a number'
    if self.lo is not None and self.hi is not None:
      return (f'{kind} in {"(" if self.lo_open else "["}{self.lo:g}, {self.hi:g}{")" if self.hi_open else "]"}')
    if self.lo is not None:
      return f'{kind} {">" if self.lo_open else ">="} {self.lo:g}'
    if self.hi is not None:
      return f'{kind} {"<" if self.hi_open else "<="} {self.hi:g}'
    return kind if self.integer else 'a finite number'

  def suggest(self):
    """A valid value at (or next to) a bound, for messages when nothing better is known."""
    cast = int if self.integer else float
    if self.lo is not None:
      v = self.lo + 1 if self.lo_open else self.lo
      return cast(v) if v in self else cast((self.lo + self.hi) / 2)
    if self.hi is not None:
      return cast(self.hi - 1 if self.hi_open else self.hi)
    return cast(0)


def integer(lo: int | None = None, hi: int | None = None, *, example=None) -> Range:
  """Whole numbers in ``[lo, hi]`` (a bound of None is open-ended)."""
  return Range(lo, hi, integer=True, example=example)


def number(lo: float | None = None, hi: float | None = None, *, above: float | None = None,
           below: float | None = None, example=None) -> Range:
  """Finite numbers ``>= lo`` (or ``> above``) and ``<= hi`` (or ``< below``)."""
  return Range(above if above is not None else lo, below if below is not None else hi, integer=False,
               lo_open=above is not None, hi_open=below is not None, example=example)


# The fields of default_config(). The open sections bring their own tables:
# each method class's and probe class's BOUNDS, each model module's BOUNDS
# (``geomrobust.models.model_bounds``), a generated dataset's ``bounds`` and
# the sweep section's ``members.SWEEP_BOUNDS``; ``field_bounds`` gathers them.
BOUNDS: dict[str, Range] = {
    'seed': integer(0),
    'data.train_examples': integer(0), 'data.train_per_class': integer(0),
    'data.test_examples': integer(0), 'data.test_per_class': integer(0),
    'train.epochs': integer(1),
    'train.batch_size': integer(1),
    'train.lr': number(0),                  # 0 is allowed: a frozen pass (e.g. init_from, phases' own lr)
    'train.momentum': number(0, below=1),
    'train.weight_decay': number(0),
    'train.lr_milestones': integer(1),      # each milestone
    'train.lr_decay': number(above=0),
    'train.checkpoint_every': integer(1),
    'train.eval_every': integer(0),
    'train.steps_per_log': integer(1),
    'eval.num_examples': integer(0),
    'eval.batch_size': integer(1),
    'eval.eps': number(0),                  # each eps
    'eval.pgd_steps': integer(0), 'eval.pgd_restarts': integer(0), 'eval.pgd_step_size': number(0),
    'eval.apgd_steps': integer(0), 'eval.apgd_restarts': integer(0), 'eval.apgd_targets': integer(0),
    'eval.square_queries': integer(0), 'eval.square_p_init': number(above=0, hi=1),
    'eval.noise_samples': integer(0),
    'eval.eot_samples': integer(1),
    'eval.passes': integer(1, example=5),
    'eval.large_eps': number(0),
    'eval.check_eps': number(0),
    'eval.trajectories': integer(0),
    'eval.seed': integer(0),
    'parallel.num_devices': integer(0),
}


def field_bounds(config: ml_collections.ConfigDict) -> dict[str, Range]:
  """Every bounded field of ``config`` (dotted key -> Range): :data:`BOUNDS`
  plus those of the chosen method, model, probes and generated dataset, the
  sweep section's, and ``sweep.grid`` (each value) with ``method.<sweep.hparam>``'s.
  An unknown method / model / probe / dataset adds nothing (validation names it)."""
  from geomrobust import methods, models, probes  # here: their modules import this one
  from geomrobust.data import generated

  out = dict(BOUNDS)

  def add(prefix: str, table: Mapping[str, Range] | None) -> None:
    out.update({f'{prefix}.{k}': r for k, r in (table or {}).items()})

  def name_of(section: str):
    node = config.get(section)
    return str(node.get('name', '')) if isinstance(node, ml_collections.ConfigDict) else ''

  try:
    add('method', methods.get_method_class(name_of('method')).BOUNDS)
  except ValueError:
    pass
  add('model', models.model_bounds(name_of('model')))
  for probe in (config.get('probes') or {}):
    try:
      add(f'probes.{probe}', probes.get_probe_class(probe).BOUNDS)
    except ValueError:
      pass
  spec = generated.GENERATORS.get(str(config.get('dataset', '')))
  if spec is not None:
    add(f'data.{spec.name}', spec.bounds)
  if isinstance(config.get('sweep'), ml_collections.ConfigDict):
    from geomrobust import members
    add('sweep', members.SWEEP_BOUNDS)
    swept = str(config.sweep.get('hparam', ''))
    hparam = out.get(swept if swept.startswith('model.') else f'method.{swept}')
    if hparam is not None:
      out['sweep.grid'] = hparam
  return out


def _show(value) -> str:
  """A value as it would be written after ``--config.key=``."""
  if isinstance(value, (tuple, list)):
    return ','.join(_show(v) for v in value)
  return f'{value:g}' if isinstance(value, float) else str(value)


def _is_valid(value, rng: Range) -> bool:
  values = value if isinstance(value, (tuple, list)) else (value,)
  return all(v in rng for v in values)


def check_value(key: str, value, rng: Range, *, text: str | None = None, where: str = '',
                examples: Iterable = ()) -> None:
  """Raises a one-line ConfigError unless ``value`` (each entry of a sequence)
  is in ``rng``: the field, the bad value, the valid range and a fix.

  ``text``: the value as the user wrote it; ``where``: '' for the command line
  (the message says ``--config.key=text``), else e.g. ``"member 'x'"``;
  ``examples``: candidate fixes, the first valid one is suggested.
  """
  if _is_valid(value, rng):
    return
  seq = isinstance(value, (tuple, list))
  example = rng.suggest()
  for candidate in (*examples, rng.example):
    if candidate is not None and _is_valid(candidate, rng) and (not seq or candidate):
      example = candidate
      break
  if seq:
    example = tuple(example)[:3] if isinstance(example, (tuple, list)) else (example,)
  shown = f'{key}={_show(value) if text is None else text}'
  fix = f'{key}={_show(example)}'
  if not where:
    shown, fix = (f'--config.{shown}' if text is not None else shown), f'--config.{fix}'
  else:
    shown = f'{where}: {shown}'
  must = 'each entry must be' if seq else 'must be'
  values = value if seq else (value,)
  numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)
  raise ConfigError(f'{shown} {"is out of range" if numeric else "is not a number"}: {must} {rng.describe()} '
                    f'(e.g. {fix})')


def _get(config: ml_collections.ConfigDict, key: str):
  """``(True, value)`` at dotted ``key``, or ``(False, None)`` when absent."""
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False, None
    node = node[part]
  return True, node


def check_fields(section: Mapping, bounds: Mapping[str, Range], prefix: str) -> None:
  """Checks the fields of one section (e.g. ``config.method`` against a
  method's BOUNDS, named ``prefix.field``); absent fields are not checked."""
  for key, rng in bounds.items():
    if key in section:
      check_value(f'{prefix}.{key}', section[key], rng)


def check_values(config: ml_collections.ConfigDict, where: str = '') -> None:
  """Every bounded numeric field of ``config`` in its range (see
  :func:`field_bounds`), else one ConfigError line naming the field, the bad
  value, the range and an example fix. Cheap: no data, no model."""
  for key, rng in field_bounds(config).items():
    found, value = _get(config, key)
    if found and not _is_valid(value, rng):
      check_value(key, value, rng, where=where, examples=[_get(default_config(), key)[1]])


# --------------------------------------------------------------------------
# The experiment registry: experiments/<name>.py (and an optional user folder)
# --------------------------------------------------------------------------

# A registry name: what --list prints; never a path (checked before any file runs).
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_]*')


def _registries(experiments_dir: pathlib.Path | str | None) -> list[pathlib.Path]:
  """The built-in registry, then ``experiments_dir`` (a user folder) when given."""
  folders = [EXPERIMENTS_DIR.resolve()]
  if experiments_dir is not None:
    extra = pathlib.Path(experiments_dir).expanduser().resolve()
    if not extra.is_dir():
      raise ConfigError(f'experiments folder {str(experiments_dir)!r} does not exist (pass a folder of '
                        'experiment files, e.g. --experiments_dir=my_experiments)')
    if extra not in folders:
      folders.append(extra)
  return folders


def _registry_files(experiments_dir: pathlib.Path | str | None) -> dict[str, pathlib.Path]:
  """``{name: file}`` over the registries; a name defined twice is an error naming both files."""
  found: dict[str, pathlib.Path] = {}
  for folder in _registries(experiments_dir):
    for path in sorted(folder.glob('*.py')):
      if not _NAME.fullmatch(path.stem):
        continue  # _helpers.py and names that are not registry names
      if path.stem in found:
        raise ConfigError(f'experiment {path.stem!r} is defined twice: {found[path.stem]} and {path}; '
                          'rename one of them')
      found[path.stem] = path
  return found


def list_experiments(experiments_dir: pathlib.Path | str | None = None) -> list[str]:
  """Experiment names: ``experiments/*.py``, plus ``experiments_dir/*.py`` when given."""
  return sorted(_registry_files(experiments_dir))


def _load_module(name: str, experiments_dir: pathlib.Path | str | None = None):
  # The name is checked before any file is looked up, let alone executed: a
  # path ('../x', '/abs/x') never reaches exec_module.
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ConfigError(f'bad experiment name {name!r}: a name is letters, digits and _ as --list prints it, '
                      'not a path (to run your own experiment file, put it in a folder and pass '
                      '--experiments_dir=FOLDER --experiment=NAME)')
  files = _registry_files(experiments_dir)
  if name not in files:
    raise ConfigError(f'unknown experiment {name!r}; available: {", ".join(sorted(files))} '
                      '(python launch.py --list describes them)')
  path = files[name].resolve()
  if not any(path.parent == folder for folder in _registries(experiments_dir)):
    # e.g. a symlink in the folder pointing elsewhere
    raise ConfigError(f'experiment {name!r} resolves to {path}, outside the experiment folders')
  spec = importlib.util.spec_from_file_location(f'geomrobust_experiments.{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_experiment_module(name: str, experiments_dir: pathlib.Path | str | None = None):
  """The module of experiment ``name`` (for an experiment built from another's helpers)."""
  return _load_module(name, experiments_dir)


def experiment_summary(name: str, experiments_dir: pathlib.Path | str | None = None) -> str:
  """First docstring line of an experiment (what ``--list`` prints)."""
  doc = (_load_module(name, experiments_dir).__doc__ or '').strip()
  return doc.splitlines()[0] if doc else '(no description)'


def experiment_doc(name: str, experiments_dir: pathlib.Path | str | None = None) -> str:
  return (_load_module(name, experiments_dir).__doc__ or '').strip()


def load_experiment(name: str, experiments_dir: pathlib.Path | str | None = None) -> ml_collections.ConfigDict:
  """Returns ``<name>.py:get_config()`` with ``experiment`` set; ``name`` is
  looked up in ``experiments/`` and, when given, the user folder
  ``experiments_dir`` (a name in both is an error)."""
  config = _load_module(name, experiments_dir).get_config()
  with config.unlocked():
    config.experiment = name
  return config


# --------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  keys = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_flat_keys(v, f'{prefix}{k}.'))
    else:
      keys.append(f'{prefix}{k}')
  return keys


def _parse_bool(text: str) -> bool:
  low = text.strip().lower()
  if low in ('true', '1', 'yes', 'y'):
    return True
  if low in ('false', '0', 'no', 'n'):
    return False
  raise ValueError('expected true or false')


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _coerce(value: Any, like: Any) -> Any:
  """Converts ``value`` (a parsed literal or raw string) to the type of ``like``."""
  if like is None:
    return value
  if isinstance(like, bool):
    if isinstance(value, bool):
      return value
    return _parse_bool(str(value))
  if isinstance(like, int):
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError('expected an integer')
    return value
  if isinstance(like, float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError('expected a number')
    return float(value)
  if isinstance(like, str):
    return value if isinstance(value, str) else str(value)
  if isinstance(like, (tuple, list)):
    if isinstance(value, str):
      # Allow the shell-friendly form a,b,c for sequences.
      value = tuple(_literal(p) for p in _split_top(value, ',')) if value else ()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      value = (value,)
    if not isinstance(value, (tuple, list)):
      raise ValueError('expected a sequence like 1,2,3 or "(1, 2, 3)"')
    if like:
      value = tuple(_coerce(v, like[0]) for v in value)
    return type(like)(value)
  raise ValueError(f'cannot override a field of type {type(like).__name__}')


def _type_name(like: Any) -> str:
  if isinstance(like, (tuple, list)):
    inner = _type_name(like[0]) if like else 'value'
    return f'sequence of {inner}'
  return 'bool' if isinstance(like, bool) else type(like).__name__


# Sections whose fields depend on what is chosen inside them (the method's
# hyperparameters, the model's architecture, a probe's options): an override
# may add a key to one of them when the same overrides also pick its ``name``
# (or replace the whole section), e.g. ``method.name=x; method.smoothing=0.1``.
OPEN_SECTIONS = ('method', 'model', 'data', 'probes')


def _section_value(text: str):
  """A whole-section value: a dict literal like ``{'name': 'cnn', 'channels': (16, 32)}``."""
  value = _literal(text)
  if not isinstance(value, dict):
    raise ValueError('a section takes a dict like {"name": "cnn", ...}')
  return ml_collections.ConfigDict(value)


def apply_override(config: ml_collections.ConfigDict, key: str, text: str, *, may_add: bool = False,
                   where: str = '') -> None:
  """Sets ``config.<key>`` from the string ``text``, type- and range-checked.

  ``key=value`` is the one override syntax (``--config.key=value``, members,
  settings and smoke all use it). A key naming a section takes a dict literal
  and replaces the section. A new key is accepted only with ``may_add`` (its
  section is being re-chosen, see ``OPEN_SECTIONS``); its type is the literal's.
  A value outside its field's range (``field_bounds``) is refused at once.
  ``where``: what the override came from in messages ('' = the command line,
  e.g. ``"member 'x'"``).
  """
  origin = f'--config.{key}' if not where else f'{key} ({where})'
  parts = key.split('.')
  node = config
  for i, part in enumerate(parts[:-1]):
    if may_add and isinstance(node, ml_collections.ConfigDict) and part not in node:
      with node.unlocked():
        node[part] = ml_collections.ConfigDict()  # e.g. data.sparse_coding.dim with dataset=sparse_coding
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f'unknown config key {key!r}; valid keys: {", ".join(_flat_keys(config))}')
    node = node[part]
  leaf = parts[-1]
  if not isinstance(node, ml_collections.ConfigDict):
    raise ConfigError(f'unknown config key {key!r}; valid keys: {", ".join(_flat_keys(config))}')
  previous = node.get(leaf)
  if leaf not in node:
    if not may_add:
      hint = ''
      if parts[0] in OPEN_SECTIONS and len(parts) > 1:
        hint = (f' (to add a field, set it together with {parts[0]}.name, or replace the section: '
                f'{parts[0]}={{...}})')
      raise ConfigError(f'unknown config key {key!r}{hint}; valid keys: {", ".join(_flat_keys(config))}')
    with node.unlocked():
      node[leaf] = _literal(text)
  elif isinstance(previous, ml_collections.ConfigDict):
    try:
      value = _section_value(text)
    except ValueError:
      sub = ', '.join(f'{key}.{k}' for k in _flat_keys(previous))
      raise ConfigError(f'{key!r} is a group, not a value; set one of: {sub}, or replace the whole section with '
                        f'a dict: {key}={{"name": ..., ...}}') from None
    with node.ignore_type():
      node[leaf] = value
  else:
    try:
      value = _coerce(_literal(text) if not isinstance(previous, str) else text, previous)
    except ValueError as e:
      raise ConfigError(f'bad value {text!r} for {origin}: {e} (the field is a {_type_name(previous)}, '
                        f'currently {previous!r})') from None
    with node.ignore_type():
      node[leaf] = value
  _check_override(config, key, text, where, previous)


def _check_override(config: ml_collections.ConfigDict, key: str, text: str, where: str, previous) -> None:
  """The range check of one override: the field itself, or every bounded field of a replaced section."""
  # Only the open sections (and the sweep's) need the owners' tables.
  bounds = field_bounds(config) if key.split('.')[0] in OPEN_SECTIONS + ('sweep',) else BOUNDS
  if key in bounds:
    value = _get(config, key)[1]
    if not _is_valid(value, bounds[key]):
      check_value(key, value, bounds[key], text=text, where=where,
                  examples=[previous, _get(default_config(), key)[1]])
    return
  for sub, rng in bounds.items():
    if sub.startswith(key + '.'):
      found, value = _get(config, sub)
      if found and not _is_valid(value, rng):
        check_value(sub, value, rng, where=where or f'--config.{key}={{...}}',
                    examples=[_get(default_config(), sub)[1]])


def parse_assignment(item: str, where: str) -> tuple[str, str]:
  """``'a.b=1'`` -> ``('a.b', '1')`` (the one override syntax)."""
  key, eq, value = str(item).partition('=')
  if not eq or not key.strip():
    raise ConfigError(f'{where}: {item!r} is not key=value')
  return key.strip(), value.strip()


def split_override_args(argv: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates ``--config.key=value`` arguments from the rest of argv."""
  rest, overrides = [], []
  for arg in argv:
    if arg.startswith('--config.'):
      body = arg[len('--config.'):]
      if '=' not in body:
        raise ConfigError(f'{arg!r} needs a value: write --config.{body}=VALUE')
      key, value = body.split('=', 1)
      overrides.append((key, value))
    else:
      rest.append(arg)
  return rest, overrides


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[tuple[str, str]], *,
                    where: str = '') -> ml_collections.ConfigDict:
  """Applies ``(key, text)`` overrides in order, except that ``eval.profile``
  goes first: a profile is a bundle of eval fields, and explicit fields win.
  Each is type- and range-checked (``where``: see :func:`apply_override`)."""
  config = copy.deepcopy(config)
  def rechooses(key: str) -> bool:  # replaces an open section, picks its name (dataset: data's) or adds a probe
    return (key in OPEN_SECTIONS or key == 'dataset' or (key.count('.') == 1 and key.endswith('.name'))
            or (key.count('.') == 1 and key.startswith('probes.')))

  # eval.profile first, then what re-chooses a section, then fields (a stable sort).
  overrides = sorted(overrides, key=lambda kv: 0 if kv[0] == 'eval.profile' else 1 if rechooses(kv[0]) else 2)
  rechosen = {'data' if k == 'dataset' else k.split('.')[0] for k, _ in overrides if rechooses(k)}
  for key, value in overrides:
    if key == 'eval.profile':
      try:
        profiles.apply_profile(config.eval, value)
      except ValueError as e:
        raise ConfigError(str(e)) from None
    else:
      apply_override(config, key, value, may_add=key.split('.')[0] in rechosen and '.' in key, where=where)
  return config


def apply_setting(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Applies the experiment's named setting (``config.settings[name]``, a tuple
  of ``'key=value'`` strings) and records it in ``config.setting``."""
  settings = config.get('settings') or {}
  if name not in settings:
    available = ', '.join(settings) or 'none'
    raise ConfigError(f'experiment {config.get("experiment", "")!r} has no setting {name!r}; available: {available}')
  where = f'setting {name!r}'
  config = apply_overrides(config, [parse_assignment(item, where) for item in settings[name]], where=where)
  with config.unlocked():
    config.setting = name
  return config


# --------------------------------------------------------------------------
# Members of a multi-model experiment
# --------------------------------------------------------------------------


def parse_member(spec: str) -> tuple[str, list[tuple[str, str]]]:
  """``'name: a.b=1; c=x'`` -> ``('name', [('a.b', '1'), ('c', 'x')])``."""
  name, _, body = spec.partition(':')
  name = name.strip()
  if not name or not all(ch.isalnum() or ch in '_-.' for ch in name):
    raise ConfigError(f'bad member {spec!r}: write "name: key=value; key=value" with a plain name')
  return name, [parse_assignment(part, f'member {name!r}') for part in _split_top(body, ';') if part.strip()]


def _split_top(text: str, sep: str) -> list[str]:
  """``text`` split at ``sep`` outside brackets and quotes (a section's dict
  literal may hold the separator)."""
  out, depth, quote, cur = [], 0, '', []
  for ch in text:
    if quote:
      quote = '' if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == sep and depth == 0:
      out.append(''.join(cur))
      cur = []
      continue
    cur.append(ch)
  return out + [''.join(cur)]


# What a member taken from another experiment (``experiment=NAME`` in its
# spec) gets from the family rather than from NAME: the data it is judged on,
# the evaluation, the probes and the seed (a family sets ``config.shared`` to change it).
SHARED_SECTIONS = ('dataset', 'data', 'eval', 'probes', 'parallel', 'seed')
# Member-spec keys that choose a member's base config instead of overriding a field.
BASE_KEYS = ('experiment', 'setting')


def member_configs(config: ml_collections.ConfigDict) -> list[tuple[str, dict, ml_collections.ConfigDict]]:
  """Expands ``config.members`` into ``[(name, overrides, member_config)]``.

  ``config.members`` is an ordered tuple of ``'name: key=value; key=value'``
  strings; each member is the experiment config with those overrides (parsed
  and type-checked like ``--config.key=value``). A spec may start from
  another experiment instead (composition, not copy, see
  :func:`_member_base`): ``'pgd_at: experiment=madry_mnist; train.epochs=2'``
  or ``experiment=ascl_mnist/ascl_leaking`` (one member of a family), with
  ``setting=NAME`` to apply that experiment's setting. ``config.only``
  (comma-separated names) restricts the list. An experiment without members
  is a single member named ``''``.
  """
  base = copy.deepcopy(config)
  with base.unlocked():
    base.members = ()
    base.only = ''
  specs = [parse_member(s) for s in (config.get('members') or ())]
  if not specs:
    return [('', {}, base)]
  names = [n for n, _ in specs]
  if len(set(names)) != len(names):
    raise ConfigError(f'duplicate member names in config.members: {names}')
  only = [n.strip() for n in str(config.get('only', '') or '').split(',') if n.strip()]
  for n in only:
    if n not in names:
      raise ConfigError(f'--config.only names unknown member {n!r}; members: {", ".join(names)}')
  out, built = [], []
  for name, overrides in specs:
    # Every member is composed (milliseconds) so that a bad spec or a smoke item no member has fails
    # at once, whatever --config.only selects.
    start, rest = _member_base(config, base, name, overrides)
    built.append(apply_overrides(start, rest, where=f'member {name!r}'))
    if not only or name in only:
      out.append((name, dict(overrides), _smoke_member(config, built[-1])))
  _check_smoke_keys(config, built)
  return out


def _check_smoke_keys(config: ml_collections.ConfigDict, members: list[ml_collections.ConfigDict]) -> None:
  """In a smoke run, every ``config.smoke`` key must name a field of the
  family or of some member (``smoke`` skips the family's missing ones for the
  members' sake; a typo would otherwise shrink nothing, silently)."""
  if not config.get('smoke_run') or not config.get('smoke'):
    return
  for item in config.smoke:
    key, _ = parse_assignment(item, 'config.smoke')
    if key in ('only', 'members') or _get(config, key)[0] or any(_get(m, key)[0] for m in members):
      continue
    raise ConfigError(f'config.smoke item {item!r}: {key} is a field of neither the experiment nor any of its '
                      f'members; fix or remove it in experiments/{config.experiment}.py')


def _member_base(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict, name: str,
                 overrides: list[tuple[str, str]]) -> tuple[ml_collections.ConfigDict, list[tuple[str, str]]]:
  """A member's starting config and the overrides left to apply to it.

  Without ``experiment=`` in its spec: the family's own config (``base``).
  With ``experiment=NAME`` (or ``NAME/MEMBER``): that experiment's config
  (that member's), its setting ``setting=S`` applied and, in a smoke run,
  shrunk as its own ``--smoke`` would; then the family's shared sections
  (``config.shared``, default :data:`SHARED_SECTIONS`) replace NAME's, so
  every such member is judged on the same data by the same evaluation and
  probes; the member's other overrides come last.
  """
  chosen = {k: v for k, v in overrides if k in BASE_KEYS}
  rest = [(k, v) for k, v in overrides if k not in BASE_KEYS]
  where = f'member {name!r}'
  if 'experiment' not in chosen:
    if chosen:
      raise ConfigError(f'{where}: setting={chosen["setting"]} needs experiment=NAME in the same spec (the '
                        "family's own settings are chosen with --setting)")
    return base, rest
  source, _, member = chosen['experiment'].partition('/')
  try:
    other = load_experiment(source)
    if chosen.get('setting'):
      other = apply_setting(other, chosen['setting'])
  except ConfigError as e:
    raise ConfigError(f'{where}: {e}') from None
  if config.get('smoke_run'):
    other = smoke(other)
  names = [parse_member(s)[0] for s in (other.get('members') or ())]
  if member and member not in names:
    raise ConfigError(f'{where}: experiment {source!r} has no member {member!r}; its members: '
                      f'{", ".join(names) or "none (name the experiment alone)"}')
  if names and not member:
    raise ConfigError(f'{where}: experiment {source!r} trains several models; name one: '
                      f'{", ".join(f"{source}/{n}" for n in names)}')
  with other.unlocked():
    other.only = member
  start = member_configs(other)[0][2]
  shared = tuple(config.get('shared', SHARED_SECTIONS))
  with start.unlocked(), start.ignore_type():
    for key in shared:
      if key not in config:
        raise ConfigError(f'config.shared names {key!r}, which is not a config field')
      start[key] = copy.deepcopy(config[key])
    for key in ('experiment', 'smoke_run'):
      start[key] = config.get(key)
    start.settings = ml_collections.ConfigDict()
    for key in ('smoke', 'sweep'):   # the source experiment's own; a member has neither
      if key in start:
        del start[key]
  return start, rest


def _smoke_member(config: ml_collections.ConfigDict, member: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """In a smoke run, the experiment's ``config.smoke`` overrides again on a
  member's config (those whose key it has), so a member that replaces a whole
  section (``model={...}``) is shrunk too."""
  if not config.get('smoke_run') or not config.get('smoke'):
    return member
  items = [parse_assignment(item, 'config.smoke') for item in config.smoke]
  items = [(k, v) for k, v in items if k not in ('only', 'members') and _get(member, k)[0]]
  return apply_overrides(member, items, where='config.smoke') if items else member


# --------------------------------------------------------------------------
# Smoke: any experiment shrunk to a sub-minute CPU run through the whole path
# --------------------------------------------------------------------------


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks data, epochs, evaluation and the member list; keeps every code path.

  The evaluation keeps its eps grid and sanity checks with small budgets,
  and of ``eval.attacks`` the single-step attacks and the first and last
  costly one (``recipes.smoke_attacks``; mnist_linf: FGSM, noise, APGD-CE,
  Square).

  An experiment may refine this with ``config.smoke``, a tuple of
  ``'key=value'`` overrides applied last (and again to each family member's
  config, for the keys it has: a member may replace a whole section).
  """
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data.train_examples = min(config.data.get('train_examples', 0) or 10**9, 512)
    config.data.test_examples = min(config.data.get('test_examples', 0) or 10**9, 256)
    config.train.epochs = min(config.train.epochs, 2)
    config.train.batch_size = min(config.train.batch_size, 64)
    config.eval.num_examples = min(config.eval.num_examples or 10**9, 64)
    config.eval.batch_size = min(config.eval.batch_size, 64)
    config.eval.pgd_steps = min(config.eval.pgd_steps, 5)
    config.eval.pgd_restarts = min(config.eval.pgd_restarts, 1)
    config.eval.apgd_steps = min(config.eval.apgd_steps, 5)
    config.eval.apgd_restarts = min(config.eval.apgd_restarts, 1)
    config.eval.noise_samples = min(config.eval.noise_samples, 2)
    config.eval.apgd_targets = min(config.eval.get('apgd_targets', 0), 2)
    config.eval.square_queries = min(config.eval.get('square_queries', 0), 20)
    config.eval.eot_samples = min(config.eval.eot_samples, 2)   # passes stay (forward passes are cheap)
    config.eval.trajectories = min(config.eval.trajectories, 4)
    config.eval.attacks = recipes.smoke_attacks(config.eval)
    config.smoke_run = True
    if config.get('members') and not config.get('only'):
      # Members differ in hyperparameters, not code: two of them cover the path.
      config.only = ','.join(parse_member(m)[0] for m in config.members[:2])
  items = [parse_assignment(item, 'config.smoke') for item in (config.get('smoke') or ())]
  if config.get('members'):
    # A family's smoke items may name fields only its members have (e.g. the
    # method options of a member taken from another experiment); those
    # apply to the members (_smoke_member).
    items = [(k, v) for k, v in items if _get(config, k)[0] or k.split('.')[0] == 'probes' or '.' not in k]
  return apply_overrides(config, items, where='config.smoke')


def fill_defaults(stored: dict) -> dict:
  """A stored config (``config.json``) with the fields it predates set to
  their ``default_config()`` values, so a run written by an older version can
  be resumed, loaded and re-evaluated. Stored values always win; an open
  section (``OPEN_SECTIONS``: method, model, ...) is filled only when it names
  the same thing as the default (an MLP's fields never go into a CNN run)."""

  def fill(into: dict, defaults: dict) -> dict:
    for k, v in defaults.items():
      if k not in into:
        into[k] = copy.deepcopy(v)
      elif isinstance(v, dict) and isinstance(into[k], dict) and (
          k not in OPEN_SECTIONS or into[k].get('name') == v.get('name')):
        fill(into[k], v)
    return into

  return fill(copy.deepcopy(stored), json.loads(to_json(default_config())))


def with_defaults(stored: dict) -> ml_collections.ConfigDict:
  """:func:`fill_defaults` as a ConfigDict."""
  return ml_collections.ConfigDict(fill_defaults(stored))


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
