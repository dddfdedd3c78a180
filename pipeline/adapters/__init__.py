"""Adapter methods behind one registry (see :mod:`pipeline.adapters.registry`)."""

from pipeline.adapters import bottleneck, full, ia3, lora  # noqa: F401  (registration)
from pipeline.adapters.registry import ADAPTERS, AdapterSettings, register_adapter

__all__ = ["ADAPTERS", "AdapterSettings", "register_adapter"]
