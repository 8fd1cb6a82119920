"""The local-contrastive paper's robustness protocol: accuracy under one FGSM
step and under Gaussian noise over an eps grid, and the areas under those
curves (R_FGSM, R_noise). A protocol probe: reported beside the shared
evaluation, never instead of it.

At each eps: one untargeted L-inf FGSM step on the CE loss (clipped to the
data's box) and additive Gaussian noise of std eps (clipped); accuracy counts
all N examples, so clean mistakes are failures. The noise of grid point i is
drawn from ``fold_in(key, i)`` with the key of ``eval.seed``: every model sees
the same noise (common random numbers across a sweep).

Options (``config.probes.fgsm_noise_areas``):
  eps_max, eps_step   the grid 0, step, ..., max (the paper: 0..0.79 by 0.01).
  examples            the first N evaluation examples (the paper: 1000).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from geomrobust import attacks
from geomrobust import config as config_lib
from geomrobust.parallel import batching
from geomrobust.probes import base


def accuracy_curves_fn(logits_fn: Callable, eps_chunk: int = 16):
  """Jitted ``(params, x [N, ...], y [N], eps [E], rng) -> (fgsm_acc [E], noise_acc [E])``.

  ``logits_fn(params, x) -> [N, C]`` (a deterministic classifier). The eps grid
  is vmapped in chunks of ``eps_chunk``: within a chunk the FGSM gradient does
  not depend on eps, so vmap computes it once.
  """

  def curves(params, x, y, eps, rng):
    f = lambda xx, r: logits_fn(params, xx)
    acc = lambda xa: jnp.mean((jnp.argmax(logits_fn(params, xa), -1) == y).astype(jnp.float32))

    def at(e, i):
      x_fgsm = attacks.fgsm(f, x, y, rng, eps=e)
      x_noise = attacks.gaussian_noise(x, jax.random.fold_in(rng, i), e)
      return acc(x_fgsm), acc(x_noise)

    idx = jnp.arange(eps.shape[0], dtype=jnp.int32)
    return batching.map_batches(lambda chunk: jax.vmap(at)(*chunk), (eps, idx), eps_chunk)

  return jax.jit(curves)


def eps_grid(step: float, top: float) -> np.ndarray:
  """``0, step, ..., top`` as float32."""
  n = int(round(top / step)) + 1
  return np.round(np.arange(n) * step, 6).astype(np.float32)


def curve_area(eps, accuracy) -> float:
  """R = trapezoid area under accuracy (in percent) vs eps: the paper's unit."""
  return float(np.trapezoid(100.0 * np.asarray(accuracy, np.float64), np.asarray(eps, np.float64)))


class FgsmNoiseAreas(base.Probe):
  kind = 'protocol'
  BOUNDS = {'eps_max': config_lib.number(0, example=0.79), 'eps_step': config_lib.number(above=0, example=0.01),
            'examples': config_lib.integer(1, example=1000)}

  def __call__(self, inp: base.ProbeInput) -> dict:
    if inp.method.stochastic:
      raise ValueError(f'probe {self.name}: the paper protocol is for deterministic classifiers')
    n = min(int(self.options.get('examples', 1000)), len(inp.eval_y))
    eps = eps_grid(float(self.options.get('eps_step', 0.01)), float(self.options.get('eps_max', 0.79)))
    method = inp.method
    fn = self.compiled(method.classifier_key(), lambda: accuracy_curves_fn(lambda p, x: method.logits(p, x)))
    fgsm, noise = fn(inp.params, jnp.asarray(inp.eval_x[:n], jnp.float32), jnp.asarray(inp.eval_y[:n], jnp.int32),
                     jnp.asarray(eps), jax.random.key(int(inp.config.eval.seed)))
    fgsm, noise = np.asarray(fgsm, np.float64), np.asarray(noise, np.float64)
    return dict(examples=n, eps=eps.tolist(), fgsm_accuracy=fgsm.tolist(), noise_accuracy=noise.tolist(),
                r_fgsm=curve_area(eps, fgsm), r_noise=curve_area(eps, noise),
                units='r_*: accuracy in percent integrated over eps (trapezoid)')

  def summary(self, out: dict) -> dict[str, float]:
    return {'r_fgsm': out['r_fgsm'], 'r_noise': out['r_noise']}

  def report(self, out: dict, workdir) -> list[str]:
    from geomrobust.runio import report
    series = {'FGSM': list(zip(out['eps'], out['fgsm_accuracy'])),
              'Gaussian noise (std eps)': list(zip(out['eps'], out['noise_accuracy']))}
    report.plot_accuracy_vs_eps(workdir / 'fgsm_noise_curves.png', series,
                                f'FGSM and noise accuracy vs eps, first {out["examples"]} test examples')
    return ['## FGSM / noise areas (the local-contrastive paper protocol)', '',
            f'On the first {out["examples"]} test examples, eps = 0..{out["eps"][-1]:g}: R_FGSM = '
            f'{out["r_fgsm"]:.3f}, R_noise = {out["r_noise"]:.3f} (accuracy in % integrated over eps; the '
            "paper's backprop MLP has R_FGSM = 4.288). One FGSM step is a weak attack: the shared evaluation above "
            'is the robustness number.', '', '![FGSM and noise curves](fgsm_noise_curves.png)', '']


PROBE = FgsmNoiseAreas
