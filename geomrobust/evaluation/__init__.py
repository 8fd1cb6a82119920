"""The shared robustness evaluation every experiment ends in.

``evaluate(apply_fn, params, images, labels, eval_config, mesh)`` runs each
configured attack recipe at every eps of the grid on the first
``eval.num_examples`` test examples, and returns clean accuracy, one
``robustness`` row per (attack, eps), the per-example worst case over attacks,
the per-example correctness masks and sanity checks. Methods cannot bring their
own attack: they only provide ``apply_fn(params, x, rng) -> logits``.

Attack recipes (names in ``eval.attacks``):
  fgsm        one signed-gradient step of size eps (CE loss).
  pgd         PGD, CE loss, ``eval.pgd_steps`` x ``eval.pgd_restarts``, step
              ``eval.pgd_step_size * eps / steps``, random start.
  pgd_margin  the same with the margin loss.
  noise       random sign noise (linf) / Gaussian direction (l2) of norm eps:
              the floor any gradient attack must beat.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from geomrobust import attacks
from geomrobust import parallel
from geomrobust.parallel import batching


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A named attack with its settings resolved from the eval config."""
  name: str
  attack: str            # key of attacks.ATTACKS
  kwargs: dict           # static keyword arguments
  steps: int
  restarts: int
  step_size_factor: float | None = None  # step = factor * eps / steps


def recipes(ev: ml_collections.ConfigDict, eot_samples: int = 1) -> list[Recipe]:
  """Resolves ``eval.attacks`` names into recipes (errors list the valid names)."""
  steps, restarts, factor = int(ev.pgd_steps), int(ev.pgd_restarts), float(ev.pgd_step_size)
  table = {
      'fgsm': Recipe('fgsm', 'fgsm', dict(loss='ce'), 1, 1),
      'pgd': Recipe('pgd', 'pgd', dict(loss=ev.get('pgd_loss', 'ce'), steps=steps, restarts=restarts),
                    steps, restarts, factor),
      'pgd_margin': Recipe('pgd_margin', 'pgd', dict(loss='margin', steps=steps, restarts=restarts),
                           steps, restarts, factor),
      'noise': Recipe('noise', 'noise', dict(samples=max(restarts, 1)), 0, max(restarts, 1)),
  }
  out = []
  for name in ev.attacks:
    if name not in table:
      raise ValueError(f'unknown eval.attacks entry {name!r}; available: {", ".join(table)}')
    r = table[name]
    kwargs = dict(r.kwargs, norm=ev.norm)
    if r.attack != 'noise':
      kwargs['eot_samples'] = eot_samples
    out.append(dataclasses.replace(r, kwargs=kwargs))
  return out


def _predict_fn(apply_fn, eot_samples: int):
  """``(params, x, rng) -> predicted labels``; stochastic models vote by mean
  probability over ``eot_samples`` draws (1 draw = deterministic)."""

  def predict(params, x, rng):
    if eot_samples == 1:
      return jnp.argmax(apply_fn(params, x, rng), -1)
    probs = jax.vmap(lambda k: jax.nn.softmax(apply_fn(params, x, k)))(jax.random.split(rng, eot_samples))
    return jnp.argmax(probs.mean(0), -1)

  return predict


def make_correct_fn(apply_fn, recipe: Recipe | None, batch_size: int, mesh, eot_samples: int = 1):
  """Jitted ``(params, x [N,...], y [N], rng, eps) -> bool [N]``: is each example
  still classified correctly after the attack (``recipe=None``: clean)?

  The whole set is processed in ``batch_size`` chunks by ``lax.map`` inside one
  program, each chunk sharded over the mesh's 'data' axis; eps is traced, so an
  eps grid compiles once per recipe.
  """
  predict = _predict_fn(apply_fn, eot_samples)

  def run(params, x, y, rng, eps):
    n = x.shape[0]
    keys = jax.random.split(rng, n)  # per-example keys: results do not depend on batch size.

    def chunk(inp):
      xb, yb, kb = inp
      xb, yb = parallel.shard_batch((xb, yb), mesh)
      k_attack = jax.random.fold_in(kb[0], 1)
      if recipe is not None:
        kw = dict(recipe.kwargs)
        if recipe.step_size_factor is not None:
          kw['step_size'] = recipe.step_size_factor * eps / recipe.steps
        xb = attacks.get_attack(recipe.attack)(
            lambda xx, r: apply_fn(params, xx, r), xb, yb, k_attack, eps=eps, **kw)
      return predict(params, xb, jax.random.fold_in(kb[0], 2)) == yb

    return batching.map_batches(chunk, (x, y, keys), batch_size)

  rep = parallel.replicated(mesh)
  return jax.jit(run, in_shardings=(rep, rep, rep, rep, rep), out_shardings=rep)


def evaluate(apply_fn: Callable, params: Any, images, labels, ev: ml_collections.ConfigDict, mesh, *,
             stochastic: bool = False, log: Callable[[str], None] = print, tag: str = '') -> dict:
  """Runs the configured attacks over the eps grid.

  Args:
    apply_fn: ``(params, x float32 [B, ...] in [0,1], rng) -> logits [B, C]``.
    params: the model parameters (passed to ``apply_fn``).
    images: float32 ``[N, ...]`` in [0,1] (the caller takes the first
      ``eval.num_examples`` test examples); labels: int32 ``[N]``.
    ev: ``config.eval``.
    mesh: the ``('data',)`` mesh.
    stochastic: the model draws noise from ``rng``; attacks then use EOT over
      ``eval.eot_samples`` draws and predictions vote over as many draws.

  Returns:
    dict with ``clean_accuracy``, ``robustness`` rows (one per attack and eps,
    plus ``worst_case`` rows when several attacks run), ``masks``
    ({row key: bool [N]}), ``sanity`` and ``timing``.
  """
  eot = int(ev.get('eot_samples', 1)) if stochastic else 1
  bs = int(ev.batch_size)
  parallel.check_batch_size(min(bs, len(labels)), mesh, 'eval.batch_size')
  rep = parallel.replicated(mesh)
  x, y = jax.device_put((jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)), rep)
  rng = jax.random.key(int(ev.seed))
  t_start = time.perf_counter()

  clean_mask = np.asarray(make_correct_fn(apply_fn, None, bs, mesh, eot)(params, x, y, rng, jnp.float32(0)))
  clean = float(clean_mask.mean())
  log(f'{tag}clean accuracy {clean:.4f} on {len(clean_mask)} examples')
  rows, masks = [], {'clean': clean_mask}
  eps_grid = [float(e) for e in ev.eps]
  recipe_list = recipes(ev, eot)
  for recipe in recipe_list:
    fn = make_correct_fn(apply_fn, recipe, bs, mesh, eot)
    for i, eps in enumerate(eps_grid):
      t0 = time.perf_counter()
      mask = np.asarray(fn(params, x, y, jax.random.fold_in(rng, i), jnp.float32(eps)))
      acc = float(mask.mean())
      masks[f'{recipe.name}@{eps:g}'] = mask
      rows.append(dict(attack=recipe.name, norm=ev.norm, eps=eps, steps=recipe.steps,
                       restarts=recipe.restarts, eot=eot, accuracy=acc))
      log(f'{tag}{recipe.name:>10} eps={eps:<6g} accuracy {acc:.4f}  ({time.perf_counter() - t0:.1f} s)')
  if len(recipe_list) > 1:
    for eps in eps_grid:
      worst = np.logical_and.reduce([masks[f'{r.name}@{eps:g}'] for r in recipe_list] + [clean_mask])
      masks[f'worst_case@{eps:g}'] = worst
      rows.append(dict(attack='worst_case', norm=ev.norm, eps=eps, steps=max(r.steps for r in recipe_list),
                       restarts=max(r.restarts for r in recipe_list), eot=eot, accuracy=float(worst.mean())))
  seconds = time.perf_counter() - t_start
  return dict(clean_accuracy=clean, robustness=rows, masks=masks, eval_examples=int(len(clean_mask)),
              sanity=sanity_checks(clean, rows),
              timing=dict(eval_seconds=seconds))


def sanity_checks(clean: float, rows: list[dict], tol: float = 1e-6) -> dict:
  """Checks any honest evaluation must pass (evaluation.md); failures are
  reported, never hidden. Each entry: ``{passed: bool, value, detail}``."""
  checks = {}
  by_attack: dict[str, list[dict]] = {}
  for r in rows:
    by_attack.setdefault(r['attack'], []).append(r)
  # 1. An attack at eps = 0 leaves the clean accuracy unchanged.
  zero = [r for r in rows if r['eps'] == 0.0]
  if zero:
    worst_gap = max(abs(r['accuracy'] - clean) for r in zero)
    checks['eps0_equals_clean'] = dict(passed=worst_gap <= tol, value=worst_gap,
                                       detail='max |accuracy(eps=0) - clean| over attacks')
  # 2. Accuracy is non-increasing in eps (per attack).
  worst_rise = 0.0
  for rs in by_attack.values():
    accs = [r['accuracy'] for r in sorted(rs, key=lambda r: r['eps'])]
    worst_rise = max([worst_rise] + [b - a for a, b in zip(accs, accs[1:])])
  checks['monotone_in_eps'] = dict(passed=worst_rise <= tol, value=worst_rise,
                                   detail='largest accuracy increase between consecutive eps')
  # 3. The iterative attack is at least as strong as the single-step one.
  if 'pgd' in by_attack and 'fgsm' in by_attack:
    fg = {r['eps']: r['accuracy'] for r in by_attack['fgsm']}
    gap = max((r['accuracy'] - fg[r['eps']] for r in by_attack['pgd'] if r['eps'] in fg), default=0.0)
    checks['pgd_le_fgsm'] = dict(passed=gap <= 0.005, value=gap,
                                 detail='max over eps of accuracy(PGD) - accuracy(FGSM); tolerance 0.5 points')
  return checks
