"""What a probe is: a measurement of a trained model, returned as JSON.

A probe gets a :class:`ProbeInput` (the method's forward pass, the
parameters, the evaluation data, a key, and on request the evaluation's
adversarial examples) and returns a JSON-able dict. It also says which flat
numbers go into tables (:meth:`Probe.summary`) and how its section reads in
a member's report (:meth:`Probe.report`). The runner, evaluation and report
code stay generic: a paper's protocol or constant lives in its probe.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from geomrobust import config as config_lib


@dataclasses.dataclass
class ProbeInput:
  """Everything a probe may read.

  Attributes:
    method: the trained method; ``method.apply(params, x, rng) -> (logits
      [B, C], reps tuple)``, ``method.logits(params, x, rng)``, and for
      probes of the training objective ``method.phases()`` / ``hparams()``.
    params: the model parameters.
    config: the member's whole config (read-only).
    eval_x: float32 ``[N, ...]``: the evaluation examples (first N test examples).
    eval_y: int32 ``[N]``.
    train_x, train_y, test_x, test_y: the training data and the per-epoch
      test split, as stored (uint8 images or float; ``data.source.to_model_input``
      converts); ``train_x`` is None for generated data.
    box: the valid input range ``(lo, hi)``, or None when unbounded.
    key: this probe's key (derived from ``eval.seed`` and the probe's name).
    adversarial: ``(attack, eps) -> float32 [N, ...]`` adversarial examples of
      the evaluation set found by the shared evaluation, for the pairs the
      probe asked for in :meth:`Probe.adversarial_requests`; None otherwise.
  """

  method: Any
  params: Any
  config: ml_collections.ConfigDict
  eval_x: np.ndarray
  eval_y: np.ndarray
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  box: tuple[float, float] | None
  key: jax.Array
  adversarial: Callable[[str, float], np.ndarray] | None = None


class Probe:
  """Base class. Subclasses set ``kind`` and implement ``__call__``.

  ``kind`` is ``'geometry'`` (the result goes under ``results['geometry']``)
  or ``'protocol'`` (under ``results['probes']``: e.g. a paper's own attack,
  reported *beside* the shared evaluation, never instead of it).

  ``BOUNDS``: the valid range of each numeric option (``{option:
  config.integer(...) | config.number(...)}``), checked with the rest of the
  config before any data is loaded (and again when the probe is built).
  """

  kind = 'geometry'
  BOUNDS: dict[str, config_lib.Range] = {}

  def __init__(self, name: str, options: ml_collections.ConfigDict):
    config_lib.check_fields(options, self.BOUNDS, f'probes.{name}')
    self.name = name
    self.options = options
    self._compiled: dict = {}   # jitted functions of this probe object (no module-level cache)

  def compiled(self, key, build: Callable[[], Callable]) -> Callable:
    """``build()``'s function, built once per ``key`` (e.g. ``method.classifier_key()``)."""
    if key not in self._compiled:
      self._compiled[key] = build()
    return self._compiled[key]

  def representations(self, inp: ProbeInput, x) -> tuple:
    """The model's per-layer representations of ``x`` (float32 ``[N, ...]``),
    jitted once per classifier; a stochastic model's with one noise draw
    (the probe's key)."""
    method = inp.method
    fn = self.compiled(('reps', method.classifier_key()),
                       lambda: jax.jit(lambda p, xx, rng: method.apply(p, xx, rng)[1]))
    return fn(inp.params, x, inp.key if method.stochastic else None)

  def adversarial_requests(self, config: ml_collections.ConfigDict) -> list[tuple[str, float]]:
    """``[(attack, eps)]`` whose adversarial examples this probe wants from the evaluation."""
    del config
    return []

  def __call__(self, inp: ProbeInput) -> dict:
    raise NotImplementedError

  def summary(self, out: dict) -> dict[str, float]:
    """Flat numbers for tables (grouped by the swept value, mean and std)."""
    del out
    return {}

  def comparison_summary(self, out: dict) -> dict:
    """The numbers a comparison of methods shows for this probe (a
    comparison's ``geometry`` column, ``geomrobust/comparison.py``).
    Default: :meth:`summary`."""
    return self.summary(out)

  @classmethod
  def family_results(cls, outs: dict[str, dict]) -> dict:
    """Tables across a family's members (``outs``: member name -> this
    probe's output) for the family's top ``results.json``; keys must not
    clash with the runner's (``runs``, ``table``, ...). Default: none."""
    del outs
    return {}

  @classmethod
  def family_report(cls, outs: dict[str, dict], workdir: pathlib.Path) -> list[str]:
    """Markdown lines comparing the members of a family in its report.md
    (``outs``: member name -> this probe's output; may write plots into
    ``workdir``). Default: nothing beyond the summary table's numbers."""
    del outs, workdir
    return []

  def report(self, out: dict, workdir: pathlib.Path) -> list[str]:
    """Markdown lines for the member's report.md (may write plots into ``workdir``)."""
    del workdir
    lines = [f'## Probe `{self.name}`', '']
    lines += [f'- {k}: {v:.4g}' if isinstance(v, float) else f'- {k}: {v}' for k, v in self.summary(out).items()]
    return lines + ['']


def option_from_config(config: ml_collections.ConfigDict, path: str, default):
  """``config`` at dotted ``path`` (e.g. ``'method.k'``), or ``default`` when absent or path is ''."""
  node = config
  for part in (path.split('.') if path else []):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return default
    node = node[part]
  return default if node is config else node
