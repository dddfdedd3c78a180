"""One registry for every adapter method: name -> typed settings that can check and apply.

A method is a dataclass extending :class:`AdapterSettings` (its fields are the ``adapter``
config group's schema for that option) decorated with :func:`register_adapter`. Adding a method
is one module in ``pipeline/adapters/`` and one ``conf/adapter/<name>.yaml``: the package imports
its modules at start-up (``pipeline/adapters/__init__.py``), the config schema, the checks, the
tests' and benchmarks' method lists, the memory estimate and the loader of saved adapters
(:func:`pipeline.adapters.saved.load_adapter`) all ask the registry. Settings modules stay light:
heavy imports (peft, bitsandbytes, a tuner of one's own) happen inside the methods below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Set, Type

from omegaconf import MISSING

from pipeline.config.errors import ConfigError
from pipeline.config.schema import ArchitectureInfo, QuantizationSettings


@dataclass
class AdapterSettings:
    """Base schema of the ``adapter`` group.

    Class attributes describe the method to the rest of the pipeline:
    ``trains`` (False for a frozen baseline), ``quantized`` (the base loads in k-bit) and
    ``vllm`` (vLLM generates with what it trains: ``evaluation.engine=vllm``, ``server.engine=vllm``).
    """

    method: str = MISSING

    trains: ClassVar[bool] = True
    quantized: ClassVar[bool] = False
    vllm: ClassVar[bool] = False

    def check(self, architecture: Optional[ArchitectureInfo]) -> List[str]:
        """Returns problems with these settings (empty when fine); never raises."""
        return []

    def quantization(self) -> Optional[QuantizationSettings]:
        """How the base is quantized on load, or None for a float base."""
        return None

    def apply(self, model: Any, architecture: Optional[ArchitectureInfo]) -> Any:
        """Returns the model with this adapter attached and only its parameters trainable."""
        raise NotImplementedError

    def fresh_is_base(self) -> bool:
        """Whether the model with the adapter just applied computes what the base does (an
        update that starts at zero, or PiSSA's residual base plus adapter): the base is then
        measured through it; otherwise with the adapter disabled."""
        return True

    def initialize_from_data(self, model: Any, examples: Any, collate: Callable[[List[Dict[str, Any]]], Any],
                             batch_size: int) -> None:
        """Initialises the applied adapter from training data (EVA); most methods need none.

        Args:
            model: what :meth:`apply` returned.
            examples: the tokenized training split.
            collate: pads a list of examples into a batch.
            batch_size: examples per batch.
        """

    def apply_for_counting(self, model: Any, architecture: Optional[ArchitectureInfo]) -> Any:
        """:meth:`apply` on a model built on the meta device (no weights), for the memory
        estimate's parameter counts. A method whose ``apply`` needs real weights overrides it."""
        if not self.trains:
            return model.requires_grad_(False)
        return self.apply(model, architecture)

    @classmethod
    def register_tuner(cls) -> None:
        """Makes PEFT able to load this method's saved adapters. PEFT's own methods need nothing;
        a method with a tuner of its own registers that tuner here (imported only now)."""


ADAPTERS: Dict[str, Type[AdapterSettings]] = {}


def register_adapter(name: str):
    """Class decorator adding a settings class to :data:`ADAPTERS` under ``name``.

    Raises:
        ValueError: if ``name`` is taken or the class's ``method`` default differs from it.
    """

    def decorator(cls: Type[AdapterSettings]) -> Type[AdapterSettings]:
        if name in ADAPTERS and ADAPTERS[name] is not cls:
            raise ValueError(f"adapter method {name!r} is already registered by "
                             f"{ADAPTERS[name].__qualname__}")
        if cls.method != name:
            raise ValueError(f"{cls.__qualname__}.method defaults to {cls.method!r}, expected {name!r}")
        ADAPTERS[name] = cls
        return cls

    return decorator


def check_targets(key: str, targets: Any, architecture: Optional[ArchitectureInfo]) -> List[str]:
    """Checks that every target module name exists in the architecture, listing those that do."""
    if targets is None or architecture is None or targets == "all-linear":
        return []
    if isinstance(targets, str):
        return [f"{key}={targets!r} must be a list of module names or 'all-linear'"]
    available = architecture.module_names
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in available)]
    if not unknown:
        return []
    leaves = sorted({n.rsplit(".", 1)[-1] for n in architecture.linear_modules})
    return [f"{key} has unknown module name(s) {unknown} for model_type={architecture.model_type}; "
            f"available linear modules: {', '.join(leaves)}"]


def settings_fields(method: str) -> Set[str]:
    """The ``adapter.*`` keys of registered method ``method``."""
    return {f.name for f in dataclasses.fields(ADAPTERS[method])}


def settings_for(method: str, key: str = "adapter_method") -> AdapterSettings:
    """A registered method's default settings (for an adapter folder given by path).

    Raises:
        ConfigError: for a method that is not registered, naming ``key``.
    """
    if method not in ADAPTERS:
        raise ConfigError([f"{key}={method!r} is unknown; choose one of: {', '.join(sorted(ADAPTERS))}"])
    return ADAPTERS[method]()


def check_architecture(settings: AdapterSettings, architecture: ArchitectureInfo) -> None:
    """The settings' checks that need the base model's architecture (target modules exist, the
    base can be quantized), before any weights load.

    Raises:
        ConfigError: listing every problem.
    """
    problems = settings.check(architecture)
    if problems:
        raise ConfigError(problems)


def register_tuners() -> None:
    """Every registered method's :meth:`AdapterSettings.register_tuner`: after it, PEFT loads a
    saved adapter of any registered type (``PeftModel.from_pretrained``, ``load_adapter``)."""
    for settings in ADAPTERS.values():
        settings.register_tuner()

