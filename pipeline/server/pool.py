"""The models a server offers: one base in memory, its adapters attached by name.

Adapters of one PEFT type (and one base quantisation) share a single base model: PEFT's
multi-adapter model holds them all and ``set_adapter`` picks one per batch. The base model is
served by the same weights with the adapters disabled. A fully fine-tuned run is a model of
its own. Only the engine's single generation thread switches adapters, so a switch never
races with another request's generation.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from pipeline.adapters.saved import is_adapter, load_adapter, read_run
from pipeline.config.errors import ConfigError
from pipeline.config.schema import ModelConfig, QuantizationSettings
from pipeline.model import loading

log = logging.getLogger(__name__)


@dataclass
class Source:
    """One served name and where its weights come from."""

    name: str
    model_cfg: ModelConfig  # the base it was trained on
    artifact: Path  # adapter folder (adapter_config.json) or full model folder (config.json)
    quantization: Optional[QuantizationSettings] = None  # the base's 4-bit settings (QLoRA), or None
    seed: Optional[int] = None  # a tiny base's initialisation seed (None: the server's)

    @property
    def is_adapter(self) -> bool:
        return is_adapter(self.artifact)


@dataclass
class Choice:
    """What a request's ``model`` field selects: a model, and the adapter to activate (None:
    adapters disabled, i.e. the base model)."""

    name: str
    model: Any
    adapter: Optional[str]
    parent: Optional[str] = None  # the base's served name, for adapters


def source_from_path(name: str, path: str, model_cfg: ModelConfig, key: str) -> Source:
    """A run folder (its config says the base) or a bare adapter / model folder (on ``model_cfg``).

    Raises:
        ConfigError: when ``path`` is none of these; the message names ``key``.
    """
    folder = Path(path)
    if (folder / "config.yaml").exists():
        data_cfg, run_model, settings, artifact = read_run(path)
        return Source(name, run_model, artifact, settings.quantization(), data_cfg.seed)
    if (folder / "adapter_config.json").exists() or (folder / "config.json").exists():
        return Source(name, model_cfg, folder)
    raise ConfigError([f"{key}={path!r} is neither a run folder (config.yaml) nor an adapter "
                         "(adapter_config.json) or model folder (config.json)"])


def base_problems(sources: List[Source], base_folder: str, cache_dir: str, seed: int) -> List[str]:
    """One line per adapter trained on another base than ``base_folder`` (``seed``: the
    server's, for sources that do not carry their own)."""
    problems = []
    for source in sources:
        own_seed = seed if source.seed is None else source.seed
        folder = loading.resolve_folder(source.model_cfg, cache_dir, own_seed)
        if source.is_adapter and folder != base_folder:
            problems.append(f"{source.name}: trained on model {source.model_cfg.name} ({folder}), "
                            f"but the server's base is {base_folder}; serve it from its own "
                            f"server, or set model= to its base")
    return problems


class ModelPool:
    """Loads the base and every source once; maps served names to :class:`Choice`."""

    def __init__(self, base_cfg: ModelConfig, base_name: str, sources: List[Source],
                 cache_dir: str, seed: int):
        self.base_folder = loading.resolve_folder(base_cfg, cache_dir, seed)
        self.tokenizer = loading.load_tokenizer(self.base_folder, base_cfg)
        self.base_name = base_name
        self.choices: Dict[str, Choice] = {}
        self._check_bases(sources, cache_dir, seed)
        shared: Dict[Tuple[str, str], Any] = {}  # (peft type, quantization) -> PEFT model
        for source in sources:
            if source.is_adapter:
                self._add_adapter(source, base_cfg, shared)
            else:
                self.choices[source.name] = Choice(source.name, _for_inference(
                    loading.load_model(str(source.artifact), source.model_cfg)), None)
        # The base: the first unquantised shared model with adapters off, else its own copy.
        plain = next((m for (_, quant), m in shared.items() if quant == "null"), None)
        if plain is None:
            plain = _for_inference(loading.load_model(self.base_folder, base_cfg))
        self.choices = {base_name: Choice(base_name, plain, None), **self.choices}
        self.context_length = _context_length(plain)

    def _check_bases(self, sources: List[Source], cache_dir: str, seed: int) -> None:
        problems = base_problems(sources, self.base_folder, cache_dir, seed)
        if problems:
            raise ConfigError(problems)

    def _add_adapter(self, source: Source, base_cfg: ModelConfig, shared: Dict) -> None:
        peft_type = json.loads((source.artifact / "adapter_config.json").read_text())["peft_type"]
        key = (peft_type, source.quantization.key() if source.quantization else "null")
        # PEFT matches adapter names inside parameter names: a served name such as "a" or "lora"
        # would collide with the "lora_" prefix, so PEFT gets names of its own.
        internal = f"adapter{len(self.choices)}"
        if key not in shared:
            base = loading.load_model(self.base_folder, base_cfg, source.quantization)
            shared[key] = _for_inference(load_adapter(base, source.artifact, adapter_name=internal))
        else:
            shared[key].load_adapter(source.artifact, adapter_name=internal)
            shared[key].eval()
        log.info("adapter %s (%s) from %s", source.name, peft_type, source.artifact)
        self.choices[source.name] = Choice(source.name, shared[key], internal, self.base_name)

    @staticmethod
    @contextlib.contextmanager
    def activate(choice: Choice) -> Iterator[Any]:
        """Selects ``choice``'s adapter (or disables adapters) for the duration of the block.
        Callers must not run two blocks on the same model at once (the engine never does)."""
        if choice.adapter is not None:
            if choice.model.active_adapter != choice.adapter:  # set_adapter walks every layer
                choice.model.set_adapter(choice.adapter)
            yield choice.model
        elif hasattr(choice.model, "disable_adapter"):
            with choice.model.disable_adapter():
                yield choice.model
        else:
            yield choice.model


def _for_inference(model: Any) -> Any:
    """Generation mode on the GPU when there is one: eval, no gradients, KV cache on (training
    loads turn it off). A quantized base is already where bitsandbytes placed it."""
    import torch  # lazy: start-up must not pay for torch

    if torch.cuda.is_available() and getattr(model, "hf_quantizer", None) is None:
        model.to(torch.device("cuda", torch.cuda.current_device()))
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = True
    return model


def _context_length(model: Any) -> Optional[int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
