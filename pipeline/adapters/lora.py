"""LoRA and the methods that extend it through PEFT: DoRA and QLoRA (LoRA over a k-bit base)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, List, Optional

from pipeline.adapters.registry import AdapterSettings, check_targets, register_adapter
from pipeline.config.choices import make_choice
from pipeline.config.ranges import bounded
from pipeline.config.schema import ArchitectureInfo, QuantizationSettings
from pipeline.model.precision import compute_dtype

# Architectures whose projections are transformers' Conv1D, which bitsandbytes cannot quantize.
NOT_QUANTIZABLE = {"gpt2": "its projections are Conv1D layers, which bitsandbytes does not quantize"}

LoraBias = make_choice("LoraBias", "none", "all", "lora_only")
QuantType = make_choice("QuantType", "nf4", "fp4")
ComputeDtype = make_choice("ComputeDtype", "auto", "float32", "bfloat16", "float16")
# How the LoRA matrices start (PEFT's ``init_lora_weights``): default (A Kaiming-uniform, B zero),
# gaussian (A normal), pissa (A and B from the weight's principal singular vectors, the base
# keeping the residual) or olora (from a QR decomposition of the weight, likewise).
LoraInit = make_choice("LoraInit", "default", "gaussian", "pissa", "olora")
# Inits that subtract the adapter's starting value from the base weights: the saved adapter is
# converted to apply to the original base (see save_adapter).
MOVES_BASE = ("pissa", "olora")
# In the run folder while training: the adapter as initialised, for that conversion (a plain
# name: PEFT loads it as an adapter named after its folder).
INITIAL_ADAPTER = "initial_adapter"


@register_adapter("lora")
@dataclass
class LoraSettings(AdapterSettings):
    method: str = "lora"
    r: int = bounded(16, gt=0, fix="use adapter=full to train all weights")
    lora_alpha: float = bounded(32.0, gt=0, meaning="scaling = alpha / r")
    lora_dropout: float = bounded(0.05, ge=0, lt=1)
    target_modules: Any = None  # null: PEFT's default for the architecture; a list; or "all-linear"
    bias: LoraBias = LoraBias.none
    use_rslora: bool = False
    modules_to_save: Optional[List[str]] = None
    init: LoraInit = LoraInit.default
    # init=pissa: fast randomized SVD with this many subspace iterations (PEFT's pissa_niter_<n>);
    # null: the exact SVD.
    pissa_niter: Optional[int] = bounded(None, gt=0)

    use_dora: ClassVar[bool] = False
    vllm: ClassVar[bool] = True

    def check(self, architecture: Optional[ArchitectureInfo]) -> List[str]:
        problems = check_targets("adapter.target_modules", self.target_modules, architecture)
        if self.pissa_niter is not None and self.init != "pissa":
            problems.append(f"adapter.pissa_niter={self.pissa_niter} applies to adapter.init=pissa only "
                            f"(adapter.init={self.init}); drop it or set adapter.init=pissa")
        if self.target_modules is None and architecture is not None:
            # lazy: peft loads torch and transformers; configs are checked without them
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

            if architecture.model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
                problems.append(f"adapter.target_modules: no default for model_type="
                                f"{architecture.model_type}; set a list or 'all-linear'")
        return problems

    def peft_config(self) -> Any:
        from peft import LoraConfig  # lazy: peft loads torch and transformers

        targets = self.target_modules
        return LoraConfig(
            r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
            bias=self.bias, use_rslora=self.use_rslora, use_dora=self.use_dora,
            modules_to_save=self.modules_to_save, task_type="CAUSAL_LM",
            init_lora_weights=self.init_lora_weights(),
        )

    def init_lora_weights(self) -> Any:
        """PEFT's ``init_lora_weights`` for ``init`` (and ``pissa_niter``)."""
        if self.init == "default":
            return True
        if self.init == "pissa" and self.pissa_niter is not None:
            return f"pissa_niter_{self.pissa_niter}"
        return str(self.init)

    def _refused_init(self, why: str) -> List[str]:
        """The problem of an init that moves the base weights, where that cannot work."""
        if self.init not in MOVES_BASE:
            return []
        return [f"adapter.init={self.init} with adapter={self.method}: {why}; use adapter.init=default or "
                f"gaussian, or adapter=lora"]

    def apply(self, model: Any, architecture: Optional[ArchitectureInfo]) -> Any:
        from peft import get_peft_model  # lazy: peft loads torch and transformers

        return get_peft_model(model, self.peft_config())


@register_adapter("dora")
@dataclass
class DoraSettings(LoraSettings):
    """Weight-decomposed LoRA: a magnitude vector plus a LoRA direction update."""

    method: str = "dora"
    use_dora: ClassVar[bool] = True
    vllm: ClassVar[bool] = False  # vLLM has no DoRA magnitudes

    def check(self, architecture: Optional[ArchitectureInfo]) -> List[str]:
        # Measured on PEFT 0.21: a PiSSA/OLoRA DoRA adapter converted for the original base
        # answers differently after reloading (logits off by 0.1-0.2), since DoRA's magnitude
        # was taken from the residual weight.
        return super().check(architecture) + self._refused_init(
            "DoRA's magnitude is taken from the residual weight, and PEFT's conversion to the original "
            "base does not carry it over")


@register_adapter("qlora")
@dataclass
class QLoraSettings(LoraSettings):
    """LoRA over a base quantized by bitsandbytes (4-bit NF4 with double quantization by default)."""

    method: str = "qlora"
    bits: int = bounded(4, one_of=(4, 8))
    quant_type: QuantType = QuantType.nf4  # 4-bit only
    double_quant: bool = True
    # auto: bfloat16 where the device multiplies it natively (AVX512-bf16/AMX CPUs, Ampere+ GPUs),
    # else float32 (the rule of trainer.precision=auto, pipeline/model/precision.py).
    compute_dtype: ComputeDtype = ComputeDtype.auto
    quant_storage: Optional[str] = None  # set to the compute dtype for ZeRO-3 / FSDP sharding

    quantized: ClassVar[bool] = True
    vllm: ClassVar[bool] = False  # vLLM would run the adapter on the float base

    def check(self, architecture: Optional[ArchitectureInfo]) -> List[str]:
        problems = super().check(architecture) + self._refused_init(
            "it decomposes the base weights, which a 4-bit base does not hold in full precision")
        if architecture is not None and architecture.model_type in NOT_QUANTIZABLE:
            problems.append(f"adapter={self.method} needs a quantizable base, but model_type="
                            f"{architecture.model_type} cannot be quantized: "
                            f"{NOT_QUANTIZABLE[architecture.model_type]}; use adapter=lora")
        return problems

    def quantization(self) -> QuantizationSettings:
        return QuantizationSettings(bits=self.bits, quant_type=str(self.quant_type), double_quant=self.double_quant,
                                    compute_dtype=compute_dtype(self.compute_dtype),
                                    quant_storage=self.quant_storage)

    def apply_for_counting(self, model: Any, architecture: Optional[ArchitectureInfo]) -> Any:
        # The same LoRA layers over a base that is quantized on load; k-bit preparation needs
        # real weights, and changes no count.
        return super().apply(model, architecture)

    def apply(self, model: Any, architecture: Optional[ArchitectureInfo]) -> Any:
        from peft import prepare_model_for_kbit_training  # lazy: peft loads torch and transformers

        # pipeline.model.loading.load_model has already guarded the 4-bit weights (guard_cpu_4bit).
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model.is_gradient_checkpointing)
        return super().apply(model, architecture)


def moves_base(model: Any) -> bool:
    """Whether ``model`` (a PEFT model) has an adapter whose init changed the base weights."""
    config = getattr(model, "peft_config", {}).get("default")
    init = getattr(config, "init_lora_weights", True)
    return isinstance(init, str) and init.split("_")[0] in MOVES_BASE


def save_initial(model: Any, folder: Path) -> None:
    """Saves the adapter as initialised (before any step), the reference that converts the
    trained adapter to the original base (PEFT's PiSSA/OLoRA recipe: saved with
    ``init_lora_weights=True``, so that loading it never decomposes the base again)."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        config.init_lora_weights = init


def save_converted(model: Any, target: Path, initial: Path) -> None:
    """Saves the trained adapter converted to apply to the original base weights: PEFT folds the
    initial adapter's difference in, so the saved rank is twice ``adapter.r``."""
    model.save_pretrained(str(target), safe_serialization=True,
                          path_initial_model_for_weight_conversion=str(initial))
