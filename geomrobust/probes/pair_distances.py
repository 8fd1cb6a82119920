"""Mean same-label ("boson") and different-label ("fermion") pair distances
per hidden layer, d_ij = ||h_i - h_j||^2 / N (``geometry.pairs``), on the
first examples of the training set and of the per-epoch test split.

Options (``config.probes.pair_distances``):
  examples    the first N examples of each split (default 1000).
  target_key  config path of the distance the method aims for, reported
              beside (default ``method.d_f``; none when the config lacks it).
"""

from __future__ import annotations

import jax.numpy as jnp

from geomrobust import config as config_lib
from geomrobust.data import source as source_lib
from geomrobust.geometry import pairs
from geomrobust.probes import base


class PairDistances(base.Probe):
  kind = 'geometry'
  BOUNDS = {'examples': config_lib.integer(2, example=1000)}  # a pair needs two

  def __call__(self, inp: base.ProbeInput) -> dict:
    n = int(self.options.get('examples', 1000))
    target = base.option_from_config(inp.config, str(self.options.get('target_key', 'method.d_f')), None)
    out = {'target': None if target is None else float(target)}
    for split, (x, y) in {'train': (inp.train_x, inp.train_y), 'test': (inp.test_x, inp.test_y)}.items():
      if x is not None:  # generated data has no stored training set
        reps = self.representations(inp, source_lib.to_model_input(jnp.asarray(x[:n])))
        out[split] = pairs.layer_pair_distances(reps, y[:n])
    return out

  def summary(self, out: dict) -> dict[str, float]:
    out_ = {'boson_distance': out['test'][-1]['boson_distance'],
            'fermion_distance': out['test'][-1]['fermion_distance']}
    if 'train' in out:
      out_.update(boson_distance_train=out['train'][-1]['boson_distance'],
                  fermion_distance_train=out['train'][-1]['fermion_distance'])
    return out_

  def report(self, out: dict, workdir) -> list[str]:
    target = '' if out.get('target') is None else f' (target fermion distance {out["target"]:g})'
    lines = [f'## Pair distances ||h_i - h_j||^2 / N{target}', '',
             '| layer | boson (test) | fermion (test) | boson (train) | fermion (train) |', '|---|---|---|---|---|']
    for te, tr in zip(out['test'], out.get('train', out['test'])):
      lines.append(f'| {te["layer"]} | {te["boson_distance"]:.4f} | {te["fermion_distance"]:.4f} | '
                   f'{tr["boson_distance"]:.4f} | {tr["fermion_distance"]:.4f} |')
    return lines + ['']


PROBE = PairDistances
