"""The comparison of methods (compare_mnist): members composed from other
experiments, the table and its claims, a failing member, reusing finished runs."""

import copy
import json
import pathlib

import numpy as np
import pytest

from geomrobust import comparison
from geomrobust import config as config_lib
from geomrobust import experiment as exp_lib
from geomrobust import runio


def _family(*members, **top):
  cfg = config_lib.load_experiment('compare_mnist')
  with cfg.unlocked():
    cfg.members = members
    cfg.comparison.claims = ()
    cfg.comparison.reference = ''
    for k, v in top.items():
      cfg[k] = v
  return cfg


# -- composition: members taken from other experiments by name -----------------


def test_a_member_starts_from_another_experiment_and_takes_the_shared_sections():
  cfg = _family('at: experiment=madry_mnist; train.epochs=2', 'asc: experiment=ascl_mnist/ascl_leaking',
                'own: method.name=standard')
  with cfg.unlocked():
    cfg.eval.num_examples = 123
    cfg.data.train_examples = 77
  madry = config_lib.load_experiment('madry_mnist')
  got = {n: m for n, _, m in config_lib.member_configs(cfg)}
  at = got['at']
  assert at.method.to_dict() == madry.method.to_dict()          # madry_mnist's objective ...
  assert at.train.epochs == 2 and at.train.lr == madry.train.lr  # ... its training, with the member's override
  assert at.eval.num_examples == 123 and at.data.train_examples == 77   # the family's evaluation and data
  assert at.probes.to_dict() == cfg.probes.to_dict() and at.experiment == 'compare_mnist'
  assert got['asc'].method.name == 'ascl' and got['asc'].method.selection == 'leaking'
  assert got['own'].method.name == 'standard' and got['own'].model.name == cfg.model.name   # the family's own config


def test_a_member_takes_its_experiments_setting_and_the_family_dataset():
  cfg = _family('at: experiment=madry_mnist; setting=full', dataset='fashion_mnist')
  (_, _, at), = config_lib.member_configs(cfg)
  assert at.model.channels == (32, 64) and at.train.epochs == 84 and at.dataset == 'fashion_mnist'


@pytest.mark.parametrize('spec, message', [
    ('x: experiment=no_such_experiment', "member 'x': unknown experiment 'no_such_experiment'"),
    ('x: experiment=ascl_mnist', 'trains several models; name one: ascl_mnist/ascl_leaking'),
    ('x: experiment=ascl_mnist/nobody', "experiment 'ascl_mnist' has no member 'nobody'"),
    ('x: experiment=madry_mnist; setting=huge', "has no setting 'huge'"),
    ('x: setting=full', 'needs experiment=NAME'),
])
def test_bad_member_specs_fail_with_one_line(spec, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace('(', r'\(')):
    config_lib.member_configs(_family(spec))


def test_smoke_shrinks_members_taken_from_other_experiments():
  cfg = config_lib.smoke(_family('lc: experiment=local_contrastive_mnist; train.epochs=10; '
                                 'method.readout_epochs=10', 'at: experiment=madry_mnist',
                                 smoke=('train.epochs=2', 'method.readout_epochs=2')))
  with cfg.unlocked():
    cfg.only = ''   # compare_mnist's smoke picks two of its own members
  (_, _, lc), (_, _, at) = config_lib.member_configs(cfg)
  assert at.method.steps == 2 and at.train.batch_size == 64   # madry_mnist's own smoke
  assert lc.train.epochs == 2 and lc.method.readout_epochs == 2 and lc.smoke_run   # the family's smoke items
  assert lc.data.train_examples <= 512 and lc.eval.num_examples <= 64


def test_a_smoke_item_no_member_has_fails_whatever_only_selects():
  cfg = _family('lc: experiment=local_contrastive_mnist', 'at: experiment=madry_mnist')
  with cfg.unlocked():
    cfg.smoke = ('method.readout_epochs=2',)   # only lc has it: fine, even when only at runs
    cfg.only = 'at'
  assert [n for n, _, _ in config_lib.member_configs(config_lib.smoke(cfg))] == ['at']
  with cfg.unlocked():
    cfg.smoke = ('method.readout_epoch=2',)    # a typo: no member has it
  with pytest.raises(config_lib.ConfigError, match='method.readout_epoch is a field of neither'):
    config_lib.member_configs(config_lib.smoke(cfg))


# -- claims and sentences -----------------------------------------------------


def _row(name, clean, robust, *, stochastic=False, geometry=None, n=100):
  return dict(name=name, method='m', model='mlp', clean_accuracy=clean, clean_stderr=comparison.stderr(clean, n),
              robust=[dict(eps=e, accuracy=a, stderr=comparison.stderr(a, n)) for e, a in robust],
              mean_robust=float(np.mean([a for _, a in robust])), sanity_passed=True, sanity_failed=[],
              stochastic=stochastic, geometry=geometry or {}, eval_examples=n)


def _masks(folder: pathlib.Path, **masks):
  folder.mkdir(parents=True, exist_ok=True)
  np.savez(folder / 'robust_masks.npz', **masks)


def test_claims_use_the_paired_standard_error_and_say_which_way(tmp_path):
  a = np.zeros(100, bool)
  a[:60] = True
  b = a.copy()
  b[50:60] = False   # b loses 10 of a's examples, nothing else differs
  _masks(tmp_path / 'a', **{'worst_case@0.1': a})
  _masks(tmp_path / 'b', **{'worst_case@0.1': b})
  rows = {'a': _row('a', 0.9, [(0.1, 0.6)]), 'b': _row('b', 0.9, [(0.1, 0.5)])}
  folders = {'a': tmp_path / 'a', 'b': tmp_path / 'b'}
  d = a.astype(float) - b.astype(float)
  out = comparison.check_claim(comparison.parse_claim('A beats B | a > b | robust@0.1'), rows, folders)
  assert out['paired'] and out['difference'] == pytest.approx(0.1)
  assert out['se'] == pytest.approx(d.std(ddof=1) / 10) and out['verdict'] == 'holds'
  # Unpaired (a stochastic member): the two binomial SEs combined; 0.1 is then within 2 SE.
  rows['a'] = _row('a', 0.9, [(0.1, 0.6)], stochastic=True)
  out = comparison.check_claim(comparison.parse_claim('A beats B | a > b | robust@0.1'), rows, folders)
  assert not out['paired'] and out['se'] == pytest.approx(np.hypot(np.sqrt(.24 / 100), np.sqrt(.25 / 100)))
  assert out['verdict'] == 'inconclusive'
  flipped = comparison.check_claim(comparison.parse_claim('B beats A | b > a | robust@0.1'),
                                   {'a': _row('a', .9, [(0.1, 0.9)]), 'b': _row('b', .9, [(0.1, 0.1)])},
                                   {'a': tmp_path / 'none', 'b': tmp_path / 'none'})
  assert flipped['verdict'] == 'contradicted'
  same = comparison.check_claim(comparison.parse_claim('no change | a ~ b | clean'), rows, folders)
  assert same['verdict'] == 'holds' and same['difference'] == 0


def test_claims_on_geometry_and_missing_members(tmp_path):
  rows = {'a': _row('a', .9, [(0.1, .5)], geometry={'class_radius_eps0': 1.5}),
          'b': _row('b', .9, [(0.1, .5)], geometry={'class_radius_eps0': 1.2})}
  out = comparison.check_claim(comparison.parse_claim('wider | a > b | class_radius_eps0'), rows, {})
  assert out['verdict'] == 'holds' and out['se'] is None and out['difference'] == pytest.approx(0.3)
  out = comparison.check_claim(comparison.parse_claim('x | a > gone | clean'), rows, {})
  assert out['verdict'] == 'not tested' and 'gone did not finish' in out['reason']
  with pytest.raises(config_lib.ConfigError, match='bad comparison claim'):
    comparison.parse_claim('no operator | a b | clean')


def test_the_opening_is_generated_from_the_numbers(tmp_path):
  """Change the numbers and the sentences change with them: no fixed text."""
  def opening(ra, rb):
    rows = {'a': _row('a', 0.95, [(0.1, ra), (0.3, ra / 2)]), 'b': _row('b', 0.97, [(0.1, rb), (0.3, rb / 2)])}
    claims = [comparison.check_claim(comparison.parse_claim('a is more robust | a > b | robust@0.1'), rows,
                                     {'a': tmp_path / 'x', 'b': tmp_path / 'x'})]
    top = dict(table=list(rows.values()), ranking=sorted(rows, key=lambda n: -rows[n]['mean_robust']),
               claims=claims, failed=[dict(name='c', error='NonFiniteLoss: loss is nan')], reference='b')
    return '\n'.join(comparison.opening_lines(top, [0.1, 0.3]))

  good, bad = opening(0.8, 0.2), opening(0.2, 0.8)
  assert '1. **a**' in good and '1. **b**' in bad
  assert 'a is more robust**: holds. a 80.0% vs b 20.0%' in good
  assert 'a is more robust**: contradicted. a 20.0% vs b 80.0%' in bad
  assert 'the reference b keeps 10.0 ± 3.0%; 1 of 1 other members' in good
  assert '0 of 1 other members' in bad
  assert '- c: NonFiniteLoss: loss is nan' in good


# -- end to end: a failing member, the table, reuse -------------------------------


@pytest.fixture(scope='module')
def finished(tmp_path_factory, shared_data_dir):
  """A smoke comparison: two MLP members and one whose training diverges."""
  cfg = config_lib.smoke(_family('ce_mlp: experiment=standard_mnist; model={"name": "mlp", "hidden": (64,)}',
                                 'broken: experiment=standard_mnist; train.lr=1e30',
                                 'iso: experiment=isometric_mnist/beta_1e-1; model={"name": "mlp", "hidden": (64,)}',
                                 smoke=('train.epochs=2',)))
  with cfg.unlocked():
    cfg.only = ''
    cfg.comparison.claims = ('iso is more robust | iso > ce_mlp | robust@0.1',)
    cfg.probes = config_lib.ml_collections.ConfigDict({'pair_distances': {'examples': 64}})
  workdir = tmp_path_factory.mktemp('compare')
  lines = []
  top = exp_lib.run_experiment(cfg, workdir, shared_data_dir, log=lines.append)
  return cfg, workdir, top, lines


def test_a_failing_member_is_reported_and_the_others_finish(finished):
  _, workdir, top, lines = finished
  assert [f['name'] for f in top['failed']] == ['broken'] and 'loss' in top['failed'][0]['error']
  assert [r['name'] for r in top['table']] == ['ce_mlp', 'iso'] and [r['name'] for r in top['runs']] == ['ce_mlp', 'iso']
  assert any('[broken 2/3] FAILED' in line for line in lines)
  report = (workdir / 'report.md').read_text()
  assert '1 member(s) failed' in report and '- broken: ' in report
  assert (workdir / comparison.TABLE_FIGURE).stat().st_size > 1000


def test_the_table_equals_the_members_own_results(finished):
  _, workdir, top, _ = finished
  assert json.loads((workdir / 'results.json').read_text())['table'] == top['table']
  for row in top['table']:
    own = json.loads((workdir / row['name'] / 'results.json').read_text())
    assert set(row) >= {'name', 'method', 'model', 'clean_accuracy', 'robust', 'sanity_passed', 'train_seconds',
                        'geometry'}
    assert row['clean_accuracy'] == own['clean_accuracy']
    worst = {r['eps']: r['accuracy'] for r in own['robustness'] if r['attack'] == 'worst_case'}
    assert {r['eps']: r['accuracy'] for r in row['robust']} == worst
    assert all(r['stderr'] == pytest.approx(np.sqrt(r['accuracy'] * (1 - r['accuracy']) / own['eval_examples']))
               for r in row['robust'])
    assert row['sanity_passed'] == all(v['passed'] for v in own['sanity'].values())
    assert row['geometry']['boson_distance'] == own['summary']['boson_distance']
    assert row['train_seconds'] > 0
  assert top['table'][0]['architecture'] == top['table'][1]['architecture'] == 'shared A'
  assert top['claims'][0]['verdict'] in ('holds', 'contradicted', 'inconclusive')


def test_a_finished_member_is_reused_not_retrained(finished, tmp_path, shared_data_dir):
  cfg, workdir, _, _ = finished
  cfg = copy.deepcopy(cfg)   # the fixture's config stays as it was
  with cfg.unlocked():
    cfg.members = tuple(m for m in cfg.members if not m.startswith('broken'))
    cfg.comparison.claims = ()
  lines = []
  top = exp_lib.run_experiment(cfg, tmp_path / 'again', shared_data_dir, log=lines.append, reuse=(workdir,))
  assert sum('not retrained' in line for line in lines) == 2 and not any(' epoch ' in line for line in lines)
  for row in top['table']:
    assert row['reused_from'] == str(workdir / row['name'])
    own = json.loads((workdir / row['name'] / 'results.json').read_text())
    assert row['clean_accuracy'] == own['clean_accuracy'] and row['robust'][0]['accuracy'] == [
        r['accuracy'] for r in own['robustness'] if r['attack'] == 'worst_case'][0]


def test_reuse_with_another_evaluation_evaluates_without_training(finished, tmp_path, shared_data_dir):
  cfg, workdir, _, _ = finished
  cfg = copy.deepcopy(cfg)   # the fixture's config stays as it was
  with cfg.unlocked():
    cfg.members = tuple(m for m in cfg.members if m.startswith('ce_mlp'))
    cfg.comparison.claims = ()
    cfg.eval.num_examples = 32
    cfg.eval.batch_size = 32
  lines = []
  top = exp_lib.run_experiment(cfg, tmp_path / 'again', shared_data_dir, log=lines.append, reuse=(workdir,))
  assert any('not retrained' in line for line in lines) and not any(' epoch ' in line for line in lines)
  (row,) = top['table']
  assert row['eval_examples'] == 32 and row['reused_from'] == str(workdir / 'ce_mlp')
  assert (tmp_path / 'again' / 'ce_mlp' / 'metrics.jsonl').read_text() == (
      workdir / 'ce_mlp' / 'metrics.jsonl').read_text()
  # Another training config is not reused: it trains.
  with cfg.unlocked():
    cfg.seed = 5
  lines = []
  exp_lib.run_experiment(cfg, tmp_path / 'third', shared_data_dir, log=lines.append, reuse=(workdir,))
  assert not any('not retrained' in line for line in lines) and any(' epoch ' in line for line in lines)


def test_a_rerun_rebuilds_the_report_when_the_claims_change(finished, tmp_path, shared_data_dir):
  cfg, workdir, _, _ = finished
  cfg = copy.deepcopy(cfg)   # the fixture's config stays as it was
  with cfg.unlocked():
    cfg.members = tuple(m for m in cfg.members if not m.startswith('broken'))
  done = tmp_path / 'done'
  exp_lib.run_experiment(cfg, done, shared_data_dir, log=lambda _: None, reuse=(workdir,))   # finished, no training
  with cfg.unlocked():
    cfg.comparison.claims = ('iso keeps clean accuracy | iso ~ ce_mlp | clean',)
  lines = []
  top = exp_lib.run_experiment(cfg, done, shared_data_dir, log=lines.append)
  assert any('already done' in line for line in lines) and any('rewrote' in line for line in lines)
  assert [c['text'] for c in top['claims']] == ['iso keeps clean accuracy']
  assert 'iso keeps clean accuracy' in (done / 'report.md').read_text()
  assert runio.read_json(done / 'config.json')['comparison']['claims'] == list(cfg.comparison.claims)
  lines = []
  exp_lib.run_experiment(cfg, done, shared_data_dir, log=lines.append)   # unchanged: nothing rewritten
  assert not any('rewrote' in line for line in lines)


def test_manifold_geometry_reads_only_the_selected_layers():
  import jax
  import jax.numpy as jnp
  from geomrobust import methods, models
  from geomrobust.geometry import manifolds
  cfg = config_lib.load_experiment('standard_mnist')
  model = models.build_model(cfg.model, 10)
  method = methods.build_method(cfg, model, 10)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  every = manifolds.ManifoldBuilder(method).layers(params, np.zeros((1, 28, 28, 1), np.float32))
  last = manifolds.ManifoldBuilder(method, layers=(-2,))
  assert [l.name for l in last.layers(params, np.zeros((1, 28, 28, 1), np.float32))] == [every[-2].name]
  feats = last.features(params, np.zeros((3, 28, 28, 1), np.float32), jax.random.key(0))
  assert list(feats) == [every[-2].name] and feats[every[-2].name].shape == (1, 3, every[-2].features)
  with pytest.raises(ValueError, match='out of range'):
    manifolds.ManifoldBuilder(method, layers=(len(every),)).layers(params, np.zeros((1, 28, 28, 1), np.float32))
