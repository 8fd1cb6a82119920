"""A trained run's robust accuracy under the reference AutoAttack, in PyTorch.

  python -m geomrobust.bench.reference --workdir=runs/madry_mnist --data_dir=../shared/data \
      --eps=0.3 --examples=500

Ports the run's CNN (``models/cnn.py``: conv blocks, 2x2 max-pool, dense
layers, ReLU) to PyTorch with the same weights, checks that the logits agree
on the evaluated images, and runs torchattacks' implementation of
AutoAttack's standard suite (Croce & Hein 2020) as AutoAttack does: APGD-CE
(100 steps), APGD-T (9 targets x 100 steps), FAB-T (9 targets x 100 steps)
and Square (5,000 queries), each on the examples still robust, on the first
``--examples`` test images. Prints one line per attack (robust accuracy after
it, examples broken, seconds) and writes them with ``--out``. Compare with
the same run's shared evaluation: ``launch.py --evaluate=WORKDIR``
(``eval.num_examples`` equal to ``--examples``).

Needs torch and torchattacks (README, "Benchmarks":
``pip install -e '.[compare]' && pip install --no-deps torchattacks==3.5.1``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def torch_cnn(model_config, params):
  """The run's ``SmallCNN`` as a ``torch.nn.Module`` (eval mode) with its weights.

  Flax kernels are ``[kh, kw, in, out]`` (conv) and ``[in, out]`` (dense), and
  flax flattens NHWC feature maps; torch wants ``[out, in, kh, kw]``,
  ``[out, in]`` and flattens NCHW, so the first dense kernel's rows are
  permuted from (h, w, c) to (c, h, w) order.
  """
  import torch
  nn = torch.nn
  if model_config.name != 'cnn' or model_config.activation != 'relu':
    raise SystemExit(f'the reference port covers the ReLU CNN (model.name=cnn); this run has '
                     f'model.name={model_config.name!r}, activation={model_config.get("activation")!r}')
  p = params['model'] if 'model' in params else params
  k = int(model_config.kernel_size)
  per_block = int(model_config.convs_per_block)
  channels, dense = [int(c) for c in model_config.channels], [int(d) for d in model_config.dense]

  def tensor(a):
    return torch.from_numpy(np.array(a, np.float32))   # a writable copy

  class CNN(nn.Module):

    def __init__(self):
      super().__init__()
      self.convs = nn.ModuleList()
      for b, _ in enumerate(channels):
        for c in range(per_block):
          w = np.asarray(p[f'conv_{b}_{c}']['kernel'])       # [kh, kw, in, out]
          conv = nn.Conv2d(w.shape[2], w.shape[3], k, padding=k // 2)
          conv.weight.data = tensor(w.transpose(3, 2, 0, 1))
          conv.bias.data = tensor(p[f'conv_{b}_{c}']['bias'])
          self.convs.append(conv)
      self.dense = nn.ModuleList()
      for j, name in enumerate([f'hidden_{i}' for i in range(len(dense))] + ['out']):
        w = np.asarray(p[name]['kernel'])                    # [in, out]
        if j == 0:
          c = channels[-1]
          side = int(round((w.shape[0] / c) ** 0.5))
          w = w.reshape(side, side, c, -1).transpose(2, 0, 1, 3).reshape(w.shape[0], -1)
        layer = nn.Linear(w.shape[0], w.shape[1])
        layer.weight.data = tensor(w.T)
        layer.bias.data = tensor(p[name]['bias'])
        self.dense.append(layer)

    def forward(self, x):
      f = nn.functional
      i = 0
      for _ in channels:
        for _ in range(per_block):
          x = f.relu(self.convs[i](x))
          i += 1
        x = f.max_pool2d(x, 2)
      x = x.flatten(1)
      for layer in self.dense[:-1]:
        x = f.relu(layer(x))
      return self.dense[-1](x)

  model = CNN().eval()
  for q in model.parameters():
    q.requires_grad_(False)
  return model


def standard_attacks(model, eps: float, num_classes: int, seed: int = 0) -> list:
  """AutoAttack's standard L-inf suite, as ``(name, attack)`` pairs in its order,
  with the settings of ``torchattacks.AutoAttack(version='standard')``."""
  import torchattacks as ta
  return [
      ('apgd_ce', ta.APGD(model, norm='Linf', eps=eps, steps=100, n_restarts=1, loss='ce', seed=seed)),
      ('apgd_t', ta.APGDT(model, norm='Linf', eps=eps, steps=100, n_restarts=1, n_classes=num_classes, seed=seed)),
      ('fab_t', ta.FAB(model, norm='Linf', eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                       n_classes=num_classes, seed=seed)),
      ('square', ta.Square(model, norm='Linf', eps=eps, n_queries=5000, n_restarts=1, p_init=0.8, loss='margin',
                           resc_schedule=True, seed=seed)),
  ]


def run_cascade(model, x, y, attacks, log=print) -> list[dict]:
  """Each attack on the examples every earlier one left robust; one row per attack."""
  import torch
  with torch.no_grad():
    robust = model(x).argmax(1) == y
  rows = [dict(attack='clean', accuracy=float(robust.float().mean()), broke=0, seconds=0.0)]
  log(f'clean: {100 * rows[0]["accuracy"]:.2f}%')
  for name, attack in attacks:
    idx = torch.nonzero(robust).flatten()
    t0 = time.perf_counter()
    broke = 0
    if len(idx):
      x_adv = attack(x[idx], y[idx]).detach()
      with torch.no_grad():
        delta = (x_adv - x[idx]).abs().amax()
        still = model(x_adv).argmax(1) == y[idx]
      broke = int((~still).sum())
      robust[idx[~still]] = False
      if float(delta) > attack.eps + 1e-5:
        raise RuntimeError(f'{name} left the eps-ball: {float(delta)}')
    seconds = time.perf_counter() - t0
    rows.append(dict(attack=name, accuracy=float(robust.float().mean()), attacked=int(len(idx)), broke=broke,
                     seconds=seconds))
    log(f'{name:>8}: robust {100 * rows[-1]["accuracy"]:.2f}% after it (faced {len(idx)}, broke {broke}) '
        f'in {seconds:.1f} s')
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='a finished run folder (launch.py --workdir)')
  parser.add_argument('--member', default=None, help='the member, for a run folder holding several models')
  parser.add_argument('--data_dir', default=None, help='the dataset folder (as for launch.py)')
  parser.add_argument('--eps', type=float, default=0.3, help='L-inf radius on the [0, 1] pixel scale')
  parser.add_argument('--examples', type=int, default=500, help='the first N test images')
  parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: all cores)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=None, help='write the rows as JSON here')
  args = parser.parse_args(argv)

  from geomrobust.bench import torch_side
  absent = torch_side.missing()
  if absent:
    raise SystemExit(f'{absent} not installed; install with: {torch_side.INSTALL_HINT}')
  import torch
  from geomrobust import pipeline
  from geomrobust import runtime
  runtime.configure(0, compilation_cache=False)
  if args.threads:
    torch.set_num_threads(args.threads)
  run = pipeline.load_run(args.workdir, args.member)
  cfg = run.config
  with cfg.unlocked():
    cfg.eval.num_examples = args.examples
  data = pipeline.prepare_data(cfg, args.data_dir)
  x = np.asarray(pipeline.model_input(data.eval_images), np.float32)           # [N, H, W, C]
  y = np.asarray(data.eval_labels, np.int64)
  model = torch_cnn(cfg.model, run.params)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  yt = torch.from_numpy(y)
  ours = np.asarray(run.logits(x))
  with torch.no_grad():
    theirs = model(xt).numpy()
  gap = float(np.abs(ours - theirs).max())
  print(f'{args.workdir}{"/" + args.member if args.member else ""}: {len(y)} images, eps {args.eps:g}; logits '
        f'JAX vs PyTorch: max |difference| {gap:.2g} (scale {float(np.abs(ours).max()):.3g})')
  if gap > 1e-3 * max(1.0, float(np.abs(ours).max())):
    raise SystemExit('the port does not reproduce the logits; refusing to compare')
  import torchattacks
  print(f'torchattacks {torchattacks.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads')
  t0 = time.perf_counter()
  rows = run_cascade(model, xt, yt, standard_attacks(model, args.eps, data.num_classes, args.seed))
  total = time.perf_counter() - t0
  print(f'AutoAttack (standard) robust accuracy at eps {args.eps:g}: {100 * rows[-1]["accuracy"]:.2f}% '
        f'({total:.0f} s)')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(dict(workdir=str(args.workdir), member=args.member, eps=args.eps, examples=len(y), logit_gap=gap,
                     rows=rows, seconds=total), f, indent=1)


if __name__ == '__main__':
  main()
