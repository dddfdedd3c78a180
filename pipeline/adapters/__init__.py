"""Adapter methods behind one registry (see :mod:`pipeline.adapters.registry`).

Every module of this package is imported here, so that its ``@register_adapter`` classes
register: a new method is a new module (plus its ``conf/adapter/<name>.yaml``), listed nowhere.
Not imported: ``registry`` itself and tuner implementations named ``peft_*``, which import peft
and are imported by their method when needed (``apply``, ``register_tuner``).
"""

import importlib
import pkgutil

from pipeline.adapters.registry import (ADAPTERS, AdapterSettings, load_adapter, register_adapter,
                                        register_tuners)


def _discover() -> None:
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module.name != "registry" and not module.name.startswith(("peft_", "_")):
            importlib.import_module(f"{__name__}.{module.name}")


_discover()

__all__ = ["ADAPTERS", "AdapterSettings", "load_adapter", "register_adapter", "register_tuners"]
