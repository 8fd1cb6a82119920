"""Every numeric config field has its valid range, checked before any data is loaded.

The cases are generated from the bounds tables themselves (``config.BOUNDS``,
each method's, model's and probe's ``BOUNDS``, each generated dataset's
``bounds``, ``members.SWEEP_BOUNDS``), so a new bounded field is covered
without a new test: each is accepted at its bound and refused just outside,
with one line naming the field.
"""

import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from geomrobust import config as config_lib
from geomrobust import members
from geomrobust import methods
from geomrobust import models
from geomrobust import probes
from geomrobust.data import generated

REPO = pathlib.Path(__file__).resolve().parents[1]


# -- the cases: (overrides that choose the owner, key, Range) ----------------------------


def _tables():
  """``[(case id, base config, overrides choosing the owner, key, Range)]`` over every table."""
  default = config_lib.default_config
  sweep_base = lambda: config_lib.load_experiment('local_contrastive_mnist')
  out = [(k, default, [], k, r) for k, r in config_lib.BOUNDS.items()]
  for name in methods.available_methods():
    for k, r in methods.get_method_class(name).BOUNDS.items():
      out.append((f'{name}:method.{k}', default, [('method.name', name)], f'method.{k}', r))
  for name in sorted(models.MODELS):
    for k, r in models.model_bounds(name).items():
      out.append((f'{name}:model.{k}', default, [('model.name', name)], f'model.{k}', r))
  for name in probes.available_probes():
    for k, r in probes.get_probe_class(name).BOUNDS.items():
      out.append((f'probes.{name}.{k}', default, [('probes', f'{{"{name}": {{}}}}')], f'probes.{name}.{k}', r))
  for name, spec in generated.GENERATORS.items():
    for k, r in spec.bounds.items():
      out.append((f'data.{name}.{k}', default, [('dataset', name)], f'data.{name}.{k}', r))
  for k, r in members.SWEEP_BOUNDS.items():
    out.append((f'sweep.{k}', sweep_base, [], f'sweep.{k}', r))
  return out


TABLES = _tables()


def _text(v) -> str:
  """A literal ``--config.key=`` parses back to ``v`` (1e999 is inf)."""
  return ('1e999' if v > 0 else '-1e999') if isinstance(v, float) and math.isinf(v) else repr(v)


def _around(r: config_lib.Range):
  """``(accepted, refused, not_whole)``: values at or just inside each bound,
  values just outside it, and (integer ranges) a fraction next to the bound."""
  ok, bad = [], []
  for bound, sign, is_open in ((r.lo, -1, r.lo_open), (r.hi, +1, r.hi_open)):
    if bound is None:
      continue
    if r.integer:
      at, beyond, inside = int(bound), int(bound) + sign, int(bound) - sign
    else:
      at = float(bound)
      beyond, inside = math.nextafter(at, sign * math.inf), math.nextafter(at, -sign * math.inf)
    ok.append(inside if is_open else at)
    bad.append(at if is_open else beyond)
  if not r.integer:
    bad += [math.inf, -math.inf]  # non-finite is never in range
  not_whole = [float(r.suggest()) + 0.5] if r.integer else []
  return ok, bad, not_whole


CASES = [pytest.param(base, choose, key, r, id=cid) for cid, base, choose, key, r in TABLES]


def _node(config, key):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


@pytest.mark.parametrize('base,choose,key,rng', CASES)
def test_every_bounded_field_is_accepted_at_its_bound_and_refused_just_outside(base, choose, key, rng):
  config = base()
  ok, bad, not_whole = _around(rng)
  assert ok and bad, key
  for v in ok:  # through an override, then the whole-config check
    cfg = config_lib.apply_overrides(config, choose + [(key, _text(v))])
    config_lib.check_values(cfg)
    got = _node(cfg, key)
    assert (got[0] if isinstance(got, tuple) else got) == v, (key, v, got)
  for v in bad:
    with pytest.raises(config_lib.ConfigError) as info:
      config_lib.apply_overrides(config, choose + [(key, _text(v))])
    msg = str(info.value)
    assert '\n' not in msg and msg.startswith(f'--config.{key}={_text(v)} is out of range: '), msg
    assert rng.describe() in msg and f'(e.g. --config.{key}=' in msg, msg
    fix = msg.rsplit('(e.g. --config.', 1)[1][:-1]
    config_lib.check_values(config_lib.apply_overrides(config, choose + [tuple(fix.split('=', 1))]))  # it works
  for v in not_whole:  # a type error for a typed field, a range error for an open section's
    with pytest.raises(config_lib.ConfigError, match=rf'--config.{key}\b'):
      config_lib.apply_overrides(config, choose + [(key, _text(v))])
  # The whole-config check (experiment files' own values, members, smoke) refuses them too.
  for v in bad + not_whole:
    cfg = config_lib.apply_overrides(config, choose + [(key, _text(ok[0]))])
    parent, _, leaf = key.rpartition('.')
    node = _node(cfg, parent) if parent else cfg
    with node.ignore_type():
      node[leaf] = (ok[0], v) if isinstance(node[leaf], tuple) else v
    with pytest.raises(config_lib.ConfigError, match=rf'^{key}=\S+ is out of range: (each entry )?must be '):
      config_lib.check_values(cfg)


def _numeric_fields(config, prefix=''):
  """Dotted keys of numeric leaves (numbers, or non-empty sequences of numbers)."""
  out = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      if k not in ('settings',):
        out += _numeric_fields(v, f'{prefix}{k}.')
      continue
    first = v[0] if isinstance(v, (tuple, list)) and v else v
    if isinstance(first, (int, float)) and not isinstance(first, bool):
      out.append(f'{prefix}{k}')
  return out


@pytest.mark.parametrize('name', config_lib.list_experiments())
def test_every_numeric_field_of_every_experiment_has_a_range(name):
  base = config_lib.load_experiment(name)
  for cfg in [base] + [config_lib.apply_setting(base, s) for s in base.get('settings', {})]:
    for c in [cfg, config_lib.smoke(cfg), *(m.config for g in members.expand(cfg) for m in g.members[:1])]:
      bounds = config_lib.field_bounds(c)
      missing = [k for k in _numeric_fields(c) if k not in bounds]
      assert not missing, f'{name}: numeric fields without a declared range: {missing}'
  default = config_lib.default_config()
  missing = [k for k in _numeric_fields(default) if k not in config_lib.field_bounds(default)]
  assert not missing, f'default_config() fields without a declared range: {missing}'


def test_the_message_names_field_value_range_and_fix():
  cfg = config_lib.load_experiment('standard_mnist')
  cfg.eval.batch_size = 0
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.check_values(cfg)
  assert str(info.value) == ('eval.batch_size=0 is out of range: must be an integer >= 1 '
                             '(e.g. --config.eval.batch_size=500)')
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.apply_overrides(cfg, [('eval.eps', '0.1,-0.1')])
  assert str(info.value) == ('--config.eval.eps=0.1,-0.1 is out of range: each entry must be a number >= 0 '
                             '(e.g. --config.eval.eps=0.1,0.2,0.3)')
  with pytest.raises(config_lib.ConfigError, match=r'^--config.train.lr=1e999 is out of range: must be a number'):
    config_lib.apply_overrides(cfg, [('train.lr', '1e999')])  # inf
  with pytest.raises(config_lib.ConfigError, match=r"^member 'b': method.beta=-1 is out of range"):
    config_lib.member_configs(config_lib.apply_overrides(
        config_lib.load_experiment('isometric_mnist'), [('members', 'a: method.beta=1,b: method.beta=-1')]))
  with pytest.raises(config_lib.ConfigError, match=r'^--config.method.steps=abc is not a number'):
    config_lib.apply_overrides(cfg, [('method.name', 'pgd_at'), ('method.steps', 'abc')])


def test_a_sweep_grid_is_checked_against_its_hparams_range():
  cfg = config_lib.load_experiment('local_contrastive_mnist')
  with pytest.raises(config_lib.ConfigError, match=r'^--config.sweep.grid=0,-0.5 is out of range: each entry'):
    config_lib.apply_overrides(cfg, [('sweep.grid', '0,-0.5')])
  cfg.sweep.grid = (0.0, -0.5)  # as an experiment file could write it
  with pytest.raises(config_lib.ConfigError, match=r'^sweep.grid=0,-0.5 is out of range: each entry must be a '
                     r'number >= 0'):
    members.expand(cfg)
  # The range is the swept hparam's: lam's bound applies once the sweep is over lam.
  assert config_lib.field_bounds(config_lib.apply_overrides(
      config_lib.load_experiment('local_contrastive_mnist'), [('sweep.hparam', 'lam')]))['sweep.grid'] == (
          methods.get_method_class('local_contrastive').BOUNDS['lam'])


@pytest.mark.parametrize('name', config_lib.list_experiments())
def test_every_experiment_with_and_without_smoke_and_each_setting_is_in_range(name):
  base = config_lib.load_experiment(name)
  for setting in [None, *base.get('settings', {})]:
    for smoke in (False, True):
      cfg = config_lib.apply_setting(base, setting) if setting else base
      cfg = config_lib.smoke(cfg) if smoke else cfg
      groups = members.expand(cfg)  # checks the values first
      members.validate(cfg, groups)
      for g in groups:
        for m in g.members:
          config_lib.check_values(m.config)


def test_out_of_range_values_stop_a_run_before_data_and_checkpoints(tmp_path):
  from geomrobust import experiment
  for key, value in (('train.epochs', 0), ('train.lr', -1.0), ('eval.batch_size', 0)):
    cfg = config_lib.load_experiment('standard_mnist')
    parent, leaf = key.split('.')
    cfg[parent][leaf] = value
    workdir = tmp_path / leaf
    with pytest.raises(config_lib.ConfigError, match=rf'^{key}={value:g} is out of range'):
      experiment.run_experiment(cfg, workdir, str(tmp_path / 'no_data_here'), log=lambda s: None)
    assert not workdir.exists()


def _launch(*args):
  env = dict(os.environ, ABSL_MIN_LOG_LEVEL='1', GEOMROBUST_OFFLINE='1', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(REPO / 'launch.py'), *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def test_launch_refuses_an_out_of_range_override_with_one_line(tmp_path):
  for args, line in (
      (['--show_config', '--config.eval.eps=-0.1'],
       'error: --config.eval.eps=-0.1 is out of range: each entry must be a number >= 0 '
       '(e.g. --config.eval.eps=0.1,0.2,0.3)'),
      ([f'--workdir={tmp_path / "run"}', f'--data_dir={tmp_path}', '--config.train.epochs=0'],
       'error: --config.train.epochs=0 is out of range: must be an integer >= 1 (e.g. --config.train.epochs=5)')):
    proc = _launch('--experiment=standard_mnist', *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [line], proc.stderr[-2000:]
    assert not proc.stdout and not (tmp_path / 'run').exists()
