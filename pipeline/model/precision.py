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
from typing import Optional

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
