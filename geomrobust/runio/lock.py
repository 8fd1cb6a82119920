"""One writer per run folder: a lock file holding the writer's pid and host.

Training, resuming and ``--evaluate`` write a run folder (checkpoints,
metrics rows, results); two processes doing it at once would both do all the
work and race on the checkpoints. :func:`writer` takes ``<folder>/run.lock``
(created with ``O_EXCL``: of two processes exactly one succeeds) and a second
writer is refused with a line naming the holder. Readers (``load_run``,
reports, an "already done" rerun) never look at the lock.

A lock whose holder is gone is stale: on the same host a dead pid (or a live
pid that belongs to a process started after the lock was written: pids are
reused) is taken over with a warning. A holder on another host (a shared
file system) cannot be checked from here; the message says which file to
delete once that process is known to be gone.

Taking the lock is also the check that the folder is writable, before any
work is spent; a folder the lock created is removed again if nothing else
was written to it (a run refused before it started leaves no trace).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import pathlib
import socket
import sys
from typing import Callable, Iterator

from geomrobust.runio import RunFolderError

LOCK_FILE = 'run.lock'

# Folders this process holds: a nested writer() is a no-op.
_held: set[str] = set()


class RunFolderBusy(RunFolderError):
  """Another live process writes this run folder."""


def _process_start(pid: int) -> str | None:
  """An id of the process's start (Linux: field 22 of /proc/PID/stat), to tell
  a reused pid from the lock holder; None where unknown."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except OSError:
    return None
  # The command name (field 2) may hold spaces and parentheses; fields after it are plain.
  return stat.rsplit(')', 1)[1].split()[19]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's live process.
  return True


def holder(folder: str | os.PathLike) -> dict | None:
  """The lock's record (pid, host, started, command) or None when unlocked."""
  path = pathlib.Path(folder) / LOCK_FILE
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}  # Being written this instant, or damaged: treated as held by an unknown process.


def _stale(info: dict) -> bool:
  """True when the holder is known to be gone (same host only)."""
  if not info or info.get('host') != socket.gethostname() or not isinstance(info.get('pid'), int):
    return False
  pid = info['pid']
  if not _alive(pid):
    return True
  start = _process_start(pid)
  return start is not None and info.get('process_start') not in (None, start)


def _describe(info: dict) -> str:
  if not info:
    return 'another process (its lock file is unreadable)'
  return (f'pid {info.get("pid")} on {info.get("host")} since {info.get("started", "?")} '
          f'({info.get("command", "?")})')


def _not_writable(folder: pathlib.Path, e: OSError) -> RunFolderError:
  return RunFolderError(f'run folder {folder} is not writable ({e.strerror or e}); make it writable '
                        f'(chmod -R u+w {folder}) or pass another --workdir')


def _check_tree_writable(folder: pathlib.Path) -> None:
  """Every existing folder below ``folder`` must be writable (checkpoints are
  replaced, member folders written): checked now, not after the work."""
  for dirpath, _, _ in os.walk(folder):
    if not os.access(dirpath, os.W_OK | os.X_OK):
      raise _not_writable(pathlib.Path(dirpath), PermissionError(errno.EACCES, 'permission denied'))


def _first_process() -> bool:
  """Multi-host jobs run one process per host on the same folder: process 0
  holds the lock for all of them."""
  if 'jax' not in sys.modules:
    return True
  import jax
  return jax.process_index() == 0


def _try_create(path: pathlib.Path) -> bool:
  record = dict(pid=os.getpid(), host=socket.gethostname(), process_start=_process_start(os.getpid()),
                started=datetime.datetime.now().isoformat(timespec='seconds'), command=' '.join(sys.argv))
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    f.write(json.dumps(record) + '\n')
  return True


@contextlib.contextmanager
def writer(folder: str | os.PathLike, *, log: Callable[[str], None] = print) -> Iterator[None]:
  """Holds ``folder``'s lock for the block (creating ``folder`` if needed).

  Raises RunFolderBusy when a live process holds it, RunFolderError when the
  folder cannot be written. Re-entrant within a process.
  """
  folder = pathlib.Path(folder)
  key = str(folder.resolve())
  if key in _held or not _first_process():
    yield  # Held already: by this process, or (multi-host) by process 0 of this job.
    return
  created = not folder.exists()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise _not_writable(folder, e) from None
  path = folder / LOCK_FILE
  try:
    for _ in range(3):
      if _try_create(path):
        break
      info = holder(folder)
      if info is None:
        continue  # Released meanwhile.
      if not _stale(info):
        hint = ('wait for it to finish or stop it, or pass another --workdir' if info.get('host') ==
                socket.gethostname() else f'if that process is gone, delete {path}; or pass another --workdir')
        raise RunFolderBusy(f'run folder {folder} is in use by {_describe(info)}; {hint}')
      log(f'warning: {path} was left by {_describe(info)}, which is gone; taking it over')
      # Renaming first: of two processes that both saw the stale lock, one wins.
      with contextlib.suppress(FileNotFoundError):
        os.replace(path, path.with_name(f'{LOCK_FILE}.stale.{os.getpid()}'))
        os.unlink(path.with_name(f'{LOCK_FILE}.stale.{os.getpid()}'))
    else:
      raise RunFolderBusy(f'run folder {folder} is in use ({path} keeps reappearing); pass another --workdir')
  except OSError as e:  # (RunFolderBusy is not an OSError: it passes.)
    raise _not_writable(folder, e) from None
  _held.add(key)
  try:
    _check_tree_writable(folder)
    yield
  finally:
    _held.discard(key)
    with contextlib.suppress(OSError):
      os.unlink(path)
    if created:
      with contextlib.suppress(OSError):
        folder.rmdir()  # Only if empty: nothing was written.
