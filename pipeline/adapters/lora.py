"""LoRA and the methods that extend it through PEFT: DoRA and QLoRA (LoRA over a k-bit base)."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional

from pipeline.adapters.registry import AdapterSettings, check_targets, register_adapter
from pipeline.config.choices import make_choice
from pipeline.config.errors import ConfigError
from pipeline.config.ranges import bounded
from pipeline.config.schema import ArchitectureInfo, QuantizationSettings
from pipeline.model.precision import compute_dtype

log = logging.getLogger(__name__)

# Architectures whose projections are transformers' Conv1D, which bitsandbytes cannot quantize.
NOT_QUANTIZABLE = {"gpt2": "its projections are Conv1D layers, which bitsandbytes does not quantize"}

LoraBias = make_choice("LoraBias", "none", "all", "lora_only")
QuantType = make_choice("QuantType", "nf4", "fp4")
ComputeDtype = make_choice("ComputeDtype", "auto", "float32", "bfloat16", "float16")
# How the LoRA matrices start (PEFT's ``init_lora_weights``): default (A Kaiming-uniform, B zero),
# gaussian (A normal), pissa (A and B from the weight's principal singular vectors, the base
# keeping the residual), olora (from a QR decomposition of the weight, likewise), loftq (QLoRA
# only: A and B fitted to the 4-bit base's quantization error, the base left as loaded) or eva
# (A from the principal components of each layer's inputs over training batches, B zero, the
# rank redistributed across layers).
LoraInit = make_choice("LoraInit", "default", "gaussian", "pissa", "olora", "loftq", "eva")
# Inits that subtract the adapter's starting value from the base weights: the saved adapter is
# converted to apply to the original base (see save_adapter).
MOVES_BASE = ("pissa", "olora")
# In the run folder while training: the adapter as initialised, for that conversion (a plain
# name: PEFT loads it as an adapter named after its folder).
INITIAL_ADAPTER = "initial_adapter"
# Why each init that reads whole weights, or runs the model before DeepSpeed starts, cannot run
# under ZeRO-3 (the validation refuses those pairs).
NEEDS_WHOLE_WEIGHTS: Dict[str, str] = {
    "pissa": "the adapter is converted for the original base from whole weights, which ZeRO-3 shards",
    "olora": "the adapter is converted for the original base from whole weights, which ZeRO-3 shards",
    "loftq": "LoftQ fits the adapter to whole quantized weights, which ZeRO-3 shards",
    "eva": ("EVA runs the model over training batches and resizes its LoRA layers before DeepSpeed starts, "
            "when ZeRO-3 has already sharded the weights"),
}
# PEFT's EVA loop (initialize_lora_eva_weights) cycles the batches until every layer's components
# settle, with no bound of its own: past this many forward passes they are taken never to.
EVA_MAX_PASSES = 1000


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
    # init=eva (PEFT's EvaConfig; null: PEFT's default, 2 and 0.99): a layer's rank may grow to
    # eva_rho * r where its inputs need it, taken from layers that need less (1: every layer keeps
    # r); the SVD of each layer's inputs stops once two batches agree to cosine similarity eva_tau.
    eva_rho: Optional[float] = bounded(None, ge=1, meaning="a layer's rank may reach eva_rho * r")
    eva_tau: Optional[float] = bounded(None, gt=0, le=1)

    use_dora: ClassVar[bool] = False
    vllm: ClassVar[bool] = True

    def check(self, architecture: Optional[ArchitectureInfo]) -> List[str]:
        problems = check_targets("adapter.target_modules", self.target_modules, architecture)
        for key, init in (("pissa_niter", "pissa"), ("eva_rho", "eva"), ("eva_tau", "eva")):
            if getattr(self, key) is not None and self.init != init:
                problems.append(f"adapter.{key}={getattr(self, key)} applies to adapter.init={init} only "
                                f"(adapter.init={self.init}); drop it or set adapter.init={init}")
        if self.init == "loftq" and not self.quantized:
            problems.append(f"adapter.init=loftq with adapter={self.method}: LoftQ fits the adapter to the "
                            "quantization error of a 4-bit base; over a full-precision base PEFT replaces the base "
                            "weights with their 4-bit round trip, which evaluate, serve and export (loading the "
                            "original base) would not reproduce; use adapter=qlora")
        components = round(self.r * self._eva_rho()) if self.init == "eva" else 0
        if architecture is not None and components > architecture.hidden_size:
            problems.append(f"adapter.init=eva with adapter.r={self.r}: EVA takes up to r * adapter.eva_rho = "
                            f"{components} principal components of each layer's inputs, more than their "
                            f"{architecture.hidden_size} features (hidden_size of model_type="
                            f"{architecture.model_type}); lower adapter.r or adapter.eva_rho")
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
            eva_config=self.eva_config() if self.init == "eva" else None,
        )

    def init_lora_weights(self) -> Any:
        """PEFT's ``init_lora_weights`` for ``init`` (and ``pissa_niter``). LoftQ starts as the
        default init: :meth:`QLoraSettings.apply` then replaces the matrices, and the saved
        adapter loads as a plain LoRA."""
        if self.init in ("default", "loftq"):
            return True
        if self.init == "pissa" and self.pissa_niter is not None:
            return f"pissa_niter_{self.pissa_niter}"
        return str(self.init)

    def eva_config(self) -> Any:
        """PEFT's ``EvaConfig`` with ``eva_rho`` and ``eva_tau`` where set."""
        from peft import EvaConfig  # lazy: peft loads torch and transformers

        given = {"rho": self.eva_rho, "tau": self.eva_tau}
        return EvaConfig(**{key: value for key, value in given.items() if value is not None})

    def _eva_rho(self) -> float:
        """``eva_rho``, or PEFT's default; an out-of-range value counts as 1 (the range check
        reports it)."""
        from peft import EvaConfig  # lazy: peft loads torch and transformers

        return EvaConfig.rho if self.eva_rho is None else max(self.eva_rho, 1.0)

    def fresh_is_base(self) -> bool:
        # LoftQ's fresh adapter offsets the 4-bit base's quantization error: base plus adapter
        # is close to the full-precision weights, not the base.
        return self.init != "loftq"

    def initialize_from_data(self, model: Any, examples: Any, collate: Callable[[List[Dict[str, Any]]], Any],
                             batch_size: int) -> None:
        if self.init == "eva":
            initialize_eva(model, examples, collate, batch_size)

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
        if self.init == "loftq":
            problems += self._loftq_problems(training_here=architecture is not None)
        if architecture is not None and architecture.model_type in NOT_QUANTIZABLE:
            problems.append(f"adapter={self.method} needs a quantizable base, but model_type="
                            f"{architecture.model_type} cannot be quantized: "
                            f"{NOT_QUANTIZABLE[architecture.model_type]}; use adapter=lora")
        return problems

    def _loftq_problems(self, training_here: bool) -> List[str]:
        """What keeps PEFT's LoftQ for a quantized base (``replace_lora_weights_loftq``) from
        running: it fits 4-bit bases only, and computes on CUDA (or an Intel XPU) only. The
        device is asked only of the machine that trains (``training_here``: the architecture
        is known, the weights about to load), not where a config is merely composed (a sweep's
        driver, the memory estimate)."""
        problems = []
        if self.bits != 4:
            problems.append(f"adapter.init=loftq with adapter.bits={self.bits}: PEFT's LoftQ fits the adapter to "
                            "4-bit bases only; use adapter.bits=4")
        if training_here:
            import torch  # lazy: torch takes seconds to import; only LoftQ needs the device
            from peft.import_utils import is_xpu_available

            if not (torch.cuda.is_available() or is_xpu_available()):
                problems.append("adapter.init=loftq with adapter=qlora needs a CUDA (or Intel XPU) device: PEFT 0.21's "
                                "LoftQ computes the quantization error there, and this machine has none; use "
                                "adapter.init=default, gaussian or eva here")
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
        model = super().apply(model, architecture)
        if self.init == "loftq":
            fit_loftq(model)
        return model


def fit_loftq(model: Any) -> None:
    """Sets the fresh LoRA matrices of ``model`` (a PEFT model over a 4-bit base) by LoftQ: the
    truncated SVD of each weight's quantization error, the full-precision weights read from the
    base's safetensors files (PEFT's ``replace_lora_weights_loftq``). The base stays the 4-bit
    base that evaluate, serve and export load again, so the saved adapter needs no conversion."""
    from peft import replace_lora_weights_loftq  # lazy: peft loads torch and transformers
    from peft.tuners.lora import Linear4bit

    source = model.config._name_or_path  # the folder from_pretrained read, or a hub id
    started = time.perf_counter()
    # For a hub id PEFT finds the files in the hub's local cache itself.
    replace_lora_weights_loftq(model, model_path=source if os.path.isdir(source) else None)
    # PEFT 0.21 sets B A to the truncated error itself, while the layer adds scaling * B A
    # (lora_alpha / r, 2 by default): the fresh model would carry the error's top components
    # reflected rather than removed (measured on tiny_llama: the weight error's norm unchanged at
    # scaling 2, 40% lower once scaled). Each matrix takes 1 / sqrt(scaling).
    for module in model.modules():
        if isinstance(module, Linear4bit):
            root = math.sqrt(module.scaling["default"])
            module.lora_A["default"].weight.data /= root
            module.lora_B["default"].weight.data /= root
    log.info("adapter.init=loftq: LoRA matrices fitted to the 4-bit base's quantization error (%.1f s)",
             time.perf_counter() - started)


class _EvaBatches:
    """The training batches EVA reads: those with at least ``needed`` tokens that it counts
    (PEFT skips a smaller batch, and cycles for ever over batches that are all smaller)."""

    def __init__(self, loader: Any, counted: Callable[[Dict[str, Any]], int], needed: int):
        self.loader, self.counted, self.needed = loader, counted, needed

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        kept = 0
        for batch in self.loader:
            if self.counted(batch) >= self.needed:
                kept += 1
                yield batch
        if not kept:
            raise ConfigError([f"adapter.init=eva: no training batch has the {self.needed} labelled tokens "
                               "(adapter.r * adapter.eva_rho) that EVA's SVD needs in a batch; raise "
                               "trainer.per_device_train_batch_size, or lower adapter.r or adapter.eva_rho"])


def initialize_eva(model: Any, examples: Any, collate: Callable[[List[Dict[str, Any]]], Any],
                   batch_size: int) -> None:
    """EVA (PEFT's ``initialize_lora_eva_weights``): each LoRA layer's A becomes the principal
    components of that layer's inputs over training batches, its rank redistributed by explained
    variance; B stays zero, so the model is still the base.

    Every process reads the same batches (none is sharded), so each computes the same ranks alone.

    Args:
        model: the PEFT model, its adapter created with ``init_lora_weights="eva"``.
        examples: the tokenized training split (``input_ids`` and ``labels`` columns).
        collate: pads a list of examples into a batch (``attention_mask`` marks the padding).
        batch_size: examples per batch (the training batch size).

    Raises:
        ConfigError: when no batch holds enough tokens, or the components do not settle within
            :data:`EVA_MAX_PASSES` batches.
    """
    import torch  # lazy: torch takes seconds to import
    from peft import initialize_lora_eva_weights  # lazy: peft loads torch and transformers
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.eva import prepare_model_inputs_fn_language_modeling

    config = model.peft_config["default"]
    rho, tau = config.eva_config.rho, config.eva_config.tau
    loader = torch.utils.data.DataLoader(examples.select_columns(["input_ids", "labels"]), batch_size=batch_size,
                                         collate_fn=lambda rows: dict(collate(rows)))  # PEFT takes a dict only
    batches = _EvaBatches(loader, lambda batch: len(prepare_model_inputs_fn_language_modeling(batch, config)),
                          round(config.r * rho))
    passes = 0

    def forward(module: Any, batch: Dict[str, Any]) -> Any:
        nonlocal passes
        passes += 1
        if passes > EVA_MAX_PASSES:
            raise ConfigError([f"adapter.init=eva: the layers' principal components did not settle to cosine "
                               f"similarity {tau} (adapter.eva_tau) within {EVA_MAX_PASSES} batches; lower "
                               "adapter.eva_tau, or give more training data"])
        return module(**batch)

    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        # A full-precision base is still on the CPU here (the Trainer places it later); EVA's
        # forward passes belong on the GPU the run trains on.
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    log.info("adapter.init=eva: principal components of each LoRA layer's inputs over the %d training batches "
             "of %d examples (rho %g, tau %g) ...", len(loader), batch_size, rho, tau)
    started = time.perf_counter()
    initialize_lora_eva_weights(model, batches, forward_fn=forward, gather_distributed_inputs=False,
                                show_progress_bar=True)
    # A layer whose rank EVA changed was rebuilt in the base's dtype (PEFT's update_layer), after
    # get_peft_model had put the adapter in fp32: trainable weights in bf16/fp16 would lose small
    # updates (and fp16 AMP refuses fp16 gradients).
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    ranks = [module.r["default"] for module in model.modules() if isinstance(module, LoraLayer)]
    log.info("adapter.init=eva: settled after %d batches (%.1f s); ranks per layer %d..%d, %d in all",
             passes, time.perf_counter() - started, min(ranks), max(ranks), sum(ranks))


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
