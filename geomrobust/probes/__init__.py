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


def member_outputs(member_results: dict[str, dict]) -> dict[str, dict[str, dict]]:
  """``{probe name: {member: its output}}`` for every known probe some
  member's results carry (``geometry`` and ``probes`` sections), in first-seen order."""
  out = {}
  for section in ('geometry', 'probes'):
    names = list(dict.fromkeys(n for res in member_results.values() for n in res.get(section) or {}))
    for name in (n for n in names if n in available_probes()):
      out[name] = {member: res[section][name] for member, res in member_results.items()
                   if name in (res.get(section) or {})}
  return out


def family_results(member_results: dict[str, dict]) -> dict:
  """The tables the probes build across a family's members
  (``Probe.family_results``), for its top ``results.json``."""
  top = {}
  for name, outs in member_outputs(member_results).items():
    top.update(get_probe_class(name).family_results(outs))
  return top


__all__ = ['Probe', 'ProbeInput', 'available_probes', 'build_probes', 'family_results', 'get_probe_class',
           'member_outputs', 'option_from_config']
