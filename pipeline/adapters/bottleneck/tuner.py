"""Bottleneck (Houlsby / Pfeiffer) adapters as a PEFT tuner of our own.

Our own because PEFT ships no bottleneck adapter and AdapterHub's ``adapters``, which does, pins
transformers 4.57 (this project runs on transformers 5). As a PEFT tuner it gets PEFT's saving,
loading, multi-adapter serving and ``disable_adapter`` for free.

A bottleneck adapter wraps an output projection and adds a small residual MLP to its output::

    y = base(x) + scaling * up(dropout(act(down(base(x)))))

The tuner is registered with PEFT, so ``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained``,
``disable_adapter`` and ``Trainer`` work exactly as they do for LoRA. Importing this module registers it.

Example:
    >>> from peft import get_peft_model
    >>> from pipeline.adapters.bottleneck.tuner import BottleneckConfig
    >>> model = get_peft_model(base_model, BottleneckConfig(r=16, placement="pfeiffer"))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft.config import PeftConfig
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.peft_types import PeftType, register_peft_method
from torch import nn
from transformers.pytorch_utils import Conv1D

from pipeline.adapters.bottleneck.layout import BOTTLENECK_TARGETS, NON_LINEARITIES, PLACEMENTS

PEFT_TYPE_NAME = "BOTTLENECK"
PREFIX = "bottleneck_"

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
assert set(ACTIVATIONS) == set(NON_LINEARITIES), "layout.NON_LINEARITIES and ACTIVATIONS must agree"
MERGE_ERROR = (
    "bottleneck adapters are non-linear (down -> activation -> up) and cannot be merged into the base weights; "
    "serve the adapter unmerged with PeftModel.from_pretrained"
)


def _ensure_peft_type_member(name: str) -> PeftType:
    """Add ``name`` to the closed ``PeftType`` enum, or return the member if it already exists.

    ``register_peft_method`` only accepts names that are ``PeftType`` members, and enums cannot be extended by
    subclassing. This mirrors what ``enum`` does for each member while building a class (CPython 3.11+).

    Args:
        name: Upper-case member name; also used as its value, as for all ``PeftType`` members.

    Returns:
        The (possibly pre-existing) member, so repeated calls and module reloads reuse one object.
    """
    existing = PeftType._member_map_.get(name)
    if existing is not None:
        return existing
    # PeftType mixes in str: the member *is* the string, which keeps JSON dumps and dict lookups by "NAME" working.
    member = str.__new__(PeftType, name)
    member._name_, member._value_, member.__objclass__ = name, name, PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # Class attribute first: EnumType.__setattr__ refuses names already in _member_map_.
    setattr(PeftType, name, member)
    PeftType._member_names_.append(name)  # iteration, list(PeftType), len(PeftType)
    PeftType._member_map_[name] = member  # PeftType["NAME"]
    PeftType._value2member_map_[name] = member  # PeftType("NAME"), `in` checks, unpickling, deepcopy
    return member


BOTTLENECK = _ensure_peft_type_member(PEFT_TYPE_NAME)


def _choice_error(field_name: str, value: Any, allowed: Any) -> ValueError:
    return ValueError(f"BottleneckConfig.{field_name}={value!r} is invalid; allowed values: {sorted(allowed)}")


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter.

    Args:
        r: Bottleneck dimension of the adapter MLP.
        placement: "houlsby" (after attention and MLP output projections) or "pfeiffer" (after the MLP only).
        target_modules: Module names (suffixes) or a regex to wrap; derived from ``placement`` and the model type via
            ``BOTTLENECK_TARGETS`` when None.
        exclude_modules: Module names (suffixes) or a regex to skip.
        non_linearity: Activation between down and up projection: relu, gelu, silu or tanh.
        dropout: Dropout applied to the activated bottleneck.
        scaling: Factor applied to the adapter output before it is added to the base output.
        modules_to_save: Extra modules (e.g. a classifier head) trained fully and saved with the adapter.
    """

    r: int = field(default=64, metadata={"help": "Bottleneck dimension"})
    placement: str = field(default="houlsby", metadata={"help": f"One of {PLACEMENTS}"})
    target_modules: Optional[list[str] | str] = field(default=None, metadata={"help": "Modules to wrap"})
    exclude_modules: Optional[list[str] | str] = field(default=None, metadata={"help": "Modules to skip"})
    non_linearity: str = field(default="relu", metadata={"help": f"One of {sorted(ACTIVATIONS)}"})
    dropout: float = field(default=0.0, metadata={"help": "Dropout inside the adapter"})
    scaling: float = field(default=1.0, metadata={"help": "Scale of the adapter output"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Fully trained extra modules"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BOTTLENECK
        if self.placement not in PLACEMENTS:
            raise _choice_error("placement", self.placement, PLACEMENTS)
        if self.non_linearity not in ACTIVATIONS:
            raise _choice_error("non_linearity", self.non_linearity, ACTIVATIONS)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"BottleneckConfig.r={self.r!r} is invalid; allowed values: positive integers")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BottleneckConfig.dropout={self.dropout!r} is invalid; allowed values: [0, 1)")
        # PEFT matches list targets as sets; a str stays a regex.
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
        return module.weight.shape[1]
    raise TypeError(f"bottleneck adapters support nn.Linear and transformers Conv1D targets, got {type(module)}")


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """Wraps a linear layer and adds one bottleneck MLP per named adapter to its output.

    Several active adapters each read the base output and add their contribution (parallel, like LoRA), so the
    result does not depend on their order.
    """

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_act", "bottleneck_dropout", "bottleneck_scaling")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features = _out_features(self.get_base_layer())
        # ModuleDicts keyed by adapter name, with the method prefix so PEFT can find, move and save them.
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.bottleneck_act = nn.ModuleDict()
        self.bottleneck_dropout = nn.ModuleDict()
        self.bottleneck_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        """Create (or replace) the adapter ``adapter_name`` on this layer."""
        d, r = self.out_features, config.r
        self.bottleneck_down[adapter_name] = nn.Linear(d, r)  # default Kaiming-uniform init
        up = nn.Linear(r, d)
        # Zero up-projection: a fresh adapter is an exact identity of the base model.
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_act[adapter_name] = ACTIVATIONS[config.non_linearity]()
        self.bottleneck_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.bottleneck_scaling[adapter_name] = config.scaling
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Always raises: the adapter is non-linear in the base output."""
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        """No-op, since nothing can ever be merged."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        out = result
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down = self.bottleneck_down[name]
            h = self._cast_input_dtype(result, down.weight.dtype)  # adapters may be kept in fp32 under bf16
            h = self.bottleneck_up[name](self.bottleneck_dropout[name](self.bottleneck_act[name](down(h))))
            out = out + self.bottleneck_scaling[name] * h.to(result.dtype)
        return out

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(BaseTuner):
    """PEFT tuner that injects ``BottleneckLayer`` wrappers into a model; created by ``get_peft_model``."""

    prefix: str = PREFIX
    tuner_layer_cls = BottleneckLayer

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        if peft_config.target_modules is None:
            targets = BOTTLENECK_TARGETS.get(model_config.get("model_type"))
            if targets is None:
                raise ValueError(
                    f"no default bottleneck targets for model_type={model_config.get('model_type')!r} "
                    f"(known: {sorted(BOTTLENECK_TARGETS)}); set BottleneckConfig.target_modules"
                )
            peft_config.target_modules = set(targets[peft_config.placement])
        return peft_config

    def _create_and_replace(
        self,
        peft_config: BottleneckConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, BottleneckLayer):  # adding a second named adapter
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter starts frozen
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        # Called by BaseTuner before merge_adapter and merge_and_unload touch any layer.
        raise ValueError(MERGE_ERROR)


def register() -> None:
    """Register the bottleneck method with PEFT; idempotent, and safe after ``importlib.reload`` of this module.

    Afterwards ``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained`` resolve ``"peft_type": "BOTTLENECK"``
    in ``adapter_config.json`` to ``BottleneckConfig``.

    Raises:
        KeyError: If a different package already registered a ``BOTTLENECK`` method.
    """
    peft_type = _ensure_peft_type_member(PEFT_TYPE_NAME)
    current = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if current is BottleneckConfig:
        return
    if current is not None:
        if current.__module__ != __name__:
            raise KeyError(f"PEFT type {PEFT_TYPE_NAME} is already registered by {current.__module__}")
        # This module was reloaded: drop the stale classes so the mappings point at the new ones.
        for mapping in (
            PEFT_TYPE_TO_CONFIG_MAPPING,
            PEFT_TYPE_TO_TUNER_MAPPING,
            PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
            PEFT_TYPE_TO_PREFIX_MAPPING,
        ):
            mapping.pop(peft_type, None)
    register_peft_method(
        name=PEFT_TYPE_NAME.lower(), config_cls=BottleneckConfig, model_cls=BottleneckModel, prefix=PREFIX
    )


register()

__all__ = [
    "BOTTLENECK_TARGETS",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckModel",
    "register",
]
