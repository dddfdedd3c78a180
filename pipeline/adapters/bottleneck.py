"""Bottleneck adapters (Houlsby / Pfeiffer): settings and placement table (light); the PEFT
tuner itself is ``peft_bottleneck``, imported only when the adapter is applied or loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from pipeline.adapters.registry import AdapterSettings, check_targets, register_adapter
from pipeline.choices import make_choice

Placement = make_choice("Placement", "houlsby", "pfeiffer")
NonLinearity = make_choice("NonLinearity", "relu", "gelu", "silu", "tanh")
PLACEMENTS, NON_LINEARITIES = Placement.values(), NonLinearity.values()  # for the PEFT tuner

# Output projections of attention and MLP blocks, per transformers `model_type`. Houlsby adapts
# both, Pfeiffer only the MLP. Names are suffixes matched by PEFT against full module paths.
BOTTLENECK_TARGETS: Dict[str, Dict[str, List[str]]] = {
    "llama": {"houlsby": ["o_proj", "down_proj"], "pfeiffer": ["down_proj"]},
    "mistral": {"houlsby": ["o_proj", "down_proj"], "pfeiffer": ["down_proj"]},
    "qwen2": {"houlsby": ["o_proj", "down_proj"], "pfeiffer": ["down_proj"]},
    "gemma": {"houlsby": ["o_proj", "down_proj"], "pfeiffer": ["down_proj"]},
    "phi3": {"houlsby": ["o_proj", "down_proj"], "pfeiffer": ["down_proj"]},
    "gpt2": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"]},
}


@register_adapter("bottleneck")
@dataclass
class BottleneckSettings(AdapterSettings):
    """A down-projection, a non-linearity and an up-projection added after a sublayer.

    ``placement=houlsby`` adds one after the attention output and one after the MLP output of
    every layer; ``pfeiffer`` only after the MLP. Trainable parameters: L x (2 d r + r + d) per
    position.
    """

    method: str = "bottleneck"
    r: int = 64  # bottleneck dimension
    placement: Placement = Placement.houlsby
    non_linearity: NonLinearity = NonLinearity.relu
    dropout: float = 0.0
    scaling: float = 1.0
    target_modules: Optional[List[str]] = None  # null: derived from placement and model_type

    def check(self, architecture: Any) -> List[str]:
        problems = []
        if self.r <= 0:
            problems.append(f"adapter.r={self.r} must be > 0 (the bottleneck dimension)")
        if not 0 <= self.dropout < 1:
            problems.append(f"adapter.dropout={self.dropout} must be in [0, 1)")
        problems += check_targets("adapter.target_modules", self.target_modules, architecture)
        if (self.target_modules is None and architecture is not None
                and architecture.model_type not in BOTTLENECK_TARGETS):
            problems.append(f"adapter.target_modules: no bottleneck placement known for model_type="
                            f"{architecture.model_type}; set the attention and MLP output "
                            f"projections, e.g. adapter.target_modules=[o_proj,down_proj]")
        return problems

    @classmethod
    def register_tuner(cls) -> None:
        import pipeline.adapters.peft_bottleneck  # noqa: F401  (registers the BOTTLENECK peft type)

    def apply(self, model: Any, architecture: Any) -> Any:
        from peft import get_peft_model

        from pipeline.adapters.peft_bottleneck import BottleneckConfig

        config = BottleneckConfig(
            r=self.r, placement=self.placement, non_linearity=self.non_linearity,
            dropout=self.dropout, scaling=self.scaling,
            target_modules=list(self.target_modules) if self.target_modules else None,
            task_type="CAUSAL_LM")
        return get_peft_model(model, config)
