"""A saved adapter merged into its base: one plain transformers model (``pipeline.export
export.merge=true``). A QLoRA adapter merges into a float copy of the dequantised 4-bit weights
it was trained against, only when asked (``dequantize``): merging into 4-bit weights would
re-quantise base + adapter and lose most of what the adapter learnt. Several LoRA adapters merged
into one adapter (``pipeline.merge``): :func:`combine`, with PEFT's rules checked first
(:func:`merge_problems`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from pipeline.adapters.saved import load_adapter
from pipeline.config.app_schema import MergeSettings
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


# --------------------------------------------------------------------------- several adapters into one

# What pipeline.merge names that is not one source: the merged adapter (in the PEFT model and in
# merged/<source>/...), and the aggregates over the sources (kept/<aggregate>/<set>/<metric>).
MERGED = "merged"
AGGREGATES = ("mean", "min")

# Methods that add the adapters' matrices side by side need equal ranks; cat concatenates them and
# the *_svd methods re-factorise the merged delta, so they take any ranks (PEFT's rules).
EQUAL_RANKS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def needs_density(method: str) -> bool:
    """Whether a merge method prunes (TIES, DARE, magnitude): it keeps ``density`` of the weights."""
    return method.startswith(("ties", "dare", "magnitude_prune"))


def merge_weights(settings: MergeSettings, count: int) -> List[float]:
    """The weight of each source: as given, else 1/n each (an average) for the methods that sum
    the weighted adapters, 1.0 each for the TIES family, whose sign election averages already."""
    if settings.weights is not None:
        return list(settings.weights)
    return [1.0] * count if "ties" in str(settings.method) else [1.0 / count] * count


def merge_problems(settings: MergeSettings, adapters: List[Dict[str, Any]]) -> List[str]:
    """What PEFT's ``add_weighted_adapter`` would refuse, or do wrong, for these adapters
    (``adapters``: each source's ``adapter_config.json``), before any weights load."""
    method, found = str(settings.method), []
    if settings.weights is not None and len(settings.weights) != len(adapters):
        found.append(f"merge.weights has {len(settings.weights)} values for {len(adapters)} runs; give one per run")
    if needs_density(method) and settings.density is None:
        found.append(f"merge.method={method} needs merge.density (the fraction of each adapter's weights it "
                     "keeps, e.g. 0.5)")
    if not needs_density(method) and settings.density is not None:
        found.append(f"merge.density applies to the pruning methods (ties, dare_*, magnitude_prune*), not "
                     f"merge.method={method}; drop it")
    kinds = {(a.get("peft_type"), bool(a.get("use_dora"))) for a in adapters}
    if kinds - {("LORA", False)}:
        found.append("runs: only LoRA adapters merge (lora, qlora, or a PiSSA/OLoRA init); DoRA, IA3 and "
                     "bottleneck adapters have no weighted combination in PEFT")
    ranks = [a.get("r") for a in adapters]
    varied = [i for i, a in enumerate(adapters) if a.get("rank_pattern")]
    if method in EQUAL_RANKS and varied:
        found.append(f"merge.method={method} adds the adapters' matrices layer by layer, which needs one rank in "
                     f"every layer, but the adapters of runs{varied} have per-layer ranks (adapter.init=eva "
                     f"redistributes them); use merge.method=cat or {method}_svd (or svd), which take any ranks")
    elif method in EQUAL_RANKS and len(set(ranks)) > 1:
        found.append(f"merge.method={method} needs runs with equal adapter.r, but they have {ranks}; use "
                     f"merge.method=cat or {method}_svd (or svd), which take any ranks")
    targets = [sorted(a.get("target_modules") or []) for a in adapters]
    if any(t != targets[0] for t in targets):
        found.append(f"runs: the adapters target different modules ({targets}); merge adapters trained with "
                     "the same adapter.target_modules")
    return found


def source_names(runs: List[str]) -> List[str]:
    """A short, unique name per source run, usable as a PEFT adapter name and in metric names:
    its folder's name, suffixed with its position where an earlier source, the merged adapter
    (:data:`MERGED`) or an aggregate over the sources (:data:`AGGREGATES`) has that name."""
    names: List[str] = []
    for i, run in enumerate(runs):
        name = re.sub(r"[^\w-]", "_", Path(run).resolve().name) or f"run_{i}"
        taken = {*names, MERGED, *AGGREGATES}
        unique, n = name, i
        while unique in taken:  # a suffixed name may itself be another source's folder name
            unique, n = f"{name}_{n}", n + 1
        names.append(unique)
    return names


def combine(model: Any, sources: List[str], settings: MergeSettings, name: str) -> None:
    """Adds adapter ``name`` to the PEFT ``model``: the adapters ``sources`` merged by
    ``settings`` (PEFT's ``add_weighted_adapter``; DARE's pruning seeded by ``settings.seed``)."""
    import torch  # lazy: start-up must not pay for torch

    torch.manual_seed(settings.seed)
    model.add_weighted_adapter(adapters=list(sources), weights=merge_weights(settings, len(sources)),
                               adapter_name=name, combination_type=str(settings.method),
                               density=settings.density)
