"""Models: Flax Linen modules returning ``(logits, per-layer representations)``.

``build_model(config.model, num_classes)`` picks one by ``config.model.name``;
``model_bounds(name)`` is the valid range of each numeric field of that
model's config (each module's ``BOUNDS``), checked before any data is loaded.
"""

import ml_collections

from geomrobust import config as config_lib
from geomrobust.models import audio, cnn, mlp, resnet, sparse, stochastic
from geomrobust.models.cnn import SmallCNN
from geomrobust.models.common import ACTIVATIONS, INITS
from geomrobust.models.mlp import MLP
from geomrobust.models.resnet import ResNet, resnet18

MODELS = {
    'mlp': lambda c, n: MLP(hidden=tuple(c.get('hidden', (100,))), num_classes=n, activation=c.get('activation', 'relu'),
                            weight_init=c.get('weight_init', 'lecun'), use_bias=c.get('use_bias', True)),
    'cnn': lambda c, n: SmallCNN(channels=tuple(c.channels), convs_per_block=c.convs_per_block,
                                 kernel_size=c.kernel_size, dense=tuple(c.dense), num_classes=n,
                                 activation=c.activation, weight_init=c.weight_init),
    # Config: width (64 = the standard 64-128-256-512), preact, weight_init, blocks per stage (2).
    'resnet18': lambda c, n: resnet18(width=c.get('width', 64), num_classes=n, preact=c.get('preact', False),
                                      weight_init=c.get('weight_init', 'he'), blocks=c.get('blocks', 2)),
    # Stochastic neurons (models/stochastic.py): VOne or conv first block + noise.
    'vone_cnn': stochastic.build_cnn,
    'vone_resnet18': stochastic.build_resnet,
    # Waveform input: fixed log-mel front end + noise + CNN (models/audio.py).
    'audio_cnn': audio.build,
    # Two-class models of the feature-purification task (models/sparse.py).
    'symmetric_relu': sparse.build_symmetric,
    'poly2': sparse.build_poly2,
}

_BOUNDS: dict[str, dict[str, config_lib.Range]] = {'mlp': mlp.BOUNDS, 'cnn': cnn.BOUNDS, 'resnet18': resnet.BOUNDS,
                                                   'vone_cnn': stochastic.BOUNDS, 'vone_resnet18': stochastic.BOUNDS,
                                                   'audio_cnn': audio.BOUNDS, 'symmetric_relu': sparse.BOUNDS,
                                                   'poly2': {'init_std': sparse.BOUNDS['init_std']}}
# Model fields a stacked sweep may trace (``sweep.hparam=model.<field>``): {field: constant leaf name}.
_TRACED: dict[str, dict[str, str]] = {'vone_cnn': stochastic.TRACED, 'vone_resnet18': stochastic.TRACED,
                                      'audio_cnn': audio.TRACED}


def model_bounds(name: str) -> dict[str, config_lib.Range]:
  """``{config.model field: Range}`` of model ``name`` ({} for an unknown name)."""
  return dict(_BOUNDS.get(name, {}))


def traced_fields(name: str) -> dict[str, str]:
  """``{config.model field: constant leaf name}`` a stacked sweep of model ``name`` can trace."""
  return dict(_TRACED.get(name, {}))


def build_model(model_config: ml_collections.ConfigDict, num_classes: int):
  """Returns the Flax module described by ``model_config`` (``name`` selects it)."""
  name = model_config.name
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; available: {", ".join(sorted(MODELS))}')
  config_lib.check_fields(model_config, model_bounds(name), 'model')
  return MODELS[name](model_config, num_classes)


def register_model(name: str, factory, bounds: dict[str, config_lib.Range] | None = None) -> None:
  """Adds ``factory(model_config, num_classes) -> nn.Module`` under ``name``;
  ``bounds``: the valid range of its numeric config fields (``config.integer``, ``config.number``)."""
  MODELS[name] = factory
  _BOUNDS[name] = dict(bounds or {})
