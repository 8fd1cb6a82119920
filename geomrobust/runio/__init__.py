"""A run is a folder: config.json, metrics.jsonl, checkpoints/, results.json,
report.md and plots. Writes are atomic (temp file + rename) so a kill never
leaves a half-written file over a good one, with the permissions the umask
gives (like any file the user creates). One process writes a run folder at a
time (:mod:`geomrobust.runio.lock`); readers never take the lock."""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from typing import Any

import numpy as np


def _jsonable(obj: Any):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.generic,)):
    obj = obj.item()
  if hasattr(obj, 'shape') and hasattr(obj, 'tolist'):
    return _jsonable(np.asarray(obj).tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)  # JSON has no NaN/inf; keep them visible as strings.
  return obj


def atomic_write_text(path: os.PathLike, text: str) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    # mkstemp makes the file 0600; a result file is as readable as any other.
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: os.PathLike, obj: Any) -> None:
  atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + '\n')


def read_json(path: os.PathLike) -> Any:
  """The JSON object in ``path``; a damaged file is a RunFolderError naming it."""
  path = pathlib.Path(path)
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunFolderError(f'{path} is damaged (not valid JSON: {e}); {_fix_hint(path)}') from None


def _fix_hint(path: pathlib.Path) -> str:
  """What to do about a damaged run file, by its name."""
  if path.name == 'results.json':
    return ('move it aside (mv {0} {0}.bad) and rerun the training command: it re-evaluates the trained '
            'model from its checkpoints'.format(path))
  if path.name == 'config.json':
    return (f'{path.parent} cannot be resumed or evaluated without it: restore it from a copy, or delete '
            f'{path.parent} and train again')
  return f'restore it from a copy, or delete {path.parent} and train again'





class RunFolderError(ValueError):
  """A run folder (or a file in it) cannot be used; the message is one
  actionable line."""


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_FILE_MODE = 0o666 & ~_umask()


class MetricsWriter:
  """Appends one JSON object per line to ``metrics.jsonl`` (big_vision style)."""

  def __init__(self, path: os.PathLike):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def truncate_after(self, epoch: int) -> None:
    """On resume: drop lines logged after the checkpoint we restart from, so a
    resumed run's log equals an uninterrupted run's."""
    if not self.path.exists():
      return
    keep = []
    for line in self.path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut by a kill.
      if rec.get('epoch', 0) <= epoch:
        keep.append(line)
    atomic_write_text(self.path, ''.join(l + '\n' for l in keep))

  def write(self, record: dict) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps(_jsonable(record)) + '\n')


def read_metrics(path: os.PathLike) -> list[dict]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  for i, line in enumerate(path.read_text().splitlines()):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise RunFolderError(f'{path} line {i + 1} is damaged ({e}); delete that line, or rerun the training '
                           'command, which rewrites the rows after the last checkpoint') from None
  return rows
