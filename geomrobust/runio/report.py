"""report.md and PNG plots for a run and for a multi-model experiment."""

from __future__ import annotations

import pathlib
import textwrap

import numpy as np

from geomrobust import runio


def _plt():
  import matplotlib
  matplotlib.use('Agg')  # Headless: files only.
  import matplotlib.pyplot as plt
  return plt


def _pct(v) -> str:
  return '–' if v is None else f'{100 * v:.2f}'


def format_number(key: str, value) -> str:
  """A table cell: fractions named ``*accuracy*`` (or ``name@eps``) in %, others to 4 digits."""
  if value is None or isinstance(value, str):
    return '–' if value is None else value
  return _pct(value) if 'accuracy' in key or '@' in key else f'{value:.4g}'


def _curves(results: dict, with_clean: bool = False) -> dict[str, list[tuple[float, float]]]:
  """attack -> sorted [(eps, accuracy)]; ``with_clean`` starts every curve at
  (0, clean accuracy) when the grid has no eps = 0 (for plots)."""
  out: dict[str, list] = {}
  for r in results.get('robustness', []):
    out.setdefault(r['attack'], []).append((r['eps'], r['accuracy']))
  out = {k: sorted(v) for k, v in out.items()}
  if with_clean and 'clean_accuracy' in results:
    out = {k: v if v and v[0][0] == 0 else [(0.0, results['clean_accuracy'])] + v for k, v in out.items()}
  return out


def _headline_attack(results: dict) -> str | None:
  curves = _curves(results)
  for name in ('worst_case', 'pgd', 'fgsm'):
    if name in curves:
      return name
  return next(iter(curves), None)


def plot_accuracy_vs_eps(path: pathlib.Path, series: dict[str, list[tuple[float, float]]], title: str,
                         log_x: bool = False) -> None:
  """One curve per entry of ``series`` (name -> [(eps, accuracy)])."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for name, pts in series.items():
    eps, acc = zip(*pts)
    eps = np.asarray(eps, float)
    if log_x:
      keep = eps > 0
      eps, acc = eps[keep], np.asarray(acc)[keep]
    ax.plot(eps, 100 * np.asarray(acc), marker='o', ms=3, label=name)
  if log_x:
    ax.set_xscale('log')
  ax.set_xlabel('eps (L-inf, pixel scale)' if not log_x else 'eps (log scale)')
  ax.set_ylabel('accuracy (%)')
  ax.set_ylim(-2, 102)
  ax.grid(alpha=0.3)
  ax.set_title(textwrap.fill(title, 70), fontsize=9)  # Long titles wrap instead of being cut.
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_convergence(path: pathlib.Path, convergence: list[dict], title: str) -> None:
  """Attack loss vs iterate, one panel per iterative attack, one colour per
  example, one thin line per restart (``results['convergence']``)."""
  if not convergence:
    return
  plt = _plt()
  n = len(convergence)
  fig, axes = plt.subplots(1, n, figsize=(max(3.6 * n, 6.0), 3.4), dpi=110, squeeze=False)
  for ax, c in zip(axes[0], convergence):
    losses = np.asarray(c['losses'], float)  # [examples, restarts, steps + 1]
    colours = plt.cm.tab10(np.arange(losses.shape[0]) % 10)
    for i in range(losses.shape[0]):
      for r in range(losses.shape[1]):
        ax.plot(losses[i, r], color=colours[i], lw=0.8, alpha=0.8 if r == 0 else 0.35)
    ax.set_title(f'{c["attack"]} ({c["loss"]} loss), eps={c["eps"]:g}', fontsize=9)
    ax.set_xlabel('iterate')
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel('attack loss (maximised)')
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _robustness_table(results: dict) -> list[str]:
  curves = _curves(results)
  if not curves:
    return ['(no attacks run)']
  names = list(curves)
  eps_all = sorted({e for pts in curves.values() for e, _ in pts})
  lines = ['| eps | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  for e in eps_all:
    cells = [_pct(dict(curves[n]).get(e)) for n in names]
    lines.append(f'| {e:g} | ' + ' | '.join(cells) + ' |')
  cascaded = [n for n in names if any(r.get('cascade') for r in results['robustness'] if r['attack'] == n)]
  if cascaded:
    lines += ['', f'Cascade (eval.cascade): {", ".join(cascaded)} ran only on the examples every column to '
                  'their left left robust, so each of these columns is the robust accuracy after that attack '
                  'and all before it; worst_case is the same as running every attack on every example.']
  return lines


def _sanity_lines(sanity: dict) -> list[str]:
  if not sanity:
    return ['(no sanity checks)']
  failed = [k for k, v in sanity.items() if not v.get('passed', False)]
  lines = []
  if failed:
    lines.append(f'**WARNING: {len(failed)} SANITY CHECK(S) FAILED: {", ".join(failed)}. '
                 'Do not trust the robustness numbers above until this is explained.**')
    lines.append('')
  lines += ['| check | passed | value | what |', '|---|---|---|---|']
  for k, v in sanity.items():
    val = v.get('value')
    val = f'{val:.4g}' if isinstance(val, (int, float)) else str(val)
    lines.append(f'| {k} | {"yes" if v.get("passed") else "**NO**"} | {val} | {v.get("detail", "")} |')
  return lines


def _run_name(results: dict, workdir: pathlib.Path) -> str:
  """'experiment — member' for a member's folder, just the experiment's name otherwise."""
  experiment, folder = results.get('experiment', ''), pathlib.Path(workdir).name
  return f'{experiment} — {folder}' if experiment and folder != experiment else (experiment or folder)


def write_run_report(workdir: pathlib.Path, config, results: dict, probe_parts: list[str] = ()) -> None:
  """report.md + accuracy_vs_eps.png for one model; ``probe_parts``: the
  probes' own markdown sections, appended."""
  workdir = pathlib.Path(workdir)
  curves = _curves(results, with_clean=True)
  if curves:
    plot_accuracy_vs_eps(workdir / 'accuracy_vs_eps.png', curves,
                         f'{_run_name(results, workdir)}: accuracy vs eps '
                         '(eps=0: clean)')
  convergence = results.get('convergence') or []
  plot_convergence(workdir / 'attack_loss_vs_step.png', convergence,
                   f'{_run_name(results, workdir)}: attack loss per step, first '
                   f'{len(convergence[0]["losses"]) if convergence else 0} test examples')
  t = results.get('timing', {})
  lines = [f'# {_run_name(results, workdir)}', '']
  if results.get('smoke'):
    lines += ['> SMOKE RUN: tiny data, few epochs and weakened attacks. These numbers test the code path only.', '']
  lines += [f'- method: `{results["method"]}`, dataset: `{results["dataset"]}`, seed {results["seed"]}',
            f'- clean accuracy: **{_pct(results["clean_accuracy"])}%** on the first {results["eval_examples"]} '
            'test examples',
            f'- training: {t.get("train_seconds", 0):.1f} s ({t.get("train_examples_per_second", 0):.0f} examples/s); '
            f'evaluation: {t.get("eval_seconds", 0):.1f} s', '',
            '## Accuracy (%) under attack', '', _attack_summary(results), '', *_robustness_table(results), '',
            '![accuracy vs eps](accuracy_vs_eps.png)', '', *stochastic_lines(results), '## Sanity checks', '',
            *_sanity_lines(results.get('sanity', {})), '']
  if convergence:
    lines += ['## Attack convergence', '',
              'Loss of every iterate (one colour per example, one line per restart). Curves still rising at the '
              'last step mean the attack had not converged.', '', '![attack loss vs step](attack_loss_vs_step.png)',
              '']
  lines += list(probe_parts)
  runio.atomic_write_text(workdir / 'report.md', '\n'.join(lines) + '\n')


def _attack_summary(results: dict) -> str:
  """One sentence naming the attacks and their budgets (from the rows)."""
  seen = {}
  for r in results.get('robustness', []):
    if r['attack'] != 'worst_case':
      seen.setdefault(r['attack'], r)
  if not seen:
    return ''
  parts = []
  for name, r in seen.items():
    budget = f' {r["steps"]} steps x {r["restarts"]} restarts' if r['steps'] > 1 else (
        f' worst of {r["restarts"]} draws' if name == 'noise' else '')
    if r.get('targets'):
      budget += f' per target, {r["targets"]} targets'
    if r.get('queries'):
      budget += f' {r["queries"]} queries'
    parts.append(f'{name}{budget}')
  norm = next(iter(seen.values()))['norm']
  eot = next(iter(seen.values())).get('eot', 1)
  eot_txt = f', EOT over {eot} draws of the model\'s noise' if eot > 1 else ''
  return (f'{norm} attacks: {"; ".join(parts)}{eot_txt}. `worst_case`: an example counts as robust only if it '
          'survives every attack.')


def summary_table(member_results: dict[str, dict]) -> list[dict]:
  """One row per member: clean accuracy and headline robust accuracy per eps."""
  rows = []
  for name, res in member_results.items():
    attack = _headline_attack(res)
    curves = _curves(res)
    row = dict(name=name, clean_accuracy=res['clean_accuracy'], attack=attack,
               robust={f'{e:g}': a for e, a in curves.get(attack, [])},
               attacks={k: {f'{e:g}': a for e, a in v} for k, v in curves.items() if k != 'worst_case'})
    row['sanity_failed'] = [k for k, v in res.get('sanity', {}).items() if not v.get('passed')]
    row['summary'] = dict(res.get('summary', {}))  # the probes' flat numbers
    if 'clean_passes' in res:   # a stochastic model: means over passes, their std, the majority vote
      pick = [r for r in res['robustness'] if r['attack'] == attack]
      row.update(passes=res['clean_passes'], clean_accuracy_std=res['clean_accuracy_std'],
                 clean_majority_vote_accuracy=res['clean_majority_vote_accuracy'],
                 robust_std={f'{r["eps"]:g}': r['accuracy_std'] for r in pick},
                 robust_majority={f'{r["eps"]:g}': r['majority_vote_accuracy'] for r in pick})
    rows.append(row)
  return rows


def _cell(row: dict, eps: str | None = None) -> str:
  """A table cell: accuracy in %, with ``± std`` over passes for a stochastic model."""
  value = row['clean_accuracy'] if eps is None else row['robust'].get(eps)
  std = row.get('clean_accuracy_std') if eps is None else row.get('robust_std', {}).get(eps)
  return _pct(value) if std is None or value is None else f'{_pct(value)} ± {100 * std:.2f}'


def stochastic_lines(results: dict) -> list[str]:
  """A stochastic model's rows: mean ± std over its passes and the majority vote (report section)."""
  if 'clean_passes' not in results:
    return []
  lines = ['## Over evaluation passes (stochastic model)', '',
           f'Each verdict is taken over {results["clean_passes"]} passes (one fresh noise draw each; attacks use '
           f'{max(r["eot"] for r in results["robustness"]) if results["robustness"] else 0} EOT draws per '
           'gradient). Accuracy in %: mean ± std over passes, and the majority vote over passes.', '',
           '| attack | eps | mean ± std | majority vote |', '|---|---|---|---|',
           f'| clean | 0 | {_pct(results["clean_accuracy"])} ± {100 * results["clean_accuracy_std"]:.2f} | '
           f'{_pct(results["clean_majority_vote_accuracy"])} |']
  for r in results['robustness']:
    lines.append(f'| {r["attack"]} | {r["eps"]:g} | {_pct(r["accuracy"])} ± {100 * r["accuracy_std"]:.2f} | '
                 f'{_pct(r["majority_vote_accuracy"])} |')
  return lines + ['']


def _per_attack_lines(table: list[dict]) -> list[str]:
  """Per-attack accuracy of every member, one table per eps at which some
  member is neither fully robust nor fully broken (where attacks differ)."""
  attacks = list(dict.fromkeys(a for r in table for a in r.get('attacks', {})))
  eps_all = sorted({float(e) for r in table for e in r['robust']})
  informative = [e for e in eps_all
                 if any(0 < r['robust'].get(f'{e:g}', 0) < r['clean_accuracy'] for r in table)]
  if len(attacks) < 2 or not informative:
    return []
  lines = ['## Per-attack accuracy (%)', '',
           'Which attack found the adversarial examples; `worst_case` is the per-example minimum.', '']
  for e in informative:
    lines += [f'eps = {e:g}', '', '| model | ' + ' | '.join(attacks) + ' | worst_case |',
              '|---|' + '---|' * (len(attacks) + 1)]
    for r in table:
      cells = [_pct(r['attacks'].get(a, {}).get(f'{e:g}')) for a in attacks]
      lines.append(f'| {r["name"]} | ' + ' | '.join(cells) + f' | {_pct(r["robust"].get(f"{e:g}"))} |')
    lines.append('')
  return lines


def _member_sweep_lines(workdir: pathlib.Path, top: dict) -> list[str]:
  """The family's member-sweep section: mean ± std over seeds per swept value,
  and the clean vs robust accuracy curves (the tradeoff) in ``<name>_tradeoff.png``."""
  info = top.get('member_sweep')
  if not info or not top.get(info['name']):
    return []
  from geomrobust import tables
  from geomrobust.runio import sweep_report
  rows, field = top[info['name']], info['hparam'].split('.')[-1]
  summary = tables.summarize(rows, field)
  plot = f'{info["name"]}_tradeoff.png'
  sweep_report.plot_vs_value(workdir / plot, summary, field, {'clean_accuracy': 100.0, 'robust_accuracy': 100.0},
                             None, 'accuracy (%)', f'{top["experiment"]}: {info["member"]} over {field} '
                             f'(robust: worst case at eps={info["eps"]:g}; mean ± std over seeds)')
  lines = [f'## Sweep of `{info["hparam"]}` (member `{info["member"]}`)', '',
           f'Each value trained over {summary[0]["seeds"] if summary else 0} seeds (one vmapped program); '
           f'clean and robust accuracy (%) from the `{info["profile"]}` screening evaluation, robust = worst case '
           f'at eps={info["eps"]:g}; mean ± std over seeds. Details: [{info["name"]}/report.md]'
           f'({info["name"]}/report.md).', '', f'| {field} | clean | robust |', '|---|---|---|']
  for e in summary:
    lines.append(f'| {e[field]:g} | {100 * e["clean_accuracy"]:.2f} ± {100 * e["clean_accuracy_std"]:.2f} | '
                 f'{100 * e["robust_accuracy"]:.2f} ± {100 * e["robust_accuracy_std"]:.2f} |')
  return lines + ['', f'![tradeoff]({plot})', '']


def _probe_family_lines(workdir: pathlib.Path, member_results: dict[str, dict]) -> list[str]:
  """Each probe's comparison of the members (``Probe.family_report``), for
  every probe some member's results carry (its name is its module)."""
  from geomrobust import probes   # here, not at the top: probes draw with this module
  lines = []
  for name, outs in probes.member_outputs(member_results).items():
    lines += probes.get_probe_class(name).family_report(outs, workdir)
  return lines


def write_experiment_report(workdir: pathlib.Path, config, top: dict, member_results: dict[str, dict]) -> None:
  """report.md + accuracy_vs_eps.png with one curve per member."""
  workdir = pathlib.Path(workdir)
  table = top['table']
  series, fgsm_series = {}, {}
  for name, res in member_results.items():
    c = _curves(res, with_clean=True)
    attack = _headline_attack(res)
    if attack:
      series[name] = c[attack]
    if 'fgsm' in c:
      fgsm_series[name] = c['fgsm']
  headline = table[0]['attack'] if table else 'worst_case'
  plot_accuracy_vs_eps(workdir / 'accuracy_vs_eps.png', series,
                       f'{top["experiment"]}: {headline} accuracy vs eps (eps=0: clean), one curve per model')
  if fgsm_series:
    plot_accuracy_vs_eps(workdir / 'fgsm_accuracy_vs_log_eps.png', fgsm_series,
                         f'{top["experiment"]}: FGSM accuracy vs eps (log axis)', log_x=True)
  eps_all = sorted({float(e) for r in table for e in r['robust']})
  lines = [f'# {top["experiment"]}', '']
  if top.get('smoke'):
    lines += ['> SMOKE RUN: tiny data, few epochs and weakened attacks. These numbers test the code path only.', '']
  failed = [(r['name'], r['sanity_failed']) for r in table if r['sanity_failed']]
  if failed:
    lines += ['**WARNING: SANITY CHECKS FAILED: ' + '; '.join(f'{n}: {", ".join(f)}' for n, f in failed)
              + '. Do not trust these robustness numbers until this is explained (see the member reports).**', '']
  first = next(iter(member_results.values()), {})
  if first.get('robustness'):
    lines += [f'Evaluation: first {first.get("eval_examples")} test examples. {_attack_summary(first)}', '']
  lines += [f'## Accuracy (%): clean and `{headline}` per eps', '',
            '| model | clean | ' + ' | '.join(f'eps={e:g}' for e in eps_all) + ' | sanity |',
            '|---|---|' + '---|' * len(eps_all) + '---|']
  for r in table:
    cells = [_cell(r, f'{e:g}') for e in eps_all]
    sanity = 'ok' if not r['sanity_failed'] else '**FAILED: ' + ', '.join(r['sanity_failed']) + '**'
    lines.append(f'| {r["name"]} | {_cell(r)} | ' + ' | '.join(cells) + f' | {sanity} |')
  if any('passes' in r for r in table):
    lines += ['', 'Stochastic models (± std): means over their evaluation passes (each a fresh noise draw), EOT '
              'attacks; their reports also give the majority vote.']
  lines += ['', '![accuracy vs eps](accuracy_vs_eps.png)', '']
  lines += _member_sweep_lines(workdir, top)
  lines += _per_attack_lines(table)
  if any('fgsm' in r.get('attacks', {}) for r in table):
    fg_eps = sorted({float(e) for r in table for e in r['attacks'].get('fgsm', {})})
    lines += ['## FGSM accuracy (%)', '', '| model | ' + ' | '.join(f'{e:g}' for e in fg_eps) + ' |',
              '|---|' + '---|' * len(fg_eps)]
    for r in table:
      lines.append(f'| {r["name"]} | ' + ' | '.join(_pct(r['attacks'].get('fgsm', {}).get(f'{e:g}'))
                                                    for e in fg_eps) + ' |')
    lines += ['', '![FGSM accuracy vs log eps](fgsm_accuracy_vs_log_eps.png)', '']
  keys = list(dict.fromkeys(k for r in table for k in r.get('summary', {})))
  if keys:
    lines += ["## The probes' numbers", '', 'From `config.probes` (each member\'s report.md has the full sections); '
              'accuracies in %.', '', '| model | ' + ' | '.join(keys) + ' |', '|---|' + '---|' * len(keys)]
    for r in table:
      lines.append(f'| {r["name"]} | ' + ' | '.join(format_number(k, r['summary'].get(k)) for k in keys) + ' |')
    lines.append('')
  lines += _probe_family_lines(workdir, member_results)
  lines += ['## Members', ''] + [f'- [{r["name"]}]({r["name"]}/report.md)' for r in top['runs']]
  runio.atomic_write_text(workdir / 'report.md', '\n'.join(lines) + '\n')
