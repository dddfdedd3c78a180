"""The bottleneck adapter's settings (``adapter=bottleneck``): light, so that configs compose
without torch or peft. The PEFT tuner (:mod:`pipeline.adapters.bottleneck.tuner`) is imported
only when an adapter is applied or loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from pipeline.adapters.bottleneck.layout import BOTTLENECK_TARGETS, NON_LINEARITIES, PLACEMENTS
from pipeline.adapters.registry import AdapterSettings, check_targets, register_adapter
from pipeline.config.choices import make_choice
from pipeline.config.ranges import bounded, unbounded
from pipeline.config.schema import ArchitectureInfo

Placement = make_choice("Placement", *PLACEMENTS)
NonLinearity = make_choice("NonLinearity", *NON_LINEARITIES)


@register_adapter("bottleneck")
@dataclass
class BottleneckSettings(AdapterSettings):
    """A down-projection, a non-linearity and an up-projection added after a sublayer.

    ``placement=houlsby`` adds one after the attention output and one after the MLP output of
    every layer; ``pfeiffer`` only after the MLP. Trainable parameters: L x (2 d r + r + d) per
    position.
    """

    method: str = "bottleneck"
    r: int = bounded(64, gt=0)  # bottleneck dimension
    placement: Placement = Placement.houlsby
    non_linearity: NonLinearity = NonLinearity.relu
    dropout: float = bounded(0.0, ge=0, lt=1)
    scaling: float = unbounded(1.0, why="a factor on the adapter's output; a negative one is a choice, not an error")
    target_modules: Optional[List[str]] = None  # null: derived from placement and model_type

    def check(self, architecture: Optional[ArchitectureInfo]) -> List[str]:
        problems = check_targets("adapter.target_modules", self.target_modules, architecture)
        if (self.target_modules is None and architecture is not None
                and architecture.model_type not in BOTTLENECK_TARGETS):
            problems.append(f"adapter.target_modules: no bottleneck placement known for model_type="
                            f"{architecture.model_type}; set the attention and MLP output "
                            f"projections, e.g. adapter.target_modules=[o_proj,down_proj]")
        return problems

    @classmethod
    def register_tuner(cls) -> None:
        # lazy: the tuner defines torch and peft classes; importing it registers the BOTTLENECK type
        from pipeline.adapters.bottleneck import tuner  # noqa: F401

    def apply(self, model: Any, architecture: Optional[ArchitectureInfo]) -> Any:
        from peft import get_peft_model  # lazy: peft loads torch and transformers

        # lazy: the tuner defines torch and peft classes (importing it registers them with PEFT)
        from pipeline.adapters.bottleneck.tuner import BottleneckConfig

        config = BottleneckConfig(
            r=self.r, placement=self.placement, non_linearity=self.non_linearity,
            dropout=self.dropout, scaling=self.scaling,
            target_modules=list(self.target_modules) if self.target_modules else None,
            task_type="CAUSAL_LM")
        return get_peft_model(model, config)
