"""The tables of a sweep: one row of flat numbers per member, grouped by the
swept value (mean and std over seeds), and the strong-evaluation picks.

Generic: a row holds the training's clean accuracy, the screening
evaluation's worst case and every probe's ``summary`` numbers; no method's
columns are named here.
"""

from __future__ import annotations

import numpy as np


def _worst_case(rows: list[dict], eps: float) -> float | None:
  for r in rows:
    if r['attack'] == 'worst_case' and abs(r['eps'] - eps) < 1e-9:
      return r['accuracy']
  return None


# Row fields that identify a member rather than measure it.
_ID_KEYS = ('name', 'seed', 'pgd_eps', 'pgd_profile', 'pgd_examples')


def sweep_row(member, res: dict, config) -> dict:
  """One row of the sweep table: the member's flat numbers (accuracies as
  fractions, the probes' numbers in their own units)."""
  screen = res.get('screen', res)
  hparam = str(config.sweep.hparam)
  eps = float(config.sweep.pgd_eps)
  return {
      'name': member.name, hparam: None if member.value is None else float(member.value), 'seed': member.seed,
      'clean_accuracy': res.get('training', {}).get('clean_accuracy_last_epochs'),
      'pgd_accuracy': _worst_case(screen['robustness'], eps), 'pgd_eps': eps,
      'pgd_profile': screen.get('eval_profile'), 'pgd_examples': screen['eval_examples'],
      'eval_clean_accuracy': screen['clean_accuracy'], **res.get('summary', {})}


def row_keys(rows: list[dict], hparam: str) -> list[str]:
  """The numeric columns of ``rows``, in first-seen order."""
  keys = dict.fromkeys(k for r in rows for k, v in r.items()
                       if k not in _ID_KEYS and k != hparam and (v is None or isinstance(v, (int, float))))
  return list(keys)


def _mean_std(rows: list[dict], key: str) -> tuple[float | None, float | None]:
  vals = np.asarray([r[key] for r in rows if r.get(key) is not None], np.float64)
  if not vals.size:
    return None, None
  return float(vals.mean()), float(vals.std())


def summarize(rows: list[dict], hparam: str) -> list[dict]:
  """Mean and std (over seeds, ddof=0) of every row key, per value."""
  out = []
  for v in sorted({r[hparam] for r in rows}):
    sel = [r for r in rows if r[hparam] == v]
    entry = {hparam: v, 'seeds': len(sel)}
    for k in row_keys(rows, hparam):
      entry[k], entry[f'{k}_std'] = _mean_std(sel, k)
    out.append(entry)
  return out


def baseline_entry(rows: list[dict], hparam: str) -> dict:
  """The baseline's row: the sweep-row keys as the mean over its seeds (std beside)."""
  entry = {'name': rows[0]['name'].rsplit('_seed', 1)[0], hparam: None, 'seed': 'mean',
           'seeds': [r['seed'] for r in rows], 'pgd_eps': rows[0]['pgd_eps'], 'pgd_profile': rows[0]['pgd_profile']}
  for k in row_keys(rows, hparam):
    entry[k], entry[f'{k}_std'] = _mean_std(rows, k)
  return entry


def strong_members(config, summary: list[dict], all_members: list) -> list[tuple[str, object]]:
  """``[(role, member)]`` for the configured strong roles (``members.Member`` objects)."""
  sw = config.sweep
  hparam = str(sw.hparam)
  n_seeds = max(int(sw.strong_seeds), 1)
  picks = []
  for role in sw.strong:
    if role == 'baseline':
      sel = [m for m in all_members if m.group.role == 'baseline']
    else:
      key = role[len('best:'):]
      ok = [s for s in summary if s.get(key) is not None]
      if not ok:
        continue
      best = max(ok, key=lambda s: s[key])[hparam]
      sel = [m for m in all_members if m.group.role == 'sweep' and float(m.value) == best]
    for m in sel[:n_seeds]:
      if all(m.name != p[1].name for p in picks):
        picks.append((role, m))
  return picks


def strong_row(role: str, member, res: dict, row: dict, hparam: str) -> dict:
  worst = {f'{r["eps"]:g}': r['accuracy'] for r in res['robustness'] if r['attack'] == 'worst_case'}
  per_attack = {}
  for r in res['robustness']:
    per_attack.setdefault(r['attack'], {})[f'{r["eps"]:g}'] = r['accuracy']
  return dict(role=role, name=member.name, **{hparam: row[hparam]}, seed=member.seed,
              profile=res.get('eval_profile'), eval_examples=res['eval_examples'],
              clean_accuracy=res['clean_accuracy'], row=row, worst_case=worst, attacks=per_attack,
              sanity_failed=[k for k, v in res.get('sanity', {}).items() if not v.get('passed')])


def member_sweep_rows(sweep_top: dict) -> list[dict]:
  """A family's member-sweep table from the sweep's top results: one row per
  member ``{<field>: value, seed, clean_accuracy, robust_accuracy, eps,
  train_clean_accuracy}``, where ``<field>`` is the swept name without its
  section (``model.noise_scale`` -> ``noise_scale``), ``clean_accuracy`` and
  ``robust_accuracy`` come from the screening evaluation (same examples; for
  a stochastic model, means over its passes), ``robust_accuracy`` is the
  worst case at ``eps`` and ``train_clean_accuracy`` the training's mean test
  accuracy over its last epochs."""
  hparam = sweep_top['hparam']
  field = hparam.split('.')[-1]
  return [{field: r[hparam], 'seed': r['seed'], 'clean_accuracy': r['eval_clean_accuracy'],
           'robust_accuracy': r['pgd_accuracy'], 'eps': r['pgd_eps'],
           'train_clean_accuracy': r['clean_accuracy']} for r in sweep_top['sweep']]
