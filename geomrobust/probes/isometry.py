"""Isometry diagnostics per hidden layer (Beshkov et al. 2022's geometry).

Within each class: the correlation of K * D(h) with D(x), the normalised
stress and max D(x) / max D(h) (``geometry.isometry``), mean over classes.

Options (``config.probes.isometry``):
  examples    the first N evaluation examples (default 2000: pairwise
              distances are O(n^2) per class).
  per_class   at most this many examples per class (default 200).
  scale_key   config path of the scale K between hidden and input distances
              (default ``method.k``; 1 when the member's config lacks it).
"""

from __future__ import annotations

from geomrobust import config as config_lib
from geomrobust.geometry import isometry
from geomrobust.probes import base


class Isometry(base.Probe):
  kind = 'geometry'
  # per_class >= 3: a class with fewer examples has no isometry statistics (geometry.isometry).
  BOUNDS = {'examples': config_lib.integer(1, example=2000), 'per_class': config_lib.integer(3, example=200)}

  def __call__(self, inp: base.ProbeInput) -> dict:
    n = min(int(self.options.get('examples', 2000)), len(inp.eval_y))
    k = float(base.option_from_config(inp.config, str(self.options.get('scale_key', 'method.k')), 1.0))
    reps = self.representations(inp, inp.eval_x[:n])
    return isometry.isometry_diagnostics(inp.eval_x[:n], reps, inp.eval_y[:n], inp.method.num_classes, k=k,
                                         per_class=int(self.options.get('per_class', 200)))

  def summary(self, out: dict) -> dict[str, float]:
    if not out.get('layers'):
      return {}
    last = out['layers'][-1]
    return {'iso_correlation': last['correlation'], 'iso_stress': last['stress'], 'iso_max_ratio': last['max_ratio']}

  def report(self, out: dict, workdir) -> list[str]:
    lines = ['## Isometry diagnostics (test data, within class, mean over classes)', '',
             f'Mean within-class input distance: {out.get("mean_within_input_dist") or 0:.3f}', '',
             '| layer | corr(K D(h), D(x)) | normalised stress | max D(x) / max D(h) | mean within-class D(h) |',
             '|---|---|---|---|---|']
    for l in out.get('layers', []):
      lines.append(f'| {l["layer"]} | {l["correlation"]:.3f} | {l["stress"]:.3f} | {l["max_ratio"]:.3f} | '
                   f'{l["mean_within_dist"]:.3f} |')
    return lines + ['']


PROBE = Isometry
