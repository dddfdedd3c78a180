"""What ``trainer.precision=auto`` and QLoRA's ``compute_dtype=auto`` pick on this machine.

bf16 autocast pays off only where the hardware multiplies bf16 natively: CUDA GPUs that
support it (Ampere and later), and x86 CPUs with AVX512-bf16 or AMX. Elsewhere bf16 is emulated:
measured on the default model, LoRA training under bf16 autocast ran 1.47x faster than fp32 on
an AVX512-bf16 EPYC, but about 30x slower on an AVX2-only CPU. So ``auto`` picks bf16 where it
is native and fp32 everywhere else (fp16 needs loss scaling and is never picked for you).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

from pipeline.config.choices import LossPrecision, Precision

log = logging.getLogger(__name__)

PRECISIONS = Precision.values()  # trainer.precision
LOSS_PRECISIONS = LossPrecision.values()  # evaluation.loss_precision


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run trains (or measures losses) in, and why."""

    requested: str  # what the config said
    precision: str  # fp32 | bf16 | fp16
    reason: str

    def as_record(self) -> dict:
        return {"requested": self.requested, "resolved": self.precision, "reason": self.reason}


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs whose instruction set multiplies bf16 (AVX512-bf16 or AMX)."""
    import torch  # lazy: start-up must not pay for torch

    cpu = torch.cpu
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def cpu_kind() -> str:
    """The CPU in words, for benchmark figures: its model name and whether bf16 is native."""
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = "native bf16 (AVX512-bf16/AMX)" if cpu_has_native_bf16() else "no native bf16"
    return f"{name}, {bf16}"


def cuda_has_native_bf16() -> Optional[bool]:
    """None without a CUDA device; else whether it multiplies bf16 natively (Ampere and later)."""
    import torch  # lazy: start-up must not pay for torch

    if not torch.cuda.is_available():
        return None
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def native_bf16() -> tuple:
    """(whether this machine's training device has native bf16, the device in words)."""
    cuda = cuda_has_native_bf16()
    if cuda is not None:
        import torch  # lazy: start-up must not pay for torch

        return cuda, f"CUDA device {torch.cuda.get_device_name()}"
    return cpu_has_native_bf16(), "CPU"


def resolve(requested: str) -> PrecisionChoice:
    """The precision to train in for ``trainer.precision=requested``.

    Args:
        requested: ``auto``, ``fp32``, ``bf16`` or ``fp16``.

    Returns:
        The choice, with the reason in words (logged and recorded in ``run.json``).
    """
    if requested != "auto":
        return PrecisionChoice(requested, requested, f"trainer.precision={requested} was set")
    native, device = native_bf16()
    if native:
        why = "AVX512-bf16/AMX" if device == "CPU" else "bf16 support"
        return PrecisionChoice("auto", "bf16", f"{device} has native {why}: bf16 autocast")
    if device == "CPU":
        return PrecisionChoice("auto", "fp32", "CPU lacks AVX512-bf16 and AMX, where bf16 is emulated and "
                                      "many times slower: fp32")
    return PrecisionChoice("auto", "fp32", f"{device} lacks native bf16: fp32 (trainer.precision=fp16 for "
                                  "mixed precision with loss scaling)")


def resolve_loss(requested: str) -> PrecisionChoice:
    """``evaluation.loss_precision``: how evaluation losses are computed (generation always runs
    in the model's own dtype, see ``pipeline.scoring.measurement.Evaluator.measure``).

    ``auto`` picks bf16 autocast where the hardware multiplies bf16 natively, whatever the run
    trains in, so that runs on one machine are measured alike. A loss is a mean over every
    completion token; bf16 moved it by 0.03% to 1.1% relative (base and tuned models, the
    embedded default and an 8,000-row classification file: ``benchmarks/eval_loss.py``,
    ``benchmarks/README.md``), at a third of fp32's time on an AVX512-bf16 CPU. The report
    warns when the runs it compares were measured in different precisions.
    """
    if requested not in LOSS_PRECISIONS:
        raise ValueError(f"evaluation.loss_precision={requested!r}: use one of {', '.join(LOSS_PRECISIONS)}")
    if requested != "auto":
        return PrecisionChoice(requested, requested, f"evaluation.loss_precision={requested} was set")
    native, device = native_bf16()
    if native:
        return PrecisionChoice("auto", "bf16", f"{device} multiplies bf16 natively: bf16 autocast")
    return PrecisionChoice("auto", "fp32", f"{device} lacks native bf16: fp32")


def compute_dtype(requested: str) -> str:
    """QLoRA's 4-bit matmul dtype: ``auto`` follows the same rule as ``trainer.precision=auto``."""
    if requested != "auto":
        return str(requested)  # a plain string, also when given a choice
    return "bfloat16" if native_bf16()[0] else "float32"


def announce(requested: str) -> PrecisionChoice:
    """:func:`resolve` for ``trainer.precision=requested``, logged once at the start of a run."""
    choice = resolve(requested)
    log.info("precision: %s (%s)", choice.precision, choice.reason)
    return choice


# --------------------------------------------------------------------------- a frozen base in the compute dtype


def _matmul_modules() -> tuple:
    """The module types whose weights autocast casts to the compute dtype in every call."""
    import torch  # lazy: start-up must not pay for torch
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, Conv1D


class FrozenBase:
    """The frozen weights of a model's matmul layers held in the compute dtype while it trains.

    Under bf16 autocast every forward casts each fp32 weight of a linear layer to bf16 (and keeps
    the copy for the backward); a weight that never changes can be cast once instead, as QLoRA and
    torchtune hold their bases. Only frozen weights of linear layers are cast (trainable weights,
    ``modules_to_save`` copies, norms, and so the optimizer states, stay fp32), and autocast would
    have rounded exactly those to bf16 anyway: each matmul computes what it computed before. An
    input embedding that shares its weight with the output layer (tied) then yields bf16 vectors,
    which a hook turns back to the embedding's former dtype, so the residual stream stays fp32;
    only those input vectors are rounded, by bf16's 2^-9.

    Outside autocast (generation during training), hooks run each such layer in its weights' dtype
    and hand back the caller's dtype. :meth:`restore` puts the original weights back, read from
    ``scratch`` (a file written at :meth:`cast`, so that the originals do not stay in memory): measuring, saving and serving see the base as loaded.
    """

    def __init__(self, model: Any, dtype: Any, scratch: Any):
        self.model, self.dtype, self.scratch = model, dtype, scratch
        self.hooks: list = []
        self.names: list = []  # the cast weights, to restore

    def matmul_parameters(self) -> Iterator[Tuple[str, Any]]:
        """``(name, parameter)`` of every weight and bias of the matmul layers (a tied one once)."""
        seen = set()
        for prefix, module in self.model.named_modules():
            if isinstance(module, _matmul_modules()):
                for name, param in module.named_parameters(recurse=False):
                    if id(param) not in seen:
                        seen.add(id(param))
                        yield f"{prefix}.{name}", param

    def frozen_weights(self) -> Dict[str, Any]:
        """``{name: parameter}`` of the frozen floating weights and biases of matmul layers that
        are not already in the compute dtype."""
        return {name: p for name, p in self.matmul_parameters()
                if not p.requires_grad and p.is_floating_point() and p.dtype != self.dtype}

    def cast(self) -> int:
        """Casts the frozen weights, keeping the originals in ``scratch``; returns how many values."""
        import torch  # lazy: start-up must not pay for torch

        weights = self.frozen_weights()
        if not weights:
            return 0
        self.scratch.parent.mkdir(parents=True, exist_ok=True)
        torch.save({name: p.detach() for name, p in weights.items()}, self.scratch)
        self.names = list(weights)
        embedding = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        tied = embedding is not None and any(embedding.weight is p for p in weights.values())
        former = next(iter(weights.values())).dtype
        for param in weights.values():
            param.data = param.data.to(self.dtype)
        if tied:
            self.hooks.append(embedding.register_forward_hook(
                lambda module, args, output: output.to(former)))
        device_type = next(iter(weights.values())).device.type
        for module in self.model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, _matmul_modules()) and weight is not None and weight.dtype == self.dtype:
                self.hooks.append(module.register_forward_pre_hook(self._input_hook(device_type)))
                self.hooks.append(module.register_forward_hook(self._output_hook))
        return sum(p.numel() for p in weights.values())

    def _input_hook(self, device_type: str) -> Any:
        import torch  # lazy: start-up must not pay for torch

        def hook(module: Any, args: Any) -> Any:
            if torch.is_autocast_enabled(device_type) or args[0].dtype == self.dtype:
                return None
            module._caller_dtype = args[0].dtype
            return (args[0].to(self.dtype), *args[1:])

        return hook

    @staticmethod
    def _output_hook(module: Any, args: Any, output: Any) -> Any:
        caller = module.__dict__.pop("_caller_dtype", None)  # set by the input hook, outside autocast
        return output.to(caller) if caller is not None else None

    def restore(self) -> None:
        """The original weights back (from ``scratch``, then deleted), the hooks removed."""
        import torch  # lazy: start-up must not pay for torch

        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        if not self.names:
            return
        # Read into memory once (a mapped file's pages would count twice with the copies made of them);
        # each bf16 weight is freed as its original takes its place.
        originals = torch.load(self.scratch, weights_only=True)
        weights = dict(self.matmul_parameters())
        for name in self.names:
            weights[name].data = originals.pop(name).to(weights[name].device)
        self.names = []
        self.scratch.unlink(missing_ok=True)
