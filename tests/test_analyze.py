"""``launch.py --analyze``: manifold geometry of a finished run (end to end on a
tiny trained MNIST run), the probe in the generic path, and the errors."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from geomrobust import config as config_lib
from geomrobust import experiment
from geomrobust import runio

REPO = pathlib.Path(__file__).resolve().parents[1]

# Small enough for seconds: 3 x 4 class / exemplar manifolds, 2 projections of
# the CNN's two conv layers (3136 and 1568 wide) to 1000 features.
TINY = dict(eps=(0.0, 0.1), classes=3, per_class=4, exemplars=3, repeats=4, n_t=10, projection_seeds=2,
            max_features=1000, steps=2, batch_size=16)
TINY_FLAGS = ['--config.geometry.eps=0,0.2', '--config.geometry.n_t=12']


def launch(*args):
  env = dict(os.environ, ABSL_MIN_LOG_LEVEL='1', GEOMROBUST_OFFLINE='1')
  return subprocess.run([sys.executable, str(REPO / 'launch.py'), *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def _error_line(proc) -> str:
  assert proc.returncode != 0, proc.stdout[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  return lines[0]


def _tiny_config(probes=None):
  """standard_mnist --smoke with one epoch and one cheap attack."""
  overrides = [('train.epochs', '1'), ('eval.attacks', 'pgd'), ('eval.eps', '0.1'), ('eval.sanity', 'false'),
               ('eval.trajectories', '0')]
  if probes:
    overrides.append(('probes', repr(probes)))
  return config_lib.apply_overrides(config_lib.smoke(config_lib.load_experiment('standard_mnist')), overrides)


@pytest.fixture(scope='module')
def trained(shared_data_dir, tmp_path_factory):
  """A finished tiny standard_mnist run (no geometry in its config)."""
  workdir = tmp_path_factory.mktemp('run')
  experiment.run_experiment(_tiny_config(), workdir, shared_data_dir, log=lambda s: None)
  return workdir


@pytest.fixture(scope='module')
def analyzed(trained, shared_data_dir, tmp_path_factory):
  """That run after ``--analyze`` (its config's options: TINY; flags: TINY_FLAGS)."""
  workdir = tmp_path_factory.mktemp('analyzed')
  shutil.copytree(trained, workdir, dirs_exist_ok=True)
  before = runio.read_json(workdir / 'results.json')
  # The run's own options sit in its config (as an experiment would put them).
  cfg = runio.read_json(workdir / 'config.json')
  cfg['probes'] = {'manifold_geometry': dict(TINY, n_t=10)}
  runio.write_json(workdir / 'config.json', cfg)
  proc = launch(f'--analyze={workdir}', f'--data_dir={shared_data_dir}', *TINY_FLAGS)
  return proc, workdir, before


def test_analyze_writes_geometry_json_results_and_report(analyzed):
  proc, workdir, before = analyzed
  assert proc.returncode == 0, proc.stderr[-4000:]
  # One progress line per (kind, eps).
  for line in ('class eps=0:', 'class eps=0.2:', 'exemplar eps=0: skipped', 'exemplar eps=0.2:'):
    assert f'manifold_geometry: {line}' in proc.stdout, proc.stdout
  out = json.loads((workdir / 'geometry.json').read_text())
  res = json.loads((workdir / 'results.json').read_text())
  assert res['geometry']['manifold_geometry'] == out
  # Options: defaults < the run's config < the flags.
  assert out['options']['eps'] == [0.0, 0.2] and out['options']['n_t'] == 12 and out['options']['classes'] == 3
  assert [l['name'] for l in out['layers']] == ['pixels', 'layer1', 'layer2', 'layer3', 'logits']
  assert [(l['features'], l['projection_seeds']) for l in out['layers']] == [(784, 1), (1000, 2), (1000, 2),
                                                                              (256, 1), (10, 1)]
  runs = {(r['kind'], r['eps']): r for r in out['runs']}
  assert set(runs) == {('class', 0.0), ('class', 0.2), ('exemplar', 0.0), ('exemplar', 0.2)}
  assert 'deterministic model' in runs[('exemplar', 0.0)]['skipped']
  for key in (('class', 0.0), ('class', 0.2), ('exemplar', 0.2)):
    for name, layer in runs[key]['layers'].items():
      for m in ('capacity', 'radius', 'dimension', 'center_correlation', 'K', 'participation_ratio'):
        assert np.isfinite(layer[m]), (key, name, m)
      assert (layer['capacity_std'] is None) == (name in ('pixels', 'layer3', 'logits'))
      assert len(layer['per_seed']) == (2 if name in ('layer1', 'layer2') else 1)
      assert len(layer['capacity_all']) == 3
  # The evaluation is untouched; the summary carries the probe's numbers.
  for k in ('clean_accuracy', 'robustness', 'sanity', 'eval_examples'):
    assert res[k] == before[k], k
  assert 'class_capacity_logits_eps0.2' in res['summary'] and 'exemplar_radius_logits_eps0.2' in res['summary']
  report = (workdir / 'report.md').read_text()
  assert '## Manifold geometry (MFTMA)' in report and '![manifold geometry](geometry.png)' in report
  assert '## Accuracy (%) under attack' in report   # the rest of the report is still there
  assert (workdir / 'geometry.png').stat().st_size > 10_000
  assert not (workdir / 'run.lock').exists()


def test_evaluate_keeps_the_analysis(analyzed, shared_data_dir, tmp_path):
  # --evaluate changes neither weights nor data: the geometry stays, in results and report.
  proc, src, _ = analyzed
  assert proc.returncode == 0, proc.stderr[-4000:]
  shutil.copytree(src, tmp_path, dirs_exist_ok=True)
  cfg = runio.read_json(tmp_path / 'config.json')
  cfg['probes'] = {}    # so the evaluation does not run the probe itself
  runio.write_json(tmp_path / 'config.json', cfg)
  kept = runio.read_json(tmp_path / 'geometry.json')
  experiment.evaluate_workdir(tmp_path, [('eval.pgd_steps', '3')], shared_data_dir, log=lambda s: None)
  res = runio.read_json(tmp_path / 'results.json')
  assert res['geometry']['manifold_geometry'] == kept
  assert 'class_capacity_logits_eps0.2' in res['summary']
  assert '## Manifold geometry (MFTMA)' in (tmp_path / 'report.md').read_text()


def test_probe_in_the_config_runs_after_the_evaluation(shared_data_dir, tmp_path):
  cfg = _tiny_config(probes={'manifold_geometry': dict(TINY, kinds=('class',))})
  experiment.run_experiment(cfg, tmp_path, shared_data_dir, log=lambda s: None)
  res = runio.read_json(tmp_path / 'results.json')
  out = res['geometry']['manifold_geometry']
  assert [(r['kind'], r['eps']) for r in out['runs']] == [('class', 0.0), ('class', 0.1)]
  assert np.isfinite(out['runs'][1]['layers']['logits']['capacity'])
  assert runio.read_json(tmp_path / 'geometry.json') == out
  assert '## Manifold geometry (MFTMA)' in (tmp_path / 'report.md').read_text()


def test_analyze_errors_are_one_line_with_the_fix(trained, tmp_path):
  line = _error_line(launch(f'--analyze={tmp_path}/nope'))
  assert 'does not exist' in line and '--experiment=' in line
  # An unfinished run: the message is its training command.
  unfinished = tmp_path / 'unfinished'
  shutil.copytree(trained, unfinished)
  (unfinished / 'results.json').unlink()
  line = _error_line(launch(f'--analyze={unfinished}'))
  assert 'not a finished run (no results.json)' in line
  assert line.endswith(f'python launch.py --experiment=standard_mnist --smoke --workdir={unfinished}')
  for flag, message in (('--config.geometry.nt=5', "unknown config key 'geometry.nt'; valid keys: geometry."),
                        ('--config.geometry.n_t=0', '--config.geometry.n_t=0 is out of range'),
                        ('--config.eval.eps=0.1', 'only takes --config.geometry.* overrides')):
    assert message in _error_line(launch(f'--analyze={trained}', flag))
  assert not (trained / 'run.lock').exists()


def test_analysing_one_member_refreshes_its_family_report(analyzed, shared_data_dir, tmp_path):
  # A family of two copies of the analysed run; then one member analysed again, at another eps.
  proc, src, _ = analyzed
  assert proc.returncode == 0, proc.stderr[-4000:]
  for member in ('a', 'b'):
    shutil.copytree(src, tmp_path / member)
  runio.write_json(tmp_path / 'config.json', runio.read_json(src / 'config.json'))
  runio.write_json(tmp_path / 'results.json', dict(experiment='standard_mnist', runs=[{'name': 'a'}, {'name': 'b'}],
                                                   table=[]))
  experiment.analyze_workdir(tmp_path / 'a', [('geometry.eps', '0,0.1'), ('geometry.kinds', 'class')],
                             shared_data_dir, log=lambda s: None)
  top = runio.read_json(tmp_path / 'results.json')
  assert [r['name'] for r in top['table']] == ['a', 'b']
  assert 'class_capacity_logits_eps0.1' in top['table'][0]['summary']
  assert 'class_capacity_logits_eps0.2' in top['table'][1]['summary']
  report = (tmp_path / 'report.md').read_text()
  section = report.split('## Manifold geometry (MFTMA) of the members')[1]
  assert '| model | eps | pixels | layer1 | layer2 | layer3 | logits |' in section
  for row in ('| a | 0.1 |', '| b | 0.2 |', '| b | 0 | – | – |'):   # b's exemplars at eps 0: points, skipped
    assert row in section, row
  a_class = runio.read_json(tmp_path / 'a' / 'geometry.json')['runs'][1]['layers']['logits']
  assert '| a | 0.1 | ' in section and f'{a_class["capacity"]:.3g} / {a_class["radius"]:.3g}' in section
  assert (tmp_path / 'geometry_comparison.png').stat().st_size > 10_000
