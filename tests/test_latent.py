"""The latent-space study (probes/latent.py): its numbers by hand, and end to end against the evaluation."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import evaluation, models, parallel, pipeline, probes
from geomrobust.attacks import losses
from geomrobust.data import testing
from geomrobust.methods import build_method
from geomrobust.probes import latent
from tests.test_pipeline import _tiny_config


def test_study_by_hand():
  # 1-D latents. Clean: class 0 at 0 and 2, class 1 at 10 and 12, all classified correctly.
  z_clean = np.array([[0.], [2.], [10.], [12.]])
  y = np.array([0, 0, 1, 1])
  # Adversarial: ex 0 -> 1 (still 0: failed), ex 1 -> 11 (predicted 1: succeeded), ex 2 -> 10 (failed),
  # ex 3 -> 4 (predicted 0: succeeded).
  z_adv = np.array([[1.], [11.], [10.], [4.]])
  out = latent.study(z_clean, z_adv, y, pred_clean=y, pred_adv=np.array([0, 1, 1, 0]))
  assert (out['succeeded'], out['failed'], out['clean_wrong']) == (2, 2, 0)
  # Shifts |z_adv - z|: succeeded 9, 8; failed 1, 0. Clean inter-class distances 10, 12, 8, 10: mean 10.
  assert out['distance']['succeeded'] == pytest.approx({'n': 2, 'mean': 8.5, 'se': 0.5, 'median': 8.5})
  assert out['distance']['failed']['mean'] == 0.5
  assert out['relative_distance']['succeeded']['mean'] == pytest.approx(0.85)
  assert out['relative_distance']['succeeded']['se'] == pytest.approx(0.05)
  # Clean: intra 2, inter 10. Adversarial (true labels): intra |1-11|, |10-4| -> 8; inter 9, 3, 1, 7 -> 5.
  assert out['clean'] == pytest.approx({'intra': 2.0, 'inter': 10.0, 'ratio': 0.2})
  assert out['adversarial'] == pytest.approx({'intra': 8.0, 'inter': 5.0, 'ratio': 1.6})
  # Centroids 1 and 11; adversarial nearest: 0, 1, 1, 0 = predicted; the fooled two sit in the wrong class.
  assert out['centroid'] == pytest.approx({'adv_nearest_is_predicted': 1.0, 'succeeded_nearest_is_predicted': 1.0,
                                           'succeeded_nearest_is_true': 0.0, 'clean_nearest_is_predicted': 1.0})
  # An example wrong when clean is neither succeeded nor failed.
  out = latent.study(z_clean, z_adv, y, pred_clean=np.array([0, 0, 0, 1]), pred_adv=np.array([0, 1, 1, 0]))
  assert (out['succeeded'], out['failed'], out['clean_wrong']) == (2, 1, 1)
  assert out['distance']['failed'] == {'n': 1, 'mean': 1.0, 'se': None, 'median': 1.0}


def test_margins():
  logits = np.array([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
  # The probe's margin (logit_y - max other; negative: misclassified) is the attacks' own, negated.
  np.testing.assert_allclose(-np.asarray(losses.margin(jnp.asarray(logits), jnp.asarray([0, 0]))), [1.0, -3.0])


def _trained_tiny():
  cfg = _tiny_config()
  cfg.eval.eps = (0.1, 0.3)
  cfg.eval.attacks = ('fgsm', 'pgd')
  x8, y = testing.class_blobs(64, 0, shape=(28, 28, 1), noise=60.0)
  data = pipeline.Data(x8, y, x8, y, x8, y, 10, 'test')
  method = build_method(cfg, models.build_model(cfg.model, 10), 10)
  params = method.init_params(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  # A few steps of plain training so that some, not all, examples survive the attacks.
  x = jnp.asarray(x8, jnp.float32) / 255
  grad = jax.jit(jax.grad(lambda p: -jnp.mean(jax.nn.log_softmax(method.logits(p, x))[jnp.arange(64), y])))
  for _ in range(30):
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grad(params))
  return cfg, data, method, params


def test_probe_agrees_with_the_evaluations_worst_case():
  cfg, data, method, params = _trained_tiny()
  cfg.probes = ml_collections.ConfigDict({'latent': {}})
  probe = probes.build_probes(cfg.probes)
  assert probe[0].adversarial_requests(cfg) == [(a, e) for e in (0.1, 0.3) for a in ('fgsm', 'pgd')]
  res = pipeline.evaluate_model(method, params, data, cfg, parallel.make_mesh(1), evaluator=evaluation.Evaluator(),
                                probes=probe, log=lambda s: None)
  out = res['geometry']['latent']
  assert [r['eps'] for r in out['runs']] == [0.1, 0.3] and out['attacks'] == ['fgsm', 'pgd']
  clean = np.asarray(res['masks']['clean'])
  for run in out['runs']:
    robust = np.asarray(res['masks'][f'worst_case@{run["eps"]:g}'])
    # Failed = correct under every attack = the evaluation's worst-case robust examples.
    assert run['failed'] == robust.sum()
    assert run['succeeded'] == (clean & ~robust).sum() and run['clean_wrong'] == (~clean).sum()
  assert 0 < out['runs'][0]['failed'] and 0 < out['runs'][-1]['succeeded']
  assert set(res['summary']) >= {'latent_ratio_clean', 'latent_ratio_adv_eps0.3'}
  assert not any('@' in k for k in res['summary'])   # '@' keys are shown as accuracies
  json.dumps(out)   # JSON-able


def test_report_and_family_plot(tmp_path):
  cfg, data, method, params = _trained_tiny()
  probe = latent.Latent('latent', ml_collections.ConfigDict({'eps': (0.3,), 'layer': 0}))
  res = pipeline.evaluate_model(method, params, data, cfg, parallel.make_mesh(1), evaluator=evaluation.Evaluator(),
                                probes=[probe], log=lambda s: None)
  out = res['geometry']['latent']
  assert out['layer'] == 0 and [r['eps'] for r in out['runs']] == [0.3]
  lines = probe.report(out, tmp_path)
  assert (tmp_path / latent.PLOT_FILE).stat().st_size > 1000
  assert any(line.startswith('| 0.3 |') for line in lines)
  family = latent.Latent.family_report({'a': out, 'b': out}, tmp_path)
  assert (tmp_path / latent.COMPARISON_PLOT).stat().st_size > 1000
  assert sum(line.startswith(('| a |', '| b |')) for line in family) == 2
  assert latent.Latent.family_report({'a': out}, tmp_path) == []
  bad = latent.Latent('latent', ml_collections.ConfigDict({'layer': 5}))
  with pytest.raises(ValueError, match='probes.latent.layer=5: the model has 1 representations'):
    pipeline.evaluate_model(method, params, data, cfg, parallel.make_mesh(1), evaluator=evaluation.Evaluator(),
                            probes=[bad], log=lambda s: None)
