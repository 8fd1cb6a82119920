"""Run an experiment: train, checkpoint, evaluate, report.

  python launch.py --list
  python launch.py --experiment=isometric_mnist --data_dir=../shared/data
  python launch.py --experiment=isometric_mnist --config.train.epochs=10 --config.only=ce,beta_1e-1
  python launch.py --experiment=isometric_mnist --smoke          # sub-minute CPU run of the whole path
  python launch.py --experiment=isometric_mnist --show_config    # every field, resolved
  python launch.py --experiment=madry_mnist --setting=full        # a named setting (paper-sized run)
  python launch.py --evaluate=WORKDIR --config.eval.pgd_steps=200  # re-evaluate (rewrites its results)
  python launch.py --evaluate=WORKDIR --config.probes.latent={}    # ... and add the latent-space study
  python launch.py --analyze=WORKDIR --config.geometry.eps=0,0.1   # manifold geometry (MFTMA) of a finished run
  python launch.py --experiments_dir=my_experiments --experiment=mine  # your own experiment files

Any config field can be overridden with --config.a.b=value (type- and range-checked).
Rerunning the same command on the same --workdir resumes where it stopped; one
process writes a run folder at a time (run.lock).
"""

import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_string('experiment', None, 'Experiment name (a file in experiments/, or in --experiments_dir); '
                    'see --list.')
flags.DEFINE_string('experiments_dir', None, 'A folder of your own experiment files (NAME.py with get_config()), '
                    'searched besides the built-in experiments/.')
flags.DEFINE_string('workdir', None, 'Run folder (default: runs/<experiment>, or runs/<experiment>_smoke).')
flags.DEFINE_string('data_dir', None, 'Folder with the canonical dataset files (or one sub-folder per '
                    'dataset), e.g. ../shared/data. Default: $GEOMROBUST_DATA_DIR, then tfds, then download.')
flags.DEFINE_list('reuse', [], 'Comma-separated finished run folders (or folders holding them) whose models a '
                  'family, e.g. compare_mnist, adopts instead of retraining a member with the identical training '
                  'config (evaluated with this experiment\'s evaluation unless that is the same too).')
flags.DEFINE_bool('list', False, 'List the experiments, one line each, and exit.')
flags.DEFINE_string('setting', None, 'A named setting of the experiment (e.g. full: the paper-sized run for '
                    'accelerators); --show_config lists them under "settings".')
flags.DEFINE_bool('smoke', False, 'Shrink the experiment to a sub-minute CPU run through the whole path.')
flags.DEFINE_bool('show_config', False, 'Print the resolved config (after overrides) and exit.')
flags.DEFINE_string('evaluate', None, 'Re-evaluate the trained run(s) in this workdir with the current eval '
                    'config (--config.eval.* overrides apply; --config.probes.NAME={} adds a probe, e.g. '
                    'latent); no retraining.')
flags.DEFINE_string('analyze', None, 'Manifold geometry (MFTMA capacity, radius, dimension, center correlation '
                    'per layer and eps; probes/manifold_geometry.py) of the finished run(s) in this workdir, or of '
                    'one member (WORKDIR/member); writes geometry.json, geometry.png and a report.md section. '
                    '--config.geometry.* set its options (e.g. --config.geometry.eps=0,0.1 '
                    '--config.geometry.n_t=100); no retraining.')
flags.DEFINE_integer('cpu_devices', 0, 'On a CPU host: how many XLA devices to expose (the evaluation shards its '
                     'examples over them; training uses one). 0: 2 on a host with 2+ cores, else 1. See '
                     'geomrobust/runtime.py.')
flags.DEFINE_bool('compilation_cache', True, 'Keep compiled programs in $GEOMROBUST_CACHE_DIR/jax (default '
                  '~/.cache/geomrobust/jax) so a rerun, resume or --evaluate does not compile them again; '
                  '--nocompilation_cache turns it off.')
FLAGS = flags.FLAGS

# Filled from sys.argv before absl parses it (absl does not know --config.*).
_OVERRIDES = []


def _fail(msg: str) -> None:
  print(f'error: {msg}', file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  # Not sys.exit: after a failed checkpoint read, orbax's leftover coroutines
  # print tracebacks at interpreter shutdown, burying the one line. Nothing of
  # ours is open any more (locks are released as the error unwinds).
  os._exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; flags are --name=value')
  if not FLAGS['verbosity'].present:
    # Orbax and XLA log every checkpoint step at INFO; the progress lines are
    # ours. --verbosity=0 brings their logs back.
    logging.set_verbosity(logging.WARNING)
  # Imported here so --help stays fast and errors above need no JAX.
  from geomrobust import runtime
  try:
    runtime.configure(FLAGS.cpu_devices, FLAGS.compilation_cache)
  except ValueError as e:
    _fail(str(e))
  from geomrobust import config as config_lib
  from geomrobust import data as data_lib
  from geomrobust import experiment as exp_lib
  from geomrobust.training.loop import NonFiniteLoss, TrainingError

  try:
    if FLAGS.list:
      for name in config_lib.list_experiments(FLAGS.experiments_dir):
        print(f'{name:28s} {config_lib.experiment_summary(name, FLAGS.experiments_dir)}')
      return
    if FLAGS.analyze:
      if FLAGS.evaluate or FLAGS.experiment:
        _fail('--analyze runs alone: drop --evaluate / --experiment')
      bad = [k for k, _ in _OVERRIDES if not k.startswith(exp_lib.GEOMETRY_PREFIX)]
      if bad:
        _fail(f'--analyze only takes --config.geometry.* overrides (e.g. --config.geometry.eps=0,0.1), '
              f'not --config.{bad[0]}')
      exp_lib.analyze_workdir(FLAGS.analyze, _OVERRIDES, FLAGS.data_dir)
      return
    if FLAGS.evaluate:
      bad = [k for k, _ in _OVERRIDES if not k.startswith(('eval.', 'parallel.', 'probes.'))]
      if bad:
        _fail(f'--evaluate only takes --config.eval.* / --config.parallel.* / --config.probes.* overrides, '
              f'not {bad[0]!r}')
      exp_lib.evaluate_workdir(FLAGS.evaluate, _OVERRIDES, FLAGS.data_dir)
      return
    if not FLAGS.experiment:
      _fail('pass --experiment=NAME (see --list), --evaluate=WORKDIR or --analyze=WORKDIR')
    config = config_lib.load_experiment(FLAGS.experiment, FLAGS.experiments_dir)
    if FLAGS.setting:
      config = config_lib.apply_setting(config, FLAGS.setting)
    config = config_lib.apply_overrides(config, _OVERRIDES)
    if FLAGS.smoke:
      config = config_lib.smoke(config)
    if FLAGS.show_config:
      config_lib.check_values(config)  # The experiment file's own values too, not only the overrides.
      print(config_lib.to_json(config))
      return
    workdir = FLAGS.workdir or f'runs/{FLAGS.experiment}{"_smoke" if FLAGS.smoke else ""}'
    try:
      top = exp_lib.run_experiment(config, workdir, FLAGS.data_dir, reuse=tuple(FLAGS.reuse))
    except NonFiniteLoss as e:
      _fail(f'{e}: {_rerun_command(workdir, float(config.train.lr) / 10)}')
    if top and top.get('failed'):
      _fail(f'{len(top["failed"])} member(s) failed ({", ".join(f["name"] for f in top["failed"])}); the others '
            f'are in {workdir}/results.json and report.md; rerunning the same command retries the failed ones')
  except (config_lib.ConfigError, data_lib.DataError, TrainingError, ValueError, FileNotFoundError) as e:
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _rerun_command(workdir: str, lr: float) -> str:
  """This command with ``--config.train.lr=lr`` into a new run folder."""
  args, skip = [], False
  for a in sys.argv[1:]:
    if skip:
      skip = False
    elif a == '--workdir':
      skip = True  # Its value is the next argument.
    elif not a.startswith(('--workdir=', '--config.train.lr=')):
      args.append(a)
  args += [f'--config.train.lr={lr:g}', f'--workdir={workdir.rstrip("/")}_lr{lr:g}']
  return ' '.join(['python', 'launch.py'] + [shlex.quote(a) for a in args])


def run():
  global _OVERRIDES
  from geomrobust.config import ConfigError, split_override_args
  try:
    argv, _OVERRIDES = split_override_args(sys.argv)
  except ConfigError as e:
    _fail(str(e))
  app.run(main, argv=argv)


if __name__ == '__main__':
  run()
