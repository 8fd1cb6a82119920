"""Runs the attack recipes over the eps grid, plus the sanity-check attacks.

Every attack is ``vmap``-ed over examples with a per-example key
``fold_in(key(attack, eps), example_index)``: an example's random start, EOT
draws and verdict depend on nothing but the example, so results do not depend
on the evaluation batch size or on which other examples are evaluated, which
is what lets the sanity checks re-attack a subset (or re-batch the set) and
compare verdict by verdict. What stays batch-dependent is float rounding (XLA
tiles a batch of B examples differently for different B); :func:`probe_fn`
measures it for the batch-size check (clean scores, attack starts and first
steps). An :class:`Evaluator` keeps its compiled programs
per (model function, recipe, batch size, mesh), so evaluating many models of
one architecture with one evaluator compiles each attack once; there is no
module-level cache.
"""

from __future__ import annotations

import math
import time
import zlib
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from geomrobust import attacks
from geomrobust import parallel
from geomrobust.attacks import common as attack_common
from geomrobust.evaluation import recipes as recipes_lib
from geomrobust.evaluation import sanity as sanity_lib
from geomrobust.parallel import batching

ApplyFn = Callable[[Any, jax.Array, jax.Array | None], jax.Array]
# A stochastic model's accuracy is the mean over at least this many evaluation passes.
MIN_PASSES = 5


def _example_keys(rng: jax.Array, idx: jax.Array) -> jax.Array:
  """Key array [N] of per-example keys: example i gets ``fold_in(rng, i)``."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, idx)


def attack_key(seed: int, name: str, eps: float) -> jax.Array:
  """The key of one (attack, eps) cell: fixed by the attack's name and eps, so a
  cell's result is the same whatever else the grid or the attack list holds."""
  rng = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
  return jax.random.fold_in(rng, int(round(float(eps) * 1e6)))


def _scores(apply_fn: ApplyFn, params, x, keys, eot: int, stochastic: bool, model_key):
  """What the verdicts take the argmax of, [B, C]: the logits; for a stochastic
  model (no ``model_key``), the mean probabilities over ``eot`` draws per
  example, drawn from ``split(keys[i], eot)``. With ``model_key`` (frozen
  noise) a stochastic model is called per example with that key, exactly as
  the attack called it: a batched call would draw each example's noise at
  its position in the batch, another draw than the one attacked."""
  if not stochastic:
    return apply_fn(params, x, model_key)
  if model_key is not None:
    return jax.vmap(lambda xi: apply_fn(params, xi[None], model_key)[0])(x)

  def one(xi, ki):
    return jax.vmap(lambda k: jax.nn.softmax(apply_fn(params, xi[None], k)[0]))(jax.random.split(ki, eot)).mean(0)

  return jax.vmap(one)(x, keys)


def _predict(apply_fn: ApplyFn, params, x, keys, eot: int, stochastic: bool, model_key):
  """Labels [B]. Stochastic models vote by mean probability over ``eot`` draws
  per example; ``model_key`` (frozen noise) makes any model deterministic."""
  return jnp.argmax(_scores(apply_fn, params, x, keys, eot, stochastic, model_key), -1)


def _pass_verdicts(apply_fn: ApplyFn, params, x, y, keys, passes: int):
  """A stochastic model's verdicts over ``passes`` evaluation passes: pass p
  predicts example i with one noise draw ``fold_in(keys[i], p)`` (the model
  as deployed). Returns ``(correct bool [B, P], majority bool [B])``: the
  majority vote is the most frequent predicted label over the passes (ties:
  the lowest label), compared with ``y``."""

  def one(xi, ki):
    return jax.vmap(lambda p: jnp.argmax(apply_fn(params, xi[None], jax.random.fold_in(ki, p))[0], -1))(
        jnp.arange(passes))

  labels = jax.vmap(one)(x, keys)                                      # [B, P]
  logits_width = jax.eval_shape(lambda: apply_fn(params, x[:1], keys[0])).shape[-1]
  counts = jax.nn.one_hot(labels, logits_width, dtype=jnp.int32).sum(1)  # [B, C]
  return labels == y[:, None], jnp.argmax(counts, -1) == y


def _attack_batch(apply_fn: ApplyFn, recipe: recipes_lib.Recipe, params, x, y, keys, eps, model_key,
                  return_losses: bool = False, box=attacks.UNIT_BOX):
  """The recipe's attack on each example of ``x [B, ...]`` on its own (vmap), inside ``box``."""
  attack = attacks.get_attack(recipe.attack)
  kw = dict(recipe.kwargs, box=box)
  if recipe.step_size_factor is not None:
    kw['step_size'] = recipe.step_size_factor * eps / recipe.steps
  if return_losses:
    kw['return_losses'] = True

  def logits_fn(xx, r):
    return apply_fn(params, xx, r if model_key is None else model_key)

  def one(xi, yi, ki):
    out = attack(logits_fn, xi[None], yi[None], ki, eps=eps, **kw)
    if return_losses:
      x_adv, losses = out  # [1, ...], [restarts, steps + 1, 1]
      return x_adv[0], losses[..., 0]
    return out[0]

  return jax.vmap(one)(x, y, keys)


def correct_fn(apply_fn: ApplyFn, recipe: recipes_lib.Recipe | None, batch_size: int, mesh, eot: int = 1,
               stochastic: bool = False, with_inputs: bool = False, box=attacks.UNIT_BOX, passes: int = 0):
  """``(params, x [N, ...], y [N], idx [N], rng, eps, model_key) -> bool [N]``, compiled per chunk.

  Is example ``idx[i]`` still classified correctly after the attack
  (``recipe=None``: clean)? ``model_key=None`` draws the model's noise per
  example (EOT); a key freezes it. A stochastic model with ``passes > 0``
  (and no ``model_key``) returns ``(correct per pass bool [N, P], majority
  vote correct bool [N])`` instead (:func:`_pass_verdicts`). The set runs in
  chunks of ``batch_size`` (the last padded by repeating its last example),
  one compiled program for every chunk, each sharded over the mesh's 'data'
  axis; eps is traced, so an eps grid compiles once per recipe, and any
  subset (the cascade's survivors) reuses the same program: an example's
  verdict is computed by the same arithmetic whichever set it is in.
  ``with_inputs``: also return the attacked inputs ``[N, ...]``.
  """

  def chunk(params, xb, yb, ib, rng, eps, model_key):
    xb, yb, ib = parallel.shard_batch((xb, yb, ib), mesh)
    keys = _example_keys(rng, ib)
    if recipe is not None:
      xb = _attack_batch(apply_fn, recipe, params, xb, yb, jax.vmap(jax.random.fold_in, (0, None))(keys, 1),
                         eps, model_key, box=box)
    pred_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 2)
    if stochastic and passes and model_key is None:
      correct = _pass_verdicts(apply_fn, params, xb, yb, pred_keys, passes)
    else:
      correct = _predict(apply_fn, params, xb, pred_keys, eot, stochastic, model_key) == yb
    return (correct, xb) if with_inputs else correct

  chunk = jax.jit(chunk)

  def run(params, x, y, idx, rng, eps, model_key):
    n = int(y.shape[0])
    pad = -n % batch_size
    if pad:
      x, y, idx = (jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) for a in (x, y, idx))
    outs = [chunk(params, x[i:i + batch_size], y[i:i + batch_size], idx[i:i + batch_size], rng, eps, model_key)
            for i in range(0, n + pad, batch_size)]
    return jax.tree.map(lambda *o: jnp.concatenate(o)[:n], *outs)

  return run


def losses_fn(apply_fn: ApplyFn, recipe: recipes_lib.Recipe, mesh, eot: int = 1, box=attacks.UNIT_BOX):
  """Jitted ``(params, x [K, ...], y, idx, rng, eps) -> losses [K, restarts, steps + 1]``:
  the attack loss at every iterate, for the convergence plot."""

  def run(params, x, y, idx, rng, eps):
    keys = jax.vmap(jax.random.fold_in, (0, None))(_example_keys(rng, idx), 1)
    return _attack_batch(apply_fn, recipe, params, x, y, keys, eps, None, return_losses=True, box=box)[1]

  return jax.jit(run)


def fingerprint(x: jax.Array) -> jax.Array:
  """uint32 []: an integer hash of the float32 bits of ``x`` (any shape), exact
  (integer arithmetic mod 2**32), so equal arrays give equal hashes however a
  program is tiled, and a change of any entry changes it."""
  bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32).reshape(-1)
  weights = (2 * jnp.arange(bits.shape[0], dtype=jnp.uint32) + 1) * jnp.uint32(2654435761)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


def _first_steps(apply_fn: ApplyFn, recipe: recipes_lib.Recipe, params, x, y, keys, eps, box):
  """Where each restart of ``recipe`` starts and its first step direction, per example (vmap).

  Mirrors the start of ``attacks.pgd`` and ``attacks.apgd``: restart ``r`` of
  example ``i`` splits ``fold_in(keys[i], r)`` into (init, model) keys, starts
  at the projected uniform point of the ball, and takes the (EOT) gradient of
  the attack loss there with the model key ``fold_in(model key, 0)``.
  Returns ``(start fingerprints uint32 [B, R], directions [B, R, ...])``: a
  start's :func:`fingerprint`; a direction is ``attacks.step_direction`` of
  the gradient (sign for linf).
  """
  opts = recipe.kwargs
  norm, eot = opts.get('norm', 'linf'), int(opts.get('eot_samples', 1))
  loss = recipes_lib.loss_name(recipe) or 'ce'
  random_start = bool(opts.get('random_start', True))

  def one(xi, yi, ki):
    xi = xi[None]
    goal = attack_common.make_goal(loss, yi[None])
    value_and_grad = attacks.eot_value_and_grad(lambda xx, r: apply_fn(params, xx, r), goal.objective, eot)

    def restart(r):
      k_init, k_model = jax.random.split(jax.random.fold_in(ki, r))
      x0 = xi
      if random_start:
        x0 = attacks.project(xi + attacks.random_init(k_init, xi, eps, norm), xi, eps, norm, box=box)
      grad = value_and_grad(x0, jax.random.fold_in(k_model, 0)).grad
      return fingerprint(x0), attacks.step_direction(grad, norm)[0]

    return jax.lax.map(restart, jnp.arange(max(recipe.restarts, 1)))

  return jax.vmap(one)(x, y, keys)


def probe_fn(apply_fn: ApplyFn, recipe: recipes_lib.Recipe, batch_size: int, mesh, eot: int = 1,
             stochastic: bool = False, box=attacks.UNIT_BOX):
  """Jitted ``(params, x [N, ...], y, idx, clean_rng, attack_rng, eps) -> (scores, starts, directions)``:
  what the batch-size sanity check compares between two batch sizes.

  Runs in ``batch_size`` chunks exactly like :func:`correct_fn`. ``scores``
  float32 [N, C]: what the clean verdict takes the argmax of (:func:`_scores`,
  with the clean evaluation's keys ``clean_rng``); ``starts`` uint32 [N, R]
  and ``directions`` [N, R, ...]: the start and first step direction of every
  restart of ``recipe`` (:func:`_first_steps`, with the attack's keys
  ``attack_rng``).
  """

  def run(params, x, y, idx, clean_rng, attack_rng, eps):
    def chunk(inp):
      xb, yb, ib = parallel.shard_batch(inp, mesh)
      pred_keys = jax.vmap(jax.random.fold_in, (0, None))(_example_keys(clean_rng, ib), 2)
      scores = _scores(apply_fn, params, xb, pred_keys, eot, stochastic, None).astype(jnp.float32)
      keys = jax.vmap(jax.random.fold_in, (0, None))(_example_keys(attack_rng, ib), 1)
      starts, directions = _first_steps(apply_fn, recipe, params, xb, yb, keys, eps, box)
      return scores, starts, directions

    return batching.map_batches(chunk, (x, y, idx), batch_size)

  return jax.jit(run)


class Evaluator:
  """The shared evaluation with its compiled programs.

  One evaluator per experiment (or per model architecture): every model it
  evaluates through the same ``apply_fn`` object reuses the attacks compiled
  for the first. ``evaluator.compiled`` counts the programs it built.
  """

  def __init__(self):
    self._fns: dict = {}

  @property
  def compiled(self) -> int:
    return sum(1 for k in self._fns if k[0] != 'classifier')

  def classifier(self, key, apply_fn: ApplyFn) -> ApplyFn:
    """The first ``apply_fn`` seen under ``key``: models whose classifiers
    compute the same function of ``(params, x, rng)`` (``Method.classifier_key``)
    then share one object, hence one compiled program per attack."""
    return self._fns.setdefault(('classifier', key), apply_fn)

  def correct_fn(self, *args, **kwargs):
    """:func:`correct_fn`, built once per distinct arguments."""
    key = ('correct', args, tuple(sorted(kwargs.items())))
    if key not in self._fns:
      self._fns[key] = correct_fn(*args, **kwargs)
    return self._fns[key]

  def probe_fn(self, *args, **kwargs):
    """:func:`probe_fn`, built once per distinct arguments."""
    key = ('probe', args, tuple(sorted(kwargs.items())))
    if key not in self._fns:
      self._fns[key] = probe_fn(*args, **kwargs)
    return self._fns[key]

  def losses_fn(self, *args):
    key = ('losses', args)
    if key not in self._fns:
      self._fns[key] = losses_fn(*args)
    return self._fns[key]

  def evaluate(self, *args, **kwargs) -> dict:
    """:func:`evaluate` with this evaluator's compiled programs."""
    return evaluate(*args, evaluator=self, **kwargs)


class Verdicts(NamedTuple):
  """One cell's verdicts. ``mask`` bool [N]: correct (a stochastic model: by
  the majority vote over its passes); ``passes`` bool [N, P]: correct in each
  evaluation pass (stochastic models), else None."""

  mask: np.ndarray
  passes: np.ndarray | None = None


def accuracy_stats(v: Verdicts) -> dict:
  """A row's accuracy fields: ``accuracy``; with passes also ``accuracy_std``
  (sample std over the passes), ``passes``, ``majority_vote_accuracy`` and
  ``accuracy_se``, the standard error of the mean over passes estimated from
  each example's fraction of correct passes q_i: sqrt(sum q_i (1 - q_i) / (P - 1)) / N
  (the noise is drawn independently per example; what the checks allow for)."""
  if v.passes is None:
    return dict(accuracy=float(np.mean(v.mask)))
  per_pass = v.passes.mean(0)                       # [P]
  n, p = v.passes.shape
  q = v.passes.mean(1)
  se = math.sqrt(float(np.sum(q * (1 - q))) / max(p - 1, 1)) / max(n, 1)
  return dict(accuracy=float(per_pass.mean()), accuracy_std=float(per_pass.std(ddof=1)) if p > 1 else 0.0,
              passes=int(p), majority_vote_accuracy=float(np.mean(v.mask)), accuracy_se=se)


def worst_case(cells: list[Verdicts]) -> Verdicts:
  """The per-example worst case over cells (the clean evaluation and every attack).

  Deterministic: robust only if correct in every cell (AND of the masks).
  Stochastic: per example the cell the model gets right least often over
  its passes (lowest fraction of correct passes; among ties one whose
  majority vote is wrong), and that cell's pass verdicts and majority vote.
  (A per-pass AND would count each extra attack as one more random draw the
  example must survive, lowering accuracy with every attack, strong or not.)
  """
  if cells[0].passes is None:
    return Verdicts(np.logical_and.reduce([c.mask for c in cells]))
  p = cells[0].passes.shape[1]
  score = np.stack([c.passes.mean(1) + c.mask * (0.5 / p) for c in cells])   # [A, N]
  pick = np.argmin(score, axis=0)
  cols = np.arange(score.shape[1])
  return Verdicts(np.stack([c.mask for c in cells])[pick, cols], np.stack([c.passes for c in cells])[pick, cols])


class _Runner:
  """Runs (recipe, eps) cells on all examples or a subset; keeps the timing."""

  def __init__(self, evaluator, apply_fn, params, x, y, ev, mesh, eot, stochastic, box=attacks.UNIT_BOX,
               passes: int = 0):
    self.evaluator = evaluator
    self.apply_fn, self.params, self.ev, self.mesh, self.box = apply_fn, params, ev, mesh, box
    self.eot, self.stochastic, self.passes = eot, stochastic, passes if stochastic else 0
    self.n = int(y.shape[0])
    self.batch_size = int(ev.batch_size)
    self.x, self.y = x, y
    self.idx = jnp.arange(self.n, dtype=jnp.int32)

  def chunk_size(self, batch_size: int, count: int) -> int:
    """The chunk ``batch_size`` gives on ``count`` examples: chunks must split evenly
    over the devices, and a subset may be smaller than a batch."""
    devices = self.mesh.devices.size
    return max(min(batch_size, count) // devices * devices, devices)

  def mask(self, recipe, eps, **kwargs):
    """bool [N] (or [len(subset)]): :meth:`verdicts`' mask (with ``with_inputs``:
    ``(mask, attacked inputs)``)."""
    out = self.verdicts(recipe, eps, **kwargs)
    return (out[0].mask, out[1]) if kwargs.get('with_inputs') else out.mask

  def verdicts(self, recipe, eps, *, subset=None, batch_size=None, model_key=None, key_name=None,
               with_inputs=False):
    """:class:`Verdicts` of ``recipe`` at ``eps`` (on ``subset`` if given). The cell key
    is that of ``key_name`` (default: the recipe's name) at ``eps``; ``model_key``
    freezes a stochastic model's noise (one pass, a deterministic network).
    ``with_inputs``: returns ``(verdicts, attacked inputs [N, ...])``."""
    bs = batch_size or self.batch_size
    x, y, idx = self.x, self.y, self.idx
    if subset is not None:
      if len(subset) == 0:
        return Verdicts(np.zeros((0,), bool))
      sel = jnp.asarray(subset, jnp.int32)
      x, y, idx = x[sel], y[sel], idx[sel]
    # The full set's chunk even for a subset: the same program, so the same verdicts.
    bs = self.chunk_size(bs, self.n)
    passes = self.passes if model_key is None else 0
    fn = self.evaluator.correct_fn(self.apply_fn, recipe, bs, self.mesh, self.eot, self.stochastic,
                                   with_inputs=with_inputs, box=self.box, passes=passes)
    name = key_name or (recipe.name if recipe is not None else 'clean')
    out = fn(self.params, x, y, idx, attack_key(int(self.ev.seed), name, eps), jnp.float32(eps), model_key)
    correct, inputs = out if with_inputs else (out, None)
    v = Verdicts(np.asarray(correct[1]), np.asarray(correct[0])) if passes else Verdicts(np.asarray(correct))
    return (v, np.asarray(inputs)) if with_inputs else v

  def probe(self, recipe, eps, batch_size: int):
    """:func:`probe_fn` on every example at ``batch_size``, with the clean
    evaluation's keys and ``recipe``'s keys at ``eps`` (device arrays)."""
    bs = self.chunk_size(batch_size, self.n)
    fn = self.evaluator.probe_fn(self.apply_fn, recipe, bs, self.mesh, self.eot, self.stochastic, box=self.box)
    seed = int(self.ev.seed)
    return fn(self.params, self.x, self.y, self.idx, attack_key(seed, 'clean', 0.0), attack_key(seed, recipe.name, eps),
              jnp.float32(eps))

  def batch_probe(self, recipe, eps, batch_sizes: tuple[int, int]) -> dict:
    """:meth:`probe` at two batch sizes, compared example by example (numpy [N] arrays
    unless noted): ``scores`` (two [N, C]), ``starts_equal`` (every restart starts at
    the same point), ``direction_diff`` (over restarts, the largest entry of
    ``|d_a - d_b|`` relative to the largest of ``|d_a|, |d_b|``: for linf 0 when
    every sign agrees, >= 1 when one differs)."""
    (s_a, st_a, d_a), (s_b, st_b, d_b) = (self.probe(recipe, eps, bs) for bs in batch_sizes)
    axes = tuple(range(2, d_a.ndim))
    diff = jnp.max(jnp.abs(d_a - d_b), axis=axes)
    scale = jnp.maximum(jnp.max(jnp.abs(d_a), axis=axes), jnp.max(jnp.abs(d_b), axis=axes))
    rel = jnp.where(diff > 0, diff / jnp.maximum(scale, jnp.finfo(jnp.float32).tiny), 0.0)
    return dict(scores=(np.asarray(s_a), np.asarray(s_b)), starts_equal=np.asarray(jnp.all(st_a == st_b, axis=1)),
                direction_diff=np.asarray(jnp.max(rel, axis=1)))


def evaluate(apply_fn: ApplyFn, params: Any, images, labels, ev: ml_collections.ConfigDict, mesh, *,
             stochastic: bool = False, log: Callable[[str], None] = print, tag: str = '',
             keep_inputs: Iterable[tuple[str, float]] = (), evaluator: Evaluator | None = None,
             box: attacks.Box = attacks.UNIT_BOX) -> dict:
  """Runs the configured attacks over the eps grid, then the sanity checks.

  Args:
    apply_fn: ``(params, x float32 [B, ...] in [0,1], rng) -> logits [B, C]``;
      pass the same function object for models of one architecture (e.g. a
      method's bound ``logits``) so compiled attacks are reused.
    params: the model parameters (passed to ``apply_fn``).
    images: float32 ``[N, ...]`` in [0,1] (the caller takes the first
      ``eval.num_examples`` test examples); labels: int32 ``[N]``.
    ev: ``config.eval``.
    mesh: the ``('data',)`` mesh.
    stochastic: the model draws noise from ``rng``; attacks then average
      gradients over ``eval.eot_samples`` draws (EOT), and every verdict is
      taken over ``eval.passes`` evaluation passes (one fresh draw each):
      rows carry the mean over passes as ``accuracy`` with ``accuracy_std``,
      ``passes``, ``majority_vote_accuracy`` and ``accuracy_se`` (and the
      result ``clean_accuracy_std`` etc.); masks are majority-vote verdicts.
      A stochastic model is never evaluated without EOT (eot_samples >= 2)
      or with fewer than MIN_PASSES passes.
    box: the valid input range ``(lo, hi)`` every attack clips to (default
      [0, 1] for images); None for inputs with no valid box (e.g. synthetic
      float vectors): attacks are then limited by the eps-ball only, and the
      huge-eps sanity check scales with the data (see ``sanity``).

  Returns:
    dict with ``clean_accuracy``, ``robustness`` rows (one per attack and eps,
    with its budget: ``steps``, ``restarts``, ``eot``, and ``targets`` for
    APGD-T, ``queries`` for Square;
    and a ``worst_case`` row per eps: an example is robust only if it survives
    every attack; with ``eval.cascade`` a deterministic model's iterative
    attacks and Square run only on the examples the attacks before them left robust, and
    their rows carry ``cascade=True``, ``attacked`` (examples faced),
    ``broke`` and as ``accuracy`` the robust accuracy after them and every
    attack before them), ``masks`` ({'attack@eps': bool [N]}; cascaded: robust
    after it and those before), ``sanity`` (named
    checks: passed, value, detail), ``convergence`` (attack loss per step for a
    few examples), ``adversarial`` ({'attack@eps': float32 [N, ...]} attacked
    inputs, for the ``keep_inputs`` pairs ``(attack name, eps)`` only) and
    ``timing``. ``evaluator``: reuse its compiled programs (default: a new one).
  """
  eot = max(int(ev.eot_samples), 1) if stochastic else 1
  passes = int(ev.get('passes', MIN_PASSES)) if stochastic else 0
  if stochastic and eot < 2:
    raise ValueError('a stochastic model needs eval.eot_samples >= 2 (EOT); got '
                     f'{int(ev.eot_samples)}: pass --config.eval.eot_samples=8')
  if stochastic and passes < MIN_PASSES:
    raise ValueError(f'a stochastic model is evaluated over eval.passes >= {MIN_PASSES} passes (its accuracy is '
                     f'random); got {passes}: pass --config.eval.passes={MIN_PASSES}')
  recipe_list = recipes_lib.resolve(ev, eot)
  n = int(len(labels))
  # The configured size must split over the devices; a smaller set runs in a chunk rounded down to
  # a multiple of the device count (_Runner.chunk_size), padded, so any number of examples works.
  parallel.check_batch_size(int(ev.batch_size), mesh, 'eval.batch_size')
  rep = parallel.replicated(mesh)
  # The parameters too: a model trained on another mesh (on a CPU host, training uses one of the
  # host's devices and the evaluation all of them) is copied to every device of this one.
  params, x, y = jax.device_put((params, jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)), rep)
  runner = _Runner(evaluator or Evaluator(), apply_fn, params, x, y, ev, mesh, eot, stochastic,
                   attacks.check_box(box), passes)
  keep = {(str(a), float(e)) for a, e in keep_inputs}
  adversarial = {}
  t_start = time.perf_counter()

  clean_v = runner.verdicts(None, 0.0)
  clean_stats = accuracy_stats(clean_v)
  clean, clean_mask = clean_stats['accuracy'], clean_v.mask
  log(f'{tag}clean accuracy {_show(clean_stats)} on {n} examples')
  rows, masks, verdicts = [], {'clean': clean_mask}, {'clean': clean_v}
  eps_grid = sorted({float(e) for e in ev.eps})
  # The cascade (deterministic models): per eps, the examples every attack so far left robust.
  cascade = bool(ev.get('cascade', False)) and not stochastic
  alive = {eps: np.asarray(clean_mask, bool).copy() for eps in eps_grid}
  for recipe in recipe_list:
    for eps in eps_grid:
      t0 = time.perf_counter()
      key = f'{recipe.name}@{eps:g}'
      row = dict(attack=recipe.name, norm=ev.norm, eps=eps, steps=recipe.steps, restarts=recipe.restarts, eot=eot,
                 **recipe.budget)
      note = ''
      if cascade and recipe.cascades and (recipe.name, eps) not in keep:
        # Only the survivors face it; its mask and row are the robust set after it (cumulative).
        faced = np.flatnonzero(alive[eps])
        survived = runner.mask(recipe, eps, subset=faced)
        alive[eps][faced] = survived
        v = Verdicts(alive[eps].copy())
        row.update(cascade=True, attacked=int(len(faced)), broke=int(len(faced) - survived.sum()))
        note = f' after it and those before (faced {len(faced)}, broke {row["broke"]})'
      else:
        if (recipe.name, eps) in keep:
          v, adversarial[key] = runner.verdicts(recipe, eps, with_inputs=True)
        else:
          v = runner.verdicts(recipe, eps)
        alive[eps] &= np.asarray(v.mask, bool)
      masks[key], verdicts[key] = v.mask, v
      stats = accuracy_stats(v)
      rows.append(dict(row, **stats))
      log(f'{tag}{recipe.name:>10} eps={eps:<7g} accuracy {_show(stats)}{note}  ({time.perf_counter() - t0:.1f} s)')
  for eps in eps_grid:
    worst = worst_case([verdicts['clean']] + [verdicts[f'{r.name}@{eps:g}'] for r in recipe_list])
    verdicts[f'worst_case@{eps:g}'] = worst
    masks[f'worst_case@{eps:g}'] = worst.mask
    rows.append(dict(attack='worst_case', norm=ev.norm, eps=eps, steps=max(r.steps for r in recipe_list),
                     restarts=max(r.restarts for r in recipe_list), eot=eot, **accuracy_stats(worst)))
  t_grid = time.perf_counter() - t_start

  checks = sanity_lib.grid_checks(clean, rows, recipe_list, n, clean_se=clean_stats.get('accuracy_se', 0.0))
  checks.update(sanity_lib.gradient_free_check(recipe_list, verdicts, n))
  check_eps = sanity_lib.choose_check_eps(ev, clean, rows)
  if bool(ev.get('sanity', True)):
    checks.update(sanity_lib.attack_checks(runner, recipe_list, masks, clean_mask, check_eps, log=log, tag=tag,
                                           verdicts=verdicts, rows=rows))
  convergence = _convergence(runner, recipe_list, check_eps, int(ev.get('trajectories', 0)))
  failed = [k for k, v in checks.items() if not v['passed']]
  for k in failed:
    log(f'{tag}WARNING: SANITY CHECK FAILED: {k}: {checks[k]["detail"]} (value {checks[k]["value"]:.4g})')
  seconds = time.perf_counter() - t_start
  extra = {f'clean_{k}': v for k, v in clean_stats.items() if k != 'accuracy'}
  return dict(clean_accuracy=clean, **extra, robustness=rows, masks=masks, eval_examples=n, sanity=checks,
              convergence=convergence, adversarial=adversarial,
              timing=dict(eval_seconds=seconds, attack_grid_seconds=t_grid, sanity_seconds=seconds - t_grid))


def _show(stats: dict) -> str:
  """An accuracy for the log: ``0.9120`` or, over passes, ``0.9120 +- 0.0040 (5 passes, majority 0.9160)``."""
  if 'passes' not in stats:
    return f'{stats["accuracy"]:.4f}'
  return (f'{stats["accuracy"]:.4f} +- {stats["accuracy_std"]:.4f} ({stats["passes"]} passes, majority '
          f'{stats["majority_vote_accuracy"]:.4f})')


def _convergence(runner: _Runner, recipe_list, eps: float | None, k: int) -> list[dict]:
  """Loss per iterate of each iterative attack on the first ``k`` examples at ``eps``."""
  if not k or eps is None:
    return []
  k = min(k, runner.n)
  out = []
  for recipe in recipe_list:
    if not recipe.iterative:
      continue
    fn = runner.evaluator.losses_fn(runner.apply_fn, recipe, runner.mesh, runner.eot, runner.box)
    losses = fn(runner.params, runner.x[:k], runner.y[:k], runner.idx[:k],
                attack_key(int(runner.ev.seed), recipe.name, eps), jnp.float32(eps))
    out.append(dict(attack=recipe.name, eps=eps, loss=recipes_lib.loss_name(recipe),
                    losses=np.asarray(losses).tolist()))  # [k, restarts, steps + 1]
  return out
