"""ASCL: the selection masks, distances and loss by hand, the objectives, the head, and the global batch."""

import itertools
import math
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from geomrobust import models
from geomrobust.config import load_experiment
from geomrobust.methods import ascl, build_method
from geomrobust.methods.trades import kl_divergence

# Six rows: (label, prediction) = (0,0) (0,0) (0,1) (1,1) (1,0) (2,2).
LABELS = np.array([0, 0, 0, 1, 1, 2])
PREDS = np.array([0, 0, 1, 1, 0, 2])
# Each anchor's positives P_i and softmax set A_i, written out from the definitions (papers/ascl.md).
SETS = {
    'all': [({1, 2}, {1, 2, 3, 4, 5}), ({0, 2}, {0, 2, 3, 4, 5}), ({0, 1}, {0, 1, 3, 4, 5}),
            ({4}, {0, 1, 2, 4, 5}), ({3}, {0, 1, 2, 3, 5}), (set(), {0, 1, 2, 3, 4})],
    # P: same label and same prediction; N: other label, same prediction.
    'leaking': [({1}, {1, 4}), ({0}, {0, 4}), (set(), {3}), (set(), {2}), (set(), {0, 1}), (set(), set())],
    # P: same label; N: other label, same prediction as the anchor.
    'soft': [({1, 2}, {1, 2, 4}), ({0, 2}, {0, 2, 4}), ({0, 1}, {0, 1, 3}), ({4}, {2, 4}), ({3}, {0, 1, 3}),
             (set(), set())],
    # P: same label; N: other label, predicted as the anchor's true label.
    'hard': [({1, 2}, {1, 2, 4}), ({0, 2}, {0, 2, 4}), ({0, 1}, {0, 1, 4}), ({4}, {2, 4}), ({3}, {2, 3}),
             (set(), set())],
}
# With every similarity 0, an anchor with positives loses log |A_i|; one without loses 0; the mean is over 6.
ZERO_SIM_LOSS = {'all': 5 * math.log(5) / 6, 'leaking': 2 * math.log(2) / 6,
                 'soft': (4 * math.log(3) + math.log(2)) / 6, 'hard': (3 * math.log(3) + 2 * math.log(2)) / 6}


def _from_sets(sim: np.ndarray, sets) -> float:
  total = 0.0
  for i, (pos, contrast) in enumerate(sets):
    if pos:
      log_z = math.log(sum(math.exp(sim[i, a]) for a in contrast))
      total += -sum(sim[i, p] - log_z for p in pos) / len(pos)
  return total / len(sets)


@pytest.mark.parametrize('selection', ascl.SELECTIONS)
def test_masks_and_loss_by_hand(selection):
  pos, contrast = ascl.selection_masks(jnp.asarray(LABELS), jnp.asarray(PREDS), selection)
  got = [(set(np.flatnonzero(p)), set(np.flatnonzero(c))) for p, c in zip(np.asarray(pos), np.asarray(contrast))]
  assert got == SETS[selection]
  zero = ascl.contrastive_loss(jnp.zeros((6, 6)), pos, contrast)
  assert float(zero) == pytest.approx(ZERO_SIM_LOSS[selection], rel=1e-6)
  sim = np.random.default_rng(0).normal(size=(6, 6)).astype(np.float32) * 3
  loss = ascl.contrastive_loss(jnp.asarray(sim), pos, contrast)
  assert float(loss) == pytest.approx(_from_sets(sim.astype(np.float64), SETS[selection]), rel=1e-5)


def test_kept_fractions_by_hand():
  # P_all: 3 rows x 2 + 2 rows x 1 = 8 ordered pairs, P_leak 2 (0->1, 1->0); N_all: 30 - 8 = 22, N_leak 6.
  out = ascl.kept_fractions(jnp.asarray(LABELS), jnp.asarray(PREDS))
  assert float(out['pos_fraction']) == pytest.approx(2 / 8)
  assert float(out['neg_fraction']) == pytest.approx(6 / 22)


def _brute_force(labels, preds, selection):
  n = len(labels)
  pos = np.zeros((n, n), bool)
  contrast = np.zeros((n, n), bool)
  for i, j in itertools.product(range(n), range(n)):
    if i == j:
      continue
    same = labels[i] == labels[j]
    p = same and (preds[i] == preds[j] if selection == 'leaking' else True)
    if selection == 'all':
      neg = not same
    elif selection in ('leaking', 'soft'):
      neg = not same and preds[j] == preds[i]
    else:  # hard
      neg = not same and preds[j] == labels[i]
    pos[i, j], contrast[i, j] = p, p or neg
  return pos, contrast


@pytest.mark.parametrize('selection', ascl.SELECTIONS)
def test_masks_match_a_brute_force_reference(selection):
  rng = np.random.default_rng(1)
  for _ in range(5):
    labels, preds = rng.integers(0, 4, 40), rng.integers(0, 4, 40)
    pos, contrast = ascl.selection_masks(jnp.asarray(labels), jnp.asarray(preds), selection)
    want_pos, want_contrast = _brute_force(labels, preds, selection)
    np.testing.assert_array_equal(np.asarray(pos), want_pos)
    np.testing.assert_array_equal(np.asarray(contrast), want_contrast)


def _rows(n=6, d=8, seed=0):
  return ascl.normalize(jax.random.normal(jax.random.key(seed), (n, d)))


@pytest.mark.parametrize('distance', ascl.DISTANCES)
def test_distances(distance):
  h = _rows()
  got = np.asarray(ascl.similarity(h, distance, 0.5))
  hn = np.asarray(h, np.float64)
  assert np.allclose(np.linalg.norm(hn, axis=1), 1, atol=1e-6)
  diff = hn[:, None] - hn[None]
  want = {'linf': -np.abs(diff).max(-1), 'l1': -np.abs(diff).sum(-1), 'l2': -np.sqrt((diff ** 2).sum(-1)),
          'cosine': hn @ hn.T}[distance] / 0.5
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='unknown method.distance .*linf, l1, l2, cosine'):
    ascl.similarity(h, 'l3', 0.5)


@pytest.mark.parametrize('distance', ascl.DISTANCES)
@pytest.mark.parametrize('selection', ascl.SELECTIONS)
def test_empty_sets_give_no_nan(selection, distance):
  # Row 5 has neither positives nor negatives under every selection but 'all'; rows 2-4 have no
  # leaking positives; rows 0 and 1 are the same vector (the l2 distance's sqrt at 0).
  h0 = jax.random.normal(jax.random.key(3), (6, 8))
  h0 = h0.at[1].set(h0[0])

  def loss(h):
    pos, contrast = ascl.selection_masks(jnp.asarray(LABELS), jnp.asarray(PREDS), selection)
    return ascl.contrastive_loss(ascl.similarity(ascl.normalize(h), distance, 0.2), pos, contrast)

  value, grad = jax.value_and_grad(loss)(h0)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
  # One class only, one prediction each: no anchor has a negative, some no positive.
  pos, contrast = ascl.selection_masks(jnp.zeros(4, int), jnp.arange(4), 'leaking')
  assert float(ascl.contrastive_loss(jnp.zeros((4, 4)), pos, contrast)) == 0.0


def _supcon(features: np.ndarray, labels: np.ndarray, tau: float) -> float:
  """Plain SupCon (Khosla et al. 2020), written independently: cosine similarity, all others in the
  denominator, the mean over each anchor's positives, anchors without positives adding 0."""
  f = features / np.linalg.norm(features, axis=1, keepdims=True)
  logits = f @ f.T / tau
  n = len(labels)
  total = 0.0
  for i in range(n):
    others = [j for j in range(n) if j != i]
    log_den = np.log(np.sum(np.exp(logits[i, others])))
    positives = [j for j in others if labels[j] == labels[i]]
    if positives:
      total -= np.mean([logits[i, j] - log_den for j in positives])
  return total / n


def test_selection_all_is_plain_supcon():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(24, 16))
  labels = rng.integers(0, 5, 24)
  preds = rng.integers(0, 5, 24)   # ignored by 'all'
  pos, contrast = ascl.selection_masks(jnp.asarray(labels), jnp.asarray(preds), 'all')
  got = ascl.contrastive_loss(ascl.similarity(ascl.normalize(jnp.asarray(z, jnp.float32)), 'cosine', 0.07),
                              pos, contrast)
  assert float(got) == pytest.approx(_supcon(z, labels, 0.07), rel=1e-5)


@pytest.mark.parametrize('selection', ascl.SELECTIONS)
def test_loss_is_invariant_to_permuting_the_batch(selection):
  rng = np.random.default_rng(4)
  h = _rows(32, 8, seed=5)
  labels, preds = jnp.asarray(rng.integers(0, 3, 32)), jnp.asarray(rng.integers(0, 3, 32))
  perm = jnp.asarray(rng.permutation(32))

  def loss(h, labels, preds):
    return ascl.contrastive_loss(ascl.similarity(h, 'linf', 0.2), *ascl.selection_masks(labels, preds, selection))

  assert float(loss(h[perm], labels[perm], preds[perm])) == pytest.approx(float(loss(h, labels, preds)), rel=1e-6)


# --------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------


def ascl_config(**method) -> ml_collections.ConfigDict:
  c = load_experiment('ascl_mnist')
  c.model.channels, c.model.dense = (4, 8), (16,)
  c.members = ()
  c.method.steps = 2
  c.method.eps_warmup_steps = 0
  for k, v in method.items():
    c.method[k] = v
  return c


def _method(cfg):
  return build_method(cfg, models.build_model(cfg.model, 10), 10)


def _batch(n=16, seed=0):
  x = jax.random.uniform(jax.random.key(seed), (n, 28, 28, 1))
  return {'image': x, 'label': jnp.arange(n) % 10}


def test_head_options():
  x = jnp.zeros((1, 28, 28, 1))
  m = _method(ascl_config(head_dim=32))
  p = m.init_params(jax.random.key(0), x)
  assert p['head']['kernel'].shape == (16, 32)   # on the penultimate (fc16) layer
  z = jax.random.normal(jax.random.key(1), (5, 16))
  h = m.project(p, z)
  np.testing.assert_allclose(np.asarray(h), np.asarray(ascl.normalize(z @ p['head']['kernel'] + p['head']['bias'])),
                             rtol=1e-5, atol=1e-6)
  # The classifier ignores the head: the shared evaluation attacks the same function as PGD-AT's.
  np.testing.assert_array_equal(np.asarray(m.logits(p, _batch()['image'])),
                                np.asarray(m.apply({'model': p['model']}, _batch()['image'])[0]))
  m0 = _method(ascl_config(head_dim=0))
  p0 = m0.init_params(jax.random.key(0), x)
  assert 'head' not in p0
  np.testing.assert_allclose(np.asarray(m0.project(p0, z)), np.asarray(ascl.normalize(z)), rtol=1e-6)


@pytest.mark.parametrize('field, value, message', [
    ('selection', 'leaky', "unknown method.selection 'leaky'; available: leaking, soft, hard, all"),
    ('distance', 'l3', "unknown method.distance 'l3'; available: linf, l1, l2, cosine"),
    ('objective', 'two_view', "unknown method.objective 'two_view'; available: main, one_view"),
    ('views', 2, 'method.views=2 needs method.view_augment'),
])
def test_bad_options_are_one_line_errors(field, value, message):
  with pytest.raises(ValueError, match=message.replace('(', '\\(').replace('.', '\\.')):
    _method(ascl_config(**{field: value}))


def test_two_views_refuse_the_loops_augmentation_and_double_the_rows():
  cfg = ascl_config(views=2, view_augment='crop_flip')
  cfg.train.augment = 'crop_flip'
  with pytest.raises(ValueError, match='augments each view itself; set --config.train.augment='):
    _method(cfg)
  cfg.train.augment = ''
  m = _method(cfg)
  assert m._views(_batch(8)['image'], jax.random.key(0)).shape == (16, 28, 28, 1)
  p = m.init_params(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  loss, metrics = m._loss(p, _batch(8), jax.random.key(1), m.hparams())
  assert np.isfinite(float(loss)) and 0 <= float(metrics['pos_fraction']) <= 1


def _pgd_at_loss(cfg, params, batch):
  """PGD-AT's loss on the same network and attack (deterministic: no random start)."""
  pgd_cfg = ascl_config()
  pgd_cfg.method = ml_collections.ConfigDict({k: cfg.method[k] for k in
                                              ('eps', 'step_size', 'steps', 'norm', 'eps_warmup_steps', 'attack')})
  pgd_cfg.method.name, pgd_cfg.method.random_start = 'pgd_at', False
  m = _method(pgd_cfg)
  return m._loss(params, batch, jax.random.key(9), m.hparams())[0]


def test_objectives():
  batch = _batch()
  cfg = ascl_config(random_start=False, contrastive_weight=0.0, kl_weight=0.0)
  m = _method(cfg)
  p = m.init_params(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  adv_ce = float(_pgd_at_loss(cfg, p, batch))
  # main without KL and contrastive term: PGD-AT's CE on the same adversarial examples.
  loss, met = m._loss(p, batch, jax.random.key(1), m.hparams())
  assert float(loss) == pytest.approx(adv_ce, rel=1e-5)
  # main: + kl_weight * KL(clean || adv) / C.
  m2 = _method(ascl_config(random_start=False, contrastive_weight=0.0, kl_weight=2.0))
  loss2, met2 = m2._loss(p, batch, jax.random.key(1), m2.hparams())
  logits = m.logits(p, batch['image'])
  x_adv = m.adversarial(p, batch['image'], batch['label'], jax.random.key(2), m.hparams())
  kl = float(jnp.mean(kl_divergence(jax.nn.log_softmax(logits), m.logits(p, x_adv))))
  assert float(met2['kl']) == pytest.approx(kl, rel=1e-4)
  assert float(loss2) == pytest.approx(adv_ce + 2.0 * kl / 10, rel=1e-5)
  # one_view: CE(clean) + CE(adv).
  m3 = _method(ascl_config(random_start=False, contrastive_weight=0.0, objective='one_view'))
  clean_ce = float(jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(16), batch['label']]))
  assert float(m3._loss(p, batch, jax.random.key(1), m3.hparams())[0]) == pytest.approx(clean_ce + adv_ce, rel=1e-5)
  # The contrastive weight adds exactly w * L_ASCL, which is logged.
  m4 = _method(ascl_config(random_start=False, contrastive_weight=0.5, kl_weight=0.0))
  loss4, met4 = m4._loss(p, batch, jax.random.key(1), m4.hparams())
  assert float(met4['contrastive']) > 0
  assert float(loss4) == pytest.approx(adv_ce + 0.5 * float(met4['contrastive']), rel=1e-5)


def test_the_head_and_the_network_get_gradients():
  m = _method(ascl_config())
  p = m.init_params(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  grads = jax.grad(lambda q: m._loss(q, _batch(), jax.random.key(1), m.hparams())[0])(p)
  assert float(jnp.abs(grads['head']['kernel']).max()) > 0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


SHARDED_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, {repo!r})
    from tests.test_ascl import ascl_config, _method, _batch
    from geomrobust import parallel
    from geomrobust.data import testing
    from geomrobust.methods import ascl
    from geomrobust.training import loop
    assert jax.device_count() == 8, jax.devices()
    out = {{}}
    # The contrastive loss of a batch sharded over 8 devices is the global batch's loss,
    # not the mean of the 8 per-device losses.
    rng = np.random.default_rng(0)
    h = ascl.normalize(jnp.asarray(rng.normal(size=(64, 8)), jnp.float32))
    labels, preds = jnp.asarray(rng.integers(0, 3, 64)), jnp.asarray(rng.integers(0, 3, 64))
    def loss(h, labels, preds):
      return ascl.contrastive_loss(ascl.similarity(h, 'linf', 0.2), *ascl.selection_masks(labels, preds, 'leaking'))
    mesh = parallel.make_mesh(8)
    sharded = jax.device_put((h, labels, preds), NamedSharding(mesh, P('data')))
    out['sharded'] = float(jax.jit(loss)(*sharded))
    out['global'] = float(loss(h, labels, preds))
    out['per_device'] = float(np.mean([loss(h[i::8], labels[i::8], preds[i::8]) for i in range(8)]))
    # Training: 8 devices == 1 device.
    x, y = testing.class_blobs(128, 0, shape=(28, 28, 1))
    for n in (1, 8):
      cfg = ascl_config()
      cfg.train.epochs, cfg.train.batch_size = 2, 32
      res = loop.train(_method(cfg), x, y, x[:32], y[:32], cfg, {tmp!r} + f'/n{{n}}', parallel.make_mesh(n),
                       log=lambda s: None)
      out[f'loop{{n}}'] = [np.asarray(l).tolist() for l in jax.tree.leaves(res.params)]
    json.dump(out, open({tmp!r} + '/out.json', 'w'))
''')


def test_sharded_batch_is_one_contrastive_batch(run_on_8_cpu_devices):
  out = run_on_8_cpu_devices(SHARDED_SCRIPT, optimised=True)
  assert out['sharded'] == pytest.approx(out['global'], rel=1e-5)
  assert abs(out['per_device'] - out['global']) > 0.05   # the check above can tell the two apart
  for a, b in zip(out['loop1'], out['loop8']):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
