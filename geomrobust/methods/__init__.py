"""Training objectives. A method is one module ``geomrobust/methods/<name>.py``
defining ``METHOD`` (a ``base.Method`` subclass); ``config.method.name`` picks it,
so adding a method touches no other file."""

import importlib
import pkgutil

from geomrobust.methods.base import Method, Phase, accuracy, cross_entropy

_NOT_METHODS = {'base'}


def available_methods() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__)
                if m.name not in _NOT_METHODS and not m.name.startswith('_'))


def get_method_class(name: str) -> type[Method]:
  if name not in available_methods():
    raise ValueError(f'unknown method {name!r}; available: {", ".join(available_methods())}')
  module = importlib.import_module(f'geomrobust.methods.{name}')
  return module.METHOD


def build_method(config, model, num_classes: int) -> Method:
  return get_method_class(config.method.name)(model, config, num_classes)
