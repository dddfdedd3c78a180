"""Model-state memory per device before launch (``python -m pipeline.estimate``, the start-up
log of every run, and sweeps that reject what will not fit: ``sweep.max_memory_gb``).

Per device, the memory for weights, gradients and optimizer states: the model states that ZeRO
shards. Activations depend on batch and sequence length and are not included. The model is
built on the meta device from its config: no weights are read or downloaded.

Bytes per parameter (Adam), following DeepSpeed's own estimator for mixed precision:

* weights: 2 (16-bit) per parameter, 0.5 for a 4-bit quantized frozen weight (QLoRA), 4 in fp32;
  without DeepSpeed, a frozen matmul weight under bf16 autocast is held in bf16 while training
  (``trainer.base_in_compute_dtype``, :class:`pipeline.model.precision.FrozenBase`): 2;
* gradients: 16-bit plus fp32 (6) per trainable parameter, 4 at ZeRO-3; 4 in fp32;
* optimizer: fp32 master weights and two Adam moments (12) per trainable parameter; 8 in fp32.

ZeRO-1 shards the optimizer states over every process, ZeRO-2 also the gradients, ZeRO-3 also
the weights (and gathers one layer at a time: DeepSpeed counts 4 bytes per parameter of the
largest layer). Offloading moves optimizer states and gradients (and at ZeRO-3 the weights) to
CPU memory. Without DeepSpeed (single, ddp) every process holds everything in ``model.dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pipeline.config.schema import DistributedConfig, TrainConfig
from pipeline.model import loading
from pipeline.model.precision import resolve as resolve_precision
from pipeline.trainer.distributed import world_size

GB = 2**30


@dataclass
class ParameterCounts:
    """What the estimate needs to know about a model with its adapter attached."""

    total: int
    trainable: int
    quantized: int  # frozen weights stored in 4 (or 8) bits
    largest_layer: int  # parameters of the largest module (ZeRO-3 gathers one at a time)
    frozen_matmul: int = 0  # frozen weights and biases of linear layers (not quantized)


@dataclass
class MemoryEstimate:
    """Bytes per device for each kind of model state."""

    weights: float
    gradients: float
    optimizer: float
    gathered_layer: float
    processes: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered_layer

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer states", self.optimizer),
                ("gathered layer (ZeRO-3)", self.gathered_layer), ("total per device", self.total)]
        return "\n".join(f"  {name:<24} {value / GB:9.3f} GiB" for name, value in rows)


def estimate(counts: ParameterCounts, *, stage: int, processes: int, mixed_precision: bool,
             deepspeed: bool, offload_optimizer: bool = False, offload_params: bool = False,
             quantized_bits: int = 4, weight_bytes: int = 4,
             frozen_matmul_bytes: Optional[int] = None) -> MemoryEstimate:
    """Model-state memory per device.

    Args:
        counts: parameter counts of the model with its adapter.
        stage: ZeRO stage (0 without DeepSpeed).
        processes: processes over which ZeRO shards (nodes x processes per node).
        mixed_precision: bf16/fp16 training (DeepSpeed then keeps 16-bit weights).
        deepspeed: whether DeepSpeed runs the model (else the weights stay in ``weight_bytes``).
        offload_optimizer: optimizer states and gradients in CPU memory.
        offload_params: (ZeRO-3) weights in CPU memory.
        quantized_bits: bits of a quantized frozen weight.
        weight_bytes: bytes per weight without DeepSpeed (``model.dtype``).
        frozen_matmul_bytes: bytes per frozen matmul weight without DeepSpeed, where they are
            held in the compute dtype while training (``trainer.base_in_compute_dtype``); None:
            ``weight_bytes``.
    """
    frozen_plain = counts.total - counts.quantized
    if deepspeed and mixed_precision:
        per_weight, per_grad, per_state = 2, (4 if stage == 3 else 6), 12
    elif deepspeed:
        per_weight, per_grad, per_state = 4, 4, 8
    else:  # the Trainer's AdamW keeps its two moments in the parameters' dtype
        per_weight, per_grad, per_state = weight_bytes, weight_bytes, 2 * weight_bytes
    weights = frozen_plain * per_weight + counts.quantized * quantized_bits / 8
    if not deepspeed and frozen_matmul_bytes is not None:
        weights -= counts.frozen_matmul * (per_weight - min(frozen_matmul_bytes, per_weight))
    gradients = counts.trainable * per_grad
    optimizer = counts.trainable * per_state
    if stage >= 1:
        optimizer /= processes
    if stage >= 2:
        gradients /= processes
    gathered = 0.0
    if stage == 3:
        weights /= processes
        gathered = 4 * counts.largest_layer
    if offload_optimizer:
        gradients = optimizer = 0.0
    if offload_params and stage == 3:
        weights = 0.0
    return MemoryEstimate(weights, gradients, optimizer, gathered, processes)


def count_parameters(model: Any) -> ParameterCounts:
    """Counts of a (meta or real) model; a 4-bit weight counts as its unpacked size."""
    from torch import nn  # lazy: start-up must not pay for torch
    from transformers.pytorch_utils import Conv1D

    total = trainable = quantized = largest = frozen_matmul = 0
    seen = set()  # tied weights (input and output embeddings) are one parameter
    # a tied output layer's weight is a matmul weight, although the embedding lists it first
    matmul = {id(p) for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))
              for p in m.parameters(recurse=False)}
    for module in model.modules():
        own = 0
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            n = getattr(param, "ds_numel", param.numel())  # a ZeRO-3 shard reports its full size
            if param.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
                n *= 2 * param.element_size()
                quantized += n
            total += n
            own += n
            trainable += n if param.requires_grad else 0
            if id(param) in matmul and not param.requires_grad and param.__class__.__name__ != "Params4bit" \
                    and param.is_floating_point():
                frozen_matmul += n
        largest = max(largest, own)
    return ParameterCounts(total, trainable, quantized, largest, frozen_matmul)


def count_for_config(cfg: TrainConfig) -> ParameterCounts:
    """Counts for a run's config, from the model's config on the meta device."""
    import torch  # lazy: start-up must not pay for torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = loading.config_folder(cfg.model, cfg.paths.cache_dir, cfg.data.seed)
    architecture = loading.describe(folder, cfg.model)
    config = AutoConfig.from_pretrained(folder, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    settings = cfg.adapter
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
        model = settings.apply_for_counting(model, architecture)
    counts = count_parameters(model)
    if settings.quantized:
        counts.quantized = _quantizable_weights(model)
    return counts


def _quantizable_weights(model: Any) -> int:
    """Frozen ``nn.Linear`` weights that bitsandbytes quantizes (all but the output head)."""
    from torch import nn  # lazy: start-up must not pay for torch

    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) and m is not head and not m.weight.requires_grad)


def for_config(cfg: TrainConfig, counts: ParameterCounts) -> MemoryEstimate:
    """The estimate for the ``distributed``, ``trainer`` and ``adapter`` settings of ``cfg``."""
    dist = cfg.distributed
    settings = cfg.adapter
    quantization = settings.quantization()
    weight_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.model.dtype, 4)
    mixed = resolve_precision(cfg.trainer.precision).precision
    # as pipeline.trainer.build._frozen_dtype decides: bf16 autocast, no DeepSpeed, no k-bit base
    frozen_in_bf16 = cfg.trainer.base_in_compute_dtype and mixed == "bf16" and settings.trains \
        and not settings.quantized
    return estimate(counts, stage=dist.zero_stage if dist.strategy == "deepspeed" else 0,
                    processes=_processes(dist),
                    mixed_precision=mixed in ("bf16", "fp16"),
                    deepspeed=dist.strategy == "deepspeed", offload_optimizer=dist.offload_optimizer,
                    offload_params=dist.offload_params, quantized_bits=quantization.bits if quantization else 4,
                    weight_bytes=weight_bytes, frozen_matmul_bytes=2 if frozen_in_bf16 else None)


def _processes(dist: DistributedConfig) -> int:
    """The processes ZeRO shards over: the launcher's world size inside a run, else the config's."""
    return world_size() if world_size() > 1 else dist.nproc_per_node * dist.nnodes


def describe(cfg: TrainConfig, counts: ParameterCounts) -> str:
    """A few lines for the start-up log and the CLI."""
    dist = cfg.distributed
    how = f"ZeRO-{dist.zero_stage}" if dist.strategy == "deepspeed" else dist.strategy
    if dist.offload_optimizer:
        how += " + optimizer offload" + (" + parameter offload" if dist.offload_params else "")
    head = (f"model-state memory per device (adapter={cfg.adapter.method}, {how}, "
            f"{_processes(dist)} process(es), trainer.precision="
            f"{resolve_precision(cfg.trainer.precision).precision}; {counts.trainable:,} trainable / "
            f"{counts.total:,} parameters; "
            "activations not included):")
    return head + "\n" + for_config(cfg, counts).table()
