"""The CPU speed work: conv and pooling lowerings equal to the plain ops, the
host split into devices, the persistent compilation cache, the benchmark's
side-by-side section and the sweep's automatic chunk."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomrobust import bench
from geomrobust import parallel
from geomrobust.bench import torch_side
from geomrobust.models import conv, pool
from geomrobust.training import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _lax_conv(x, k, padding):
  return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=_DIMS)


@pytest.mark.parametrize('shape,kernel,padding', [
    ((3, 12, 12, 1), 5, ((2, 2), (2, 2))),   # an MNIST first layer
    ((2, 9, 9, 3), 3, ((1, 1), (1, 1))),     # a CIFAR first layer
    ((2, 8, 7, 2), 4, ((1, 2), (2, 1))),     # uneven 'SAME'
    ((2, 7, 7, 3), 3, ((0, 0), (0, 0))),     # 'VALID'
])
def test_patches_conv_equals_the_plain_conv(shape, kernel, padding):
  """Values and both gradients, outside and inside a loop and under vmap, to float rounding."""
  x = jax.random.normal(jax.random.key(0), shape)
  k = jax.random.normal(jax.random.key(1), (kernel, kernel, shape[-1], 5))
  w = jax.random.normal(jax.random.key(2), _lax_conv(x, k, padding).shape)

  def loss(f):
    return lambda a, b: jnp.sum(w * jnp.tanh(f(a, b, padding)))

  def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))

  ref_val, ref_grads = jax.value_and_grad(loss(_lax_conv), (0, 1))(x, k)
  for f in (conv.conv_patches, conv.conv2d):
    val, grads = jax.jit(jax.value_and_grad(loss(f), (0, 1)))(x, k)
    close(val, ref_val)
    close(grads[0], ref_grads[0])
    close(grads[1], ref_grads[1])
  # In a fori_loop (where XLA:CPU's conv gradients were slow), three gradient steps on x.
  def steps(f):
    g = jax.grad(loss(f))
    return jax.jit(lambda a: jax.lax.fori_loop(0, 3, lambda i, v: v - 0.1 * g(v, k), a))(x)
  close(steps(conv.conv_patches), steps(_lax_conv))
  # Under vmap over examples (how the evaluation runs an attack), each example alone.
  per = lambda f: jax.vmap(lambda xi: jax.grad(loss(f))(xi[None], k)[0])
  close(jax.jit(per(conv.conv_patches))(x), jax.vmap(lambda xi: jax.grad(loss(_lax_conv))(xi[None], k)[0])(x))


def test_cpu_programs_take_the_patches_conv_for_few_input_channels():
  x, k = jnp.ones((2, 8, 8, 1)), jnp.ones((3, 3, 1, 4))
  hlo = jax.jit(lambda a: conv.conv2d(a, k, ((1, 1), (1, 1)))).lower(x).compile().as_text()
  assert 'convolution' not in hlo  # patches + dot on the CPU
  wide = jnp.ones((2, 8, 8, conv.PATCHES_MAX_CHANNELS + 1))
  kw = jnp.ones((3, 3, conv.PATCHES_MAX_CHANNELS + 1, 4))
  assert 'convolution' in jax.jit(lambda a: conv.conv2d(a, kw, ((1, 1), (1, 1)))).lower(wide).compile().as_text()


@pytest.mark.parametrize('shape,window', [((2, 8, 8, 3), (2, 2)), ((3, 7, 9, 2), (2, 2)), ((2, 9, 9, 4), (3, 3)),
                                          ((2, 8, 9, 2), (2, 3))])
def test_select_pool_is_bit_identical_to_max_pool(shape, window):
  """Values and gradients exactly, ties included (ReLU zeros and repeated values)."""
  h = jnp.round(4 * jax.nn.relu(jax.random.normal(jax.random.key(0), shape))) / 4  # many ties
  weights = jax.random.normal(jax.random.key(1), nn.max_pool(h, window, strides=window).shape)
  plain = lambda v: jnp.sum(weights * nn.max_pool(v, window, strides=window))
  ours = lambda v: jnp.sum(weights * pool.max_pool(v, window))
  np.testing.assert_array_equal(pool.max_pool(h, window), nn.max_pool(h, window, strides=window))
  np.testing.assert_array_equal(jax.jit(jax.grad(ours))(h), jax.grad(plain)(h))
  loop = lambda f: jax.jit(lambda v: jax.lax.fori_loop(0, 2, lambda i, a: a + jax.grad(f)(a), v))(h)
  np.testing.assert_array_equal(loop(ours), loop(plain))
  per = lambda f: jax.jit(jax.vmap(lambda v: jax.grad(lambda a: f(a[None]) )(v)))
  np.testing.assert_array_equal(per(lambda a: jnp.sum(pool.max_pool(a, window) ** 2))(h),
                                per(lambda a: jnp.sum(nn.max_pool(a, window, strides=window) ** 2))(h))
  # The CPU program has no scatter (what XLA:CPU makes of the plain gradient's select-and-scatter).
  assert ' scatter(' not in jax.jit(jax.grad(ours)).lower(h).compile().as_text()
  assert ' scatter(' in jax.jit(jax.grad(plain)).lower(h).compile().as_text()


def _subprocess(script: str, env: dict) -> dict:
  full = {k: v for k, v in dict(os.environ, **env).items() if v is not None}  # None: unset
  proc = subprocess.run([sys.executable, '-c', script], env=full, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


_RUNTIME = '''
import json, jax, jax.numpy as jnp
from jax._src import monitoring
from geomrobust import parallel, runtime
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
set_ = runtime.configure({devices}, compilation_cache=True)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
for n in (64, 65, 66):  # three programs
  f(jnp.ones((n, 32)))
print(json.dumps(dict(set=set_, devices=jax.device_count(), train=parallel.make_mesh(0, training=True).devices.size,
                      eval=parallel.make_mesh(0).devices.size,
                      hits=events.count('/jax/compilation_cache/cache_hits'),
                      misses=events.count('/jax/compilation_cache/cache_misses'))))
'''


def test_compilation_cache_is_used_on_the_second_run(tmp_path):
  env_min = dict(GEOMROBUST_CACHE_DIR=str(tmp_path), JAX_NUM_CPU_DEVICES=None, XLA_FLAGS=None, JAX_PLATFORMS='cpu',
                 PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=None, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=None)
  script = _RUNTIME.format(devices=2).replace('set_ = ', 'from geomrobust import runtime as r; '
                                              'r.MIN_COMPILE_SECONDS = 0.0\nset_ = ')
  first = _subprocess(script, env_min)
  second = _subprocess(script, env_min)
  assert first['misses'] >= 3 and first['hits'] == 0, first
  assert second['hits'] == first['misses'] and second['misses'] == 0, second
  assert first['set']['compilation_cache'] == str(tmp_path / 'jax')
  # The host as 2 devices: the evaluation shards over both, training stays on one.
  assert (first['devices'], first['eval'], first['train']) == (2, 2, 1)


def test_a_device_count_from_the_environment_wins(tmp_path):
  out = _subprocess(_RUNTIME.format(devices=0), dict(JAX_NUM_CPU_DEVICES='3', PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
                                                     GEOMROBUST_CACHE_DIR=str(tmp_path)))
  assert out['devices'] == 3 and 'cpu_devices' not in out['set']


def test_sweep_chunk_is_one_member_per_cpu_device():
  mesh = parallel.make_mesh(1)
  assert sweep.auto_chunk_size(50, mesh) == 1
  assert sweep.Layout.make(50, sweep.auto_chunk_size(50, mesh), 1).n_chunks == 50


def test_compare_section_without_torch_says_how_to_enable_it(monkeypatch):
  lines = []
  monkeypatch.setattr(torch_side, 'missing', lambda: 'torch, torchattacks')
  assert bench.compare(log=lines.append) is None
  assert 'skipped' in lines[0] and "pip install -e '.[compare]'" in lines[0]


@pytest.mark.skipif(bool(torch_side.missing()), reason='torch / torchattacks not installed (the [compare] extra)')
def test_compare_section_runs_both_sides_in_smoke_mode():
  lines = []
  out = bench.compare(repeats=1, n=8, batch=8, steps=2, n_train=256, log=lines.append)
  assert set(out) == {'pgd', 'apgd_ce', 'mlp'}
  assert all(ours > 0 and theirs > 0 for ours, theirs, _ in out.values())
  assert any('->' in line and 'x' in line for line in lines)
