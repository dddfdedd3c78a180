"""A saved adapter merged into its base: one plain transformers model (``pipeline.export
export.merge=true``). A QLoRA adapter merges into a float copy of the dequantised 4-bit weights
it was trained against, only when asked (``dequantize``): merging into 4-bit weights would
re-quantise base + adapter and lose most of what the adapter learnt."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pipeline.adapters.saved import load_adapter
from pipeline.config.errors import PipelineError
from pipeline.config.schema import ModelConfig, QuantizationSettings
from pipeline.model import loading
from pipeline.model.quantization import dequantized_state_dict
from pipeline.runs.progress import interactive

QUANTIZED_MERGE = ("the run's adapter was trained on a 4-bit base (adapter=qlora); merging into 4-bit "
                   "weights would re-quantise base + adapter and lose most of what the adapter learnt. "
                   "Set export.dequantize=true to merge into a float copy of the dequantised 4-bit "
                   "weights (the weights the adapter was trained against), or export.merge=false to "
                   "keep the adapter separate")


class MergeError(PipelineError, ValueError):
    """The adapter cannot be merged as asked; the message says why and what to do instead."""


def merged_model(folder: str, model_cfg: ModelConfig, adapter: Path,
                 quantization: Optional[QuantizationSettings], dequantize: bool) -> Any:
    """The base in ``folder`` with the adapter in ``adapter`` merged in, as a plain model.

    Args:
        folder: the base model's folder (``pipeline.model.loading.resolve_folder``).
        model_cfg: the base model's settings.
        adapter: the adapter folder.
        quantization: the 4-bit settings the adapter was trained on (QLoRA), or None.
        dequantize: merge a QLoRA adapter into the dequantised 4-bit weights.

    Raises:
        MergeError: for a 4-bit base without ``dequantize``, or an adapter that cannot merge.
    """
    if quantization and not dequantize:
        raise MergeError(f"export.merge=true: {QUANTIZED_MERGE}")
    base = loading.load_model(folder, model_cfg)
    if quantization:
        # load_model guards every 4-bit load, which keeps the layout dequantize_4bit reads.
        quantized = loading.load_model(folder, model_cfg, quantization)
        dense = dequantized_state_dict(quantized)
        missing = set(dense) - set(base.state_dict())
        if missing:
            raise MergeError(f"dequantised weights {sorted(missing)[:3]} have no place in the float base")
        base.load_state_dict(dense, strict=False)
        del quantized
    tuned = load_adapter(base, adapter)
    try:
        return tuned.merge_and_unload(progressbar=interactive())  # a bar over the layers on a terminal
    except ValueError as err:  # the bottleneck tuner refuses with the reason
        raise MergeError(f"export.merge=true: {err}; or export.merge=false") from err
