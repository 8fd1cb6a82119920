"""geomrobust: representation geometry and adversarial robustness, in JAX.

    run = geomrobust.load_run('runs/isometric_mnist', 'beta_1e-1')
    logits = run.logits(x)   # x: float32 [B, 28, 28, 1] in [0, 1]
"""

__version__ = '0.1.0'


def load_run(workdir, member=None):
  """A trained run (config, params, ``logits(x[, rng])``); see ``experiment.Run``."""
  from geomrobust.experiment import load_run as _load_run
  return _load_run(workdir, member)
