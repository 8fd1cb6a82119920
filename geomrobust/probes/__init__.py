"""Probes: named measurements beyond accuracy, chosen in the config.

Like big_vision's evaluators: ``config.probes`` maps a probe name (a module
``geomrobust/probes/<name>.py`` defining ``PROBE``, a :class:`Probe`
subclass) to its options, e.g.::

  c.probes = ml_collections.ConfigDict({'isometry': {'scale_key': 'method.k'}})

Every member of an experiment goes through the same probes after the shared
evaluation; adding a probe touches no other file.
"""

import importlib
import pkgutil

import ml_collections

from geomrobust.probes.base import Probe, ProbeInput, option_from_config

_NOT_PROBES = {'base'}


def available_probes() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__)
                if m.name not in _NOT_PROBES and not m.name.startswith('_'))


def get_probe_class(name: str) -> type[Probe]:
  if name not in available_probes():
    raise ValueError(f'unknown probe {name!r} in config.probes; available: {", ".join(available_probes())}')
  return importlib.import_module(f'geomrobust.probes.{name}').PROBE


def build_probes(probes_config: ml_collections.ConfigDict | dict | None) -> list[Probe]:
  """One probe object per entry of ``config.probes`` (its compiled functions
  live on it: build once per experiment, run on every member)."""
  out = []
  for name, options in (probes_config or {}).items():
    opts = ml_collections.ConfigDict(dict(options or {}))
    out.append(get_probe_class(name)(name, opts))
  return out


__all__ = ['Probe', 'ProbeInput', 'available_probes', 'build_probes', 'get_probe_class', 'option_from_config']
