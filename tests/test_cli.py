"""launch.py end to end: every experiment with --smoke, and every error path."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
import geomrobust
from geomrobust import config as config_lib
from geomrobust import experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


def launch(*args, env=None, timeout=600):
  full_env = dict(os.environ, ABSL_MIN_LOG_LEVEL='1', GEOMROBUST_OFFLINE='1', **(env or {}))
  return subprocess.run([sys.executable, str(REPO / 'launch.py'), *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def _error_line(proc):
  assert proc.returncode != 0, proc.stdout[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  return lines[0]


def test_list_prints_one_line_per_experiment():
  proc = launch('--list')
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == len(config_lib.list_experiments())
  assert any(l.startswith('isometric_mnist') for l in lines)


@pytest.mark.parametrize('args,message', [
    (['--experiment=nope'], "unknown experiment 'nope'; available: "),
    (['--experiment=isometric_mnist', '--config.train.epoch=3'], "unknown config key 'train.epoch'; valid keys:"),
    (['--experiment=isometric_mnist', '--config.train.epochs=many'], 'expected an integer'),
    (['--experiment=isometric_mnist', '--config.train.epochs'], 'needs a value'),
    (['--experiment=isometric_mnist', '--config.method.name=magic', '--smoke'], "unknown method 'magic'"),
    (['--experiment=isometric_mnist', '--config.dataset=imagenet', '--smoke'], "unknown dataset 'imagenet'"),
    (['--experiment=stochastic_mnist', '--config.eval.eot_samples=1', '--smoke'], 'needs EOT'),
    (['--experiment=stochastic_spoken_digit', '--config.eval.passes=2', '--smoke'], 'eval.passes >= 5'),
    ([], 'pass --experiment=NAME'),
    (['--evaluate=/nonexistent/run'], 'no trained run'),
])
def test_cli_errors_are_one_line_and_nonzero(args, message, tmp_path):
  proc = launch(*args, f'--workdir={tmp_path}/w', '--data_dir=' + str(tmp_path))
  assert message in _error_line(proc)


def test_missing_data_says_which_files_and_where(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  proc = launch('--experiment=isometric_mnist', '--smoke', f'--data_dir={empty}', f'--workdir={tmp_path}/w',
                env={'GEOMROBUST_CACHE_DIR': str(tmp_path / 'cache')})
  line = _error_line(proc)
  assert 'train-images-idx3-ubyte.gz' in line and '--data_dir' in line
  assert not (tmp_path / 'w' / 'results.json').exists()


@pytest.fixture(scope='module')
def _trained_family(shared_data_dir, tmp_path_factory):
  """One finished isometric smoke family (ce, beta_1e-3), trained once for the tests below."""
  cfg = config_lib.smoke(config_lib.load_experiment('isometric_mnist'))
  cfg.only = 'ce,beta_1e-3'
  # What these tests read is the run folder, not the attacks (test_every_experiment_runs_with_smoke runs them):
  # one cheap attack, no sanity checks.
  cfg.eval.attacks, cfg.eval.sanity = ('pgd',), False
  workdir = tmp_path_factory.mktemp('family')
  experiment.run_experiment(cfg, workdir, shared_data_dir, log=lambda s: None)
  return cfg, workdir


@pytest.fixture
def trained_family(_trained_family, tmp_path):
  """A private copy of the finished family (tests may rewrite it)."""
  cfg, src = _trained_family
  shutil.copytree(src, tmp_path, dirs_exist_ok=True)
  return cfg, tmp_path


def test_changed_config_on_an_existing_workdir_is_refused(trained_family, shared_data_dir):
  # A completed tiny run, then the same workdir with another learning rate.
  _, tmp_path = trained_family
  before = (tmp_path / 'ce' / 'results.json').read_text()
  proc = launch('--experiment=isometric_mnist', '--smoke', '--config.only=ce', '--config.train.lr=0.5',
                f'--data_dir={shared_data_dir}', f'--workdir={tmp_path}')
  assert 'holds a run with a different config (train.lr' in _error_line(proc)
  assert (tmp_path / 'ce' / 'results.json').read_text() == before  # nothing good overwritten


@pytest.fixture(scope='session')
def generated_cifar_dir(tmp_path_factory) -> str:
  """CIFAR-10-shaped binary batches (there is no offline CIFAR-10 here)."""
  from geomrobust.data import testing
  folder = tmp_path_factory.mktemp('cifar') / 'cifar10'
  testing.write_cifar10_bin(folder, n_per_train_file=40, n_test=64)
  return str(folder.parent)


@pytest.mark.parametrize('name', config_lib.list_experiments())
def test_every_experiment_runs_with_smoke(name, shared_data_dir, generated_cifar_dir, tmp_path):
  dataset = config_lib.load_experiment(name).dataset
  data_dir = generated_cifar_dir if dataset == 'cifar10' else shared_data_dir
  # A ResNet's smoke is mostly running, not compiling (conftest.FAST_RUN).
  env = {'XLA_FLAGS': conftest.with_opt_level(os.environ.get('XLA_FLAGS'), conftest.FAST_RUN)} if (
      dataset == 'cifar10') else None
  proc = launch(f'--experiment={name}', '--smoke', f'--data_dir={data_dir}', f'--workdir={tmp_path}', env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  top = json.loads((tmp_path / 'results.json').read_text())
  assert top['experiment'] == name and top['smoke'] is True
  assert (tmp_path / 'report.md').exists() and (tmp_path / 'accuracy_vs_eps.png').stat().st_size > 1000
  members = [r['name'] for r in top.get('runs', [])] or [None]
  for member in members:
    res = json.loads(((tmp_path / member) if member else tmp_path).joinpath('results.json').read_text())
    for key in ('experiment', 'method', 'dataset', 'seed', 'clean_accuracy', 'robustness', 'eval_examples',
                'sanity', 'geometry', 'timing'):
      assert key in res, key
    assert 0.0 <= res['clean_accuracy'] <= 1.0
    for row in res['robustness']:
      assert set(row) >= {'attack', 'norm', 'eps', 'steps', 'restarts', 'eot', 'accuracy'}
    run_cfg = json.loads(((tmp_path / member) if member else tmp_path).joinpath('config.json').read_text())
    if 'latent' in (run_cfg.get('probes') or {}):
      assert {r['eps'] for r in res['geometry']['latent']['runs']} == {r['eps'] for r in res['robustness']}
    if run_cfg['method']['name'] == 'ascl':   # the kept fractions, every epoch
      epochs = [json.loads(l) for l in ((tmp_path / member) if member else tmp_path).joinpath(
          'metrics.jsonl').read_text().splitlines()]
      assert epochs and all(0 <= e['pos_fraction'] <= 1 and 0 <= e['neg_fraction'] <= 1 for e in epochs)
  if 'models' in top and 'at_nn' in members:   # feature purification: the family tables of its contract
    assert {m['name'] for m in top['models']} == set(members)
    for m in top['models']:
      assert set(m) >= {'name', 'clean_accuracy', 'robust', 'break_radius'} and m['robust']
      assert all(set(r) == {'tau', 'accuracy'} and 0 <= r['accuracy'] <= 1 for r in m['robust'])
    assert set(top['principle']) >= {'median_rho', 'frac_rho_below_1', 'cos_w_wadv', 'cos_w_w0', 'cos_wadv_w0',
                                     'cos_v_dense'}
    assert set(top['purity']) >= {'dense_cos_at', 'dense_cos_ideal', 'top1_at'}
    assert [r['rank'] for r in top['rank']][-1] == 'full' and all('robust_accuracy' in r for r in top['rank'])
    curve = [json.loads(l) for l in (tmp_path / 'at_nn' / 'metrics.jsonl').read_text().splitlines()]
    assert {r['phase'] for r in curve} == {'clean', 'adversarial'} and all('dense_cos' in r for r in curve)
  if 'models' in top:   # every member's per-layer decomposition when it trained clean then adversarially
    for member in members:
      out = json.loads((tmp_path / member / 'results.json').read_text())['geometry']['purification']
      if out['recipe'].get('recipe') == 'clean_then_adversarial' and not out['recipe'].get('ideal'):
        assert out['layers'] and all(0 <= v['frac_rho_below_1'] <= 1 for v in out['layers'].values())
        if dataset == 'cifar10':   # the first conv layer's RGB filters, pictured per stage
          assert np.asarray(out['first_filters']['final']).shape[2] == 3
          assert (tmp_path / member / 'purification_filters.png').stat().st_size > 1000
  sweep = config_lib.smoke(config_lib.load_experiment(name)).get('sweep')
  if sweep and sweep.get('member'):   # a family sweeping one member: its table in the top results.json
    field = sweep.hparam.split('.')[-1]
    rows = top[sweep.name]
    assert sorted((r[field], r['seed']) for r in rows) == sorted(
        (float(v), s) for v in sweep.grid for s in range(sweep.seeds))
    for row in rows:
      assert set(row) >= {field, 'seed', 'clean_accuracy', 'robust_accuracy', 'eps'}
      assert 0.0 <= row['robust_accuracy'] <= 1.0 and row['eps'] == sweep.pgd_eps
  # Rerunning the finished experiment trains nothing and keeps the results.
  again = launch(f'--experiment={name}', '--smoke', f'--data_dir={data_dir}', f'--workdir={tmp_path}', env=env)
  assert again.returncode == 0 and 'already done' in again.stdout + again.stderr
  # Every kind of run (single, family member, member of a vmapped sweep) loads back as a classifier.
  run = geomrobust.load_run(tmp_path, members[-1]) if members[-1] else geomrobust.load_run(tmp_path)
  from geomrobust import data
  spec = data.get_spec(dataset)
  shape = (data.make_source(dataset, run.config.data.get(dataset)).example_shape if spec.generated
           else spec.image_shape)
  x = jnp.full((1,) + tuple(shape), 0.25, jnp.float32)
  out = run.logits(x, jax.random.key(0)) if run.stochastic else run.logits(x)   # a stochastic model needs a key
  assert out.shape == (1, spec.num_classes) and bool(jnp.all(jnp.isfinite(out)))


def test_load_run_gives_a_pure_jax_classifier(trained_family, shared_data_dir):
  cfg, tmp_path = trained_family
  with pytest.raises(ValueError, match='holds several models.*ce, beta_1e-3'):
    geomrobust.load_run(tmp_path)
  run = geomrobust.load_run(tmp_path, 'ce')
  assert run.config.method.beta == 0.0 and run.epoch == cfg.train.epochs
  from geomrobust import data
  ds = data.load_dataset('mnist', shared_data_dir)
  x = data.to_float(ds.test_images[:64])
  logits = jax.jit(run.logits)(x)
  assert logits.shape == (64, 10)
  # The same classifier the evaluation measured.
  acc = float((np.argmax(logits, -1) == ds.test_labels[:64]).mean())
  assert acc == pytest.approx(run.results['clean_accuracy'])
  g = jax.grad(lambda x: run.logits(x)[:, 0].sum())(x)  # differentiable in x (attack tools need it)
  assert g.shape == x.shape


def test_evaluate_reuses_the_trained_run(trained_family, shared_data_dir):
  _, tmp_path = trained_family
  proc = launch(f'--evaluate={tmp_path}', '--config.eval.eps=0,0.2', '--config.eval.attacks=pgd',
                '--config.eval.sanity=true', f'--data_dir={shared_data_dir}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'epoch' not in proc.stdout  # no training
  res = json.loads((tmp_path / 'ce' / 'results.json').read_text())
  assert sorted({r['eps'] for r in res['robustness']}) == [0.0, 0.2]
  # The sanity checks add FGSM and noise (iterative <= single-step <= noise).
  assert {r['attack'] for r in res['robustness']} == {'pgd', 'fgsm', 'noise', 'worst_case'}
  proc = launch(f'--evaluate={tmp_path}', '--config.train.lr=1')
  assert 'only takes --config.eval' in _error_line(proc)


def test_evaluate_adds_a_probe_to_a_finished_run(trained_family, shared_data_dir):
  _, tmp_path = trained_family
  proc = launch(f'--evaluate={tmp_path}/ce', '--config.probes.nonsense={}', f'--data_dir={shared_data_dir}')
  assert "unknown probe 'nonsense'" in _error_line(proc)
  assert 'latent' not in json.loads((tmp_path / 'ce' / 'results.json').read_text())['geometry']
  experiment.evaluate_workdir(tmp_path / 'ce', [('eval.eps', '0.2'), ('eval.attacks', 'pgd'), ('eval.sanity', 'false'),
                                                ('probes.latent', '{"eps": (0.2,)}')],
                              shared_data_dir, log=lambda s: None)
  res = json.loads((tmp_path / 'ce' / 'results.json').read_text())
  assert [r['eps'] for r in res['geometry']['latent']['runs']] == [0.2]
  # Stored with the run: the next re-evaluation measures it again.
  assert json.loads((tmp_path / 'ce' / 'config.json').read_text())['probes']['latent'] == {'eps': [0.2]}
  assert '## Latent space' in (tmp_path / 'ce' / 'report.md').read_text()


def test_evaluating_one_member_refreshes_its_family_table(trained_family, shared_data_dir):
  _, tmp_path = trained_family
  experiment.evaluate_workdir(tmp_path / 'ce', [('eval.eps', '0.2'), ('eval.attacks', 'pgd'), ('eval.sanity', 'false')],
                              shared_data_dir, log=lambda s: None)
  top = json.loads((tmp_path / 'results.json').read_text())
  row = next(r for r in top['table'] if r['name'] == 'ce')
  assert set(row['robust']) == {'0.2'}                     # the member's new grid, in the family's table
  other = next(r for r in top['table'] if r['name'] == 'beta_1e-3')
  assert set(other['robust']) != {'0.2'}                   # the other member as it was
  assert '| ce |' in (tmp_path / 'report.md').read_text()
