"""report.md and plots of a sweep experiment (``geomrobust.sweep_experiment``).

Plots against the swept value (mean over seeds, +-1 std band), each with the
baseline's mean as a horizontal reference line: clean accuracy, R_FGSM,
R_noise, the screening PGD accuracy, and the measured boson / fermion pair
distances against the target (the identity line). ``accuracy_vs_eps.png``
holds the strong evaluation's worst-case curves of the strong members.
"""

from __future__ import annotations

import pathlib

import numpy as np

from geomrobust import runio
from geomrobust.runio import report


def _num(v, fmt='.3f') -> str:
  return '–' if v is None else format(v, fmt)


def _pm(entry: dict, key: str, scale: float = 1.0, fmt: str = '.2f') -> str:
  m, s = entry.get(key), entry.get(f'{key}_std')
  if m is None:
    return '–'
  return f'{scale * m:{fmt}} ± {scale * (s or 0.0):{fmt}}'


def plot_vs_value(path: pathlib.Path, summary: list[dict], hparam: str, series: dict[str, float],
                  baseline: dict | None, ylabel: str, title: str, identity: bool = False) -> None:
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
  if identity and len(x):
    ax.plot(x, x, color='k', lw=0.8, ls=':', label=f'target {hparam}')
  ax.set_xlabel(hparam)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _paper_series(member_results: dict, names: list[str], key: str) -> list[tuple[float, float]]:
  curves = [member_results[n]['paper_evaluation'] for n in names
            if key in member_results[n].get('paper_evaluation', {})]
  if not curves:
    return []
  eps = curves[0]['eps']
  acc = np.mean([c[key] for c in curves], axis=0)
  return list(zip(eps, acc.tolist()))


def write_sweep_report(workdir: pathlib.Path, config, top: dict, member_results: dict[str, dict]) -> None:
  """report.md and the plots for a sweep experiment's ``top`` results."""
  workdir = pathlib.Path(workdir)
  hparam = top['hparam']
  summary, base = top['sweep_summary'], top.get('baseline')
  ref = base if base else None
  plot_vs_value(workdir / 'sweep_clean_accuracy.png', summary, hparam, {'clean_accuracy': 100.0}, ref,
                'clean accuracy (%)', f'{top["experiment"]}: clean accuracy (mean of the last epochs) vs {hparam}')
  plot_vs_value(workdir / 'sweep_r_fgsm.png', summary, hparam, {'r_fgsm': 1.0}, ref, 'R_FGSM (% x eps)',
                f'{top["experiment"]}: FGSM area R_FGSM vs {hparam}')
  plot_vs_value(workdir / 'sweep_r_noise.png', summary, hparam, {'r_noise': 1.0}, ref, 'R_noise (% x eps)',
                f'{top["experiment"]}: Gaussian-noise area R_noise vs {hparam}')
  eps = summary[0].get('pgd_eps') if summary else None
  pgd_eps = top['sweep'][0]['pgd_eps'] if top['sweep'] else eps
  plot_vs_value(workdir / 'sweep_pgd.png', summary, hparam, {'pgd_accuracy': 100.0}, ref, 'accuracy (%)',
                f'{top["experiment"]}: screening worst-case accuracy at eps={pgd_eps:g} vs {hparam}')
  plot_vs_value(workdir / 'sweep_distances.png', summary, hparam,
                {'boson_distance': 1.0, 'fermion_distance': 1.0, 'boson_distance_train': 1.0,
                 'fermion_distance_train': 1.0}, ref, 'mean pair distance ||h_i - h_j||^2 / N',
                f'{top["experiment"]}: measured pair distances (last hidden layer) vs target {hparam}',
                identity=True)

  # Accuracy vs eps: the strong evaluation's worst case, else the paper's FGSM curves.
  strong = top.get('pgd_comparison') or []
  series = {f'{r["name"]} ({r["role"]})': sorted((float(e), a) for e, a in r['worst_case'].items())
            for r in strong if r['worst_case']}
  title = f'{top["experiment"]}: worst-case accuracy vs eps ({strong[0]["profile"]} profile)' if series else ''
  if not series:
    for r in top['sweep'][:1] + top.get('baseline_runs', [])[:1]:
      pts = _paper_series(member_results, [r['name']], 'fgsm_accuracy')
      if pts:
        series[r['name']] = pts
    title = f'{top["experiment"]}: FGSM accuracy vs eps'
  report.plot_accuracy_vs_eps(workdir / 'accuracy_vs_eps.png', series, title)

  # The paper's curves: the best value and the baseline, mean over seeds.
  best = max((s for s in summary if s['clean_accuracy'] is not None), key=lambda s: s['clean_accuracy'],
             default=None)
  paper_series = {}
  if best is not None:
    names = [r['name'] for r in top['sweep'] if r[hparam] == best[hparam]]
    for key, label in (('fgsm_accuracy', 'FGSM'), ('noise_accuracy', 'noise')):
      pts = _paper_series(member_results, names, key)
      if pts:
        paper_series[f'{hparam}={best[hparam]:g}, {label}'] = pts
  if base:
    names = [r['name'] for r in top.get('baseline_runs', [])]
    for key, label in (('fgsm_accuracy', 'FGSM'), ('noise_accuracy', 'noise')):
      pts = _paper_series(member_results, names, key)
      if pts:
        paper_series[f'{base["name"]}, {label}'] = pts
  if paper_series:
    report.plot_accuracy_vs_eps(workdir / 'paper_curves.png', paper_series,
                                f'{top["experiment"]}: the paper protocol (mean over seeds)')

  lines = [f'# {top["experiment"]}', '']
  if top.get('smoke'):
    lines += ['> SMOKE RUN: tiny data, few epochs and weakened attacks. These numbers test the code path only.', '']
  t = top.get('timing', {})
  n_sweep = len(top['sweep'])
  first = member_results[top['sweep'][0]['name']] if top['sweep'] else {}
  paper = first.get('paper_evaluation', {})
  lines += [f'Sweep of `{hparam}` over {len(summary)} values x {summary[0]["seeds"] if summary else 0} seeds '
            f'({n_sweep} models, method `{top["method"]}`) trained as one vmapped program, plus the baseline '
            f'`{base["name"] if base else "none"}` over the same seeds.', '',
            f'- clean accuracy: mean test accuracy after each of the last {len(paper.get("test_accuracies", []))} '
            f'epochs on {paper.get("test_examples", "?")} test images (fraction shown in %);',
            f'- R_FGSM, R_noise: area under accuracy (%) vs eps, eps = 0..{paper["eps"][-1] if paper.get("eps") else float("nan"):g}'
            f', on the first {paper.get("examples", "?")} test images (the paper\'s unit; its MLP has '
            'R_FGSM = 4.288);',
            f'- PGD (screen): per-example worst case over the `{top["sweep"][0]["pgd_profile"] if n_sweep else ""}` '
            f'profile\'s attacks at eps = {pgd_eps:g} on the first '
            f'{top["sweep"][0]["pgd_examples"] if n_sweep else "?"} test images;',
            '- boson / fermion: mean ||h_i - h_j||^2 / N over same- / different-label pairs in the last hidden '
            'layer (test; train in the plot).', '',
            '## Sweep (mean ± std over seeds)', '',
            f'| {hparam} | clean (%) | R_FGSM | R_noise | PGD@{pgd_eps:g} (%) | boson | fermion |',
            '|---|---|---|---|---|---|---|']
  for s in summary:
    lines.append(f'| {s[hparam]:g} | {_pm(s, "clean_accuracy", 100)} | {_pm(s, "r_fgsm")} | {_pm(s, "r_noise")} | '
                 f'{_pm(s, "pgd_accuracy", 100)} | {_pm(s, "boson_distance", fmt=".3f")} | '
                 f'{_pm(s, "fermion_distance", fmt=".3f")} |')
  if base:
    lines.append(f'| **{base["name"]}** (baseline) | {_pm(base, "clean_accuracy", 100)} | {_pm(base, "r_fgsm")} | '
                 f'{_pm(base, "r_noise")} | {_pm(base, "pgd_accuracy", 100)} | '
                 f'{_pm(base, "boson_distance", fmt=".3f")} | {_pm(base, "fermion_distance", fmt=".3f")} |')
  lines += ['', '![clean accuracy](sweep_clean_accuracy.png)', '', '![R_FGSM](sweep_r_fgsm.png)', '',
            '![R_noise](sweep_r_noise.png)', '', '![distances vs target](sweep_distances.png)', '',
            '![screening PGD](sweep_pgd.png)', '']
  if paper_series:
    lines += ['![paper curves](paper_curves.png)', '']

  if strong:
    eps_all = sorted({float(e) for r in strong for e in r['worst_case']})
    lines += ['## Strong evaluation (the number that counts)', '',
              f'Profile `{strong[0]["profile"]}` on the first {strong[0]["eval_examples"]} test images: per-example '
              'worst case over all its attacks, accuracy in %.', '',
              '| role | model | clean | ' + ' | '.join(f'eps={e:g}' for e in eps_all) + ' | R_FGSM | sanity |',
              '|---|---|---|' + '---|' * len(eps_all) + '---|---|']
    for r in strong:
      cells = [report._pct(r['worst_case'].get(f'{e:g}')) for e in eps_all]
      sanity = 'ok' if not r['sanity_failed'] else '**FAILED: ' + ', '.join(r['sanity_failed']) + '**'
      lines.append(f'| {r["role"]} | [{r["name"]}]({r["name"]}/report.md) | {report._pct(r["clean_accuracy"])} | '
                   + ' | '.join(cells) + f' | {_num(r["r_fgsm"])} | {sanity} |')
    lines += ['', '![accuracy vs eps](accuracy_vs_eps.png)', '']

  lines += ['## Timing', '']
  for key in sorted(t):
    if key.endswith('_train_seconds') or key.endswith('_eval_seconds') or key.endswith('_members') \
        or key in ('strong_eval_seconds', 'total_seconds'):
      val = t[key]
      lines.append(f'- {key}: {val:.1f}' if isinstance(val, float) else f'- {key}: {val}')
  lines += ['', '## Members', '', ', '.join(f'[{r["name"]}]({r["results"].rsplit("/", 1)[0]}/report.md)'
                                            for r in top['runs']), '']
  runio.atomic_write_text(workdir / 'report.md', '\n'.join(lines) + '\n')
