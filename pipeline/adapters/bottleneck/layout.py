"""Where bottleneck adapters go: the placements, the non-linearities, and the output projections
each placement adapts per transformers ``model_type``. Plain data, read by the settings (config
checks, no torch) and by the tuner alike."""

from __future__ import annotations

from typing import Dict, List

PLACEMENTS = ("houlsby", "pfeiffer")  # houlsby: after attention and MLP outputs; pfeiffer: after the MLP
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")

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
