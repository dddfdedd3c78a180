"""Adapter methods behind one registry (:mod:`pipeline.adapters.registry`): one module (or
subpackage) per method family, a saved run's adapter read back (:mod:`pipeline.adapters.saved`)
and merged into its base (:mod:`pipeline.adapters.merging`).

Every module of this package is imported here, so that its ``@register_adapter`` classes
register: a new method is a new module (plus its ``conf/adapter/<name>.yaml``), listed nowhere.
Settings modules import no torch or peft; a tuner of our own (``bottleneck/tuner.py``) is
imported by its method only when the adapter is applied or loaded.
"""

import importlib
import pkgutil


def _discover() -> None:
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_discover()
