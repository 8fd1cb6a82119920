"""A comparison of methods: one table, two figures, and a report that opens
with the ranking and the claims the table tests.

A family experiment becomes a comparison when its config has a
``comparison`` section (``experiments/compare_mnist.py``). Its members are
trained and evaluated like any family's (each a run folder); a member that
fails is listed under ``failed`` with its error line and the others go on.
This module then reads the members' own ``results.json`` (and
``robust_masks.npz``, ``metrics.jsonl``) and writes, into the top
``results.json``:

  table    one row per finished member: ``{name, method, model, architecture,
           clean_accuracy, clean_stderr, robust: [{eps, accuracy, stderr}],
           mean_robust, sanity_passed, sanity_failed, train_seconds,
           eval_seconds (the evaluation and the probes), eval_examples,
           stochastic, geometry: {...}}``;
           ``stderr`` is the binomial standard error over the evaluated
           images, sqrt(p (1 - p) / n); ``geometry`` holds each probe's
           :meth:`Probe.comparison_summary` numbers.
  ranking  member names by ``mean_robust`` (the mean of the worst-case
           robust accuracy over the eps grid), best first.
  claims   each of ``comparison.claims`` tested on the table (below).
  failed   ``[{name, error}]``.

Options (``config.comparison``):
  reference   the member the summary compares others with (e.g. plain CE).
  geometry    the geometry keys the report's table shows (every key is in
              results.json either way; empty: all of them).
  claims      strings ``'TEXT | A OP B | METRIC'``: member A against member B
              on METRIC, one of ``clean``, ``robust@EPS`` or a geometry key of
              the table (e.g. ``class_capacity_eps0.1``); OP ``>`` (A above
              B), ``<`` (A below B) or ``~`` (no difference). Accuracies are
              compared by their difference and its standard error (paired
              over the same images, from the members' masks, when both are
              deterministic): it *holds* when the difference is beyond 2 SE in
              the claimed direction (for ``~``: within 2 SE), is *contradicted*
              when beyond 2 SE the other way (``~``: beyond 2 SE) and is
              *inconclusive* otherwise. A geometry number has no standard
              error here (one network each): the claim holds or not by its sign.

Every sentence of the report's opening is generated from these numbers.
"""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np

from geomrobust import config as config_lib
from geomrobust import probes as probes_lib
from geomrobust import runio

TABLE_FIGURE = 'comparison_robust.png'
GEOMETRY_FIGURE = 'comparison_geometry.png'
def stderr(p: float, n: int) -> float:
  """Binomial standard error of an accuracy ``p`` over ``n`` images."""
  return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float('nan')


def parse_claim(text: str) -> dict:
  """``'TEXT | A OP B | METRIC'`` -> ``{text, a, op, b, metric}`` (one ConfigError line if malformed)."""
  parts = [p.strip() for p in str(text).split('|')]
  m = re.fullmatch(r'(\S+)\s*([<>~])\s*(\S+)', parts[1]) if len(parts) == 3 else None
  if not m or not parts[0] or not parts[2]:
    raise config_lib.ConfigError(f'bad comparison claim {text!r}: write "TEXT | member_a > member_b | metric" '
                                 '(op >, < or ~; metric clean, robust@EPS or a geometry key)')
  return dict(text=parts[0], a=m.group(1), op=m.group(2), b=m.group(3), metric=parts[2])


def validate(config) -> None:
  """Claims parse and name members of the family (checked before training)."""
  names = {config_lib.parse_member(s)[0] for s in config.get('members') or ()}
  for text in config.comparison.get('claims', ()):
    c = parse_claim(text)
    for who in (c['a'], c['b']):
      if who not in names:
        raise config_lib.ConfigError(f'comparison claim {c["text"]!r} names {who!r}, not a member '
                                     f'({", ".join(sorted(names))})')
  ref = str(config.comparison.get('reference', '') or '')
  if ref and ref not in names:
    raise config_lib.ConfigError(f'comparison.reference={ref!r} is not a member ({", ".join(sorted(names))})')


def _model_text(model: dict) -> str:
  """A short description of a model section: its name and its sequence-valued
  fields (the layer sizes), e.g. ``mlp hidden=1000`` or ``cnn channels=16-32 dense=256``."""
  sizes = [f'{k}={"-".join(str(v) for v in vals)}' for k, vals in sorted(model.items())
           if isinstance(vals, (list, tuple)) and vals]
  return ' '.join([str(model.get('name', '?'))] + sizes)


def _train_seconds(folder: pathlib.Path, results: dict) -> float:
  """Training wall time over every epoch or chunk logged (a resumed or reused run counts all of them)."""
  rows = runio.read_metrics(folder / 'metrics.jsonl') if (folder / 'metrics.jsonl').exists() else []
  total = sum(float(r.get('epoch_seconds', r.get('seconds', 0.0)) or 0.0) for r in rows)
  return total or float(results.get('timing', {}).get('train_seconds', 0.0))


def member_row(name: str, config, results: dict, folder: pathlib.Path) -> dict:
  """One table row from a member's config and ``results.json``."""
  n = int(results['eval_examples'])
  worst = sorted((r for r in results['robustness'] if r['attack'] == 'worst_case'), key=lambda r: r['eps'])
  robust = [dict(eps=float(r['eps']), accuracy=float(r['accuracy']), stderr=stderr(float(r['accuracy']), n))
            for r in worst]
  geometry = {}
  for probe in probes_lib.build_probes(config.get('probes')):
    out = results.get('geometry' if probe.kind == 'geometry' else 'probes', {}).get(probe.name)
    if out:
      geometry.update(probe.comparison_summary(out))
  sanity = results.get('sanity', {})
  timing = results.get('timing', {})
  return dict(
      name=name, method=str(config.method.name), model=_model_text(config.model.to_dict()),
      clean_accuracy=float(results['clean_accuracy']), clean_stderr=stderr(float(results['clean_accuracy']), n),
      robust=robust, mean_robust=float(np.mean([r['accuracy'] for r in robust])) if robust else float('nan'),
      sanity_passed=all(v.get('passed', False) for v in sanity.values()),
      sanity_failed=[k for k, v in sanity.items() if not v.get('passed', False)],
      train_seconds=_train_seconds(folder, results),
      eval_seconds=float(timing.get('eval_seconds', 0.0)) + float(timing.get('probe_seconds', 0.0)),
      eval_examples=n, stochastic='clean_passes' in results, reused_from=results.get('reused_from'),
      geometry=geometry)


def _architectures(rows: list[dict], configs: dict) -> None:
  """Sets each row's ``architecture``: 'shared A' for a model section other
  members have too (same letter, same network), 'own' otherwise."""
  groups: dict[str, list[str]] = {}
  for r in rows:
    groups.setdefault(config_lib.to_json(configs[r['name']].model), []).append(r['name'])
  letters = iter('ABCDEFGHIJKLMNOPQRSTUVWXYZ')
  label = {key: (f'shared {next(letters)}' if len(names) > 1 else 'own') for key, names in groups.items()}
  for r in rows:
    r['architecture'] = label[config_lib.to_json(configs[r['name']].model)]


def _mask(folder: pathlib.Path, key: str) -> np.ndarray | None:
  path = folder / 'robust_masks.npz'
  if not path.exists():
    return None
  with np.load(path) as z:
    return np.asarray(z[key], bool) if key in z.files else None


def _value(row: dict, metric: str):
  """``(value, stderr, mask key)`` of a row's metric (stderr None for geometry numbers)."""
  if metric == 'clean':
    return row['clean_accuracy'], row['clean_stderr'], 'clean'
  if metric.startswith('robust@'):
    eps = float(metric[len('robust@'):])
    for r in row['robust']:
      if abs(r['eps'] - eps) < 1e-9:
        return r['accuracy'], r['stderr'], f'worst_case@{eps:g}'
    return None, None, None
  v = row['geometry'].get(metric)
  return (float(v), None, None) if isinstance(v, (int, float)) else (None, None, None)


def check_claim(claim: dict, rows: dict[str, dict], folders: dict[str, pathlib.Path]) -> dict:
  """One claim against the table: the numbers, the difference, its SE and the verdict."""
  out = dict(claim)
  ra, rb = rows.get(claim['a']), rows.get(claim['b'])
  if ra is None or rb is None:
    missing = claim['a'] if ra is None else claim['b']
    return dict(out, verdict='not tested', reason=f'{missing} did not finish')
  (va, sa, key), (vb, sb, _) = _value(ra, claim['metric']), _value(rb, claim['metric'])
  if va is None or vb is None:
    return dict(out, verdict='not tested', reason=f'{claim["metric"]} is not in both rows')
  diff = va - vb
  out.update(a_value=va, b_value=vb, difference=diff)
  if sa is None:   # a geometry number: one network each, no standard error
    holds = {'>': diff > 0, '<': diff < 0, '~': diff == 0}[claim['op']]
    return dict(out, se=None, paired=False, verdict='holds' if holds else 'does not hold')
  ma, mb = _mask(folders[claim['a']], key), _mask(folders[claim['b']], key)
  paired = (ma is not None and mb is not None and len(ma) == len(mb) and not ra['stochastic']
            and not rb['stochastic'])
  if paired:
    d = ma.astype(np.float64) - mb.astype(np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float('nan')
  else:
    se = math.sqrt(sa**2 + sb**2)
  out.update(se=se, paired=paired)
  z = diff / se if se > 0 else (math.inf if diff > 0 else -math.inf if diff < 0 else 0.0)
  if claim['op'] == '~':
    verdict = 'holds' if abs(z) <= 2 else 'contradicted'
  else:
    z = z if claim['op'] == '>' else -z
    verdict = 'holds' if z > 2 else 'contradicted' if z < -2 else 'inconclusive'
  return dict(out, verdict=verdict)


def build(config, workdir: pathlib.Path, member_results: dict[str, dict], member_configs: dict,
          failed: list[dict]) -> dict:
  """The comparison's part of the top ``results.json``: table, ranking, claims, failed."""
  rows = [member_row(name, member_configs[name], res, workdir / name) for name, res in member_results.items()]
  _architectures(rows, member_configs)
  by_name = {r['name']: r for r in rows}
  folders = {name: workdir / name for name in member_results}
  ranking = [r['name'] for r in sorted(rows, key=lambda r: -r['mean_robust'])]
  claims = [check_claim(parse_claim(t), by_name, folders) for t in config.comparison.get('claims', ())]
  return dict(table=rows, ranking=ranking, claims=claims, failed=list(failed),
              reference=str(config.comparison.get('reference', '') or ''),
              geometry_columns=list(config.comparison.get('geometry', ())))


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------


def _pct(v, se=None) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return '-'
  return f'{100 * v:.1f}' + (f' ± {100 * se:.1f}' if se is not None else '')


def _num(v) -> str:
  return '-' if v is None else f'{v:.3g}' if isinstance(v, (int, float)) else str(v)


def _claim_sentence(c: dict) -> str:
  if c['verdict'] == 'not tested':
    return f'- **{c["text"]}**: not tested ({c["reason"]}).'
  accuracy = c['se'] is not None
  fmt = (lambda v: f'{100 * v:.1f}%') if accuracy else _num
  metric = c['metric'].replace('@', ' at eps ')
  diff = f'{100 * c["difference"]:+.1f} ± {100 * c["se"]:.1f} points' if accuracy else f'{c["difference"]:+.3g}'
  how = ('paired over the same images' if c.get('paired') else 'unpaired') if accuracy else 'one network each'
  return (f'- **{c["text"]}**: {c["verdict"]}. {c["a"]} {fmt(c["a_value"])} vs {c["b"]} {fmt(c["b_value"])} '
          f'({metric}); difference {diff} ({how}).')


def opening_lines(top: dict, eps_grid: list[float]) -> list[str]:
  """The report's opening: ranking, the claims, failures. Every number comes from ``top``."""
  rows = {r['name']: r for r in top['table']}
  grid = ', '.join(f'{e:g}' for e in eps_grid)
  lines = [f'Ranking by mean worst-case robust accuracy over eps {grid} (the shared evaluation; EOT for '
           'stochastic members):', '']
  for i, name in enumerate(top['ranking'], 1):
    r = rows[name]
    lines.append(f'{i}. **{name}** ({r["method"]}, {r["model"]}): {_pct(r["mean_robust"])}% mean robust, '
                 f'{_pct(r["clean_accuracy"], r["clean_stderr"])}% clean' +
                 ('' if r['sanity_passed'] else f' — sanity FAILED: {", ".join(r["sanity_failed"])}'))
  ref = rows.get(top.get('reference', ''))
  if ref is not None and ref['robust']:
    last = ref['robust'][-1]
    above = [n for n in top['ranking'] if n != ref['name'] and
             any(abs(x['eps'] - last['eps']) < 1e-9 and x['accuracy'] - x['stderr'] * 2 > last['accuracy'] + 1e-12
                 for x in rows[n]['robust'])]
    lines += ['', f'At eps {last["eps"]:g} the reference {ref["name"]} keeps {_pct(last["accuracy"], last["stderr"])}%; '
              f'{len(above)} of {len(rows) - 1} other members are more than 2 SE above it'
              + (f' ({", ".join(above)}).' if above else '.')]
  if top.get('claims'):
    lines += ['', 'The papers\' claims, tested on this table:', '']
    lines += [_claim_sentence(c) for c in top['claims']]
  bad = [n for n, r in rows.items() if not r['sanity_passed']]
  lines += ['', f'Sanity checks: all pass for {len(rows) - len(bad)} of {len(rows)} members' +
            (f'; FAILED for {", ".join(bad)} (their numbers are not to be trusted until the failure is '
             'understood).' if bad else '.')]
  if top.get('failed'):
    lines += ['', f'**{len(top["failed"])} member(s) failed** and are not in the table:', '']
    lines += [f'- {f["name"]}: {f["error"]}' for f in top['failed']]
  return lines


def table_lines(top: dict, eps_grid: list[float]) -> list[str]:
  """The table: accuracy in % ± SE, sanity, time, and the geometry columns all rows share."""
  rows = top['table']
  found = [k for k in dict.fromkeys(k for r in rows for k in r['geometry'])
           if all(isinstance(r['geometry'].get(k, 0.0), (int, float)) for r in rows)]
  keys = [k for k in (top.get('geometry_columns') or found) if k in found]
  head = (['member', 'method', 'model', 'architecture', 'clean'] + [f'eps {e:g}' for e in eps_grid] +
          ['sanity', 'train s', 'eval + probes s', 'n'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    robust = {round(x['eps'], 9): x for x in r['robust']}
    cells = [r['name'], r['method'], r['model'], r['architecture'], _pct(r['clean_accuracy'], r['clean_stderr'])]
    cells += [_pct(robust[round(e, 9)]['accuracy'], robust[round(e, 9)]['stderr']) if round(e, 9) in robust else '-'
              for e in eps_grid]
    cells += ['pass' if r['sanity_passed'] else 'FAILED: ' + ', '.join(r['sanity_failed']),
              f'{r["train_seconds"]:.0f}', f'{r["eval_seconds"]:.0f}', str(r['eval_examples'])]
    lines.append('| ' + ' | '.join(cells) + ' |')
  if keys:
    lines += ['', 'Geometry (the shared probes at each member\'s last hidden layer; MFTMA of class and exemplar '
              'manifolds clean (eps0) and attacked; all numbers in results.json):', '',
              '| member | ' + ' | '.join(keys) + ' |', '|---|' + '---|' * len(keys)]
    for r in rows:
      lines.append(f'| {r["name"]} | ' + ' | '.join(_num(r['geometry'].get(k)) for k in keys) + ' |')
  return lines


def plot(workdir: pathlib.Path, top: dict, member_results: dict[str, dict]) -> list[str]:
  """The robust-accuracy-vs-eps figure and the geometry panel; returns the files written."""
  from geomrobust.runio import report
  plt = report._plt()
  written = []
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in top['table']:
    xs = [0.0] + [x['eps'] for x in r['robust']]
    ys = [100 * r['clean_accuracy']] + [100 * x['accuracy'] for x in r['robust']]
    es = [100 * r['clean_stderr']] + [100 * x['stderr'] for x in r['robust']]
    ax.errorbar(xs, ys, yerr=es, marker='o', capsize=2, label=r['name'], linestyle='--' if r['stochastic'] else '-')
  ax.set_xlabel('eps (L-inf)')
  ax.set_ylabel('worst-case robust accuracy (%)')
  ax.set_ylim(-2, 102)
  ax.legend(fontsize=7, ncol=2)
  ax.set_title('Robust accuracy vs eps (± 1 SE; dashed: stochastic, EOT)')
  fig.tight_layout()
  fig.savefig(workdir / TABLE_FIGURE, dpi=120)
  plt.close(fig)
  written.append(TABLE_FIGURE)
  keys = [k for k in (top.get('geometry_columns') or []) if any(k in r['geometry'] for r in top['table'])]
  if keys:
    cols = min(6, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    names = [r['name'] for r in top['table']]
    for ax, k in zip(axes.flat, keys):
      vals = [r['geometry'].get(k) for r in top['table']]
      ax.bar(np.arange(len(names)), [np.nan if v is None else v for v in vals])
      ax.set_xticks(np.arange(len(names)))
      ax.set_xticklabels(names, rotation=80, fontsize=6)
      ax.set_title(k, fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
      ax.axis('off')
    fig.suptitle('Geometry per member (comparison.geometry columns)')
    fig.tight_layout()
    fig.savefig(workdir / GEOMETRY_FIGURE, dpi=110)
    plt.close(fig)
    written.append(GEOMETRY_FIGURE)
  return written


def write_report(workdir: pathlib.Path, config, top: dict, member_results: dict[str, dict]) -> None:
  """Prepends the comparison (ranking, claims, table, figures) to the family's report.md."""
  eps_grid = sorted({x['eps'] for r in top['table'] for x in r['robust']})
  figures = plot(workdir, top, member_results) if top['table'] else []
  title = f'# {config.get("experiment", "") or workdir.name}: the comparison' + (
      ' (SMOKE: not a result)' if config.get('smoke_run') else '')
  lines = [title, ''] + (opening_lines(top, eps_grid) if top['table'] else ['No member finished.']) + ['']
  if top['table']:
    lines += ['## The table', '', 'Accuracy in % ± the binomial standard error over the n evaluated images; '
              'robust = the per-example worst case over every attack of the shared evaluation.', '']
    lines += table_lines(top, eps_grid) + ['']
    lines += [f'![{f}]({f})' for f in figures] + ['']
  path = workdir / 'report.md'
  rest = path.read_text() if path.exists() else ''
  runio.atomic_write_text(path, '\n'.join(lines) + '\n## The members\n\n' + rest)
