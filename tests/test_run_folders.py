"""Run folders a user can trust: --evaluate then rerun, one writer at a time,
damaged checkpoints and JSON, read-only folders, file modes, no stray files."""

import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import chex
import pytest

import geomrobust
from geomrobust import config as config_lib
from geomrobust import experiment
from geomrobust import parallel
from geomrobust import runio
from geomrobust.runio import lock
from geomrobust.training import loop

from test_training import _method, tiny_config, tiny_data

REPO = pathlib.Path(__file__).resolve().parents[1]

# A CNN run (the run that --evaluate used to trap), as small as the whole path allows.
CNN_ARGS = ('--experiment=standard_mnist', '--smoke', '--config.data.verify=false', '--config.train.epochs=1',
            '--config.data.train_examples=128', '--config.eval.attacks=pgd', '--config.eval.eps=0.1',
            '--config.eval.num_examples=32', '--config.eval.sanity=false')


def cnn_config():
  overrides = [a[len('--config.'):].split('=', 1) for a in CNN_ARGS if a.startswith('--config.')]
  return config_lib.apply_overrides(config_lib.smoke(config_lib.load_experiment('standard_mnist')), overrides)


def launch(*args, timeout=600, **kw):
  env = dict(os.environ, ABSL_MIN_LOG_LEVEL='1', GEOMROBUST_OFFLINE='1')
  return subprocess.Popen([sys.executable, str(REPO / 'launch.py'), *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def error_line(rc, err):
  assert rc != 0
  lines = [l for l in err.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
  return lines[0]


@pytest.fixture(scope='module')
def _finished_cnn(tiny_mnist_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('cnn') / 'run'
  experiment.run_experiment(cnn_config(), workdir, tiny_mnist_dir, log=lambda s: None)
  return workdir


@pytest.fixture
def finished_cnn(_finished_cnn, tmp_path):
  """A private copy of a finished one-epoch CNN run."""
  dst = tmp_path / 'run'
  shutil.copytree(_finished_cnn, dst)
  return dst


# --------------------------------------------------------------------------
# 1. --evaluate leaves the run resumable; 4. damaged JSON is named, up front
# --------------------------------------------------------------------------


def test_evaluate_then_rerun_the_training_command_is_already_done(finished_cnn, tiny_mnist_dir):
  trained = json.loads((finished_cnn / 'config.json').read_text())
  experiment.evaluate_workdir(finished_cnn, [('eval.eps', '0.05,0.1')], tiny_mnist_dir, log=lambda s: None)
  stored = json.loads((finished_cnn / 'config.json').read_text())
  assert stored['eval']['eps'] == [0.05, 0.1]
  assert {k: v for k, v in stored.items() if k != 'eval'} == {k: v for k, v in trained.items() if k != 'eval'}
  lines = []
  experiment.run_experiment(cnn_config(), finished_cnn, tiny_mnist_dir, log=lines.append)
  assert lines and lines[0].startswith('already done'), lines


@pytest.mark.parametrize('name', ['results.json', 'config.json'])
def test_damaged_json_is_named_before_any_evaluation(finished_cnn, tiny_mnist_dir, name):
  path = finished_cnn / name
  path.write_text('{"a": "\x01')
  lines = []
  with pytest.raises(runio.RunFolderError, match=f'{path} is damaged \\(not valid JSON'):
    experiment.evaluate_workdir(finished_cnn, [], tiny_mnist_dir, log=lines.append)
  assert not any('accuracy' in l for l in lines), lines  # nothing was computed first
  with pytest.raises(runio.RunFolderError, match=f'{path} is damaged'):
    if name == 'results.json':
      geomrobust.load_run(finished_cnn).results
    else:
      geomrobust.load_run(finished_cnn)


# --------------------------------------------------------------------------
# 2. One writer per run folder
# --------------------------------------------------------------------------


def _write_lock(folder, **record):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / lock.LOCK_FILE).write_text(json.dumps(record))


def test_a_live_holder_refuses_a_second_writer_and_names_it(tmp_path):
  sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    _write_lock(tmp_path, pid=sleeper.pid, host=socket.gethostname(), started='then', command='python launch.py x',
                process_start=lock._process_start(sleeper.pid))
    with pytest.raises(lock.RunFolderBusy, match=f'in use by pid {sleeper.pid} on {socket.gethostname()} .*'
                                                 'python launch.py x.*another --workdir'):
      with lock.writer(tmp_path):
        pass
    assert lock.holder(tmp_path)['pid'] == sleeper.pid  # the holder's lock is untouched
  finally:
    sleeper.kill()
    sleeper.wait()


def test_a_dead_or_reused_pid_is_a_stale_lock_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  _write_lock(tmp_path, pid=dead.pid, host=socket.gethostname(), started='then', command='old')
  lines = []
  with lock.writer(tmp_path, log=lines.append):
    assert lock.holder(tmp_path)['pid'] == os.getpid()
  assert 'which is gone; taking it over' in lines[0]
  assert lock.holder(tmp_path) is None  # released
  # A live pid that started after the lock was written is not the holder either.
  _write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), process_start='1', command='old')
  with lock.writer(tmp_path, log=lines.append):
    pass


def test_a_holder_on_another_host_is_not_guessed_at(tmp_path):
  _write_lock(tmp_path, pid=1, host='elsewhere.example', started='then', command='python launch.py x')
  with pytest.raises(lock.RunFolderBusy, match=f'if that process is gone, delete {tmp_path / lock.LOCK_FILE}'):
    with lock.writer(tmp_path):
      pass


def test_writer_is_reentrant_and_leaves_no_empty_folder(tmp_path):
  folder = tmp_path / 'new' / 'run'
  with lock.writer(folder):
    with lock.writer(folder):
      assert (folder / lock.LOCK_FILE).exists()
    assert (folder / lock.LOCK_FILE).exists()  # the inner exit does not release
  assert not folder.exists()  # created and nothing written: removed again
  with lock.writer(folder):
    (folder / 'x').write_text('kept')
  assert (folder / 'x').exists() and not (folder / lock.LOCK_FILE).exists()


def test_two_processes_on_one_folder(tiny_mnist_dir, tmp_path):
  workdir = tmp_path / 'run'
  first = launch(*CNN_ARGS, f'--data_dir={tiny_mnist_dir}', f'--workdir={workdir}')
  try:
    deadline = time.time() + 300
    while not (workdir / lock.LOCK_FILE).exists():
      assert first.poll() is None, first.communicate()[1][-3000:]
      assert time.time() < deadline
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # holds the lock for as long as the second process needs
    try:
      rc, _, err = finish(launch(*CNN_ARGS, f'--data_dir={tiny_mnist_dir}', f'--workdir={workdir}'))
      line = error_line(rc, err)
      assert f'run folder {workdir} is in use by pid {first.pid}' in line, line
      rc, _, err = finish(launch(f'--evaluate={workdir}', f'--data_dir={tiny_mnist_dir}'))
      assert f'is in use by pid {first.pid}' in error_line(rc, err)
    finally:
      first.send_signal(signal.SIGCONT)
    rc, out, err = finish(first)
    assert rc == 0, err[-3000:]
  finally:
    first.kill()
  assert [r['epoch'] for r in runio.read_metrics(workdir / 'metrics.jsonl')] == [1]  # logged once
  assert json.loads((workdir / 'results.json').read_text())['eval_examples'] == 32
  assert not (workdir / lock.LOCK_FILE).exists()


def test_evaluate_reports_a_busy_folder_before_its_config_exists(tmp_path):
  # A run that has taken its lock but not yet written config.json is busy, not missing.
  other = subprocess.Popen(['sleep', '60'])
  try:
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / lock.LOCK_FILE).write_text(json.dumps(dict(
        pid=other.pid, host=socket.gethostname(), started='now', command='launch.py',
        process_start=lock._process_start(other.pid))))
    with pytest.raises(lock.RunFolderBusy, match=f'in use by pid {other.pid}'):
      experiment.evaluate_workdir(folder, [], None, log=lambda s: None)
    assert (folder / lock.LOCK_FILE).exists() and not (folder / 'config.json').exists()
  finally:
    other.kill()
  with pytest.raises(FileNotFoundError, match='no trained run'):
    experiment.evaluate_workdir(tmp_path / 'nothing', [], None, log=lambda s: None)


# --------------------------------------------------------------------------
# 3. Damaged checkpoints
# --------------------------------------------------------------------------


def _data_file(ckpt: pathlib.Path) -> pathlib.Path:
  """The largest array-data file of a checkpoint (the weights)."""
  return max((p for p in ckpt.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture(scope='module')
def _killed_and_full(tmp_path_factory):
  """A 4-epoch tiny run, and the same run killed after epoch 3 (checkpoints 2 and 3)."""
  root = tmp_path_factory.mktemp('ckpt')
  cfg = tiny_config(epochs=4)
  x, y = tiny_data()
  mesh = parallel.make_mesh(1)
  full = loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, root / 'full', mesh, log=lambda s: None)

  def kill(done):
    if done == 3:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, root / 'part', mesh, log=lambda s: None, after_epoch=kill)
  return cfg, full, root / 'part'


@pytest.mark.parametrize('which,where', [('data', 0), ('data', 0.5), ('data', 0.9), ('_METADATA', 0.5),
                                         ('manifest.ocdbt', 0), ('data', 'flip')])
def test_resume_falls_back_past_a_damaged_checkpoint(_killed_and_full, tmp_path, which, where):
  cfg, full, part = _killed_and_full
  run = tmp_path / 'run'
  shutil.copytree(part, run)
  victim = _data_file(run / 'checkpoints' / '3') if which == 'data' else run / 'checkpoints' / '3' / 'default' / which
  size = victim.stat().st_size
  if where == 'flip':  # same size, changed bytes
    with open(victim, 'r+b') as f:
      f.seek(size // 2)
      inverted = bytes(255 - b for b in f.read(16))
      f.seek(size // 2)
      f.write(inverted)
    assert victim.stat().st_size == size
  else:
    os.truncate(victim, int(size * where))
  x, y = tiny_data()
  lines = []
  resumed = loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, run, parallel.make_mesh(1), log=lines.append)
  warning = [l for l in lines if 'damaged' in l]
  assert len(warning) == 1 and f'checkpoint {run / "checkpoints" / "3"} is damaged' in warning[0], lines
  assert 'resuming from the newest intact one, 2' in warning[0]
  assert resumed.resumed_from == 2
  chex.assert_trees_all_equal(resumed.params, full.params)  # as if never interrupted
  assert [r['epoch'] for r in runio.read_metrics(run / 'metrics.jsonl')] == [1, 2, 3, 4]
  assert (run / 'damaged_checkpoints' / '3').is_dir()  # moved aside, not deleted


def test_a_run_written_without_digests_is_checked_by_restoring(_killed_and_full, tmp_path):
  cfg, full, part = _killed_and_full
  run = tmp_path / 'run'
  shutil.copytree(part, run)
  (run / 'checkpoints' / 'digests.json').unlink()  # as written before digests were recorded
  os.truncate(_data_file(run / 'checkpoints' / '3'), 100)
  x, y = tiny_data()
  lines = []
  resumed = loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, run, parallel.make_mesh(1), log=lines.append)
  assert resumed.resumed_from == 2 and any('checkpoints/3 is damaged' in l for l in lines), lines
  chex.assert_trees_all_equal(resumed.params, full.params)


def test_a_damaged_final_checkpoint_is_not_read_as_the_model(_killed_and_full, tmp_path):
  _, _, part = _killed_and_full
  run = tmp_path / 'run'
  shutil.copytree(part, run)
  os.truncate(_data_file(run / 'checkpoints' / '3'), 10)
  # Found by the recorded digests, before the storage library reads the broken file.
  with pytest.raises(runio.RunFolderError, match=r'checkpoints/3 is damaged \(.* has 10 bytes, \d+ were written\); '
                                                 r'the newest intact checkpoint '
                                                 r'is 2: .*rerun the training command'):
    loop.restore_params(run)
  os.truncate(_data_file(run / 'checkpoints' / '2'), 10)
  x, y = tiny_data()
  cfg = tiny_config(epochs=4)
  with pytest.raises(loop.TrainingError, match=f'every checkpoint in {run / "checkpoints"} is damaged .*'
                                               f'rm -r {run / "checkpoints"}'):
    loop.train(_method(cfg), x, y, x[:64], y[:64], cfg, run, parallel.make_mesh(1), log=lambda s: None)


def test_evaluate_of_a_damaged_run_is_one_line(finished_cnn, tiny_mnist_dir):
  before = (finished_cnn / 'results.json').read_text()
  os.truncate(_data_file(finished_cnn / 'checkpoints' / '1'), 7)
  rc, _, err = finish(launch(f'--evaluate={finished_cnn}', f'--data_dir={tiny_mnist_dir}'))
  assert f'checkpoint {finished_cnn / "checkpoints" / "1"} is damaged' in error_line(rc, err)
  assert (finished_cnn / 'results.json').read_text() == before  # nothing good overwritten


# --------------------------------------------------------------------------
# 7. Read-only run folders
# --------------------------------------------------------------------------


def _as_reader(cmd_args, folder):
  """Runs launch.py with ``folder`` not writable: chmod a-w, and as root (who
  may write anywhere) without the capabilities that bypass file modes."""
  prefix = []
  if os.geteuid() == 0:
    if not shutil.which('setpriv'):
      pytest.skip('running as root without setpriv: cannot make a folder read-only for this process')
    caps = '-dac_override,-dac_read_search'
    prefix = ['setpriv', f'--inh-caps={caps}', f'--bounding-set={caps}', '--']
  env = dict(os.environ, ABSL_MIN_LOG_LEVEL='1', GEOMROBUST_OFFLINE='1')
  paths = [folder, *folder.rglob('*')]
  for p in paths:
    os.chmod(p, p.stat().st_mode & ~0o222)
  try:
    return subprocess.run([*prefix, sys.executable, str(REPO / 'launch.py'), *cmd_args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  finally:
    for p in paths:
      os.chmod(p, p.stat().st_mode | stat.S_IWUSR)


def test_read_only_finished_run(finished_cnn):
  before = (finished_cnn / 'results.json').read_text()
  proc = _as_reader([*CNN_ARGS, f'--workdir={finished_cnn}', '--data_dir=/nonexistent'], finished_cnn)
  assert proc.returncode == 0 and 'already done' in proc.stdout + proc.stderr, proc.stderr[-3000:]
  proc = _as_reader([f'--evaluate={finished_cnn}', '--data_dir=/nonexistent'], finished_cnn)
  line = error_line(proc.returncode, proc.stderr)
  assert f'run folder {finished_cnn} is not writable' in line and 'chmod' in line
  assert (finished_cnn / 'results.json').read_text() == before


# --------------------------------------------------------------------------
# 6. A non-finite loss: advice that is a working command
# --------------------------------------------------------------------------


def test_nan_advice_is_a_command_that_is_not_refused(tiny_mnist_dir, tmp_path):
  workdir = tmp_path / 'run'
  rc, _, err = finish(launch(*CNN_ARGS, '--config.train.lr=1e30', f'--data_dir={tiny_mnist_dir}',
                             f'--workdir={workdir}'))
  line = error_line(rc, err)
  assert 'non-finite loss' in line and 'no checkpoint was written before it' in line, line
  args = shlex.split(line.split(': python launch.py ', 1)[1])
  assert f'--workdir={workdir}_lr1e+29' in args and '--config.train.lr=1e+29' in args
  assert [a for a in args if a.startswith(('--workdir', '--config.train.lr'))] == [
      '--config.train.lr=1e+29', f'--workdir={workdir}_lr1e+29']
  # The old advice (rerun here with a lower lr) was refused; this command trains (and may diverge again).
  rc, out, err = finish(launch(*args))
  assert 'different config' not in err and (rc == 0 or 'non-finite loss' in err), err[-2000:]


# --------------------------------------------------------------------------
# 8. Experiments from the registry, or a folder the user names
# --------------------------------------------------------------------------


def test_experiments_dir_and_names_that_are_paths(tmp_path):
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'short_cnn.py').write_text('"""My shorter baseline."""\nfrom geomrobust.config import load_experiment\n\n'
                                     'def get_config():\n  c = load_experiment("standard_mnist")\n'
                                     '  c.train.epochs = 1\n  return c\n')
  marker = tmp_path / 'ran'
  (tmp_path / 'evil.py').write_text(f'open({str(marker)!r}, "w").close()\ndef get_config(): pass\n')
  proc = subprocess.run([sys.executable, str(REPO / 'launch.py'), '--list', f'--experiments_dir={mine}'],
                        cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0 and 'short_cnn' in proc.stdout and 'My shorter baseline.' in proc.stdout
  rc, out, err = finish(launch('--experiment=short_cnn', f'--experiments_dir={mine}', '--show_config'))
  assert rc == 0 and json.loads(out)['train']['epochs'] == 1, err
  for name in ('../x/evil', str(tmp_path / 'evil'), 'evil.py'):
    rc, _, err = finish(launch(f'--experiment={name}', f'--experiments_dir={mine}', '--show_config'))
    assert 'bad experiment name' in error_line(rc, err)
  assert not marker.exists()


# --------------------------------------------------------------------------
# 9. Small things
# --------------------------------------------------------------------------


def test_result_files_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    runio.write_json(tmp_path / 'results.json', {'a': 1})
    runio.atomic_write_text(tmp_path / 'report.md', 'x')
  finally:
    os.umask(old)
  for name in ('results.json', 'report.md'):
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_a_run_refused_for_missing_data_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv('GEOMROBUST_OFFLINE', '1')
  monkeypatch.setenv('GEOMROBUST_CACHE_DIR', str(tmp_path / 'cache'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  workdir = tmp_path / 'w'
  cfg = config_lib.smoke(config_lib.load_experiment('madry_cifar10'))
  with pytest.raises(Exception, match='cifar'):
    experiment.run_experiment(cfg, workdir, str(empty), log=lambda s: None)
  assert not workdir.exists()
