"""IA3: learned rescaling vectors on attention keys/values and the feed-forward input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from pipeline.adapters.registry import AdapterSettings, check_targets, register_adapter
from pipeline.config.schema import ArchitectureInfo


@register_adapter("ia3")
@dataclass
class IA3Settings(AdapterSettings):
    method: str = "ia3"
    target_modules: Any = None  # null: PEFT's default for the architecture
    feedforward_modules: Any = None  # must be a subset of target_modules
    modules_to_save: Optional[List[str]] = None

    def check(self, architecture: Optional[ArchitectureInfo]) -> List[str]:
        problems = check_targets("adapter.target_modules", self.target_modules, architecture)
        problems += check_targets("adapter.feedforward_modules", self.feedforward_modules, architecture)
        if (self.target_modules is None) != (self.feedforward_modules is None):
            problems.append("adapter.target_modules and adapter.feedforward_modules must be set "
                            "together (feedforward_modules is a subset of target_modules)")
        elif isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                problems.append(f"adapter.feedforward_modules {extra} are not in adapter.target_modules")
        return problems

    def apply(self, model: Any, architecture: Optional[ArchitectureInfo]) -> Any:
        from peft import IA3Config, get_peft_model  # lazy: peft loads torch and transformers

        def as_list(value: Any) -> Any:
            return list(value) if isinstance(value, (list, tuple)) else value

        config = IA3Config(target_modules=as_list(self.target_modules),
                           feedforward_modules=as_list(self.feedforward_modules),
                           modules_to_save=self.modules_to_save, task_type="CAUSAL_LM")
        return get_peft_model(model, config)
