"""Experiment configs: loading by name, ``--config.a.b=value`` overrides, smoke.

An experiment is a Python file ``experiments/<name>.py`` with ``get_config()``
returning an ``ml_collections.ConfigDict`` and a module docstring that holds its
COMMAND, expected runtime and expected result (big_vision style).

Overrides are parsed here rather than by ``ml_collections.config_flags`` so that
every bad override is one actionable line (an unknown key lists the valid keys,
a bad value names the expected type) instead of a traceback.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import pathlib
from typing import Any, Iterable

import ml_collections

from geomrobust.evaluation import profiles

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
  model.*              see ``geomrobust.models`` (name: mlp | cnn).
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
                       cifar10_linf, l2, quick); --config.eval.profile=NAME
                       applies it before other eval overrides.
  eval.num_examples    evaluate on the first N test examples (0 = all).
  eval.batch_size      attack batch size (examples per compiled chunk).
  eval.norm            linf | l2.
  eval.eps             the eps grid (pixel scale, inputs in [0,1]).
  eval.attacks         attacks run at every eps: fgsm, noise, pgd (CE),
                       pgd_margin, pgd_dlr, apgd_ce, apgd_dlr. Robust accuracy
                       is the per-example worst case over all of them.
  eval.pgd_steps, eval.pgd_restarts, eval.pgd_step_size (step = this x eps /
                       steps)      PGD settings (all pgd_* attacks).
  eval.apgd_steps, eval.apgd_restarts   APGD settings.
  eval.noise_samples   random points on the eps-sphere per example (worst kept).
  eval.eot_samples     gradient draws averaged per attack step for stochastic
                       models (EOT); predictions vote over as many draws.
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
                       a dict literal: 'cnn: model={"name": "cnn", ...}').
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
      pgd_steps=0, pgd_restarts=0, pgd_step_size=0.0, apgd_steps=0, apgd_restarts=0, noise_samples=0,
      eot_samples=16, sanity=True, large_eps=0.0, check_eps=0.0, trajectories=16, seed=0))
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
# The experiment registry: experiments/<name>.py
# --------------------------------------------------------------------------


def list_experiments(experiments_dir: pathlib.Path = EXPERIMENTS_DIR) -> list[str]:
  return sorted(p.stem for p in experiments_dir.glob('*.py') if not p.stem.startswith('_'))


def _load_module(name: str, experiments_dir: pathlib.Path):
  path = experiments_dir / f'{name}.py'
  if not path.is_file():
    raise ConfigError(f'unknown experiment {name!r}; available: {", ".join(list_experiments(experiments_dir))} '
                      '(python launch.py --list describes them)')
  spec = importlib.util.spec_from_file_location(f'geomrobust_experiments.{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def experiment_summary(name: str, experiments_dir: pathlib.Path = EXPERIMENTS_DIR) -> str:
  """First docstring line of an experiment (what ``--list`` prints)."""
  doc = (_load_module(name, experiments_dir).__doc__ or '').strip()
  return doc.splitlines()[0] if doc else '(no description)'


def experiment_doc(name: str, experiments_dir: pathlib.Path = EXPERIMENTS_DIR) -> str:
  return (_load_module(name, experiments_dir).__doc__ or '').strip()


def load_experiment(name: str, experiments_dir: pathlib.Path = EXPERIMENTS_DIR) -> ml_collections.ConfigDict:
  """Returns ``experiments/<name>.py:get_config()`` with ``experiment`` set."""
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


def apply_override(config: ml_collections.ConfigDict, key: str, text: str, *, may_add: bool = False) -> None:
  """Sets ``config.<key>`` from the string ``text``, type-checked.

  ``key=value`` is the one override syntax (``--config.key=value``, members,
  settings and smoke all use it). A key naming a section takes a dict literal
  and replaces the section. A new key is accepted only with ``may_add`` (its
  section is being re-chosen, see ``OPEN_SECTIONS``); its type is the literal's.
  """
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
  if leaf not in node:
    if not may_add:
      hint = ''
      if parts[0] in OPEN_SECTIONS and len(parts) > 1:
        hint = (f' (to add a field, set it together with {parts[0]}.name, or replace the section: '
                f'{parts[0]}={{...}})')
      raise ConfigError(f'unknown config key {key!r}{hint}; valid keys: {", ".join(_flat_keys(config))}')
    with node.unlocked():
      node[leaf] = _literal(text)
    return
  like = node[leaf]
  if isinstance(like, ml_collections.ConfigDict):
    try:
      value = _section_value(text)
    except ValueError:
      sub = ', '.join(f'{key}.{k}' for k in _flat_keys(like))
      raise ConfigError(f'{key!r} is a group, not a value; set one of: {sub}, or replace the whole section with '
                        f'a dict: {key}={{"name": ..., ...}}') from None
    with node.ignore_type():
      node[leaf] = value
    return
  try:
    value = _coerce(_literal(text) if not isinstance(like, str) else text, like)
  except ValueError as e:
    raise ConfigError(f'bad value {text!r} for --config.{key}: {e} (the field is a {_type_name(like)}, '
                      f'currently {like!r})') from None
  with node.ignore_type():
    node[leaf] = value


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


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Applies ``(key, text)`` overrides in order, except that ``eval.profile``
  goes first: a profile is a bundle of eval fields, and explicit fields win."""
  config = copy.deepcopy(config)
  def rechooses(key: str) -> bool:  # replaces an open section, or picks its name (dataset: data's)
    return key in OPEN_SECTIONS or key == 'dataset' or (key.count('.') == 1 and key.endswith('.name'))

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
      apply_override(config, key, value, may_add=key.split('.')[0] in rechosen and '.' in key)
  return config


def apply_setting(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Applies the experiment's named setting (``config.settings[name]``, a tuple
  of ``'key=value'`` strings) and records it in ``config.setting``."""
  settings = config.get('settings') or {}
  if name not in settings:
    available = ', '.join(settings) or 'none'
    raise ConfigError(f'experiment {config.get("experiment", "")!r} has no setting {name!r}; available: {available}')
  config = apply_overrides(config, [parse_assignment(item, f'setting {name!r}') for item in settings[name]])
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


def member_configs(config: ml_collections.ConfigDict) -> list[tuple[str, dict, ml_collections.ConfigDict]]:
  """Expands ``config.members`` into ``[(name, overrides, member_config)]``.

  ``config.members`` is an ordered tuple of ``'name: key=value; key=value'``
  strings; each member is the experiment config with those overrides (parsed
  and type-checked like ``--config.key=value``). ``config.only``
  (comma-separated names) restricts the list. An experiment without members is
  a single member named ``''``.
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
  return [(name, dict(overrides), apply_overrides(base, overrides))
          for name, overrides in specs if not only or name in only]


# --------------------------------------------------------------------------
# Smoke: any experiment shrunk to a sub-minute CPU run through the whole path
# --------------------------------------------------------------------------


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks data, epochs, evaluation and the member list; keeps every code path.

  An experiment may refine this with ``config.smoke``, a tuple of
  ``'key=value'`` overrides applied last.
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
    config.eval.eot_samples = min(config.eval.eot_samples, 2)
    config.eval.trajectories = min(config.eval.trajectories, 4)
    config.smoke_run = True
    if config.get('members') and not config.get('only'):
      # Members differ in hyperparameters, not code: two of them cover the path.
      config.only = ','.join(parse_member(m)[0] for m in config.members[:2])
  return apply_overrides(config, [parse_assignment(item, 'config.smoke') for item in (config.get('smoke') or ())])


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
