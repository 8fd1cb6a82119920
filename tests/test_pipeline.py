"""The experiment pipeline: probes, keys reaching the model, members that
replace sections or change the dataset."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import attacks
from geomrobust import config as config_lib
from geomrobust import data as data_lib
from geomrobust import evaluation
from geomrobust import experiment
from geomrobust import models
from geomrobust import parallel
from geomrobust import pipeline
from geomrobust import probes
from geomrobust import runio
from geomrobust.data import testing
from geomrobust.methods import build_method


def _tiny_config(**train):
  cfg = config_lib.default_config()
  cfg.model.hidden = (16,)
  cfg.method = ml_collections.ConfigDict(dict(name='standard'))
  cfg.data.verify = False
  cfg.train.epochs = train.get('epochs', 1)
  cfg.train.batch_size = 32
  cfg.eval.num_examples = 32
  cfg.eval.batch_size = 32
  cfg.eval.eps = (0.1,)
  cfg.eval.attacks = ('fgsm', 'pgd')
  cfg.eval.pgd_steps = 3
  cfg.eval.pgd_restarts = 1
  cfg.eval.sanity = False
  cfg.eval.trajectories = 0
  return cfg


def _probe_input(method, params, x, y, cfg, adversarial=None):
  return probes.ProbeInput(method=method, params=params, config=cfg, eval_x=x, eval_y=y, train_x=x, train_y=y,
                           test_x=x, test_y=y, box=(0.0, 1.0), key=jax.random.key(0), adversarial=adversarial)


# -- probes -------------------------------------------------------------------


def test_probe_registry_lists_modules_and_rejects_unknown_names():
  assert {'isometry', 'pair_distances', 'fgsm_noise_areas', 'train_loss_fgsm'} <= set(probes.available_probes())
  with pytest.raises(ValueError, match="unknown probe 'nope'.*available: .*isometry"):
    probes.build_probes({'nope': {}})
  cfg = config_lib.apply_overrides(config_lib.load_experiment('isometric_mnist'), [('probes.isometry.examples', '7')])
  assert [p.name for p in probes.build_probes(cfg.probes)] == ['isometry', 'train_loss_fgsm']
  assert probes.build_probes(cfg.probes)[0].options.examples == 7


def test_train_loss_fgsm_with_beta_zero_equals_the_ce_fgsm():
  """The authors' FGSM on CE + 0 * iso is one FGSM step on CE (checked by hand)."""
  cfg = config_lib.load_experiment('isometric_mnist')
  cfg.model.hidden = (16, 16)
  cfg.method.beta = 0.0
  cfg.train.batch_size = 16
  method = build_method(cfg, models.build_model(cfg.model, 10), 10)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  x = jax.random.uniform(jax.random.key(1), (32, 28, 28, 1))
  y = jnp.arange(32) % 10
  probe = probes.build_probes({'train_loss_fgsm': {'eps': (0.0, 0.1)}})[0]
  rows = probe(_probe_input(method, params, x, y, cfg))['fgsm_train_loss']
  assert [r['eps'] for r in rows] == [0.0, pytest.approx(0.1)]
  for row in rows:
    x_adv = attacks.fgsm(lambda xx, r: method.logits(params, xx), x, y, jax.random.key(0), eps=row['eps'])
    acc = float((jnp.argmax(method.logits(params, x_adv), -1) == y).mean())
    assert row['accuracy'] == pytest.approx(acc)
  # ... and with beta > 0 the loss (hence the attack) differs.
  cfg.method.beta = 10.0
  heavy = build_method(cfg, models.build_model(cfg.model, 10), 10)
  other = probe(_probe_input(heavy, params, x, y, cfg))['fgsm_train_loss']
  assert other[1]['accuracy'] != rows[1]['accuracy']


def test_fgsm_noise_areas_match_a_direct_computation():
  cfg = _tiny_config()
  method = build_method(cfg, models.build_model(cfg.model, 10), 10)
  x8, y = testing.class_blobs(64, 0)
  x = jnp.asarray(x8, jnp.float32) / 255.0
  params = method.init_params(jax.random.key(0), x[:1])
  probe = probes.build_probes({'fgsm_noise_areas': {'eps_max': 0.2, 'eps_step': 0.05, 'examples': 64}})[0]
  out = probe(_probe_input(method, params, x, y, cfg))
  assert out['eps'] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
  clean = float(jnp.mean(jnp.argmax(method.logits(params, x), -1) == y))
  assert out['fgsm_accuracy'][0] == pytest.approx(clean) and out['noise_accuracy'][0] == pytest.approx(clean)
  g = jax.grad(lambda xx: -jnp.sum(jax.nn.log_softmax(method.logits(params, xx))[jnp.arange(64), y]))(x)
  manual = float(jnp.mean(jnp.argmax(method.logits(params, jnp.clip(x + 0.1 * jnp.sign(g), 0, 1)), -1) == y))
  assert out['fgsm_accuracy'][2] == pytest.approx(manual)
  assert out['r_fgsm'] == pytest.approx(float(np.trapezoid(100 * np.asarray(out['fgsm_accuracy']), out['eps'])))
  assert probe.summary(out) == {'r_fgsm': out['r_fgsm'], 'r_noise': out['r_noise']}


class _AdversarialNorm(probes.Probe):
  """A probe that asks for the evaluation's PGD examples (what manifold probes will do)."""
  kind = 'geometry'

  def adversarial_requests(self, config):
    return [('pgd', 0.1)]

  def __call__(self, inp):
    x_adv = inp.adversarial('pgd', 0.1)
    delta = np.abs(np.asarray(x_adv) - np.asarray(inp.eval_x)).reshape(len(x_adv), -1).max(1)
    return {'max_linf': float(delta.max()), 'moved': float((delta > 0).mean())}

  def summary(self, out):
    return dict(out)


def test_probes_get_the_evaluations_adversarial_examples(tmp_path):
  cfg = _tiny_config()
  x8, y = testing.class_blobs(64, 0, shape=(28, 28, 1))
  data = pipeline.Data(x8, y, x8, y, x8[:32], y[:32], 10, 'test')
  method = build_method(cfg, models.build_model(cfg.model, 10), 10)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  res = pipeline.evaluate_model(method, params, data, cfg, parallel.make_mesh(1), evaluator=evaluation.Evaluator(),
                                probes=[_AdversarialNorm('adv_norm', ml_collections.ConfigDict())],
                                log=lambda s: None)
  out = res['geometry']['adv_norm']
  # PGD examples: inside the eps-ball, and actually moved (not the clean inputs).
  assert 0.0 < out['max_linf'] <= 0.1 + 1e-6 and out['moved'] > 0.5
  assert res['summary'] == out
  assert 'adversarial' not in res  # attacked inputs are not written to results.json


# -- keys reach the model --------------------------------------------------------


class NoisyMLP(nn.Module):
  """An MLP whose hidden units get Gaussian noise drawn with make_rng('noise')."""
  num_classes: int = 10
  stochastic = True  # a property of the model: the evaluation uses EOT

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.tanh(nn.Dense(32, name='hidden_0')(x.reshape((x.shape[0], -1))))
    h = h + 0.5 * jax.random.normal(self.make_rng('noise'), h.shape)
    return nn.Dense(self.num_classes, name='out')(h), (h,)


def test_a_module_that_draws_noise_trains_and_evaluates_with_eot(tmp_path, tiny_mnist_dir):
  models.register_model('noisy_mlp_test', lambda c, n: NoisyMLP(num_classes=n))
  cfg = _tiny_config(epochs=2)
  cfg.model = ml_collections.ConfigDict(dict(name='noisy_mlp_test'))
  cfg.eval.eot_samples = 4
  res = experiment.train_and_evaluate(cfg, tmp_path / 'run', tiny_mnist_dir, log=lambda s: None)
  assert all(r['eot'] == 4 for r in res['robustness'])
  run = experiment.load_run(tmp_path / 'run')
  assert run.stochastic
  x = jnp.full((2, 28, 28, 1), 0.5)
  with pytest.raises(ValueError, match='stochastic'):
    run.logits(x)
  a, b = run.logits(x, jax.random.key(0)), run.logits(x, jax.random.key(1))
  assert not np.allclose(a, b)  # the key reaches the module
  np.testing.assert_array_equal(a, run.logits(x, jax.random.key(0)))


def test_deterministic_models_ignore_the_key():
  cfg = _tiny_config()
  method = build_method(cfg, models.build_model(cfg.model, 10), 10)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  x = jnp.full((2, 28, 28, 1), 0.5)
  assert not method.stochastic
  np.testing.assert_array_equal(method.logits(params, x), method.logits(params, x, jax.random.key(3)))


# -- members ----------------------------------------------------------------------


def test_members_replace_sections_and_add_fields_only_when_they_rechoose_them():
  base = config_lib.load_experiment('isometric_mnist')
  cfg = config_lib.apply_overrides(base, [(
      'members', "cnn: model={'name': 'cnn', 'channels': (4,), 'convs_per_block': 1, 'kernel_size': 3, "
                 "'dense': (8,), 'activation': 'relu', 'weight_init': 'torch'}; method.name=standard; "
                 "method.smoothing=0.1")])
  (name, _, member), = config_lib.member_configs(cfg)
  assert name == 'cnn' and member.model.to_dict()['channels'] == (4,) and 'hidden' not in member.model
  assert member.method.name == 'standard' and member.method.smoothing == 0.1
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'method.nope' \(to add a field"):
    config_lib.member_configs(config_lib.apply_overrides(base, [('members', 'x: method.nope=1')]))
  with pytest.raises(config_lib.ConfigError, match="'model' is a group, not a value.*replace the whole section"):
    config_lib.apply_overrides(base, [('model', '3')])


def test_a_member_on_another_dataset_trains_on_it(tmp_path):
  root = tmp_path / 'data'
  testing.write_idx_dataset(root / 'mnist', n_train=64, n_test=32, seed=0)
  testing.write_idx_dataset(root / 'fashion_mnist', n_train=64, n_test=32, seed=1)
  cfg = _tiny_config()
  cfg.experiment = 'mixed'
  cfg.members = ('a: seed=0', 'b: dataset=fashion_mnist')
  lines = []
  experiment.run_experiment(cfg, tmp_path / 'w', str(root), log=lines.append)
  res_b = runio.read_json(tmp_path / 'w' / 'b' / 'results.json')
  assert res_b['dataset'] == 'fashion_mnist'
  assert any('[b 2/2]' in l and 'fashion_mnist' in l for l in lines)
  # The same member alone (its own data load) gives the same numbers: it trained on Fashion-MNIST.
  alone = config_lib.member_configs(cfg)[1][2]
  solo = experiment.train_and_evaluate(alone, tmp_path / 'solo', str(root), log=lambda s: None)
  assert solo['clean_accuracy'] == res_b['clean_accuracy']
  np.testing.assert_array_equal(np.load(tmp_path / 'solo' / 'robust_masks.npz')['pgd@0.1'],
                                np.load(tmp_path / 'w' / 'b' / 'robust_masks.npz')['pgd@0.1'])
  ref = data_lib.load_dataset('fashion_mnist', str(root), verify_checksums=False, expected_counts=False)
  assert len(ref.train_labels) == 64


def test_stored_cnn_config_is_not_filled_with_mlp_defaults():
  stored = json.loads(config_lib.to_json(config_lib.load_experiment('standard_mnist')))
  del stored['train']['augment']
  filled = config_lib.fill_defaults(stored)
  assert filled['train']['augment'] == ''  # a closed section gets the new default field
  assert 'hidden' not in filled['model']   # an MLP field never enters a CNN section


# -- one runner: a sweep trained stacked or one by one --------------------------------


def test_a_sweep_trained_one_by_one_equals_the_stacked_sweep(tmp_path, tiny_mnist_dir):
  cfg = config_lib.load_experiment('local_contrastive_mnist')
  cfg = config_lib.apply_overrides(config_lib.smoke(cfg), [
      ('data.verify', 'false'), ('data.train_per_class', '0'), ('data.test_per_class', '0'),
      ('data.train_examples', '128'), ('sweep.screen_examples', '32'), ('probes.fgsm_noise_areas.examples', '32'),
      ('model.hidden', '16'), ('train.epochs', '1'), ('method.readout_epochs', '2'), ('sweep.seeds', '1'),
      ('sweep.baseline', ''), ('sweep.strong', 'best:r_fgsm'), ('sweep.mean_last_epochs', '2'),
      ('eval.eps', '0.1'), ('eval.attacks', 'fgsm,pgd'), ('eval.sanity', 'false')])
  stacked = experiment.run_experiment(cfg, tmp_path / 'stacked', tiny_mnist_dir, log=lambda s: None)
  alone_cfg = config_lib.apply_overrides(cfg, [('sweep.stacked', 'false')])
  alone = experiment.run_experiment(alone_cfg, tmp_path / 'alone', tiny_mnist_dir, log=lambda s: None)
  assert [r['name'] for r in stacked['sweep']] == ['d_f_0_seed0', 'd_f_0.5_seed0']
  for a, b in zip(stacked['sweep'], alone['sweep']):
    for key in ('clean_accuracy', 'pgd_accuracy', 'r_fgsm', 'boson_distance', 'fermion_distance'):
      assert a[key] == pytest.approx(b[key], abs=1e-6), key
  assert stacked['pgd_comparison'][0]['role'] == 'best:r_fgsm'
  assert stacked['columns'][:3] == ['clean_accuracy', 'pgd_accuracy', 'eval_clean_accuracy']
  # load_run: a slice of the stacked checkpoint (manifest) and a stand-alone run give the same classifier.
  ra = experiment.load_run(tmp_path / 'stacked', 'd_f_0.5_seed0')
  rb = experiment.load_run(tmp_path / 'alone', 'd_f_0.5_seed0')
  assert (tmp_path / 'stacked' / 'd_f_0.5_seed0' / pipeline.MEMBER_FILE).exists()
  assert not (tmp_path / 'alone' / 'd_f_0.5_seed0' / pipeline.MEMBER_FILE).exists()
  x = jnp.full((2, 28, 28, 1), 0.3)
  np.testing.assert_allclose(ra.logits(x), rb.logits(x), rtol=1e-4, atol=1e-4)  # vmapped vs plain matmuls


# -- data beyond stored images; starting from another run ------------------------------


def test_a_generated_dataset_runs_through_the_whole_pipeline_without_a_box(tmp_path):
  cfg = _tiny_config(epochs=2)
  cfg = config_lib.apply_overrides(cfg, [
      ('dataset', 'sparse_coding'), ('data.sparse_coding.dim', '32'), ('data.sparse_coding.sparsity', '3'),
      ('data.sparse_coding.steps_per_epoch', '5'), ('data.sparse_coding.test_examples', '64'),
      ('eval.eps', '0.5'), ('eval.num_examples', '64'), ('eval.sanity', 'true'), ('probes', "{'pair_distances': {}}")])
  lines = []
  res = experiment.run_experiment(cfg, tmp_path / 'gen', None, log=lines.append)
  assert res['dataset'] == 'sparse_coding' and res['eval_examples'] == 64
  metrics = runio.read_metrics(tmp_path / 'gen' / 'metrics.jsonl')
  assert [m['step'] for m in metrics] == [5, 10]  # 2 epochs of 5 generated batches
  # No box: the large-eps check scales with the data instead of assuming [0, 1] images.
  assert res['sanity']['large_eps_to_zero']['passed'], res['sanity']['large_eps_to_zero']
  assert 'train' not in res['geometry']['pair_distances'] and res['geometry']['pair_distances']['test']
  assert any('generated:sparse_coding' in l for l in lines)


def test_init_from_starts_from_another_runs_weights(tmp_path, tiny_mnist_dir):
  cfg = _tiny_config(epochs=2)
  first = experiment.run_experiment(cfg, tmp_path / 'a', tiny_mnist_dir, log=lambda s: None)
  # One epoch at learning rate 0 leaves the starting weights as they are.
  again = config_lib.apply_overrides(cfg, [('init_from', str(tmp_path / 'a')), ('train.epochs', '1'), ('train.lr', '0')])
  second = experiment.run_experiment(again, tmp_path / 'b', tiny_mnist_dir, log=lambda s: None)
  assert second['clean_accuracy'] == first['clean_accuracy']
  np.testing.assert_array_equal(np.load(tmp_path / 'a' / 'robust_masks.npz')['pgd@0.1'],
                                np.load(tmp_path / 'b' / 'robust_masks.npz')['pgd@0.1'])
  leaves = lambda d: jax.tree.leaves(experiment.load_run(tmp_path / d).params)
  for a, b in zip(leaves('a'), leaves('b')):
    np.testing.assert_array_equal(a, b)
  experiment.run_experiment(config_lib.apply_overrides(cfg, [('train.epochs', '1'), ('train.lr', '0')]),
                            tmp_path / 'c', tiny_mnist_dir, log=lambda s: None)
  assert any(not np.array_equal(a, c) for a, c in zip(leaves('a'), leaves('c')))  # from an init: another model
  with pytest.raises(config_lib.ConfigError, match="init_from='/nowhere': no run"):
    experiment.run_experiment(config_lib.apply_overrides(cfg, [('init_from', '/nowhere')]), tmp_path / 'd',
                              tiny_mnist_dir, log=lambda s: None)


def test_sweep_tables_group_by_value_and_pick_strong_members_by_role():
  from geomrobust import tables

  class G:  # stand-ins for members.Group / Member: only what tables reads
    def __init__(self, role):
      self.role = role

  class M:
    def __init__(self, name, role, value, seed):
      self.name, self.group, self.value, self.seed = name, G(role), value, seed

  rows = [dict(name=f'v{v}_s{s}', d_f=v, seed=s, clean_accuracy=c, pgd_accuracy=None, pgd_eps=0.05, pgd_profile='quick',
               r_fgsm=r)
          for v, s, c, r in [(0.0, 0, 0.5, 9.0), (0.0, 1, 0.7, 11.0), (0.5, 0, 0.8, 2.0), (0.5, 1, 0.9, 4.0)]]
  summary = tables.summarize(rows, 'd_f')
  assert [s['d_f'] for s in summary] == [0.0, 0.5]
  assert summary[0]['clean_accuracy'] == pytest.approx(0.6) and summary[0]['clean_accuracy_std'] == pytest.approx(0.1)
  assert summary[1]['r_fgsm'] == pytest.approx(3.0) and summary[0]['pgd_accuracy'] is None
  assert tables.row_keys(rows, 'd_f') == ['clean_accuracy', 'pgd_accuracy', 'r_fgsm']
  all_members = [M(r['name'], 'sweep', r['d_f'], r['seed']) for r in rows] + [M('mlp_s0', 'baseline', None, 0),
                                                                              M('mlp_s1', 'baseline', None, 1)]
  cfg = ml_collections.ConfigDict(dict(sweep=dict(hparam='d_f', strong=('baseline', 'best:clean_accuracy',
                                                                        'best:r_fgsm', 'best:nope'),
                                                  strong_seeds=1)))
  picks = [(role, m.name) for role, m in tables.strong_members(cfg, summary, all_members)]
  # The best mean per column (first seed of it), the baseline's first seed; an unknown column picks nobody.
  assert picks == [('baseline', 'mlp_s0'), ('best:clean_accuracy', 'v0.5_s0'), ('best:r_fgsm', 'v0.0_s0')]
  cfg.sweep.strong_seeds = 2
  assert len(tables.strong_members(cfg, summary, all_members)) == 6
  base = tables.baseline_entry([dict(rows[0], name='mlp_seed0'), dict(rows[1], name='mlp_seed1')], 'd_f')
  assert base['name'] == 'mlp' and base['clean_accuracy'] == pytest.approx(0.6) and base['seeds'] == [0, 1]
