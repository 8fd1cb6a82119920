"""The PyTorch side of the benchmark's side-by-side section (optional).

The same workloads as the JAX side, written the way a robustness researcher
would in PyTorch: the MNIST CNN of ``standard_mnist`` (conv16-conv32 5x5 with
'same' padding, ReLU, 2x2 max-pool, fc256, fc10), attacked by torchattacks'
``PGD`` and ``APGD`` (CE loss, L-inf, one restart), and the wide MLP
784-1000-1000-10 trained with CE and Adam. Needs ``torch`` and
``torchattacks``: ``pip install -e '.[compare]'`` then ``pip install
--no-deps torchattacks`` (its package metadata asks for torchvision and an
old ``requests``, neither of which it imports).
"""

from __future__ import annotations

import importlib.util

import numpy as np

INSTALL_HINT = ("pip install -e '.[compare]' && pip install --no-deps torchattacks==3.5.1")


def missing() -> str | None:
  """What is missing for the comparison ('' when both are importable)."""
  absent = [m for m in ('torch', 'torchattacks') if importlib.util.find_spec(m) is None]
  return ', '.join(absent)


def set_threads(n: int) -> None:
  import torch
  torch.set_num_threads(n)


def _cnn():
  import torch
  nn = torch.nn

  class CNN(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv0 = nn.Conv2d(1, 16, 5, padding=2)
      self.conv1 = nn.Conv2d(16, 32, 5, padding=2)
      self.hidden = nn.Linear(7 * 7 * 32, 256)
      self.out = nn.Linear(256, 10)

    def forward(self, x):
      f = nn.functional
      x = f.max_pool2d(f.relu(self.conv0(x)), 2)
      x = f.max_pool2d(f.relu(self.conv1(x)), 2)
      return self.out(f.relu(self.hidden(x.flatten(1))))

  torch.manual_seed(0)
  return CNN().eval()


def attack_workloads(n: int, batch: int, steps: int, eps: float = 0.3) -> dict:
  """``{'pgd': fn, 'apgd_ce': fn}``: each attacks ``n`` random images in batches of
  ``batch`` (labels: the model's own predictions, so every example is attacked;
  torchattacks' APGD skips examples it already misclassifies)."""
  import torch
  import torchattacks
  model = _cnn()
  x = torch.from_numpy(np.random.default_rng(0).uniform(size=(n, 1, 28, 28)).astype(np.float32))
  with torch.no_grad():
    y = model(x).argmax(1)
  attacks = {
      'pgd': torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True),
      'apgd_ce': torchattacks.APGD(model, norm='Linf', eps=eps, steps=steps, n_restarts=1, loss='ce'),
  }

  def runner(attack):
    def run():
      for i in range(0, n, batch):
        attack(x[i:i + batch], y[i:i + batch])
    return run

  return {name: runner(a) for name, a in attacks.items()}


def mlp_train_workload(n_train: int, batch: int, sizes=(784, 1000, 1000, 10)):
  """One epoch (``n_train // batch`` Adam steps) of the wide MLP on random data."""
  import torch
  nn = torch.nn
  torch.manual_seed(0)
  layers = []
  for k, n in zip(sizes[:-1], sizes[1:]):
    layers += [nn.Linear(k, n), nn.ReLU()]
  model = nn.Sequential(*layers[:-1])
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.integers(0, 256, size=(n_train, sizes[0]), dtype=np.uint8))
  y = torch.from_numpy(rng.integers(0, sizes[-1], size=n_train).astype(np.int64))
  steps = n_train // batch
  loss_fn = nn.CrossEntropyLoss()

  def run():
    perm = torch.randperm(n_train)
    for s in range(steps):
      idx = perm[s * batch:(s + 1) * batch]
      opt.zero_grad(set_to_none=True)
      loss_fn(model(x[idx].float() / 255.0), y[idx]).backward()
      opt.step()

  return run
