"""Experiment registry, --config overrides, members and smoke."""

import os
import pathlib

import pytest

from geomrobust import config as config_lib


def test_every_experiment_loads_and_has_a_documented_command():
  names = config_lib.list_experiments()
  assert 'isometric_mnist' in names
  for name in names:
    cfg = config_lib.load_experiment(name)
    assert cfg.experiment == name
    doc = config_lib.experiment_doc(name)
    assert 'COMMAND' in doc and 'launch.py' in doc, name
    assert 'RUNTIME' in doc and 'EXPECTED' in doc, name


def test_unknown_experiment_lists_available():
  with pytest.raises(config_lib.ConfigError, match="unknown experiment 'nope'.*isometric_mnist"):
    config_lib.load_experiment('nope')


@pytest.mark.parametrize('key,text,expected', [
    ('train.epochs', '7', 7),
    ('train.lr', '3', 3.0),          # int literal accepted for a float field
    ('train.lr', '1e-2', 0.01),
    ('model.hidden', '10,20', (10, 20)),
    ('model.hidden', '(4, 5, 6)', (4, 5, 6)),
    ('model.hidden', '8', (8,)),
    ('data.verify', 'false', False),
    ('data.verify', 'True', True),
    ('model.activation', 'relu', 'relu'),
    ('eval.eps', '0,0.1', (0.0, 0.1)),
])
def test_override_types(key, text, expected):
  cfg = config_lib.apply_overrides(config_lib.load_experiment('isometric_mnist'), [(key, text)])
  node = cfg
  for part in key.split('.'):
    node = node[part]
  assert node == expected and type(node) is type(expected)


def test_override_errors_are_one_actionable_line():
  cfg = config_lib.load_experiment('isometric_mnist')
  cases = [
      (r"unknown config key 'train.epoch'; valid keys: .*train\.epochs",
       lambda: config_lib.apply_overrides(cfg, [('train.epoch', '3')])),
      (r"bad value 'abc' for --config.train.epochs: expected an integer",
       lambda: config_lib.apply_overrides(cfg, [('train.epochs', 'abc')])),
      ('expected an integer', lambda: config_lib.apply_overrides(cfg, [('train.epochs', '2.5')])),
      ('expected true or false', lambda: config_lib.apply_overrides(cfg, [('data.verify', 'maybe')])),
      ('is a group', lambda: config_lib.apply_overrides(cfg, [('train', '3')])),
      ('needs a value', lambda: config_lib.split_override_args(['launch.py', '--config.train.epochs'])),
  ]
  for pattern, call in cases:
    with pytest.raises(config_lib.ConfigError, match=pattern) as info:
      call()
    # The message actually raised is one line (the CLI prints it as is).
    message = str(info.value)
    assert '\n' not in message and '\r' not in message, message
    assert message.strip() == message and message, repr(message)


def test_split_override_args_keeps_other_flags():
  rest, overrides = config_lib.split_override_args(['l.py', '--experiment=x', '--config.a.b=1', '--smoke'])
  assert rest == ['l.py', '--experiment=x', '--smoke'] and overrides == [('a.b', '1')]


def test_members_expand_in_order_with_typed_overrides():
  cfg = config_lib.load_experiment('isometric_mnist')
  members = config_lib.member_configs(cfg)
  names = [m[0] for m in members]
  assert names[0] == 'ce' and len(names) == len(set(names)) == len(cfg.members)
  by_name = {n: c for n, _, c in members}
  assert by_name['ce'].method.beta == 0.0
  assert by_name['beta_1e-1_k10'].method.beta == 0.1 and by_name['beta_1e-1_k10'].method.k == 10.0
  assert all(c.members == () for c in by_name.values())
  only = config_lib.apply_overrides(cfg, [('only', 'beta_1,ce')])
  assert [m[0] for m in config_lib.member_configs(only)] == ['ce', 'beta_1']
  with pytest.raises(config_lib.ConfigError, match="unknown member 'zzz'"):
    config_lib.member_configs(config_lib.apply_overrides(cfg, [('only', 'zzz')]))
  with pytest.raises(config_lib.ConfigError, match='unknown config key'):
    config_lib.member_configs(config_lib.apply_overrides(cfg, [('members', 'x: method.nope=1')]))


def test_smoke_shrinks_but_keeps_the_path():
  cfg = config_lib.smoke(config_lib.load_experiment('isometric_mnist'))
  assert cfg.smoke_run and cfg.train.epochs <= 2 and cfg.eval.num_examples <= 64
  assert cfg.data.train_examples <= 512 and cfg.eval.pgd_steps >= 1
  assert len(config_lib.member_configs(cfg)) >= 2
  # Attacks: the single-step ones and the first and last costly one (the cascade and Square stay).
  assert tuple(cfg.eval.attacks) == ('fgsm', 'noise', 'apgd_ce', 'square')


@pytest.mark.parametrize('attacks,kept', [
    (('pgd', 'apgd_dlr'), ('pgd', 'apgd_dlr')),
    (('fgsm', 'pgd', 'pgd_margin', 'apgd_t', 'noise'), ('fgsm', 'pgd', 'apgd_t', 'noise')),
    (('square', 'pgd', 'apgd_ce', 'apgd_dlr'), ('square', 'apgd_dlr')),
    (('noise', 'apgd_t'), ('noise', 'apgd_t')),
    (('pgd', 'magic', 'apgd_ce', 'square'), ('pgd', 'magic', 'square')),   # unknown: left for the error
])
def test_smoke_keeps_the_first_and_last_costly_attack(attacks, kept):
  cfg = config_lib.default_config()
  cfg.eval.attacks = attacks
  assert config_lib.smoke(cfg).eval.attacks == kept


def test_a_run_written_before_a_new_default_field_still_resumes(tmp_path):
  import json
  from geomrobust import experiment
  cfg = config_lib.load_experiment('isometric_mnist')
  stored = json.loads(config_lib.to_json(cfg))
  del stored['train']['augment']  # as written by a version without that field
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  experiment.check_workdir_config(tmp_path, cfg)  # no error: the default is what that run used
  cfg.train.augment = 'crop_flip'
  with pytest.raises(config_lib.ConfigError, match="train.augment: '' -> 'crop_flip'"):
    experiment.check_workdir_config(tmp_path, cfg)


# -- the registry: names, not paths; an optional user folder ---------------------------------------


def _evil_file(folder, marker):
  """An experiment file that would leave ``marker`` behind if it ever ran."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'evil.py').write_text(f'import pathlib\npathlib.Path({str(marker)!r}).write_text("ran")\n'
                                  'def get_config():\n  raise SystemExit("ran")\n')
  return folder / 'evil.py'


def test_experiment_names_are_registry_names_never_paths(tmp_path):
  marker = tmp_path / 'marker'
  evil = _evil_file(tmp_path / 'elsewhere', marker)
  rel = pathlib.Path(os.path.relpath(evil.with_suffix(''), config_lib.EXPERIMENTS_DIR))
  names = [str(rel), str(evil.with_suffix('')), str(evil), '../evil', 'a/evil', 'a\\evil', '..', '.evil',
           'evil.py', 'standard_mnist/../evil', '', ' evil', 'evil\n']
  for name in names:
    for call in (config_lib.load_experiment, config_lib.experiment_doc, config_lib.experiment_summary):
      for extra in (None, tmp_path / 'elsewhere'):
        with pytest.raises(config_lib.ConfigError, match=r'^bad experiment name .*not a path') as info:
          call(name, extra)
        assert '\n' not in str(info.value)
  assert not marker.exists()
  with pytest.raises(config_lib.ConfigError, match="unknown experiment 'evil'"):
    config_lib.load_experiment('evil')  # not in the built-in registry
  assert not marker.exists()


def test_a_user_folder_adds_experiments_beside_the_builtin_ones(tmp_path):
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'my_run.py').write_text(
      '"""My run.\n\nCOMMAND: python launch.py --experiments_dir=mine --experiment=my_run\n"""\n'
      'from geomrobust.config import load_experiment\n\n'
      'def get_config():\n  c = load_experiment("standard_mnist")\n  c.train.epochs = 1\n  return c\n')
  (mine / '_helper.py').write_text('raise SystemExit("a helper is not an experiment")\n')
  names = config_lib.list_experiments(mine)
  assert 'my_run' in names and 'standard_mnist' in names and '_helper' not in names
  assert 'my_run' not in config_lib.list_experiments()
  cfg = config_lib.load_experiment('my_run', mine)
  assert cfg.experiment == 'my_run' and cfg.train.epochs == 1 and cfg.model.name == 'cnn'
  assert config_lib.experiment_summary('my_run', experiments_dir=mine) == 'My run.'
  assert config_lib.load_experiment('standard_mnist', mine).train.epochs == 5  # built-ins still there
  # Passing the built-in folder itself adds nothing (and is no duplicate).
  assert config_lib.list_experiments(config_lib.EXPERIMENTS_DIR) == config_lib.list_experiments()
  with pytest.raises(config_lib.ConfigError, match=r"^experiments folder .*nowhere.* does not exist"):
    config_lib.load_experiment('my_run', tmp_path / 'nowhere')
  # A name in both registries is an error naming both files.
  (mine / 'standard_mnist.py').write_text('raise SystemExit("must not run")\n')
  with pytest.raises(config_lib.ConfigError, match=r"^experiment 'standard_mnist' is defined twice: "
                     rf".*experiments/standard_mnist.py and {mine}/standard_mnist.py"):
    config_lib.load_experiment('standard_mnist', mine)


def test_a_registry_entry_that_resolves_outside_its_folder_is_refused(tmp_path):
  marker = tmp_path / 'marker'
  evil = _evil_file(tmp_path / 'elsewhere', marker)
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'linked.py').symlink_to(evil)
  with pytest.raises(config_lib.ConfigError, match=r"^experiment 'linked' resolves to .*outside"):
    config_lib.load_experiment('linked', mine)
  assert not marker.exists()
