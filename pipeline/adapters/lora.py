"""LoRA and the methods that extend it through PEFT: DoRA and QLoRA (LoRA over a k-bit base)."""

from __future__ import annotations

from dataclasses import dataclass
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

    use_dora: ClassVar[bool] = False
    vllm: ClassVar[bool] = True

    def check(self, architecture: Optional[ArchitectureInfo]) -> List[str]:
        problems = check_targets("adapter.target_modules", self.target_modules, architecture)
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
        )

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
        problems = super().check(architecture)
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
