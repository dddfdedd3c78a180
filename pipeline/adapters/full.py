"""Full fine-tuning (every weight trains) and ``none`` (a frozen base, for baselines)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from pipeline.adapters.registry import AdapterSettings, register_adapter
from pipeline.config.schema import ArchitectureInfo


@register_adapter("full")
@dataclass
class FullSettings(AdapterSettings):
    method: str = "full"
    vllm: ClassVar[bool] = True

    def apply(self, model: Any, architecture: Optional[ArchitectureInfo]) -> Any:
        model.requires_grad_(True)
        return model


@register_adapter("none")
@dataclass
class NoneSettings(AdapterSettings):
    """No training: the base model as it is, evaluated like a tuned one."""

    method: str = "none"
    trains: ClassVar[bool] = False
    vllm: ClassVar[bool] = True

    def apply(self, model: Any, architecture: Optional[ArchitectureInfo]) -> Any:
        model.requires_grad_(False)
        return model
