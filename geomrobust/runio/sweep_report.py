"""report.md and plots of a sweep experiment (``geomrobust.experiment``, ``geomrobust.tables``).

Generic over methods and probes: every numeric column of the sweep table
(clean accuracy, the screening PGD accuracy, each probe's flat numbers) gets
a row of mean ± std per swept value and a plot against the swept value (mean
over seeds, +-1 std band, the baseline's mean as a dashed line).
``accuracy_vs_eps.png`` holds the strong evaluation's worst-case curves.
"""

from __future__ import annotations

import pathlib

import numpy as np

from geomrobust import runio
from geomrobust.runio import report


def _pm(entry: dict, key: str, scale: float = 1.0, fmt: str = '.2f') -> str:
  m, s = entry.get(key), entry.get(f'{key}_std')
  if m is None:
    return '–'
  return f'{scale * m:{fmt}} ± {scale * (s or 0.0):{fmt}}'


def plot_vs_value(path: pathlib.Path, summary: list[dict], hparam: str, series: dict[str, float],
                  baseline: dict | None, ylabel: str, title: str) -> None:
  """One curve per ``series`` entry (row key -> scale), mean +- std over seeds
  vs the swept value; the baseline's mean of each key as a dashed line."""
  plt = report._plt()
  fig, ax = plt.subplots(figsize=(6.4, 4), dpi=120)
  x = np.asarray([s[hparam] for s in summary], float)
  for i, (key, scale) in enumerate(series.items()):
    color = f'C{i}'
    m = np.asarray([np.nan if s[key] is None else s[key] for s in summary], float) * scale
    sd = np.asarray([np.nan if s[f'{key}_std'] is None else s[f'{key}_std'] for s in summary], float) * scale
    ax.plot(x, m, marker='o', ms=3, color=color, label=key.replace('_', ' '))
    ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.2, lw=0)
    if baseline and baseline.get(key) is not None:
      ax.axhline(scale * baseline[key], color=color, ls='--', lw=1,
                 label=f'{baseline.get("name", "baseline")} ({key.replace("_", " ")})')
  ax.set_xlabel(hparam)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _scale(key: str) -> float:
  return 100.0 if 'accuracy' in key or '@' in key else 1.0


def write_sweep_report(workdir: pathlib.Path, config, top: dict, member_results: dict[str, dict]) -> None:
  """report.md and the plots for a sweep experiment's ``top`` results."""
  workdir = pathlib.Path(workdir)
  hparam = top['hparam']
  summary, base = top['sweep_summary'], top.get('baseline')
  keys = top.get('columns') or []
  plots = []
  for key in keys:
    if not any(s.get(key) is not None for s in summary):
      continue
    name = f'sweep_{key.replace("@", "_at_")}.png'
    unit = ' (%)' if _scale(key) == 100 else ''
    plot_vs_value(workdir / name, summary, hparam, {key: _scale(key)}, base, key + unit,
                  f'{top["experiment"]}: {key} vs {hparam} (mean ± std over seeds)')
    plots.append((key, name))

  strong = top.get('pgd_comparison') or []
  series = {f'{r["name"]} ({r["role"]})': sorted((float(e), a) for e, a in r['worst_case'].items())
            for r in strong if r['worst_case']}
  if series:
    report.plot_accuracy_vs_eps(workdir / 'accuracy_vs_eps.png', series,
                                f'{top["experiment"]}: worst-case accuracy vs eps ({strong[0]["profile"]} profile)')

  lines = [f'# {top["experiment"]}', '']
  if top.get('smoke'):
    lines += ['> SMOKE RUN: tiny data, few epochs and weakened attacks. These numbers test the code path only.', '']
  n_sweep = len(top['sweep'])
  first = top['sweep'][0] if n_sweep else {}
  lines += [f'Sweep of `{hparam}` over {len(summary)} values x {summary[0]["seeds"] if summary else 0} seeds '
            f'({n_sweep} models, method `{top["method"]}`) trained as one vmapped program, plus the baseline '
            f'`{base["name"] if base else "none"}` over the same seeds. Columns: `clean_accuracy` = mean test '
            'accuracy over the last epochs; `pgd_accuracy` = the screening evaluation (profile '
            f'`{first.get("pgd_profile", "")}`, per-example worst case at eps = {first.get("pgd_eps", 0):g} on the '
            f'first {first.get("pgd_examples", "?")} test examples); the others come from the probes '
            '(`config.probes`; each member\'s report.md explains them). Accuracies in %.', '',
            '## Sweep (mean ± std over seeds)', '',
            f'| {hparam} | ' + ' | '.join(keys) + ' |', '|---|' + '---|' * len(keys)]
  for s in summary:
    lines.append(f'| {s[hparam]:g} | ' + ' | '.join(_pm(s, k, _scale(k)) for k in keys) + ' |')
  if base:
    lines.append(f'| **{base["name"]}** (baseline) | ' + ' | '.join(_pm(base, k, _scale(k)) for k in keys) + ' |')
  lines.append('')
  lines += [f'![{key}]({name})' for key, name in plots] + ['']

  if strong:
    eps_all = sorted({float(e) for r in strong for e in r['worst_case']})
    lines += ['## Strong evaluation (the number that counts)', '',
              f'Profile `{strong[0]["profile"]}` on the first {strong[0]["eval_examples"]} test images: per-example '
              'worst case over all its attacks, accuracy in %.', '',
              '| role | model | clean | ' + ' | '.join(f'eps={e:g}' for e in eps_all) + ' | sanity |',
              '|---|---|---|' + '---|' * len(eps_all) + '---|']
    for r in strong:
      cells = [report._pct(r['worst_case'].get(f'{e:g}')) for e in eps_all]
      sanity = 'ok' if not r['sanity_failed'] else '**FAILED: ' + ', '.join(r['sanity_failed']) + '**'
      lines.append(f'| {r["role"]} | [{r["name"]}]({r["name"]}/report.md) | {report._pct(r["clean_accuracy"])} | '
                   + ' | '.join(cells) + f' | {sanity} |')
    lines += ['', '![accuracy vs eps](accuracy_vs_eps.png)', '']

  t = top.get('timing', {})
  lines += ['## Timing', '']
  for key in sorted(t):
    if key.endswith('_train_seconds') or key.endswith('_eval_seconds') or key.endswith('_members') \
        or key in ('strong_eval_seconds', 'total_seconds'):
      val = t[key]
      lines.append(f'- {key}: {val:.1f}' if isinstance(val, float) else f'- {key}: {val}')
  lines += ['', '## Members', '', ', '.join(f'[{r["name"]}]({r["results"].rsplit("/", 1)[0]}/report.md)'
                                            for r in top['runs']), '']
  runio.atomic_write_text(workdir / 'report.md', '\n'.join(lines) + '\n')
