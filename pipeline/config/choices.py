"""The allowed values of config keys that choose among a few (``trainer.sampling``,
``model.dtype``, ``evaluation.engine``, ...), as Enums. A schema field typed with one is checked
by OmegaConf while the config is composed, with the key's full name and the allowed values, so
no check elsewhere lists them again."""

from __future__ import annotations

import enum
import sys
from typing import Any


class Choice(str, enum.Enum):
    """One of a key's allowed values. A field typed with a subclass is checked by OmegaConf when
    the config is composed (``Invalid value 'x', expected one of [...]``, with the key's full
    name); each member's name is its value, and it compares, hashes, prints and serialises as
    that value, so ``cfg.trainer.sampling == "random"`` holds and records hold plain strings."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple:
        return tuple(member.value for member in cls)


def make_choice(name: str, *values: str) -> Any:
    """A :class:`Choice` of ``values``, to be assigned to ``name`` in the calling module, where
    pickle finds it (Hydra's submitit launcher pickles configs for SLURM)."""
    module = sys._getframe(1).f_globals["__name__"]
    return Choice(name, [(value, value) for value in values], module=module, qualname=name)


DataFormat = make_choice("DataFormat", "auto", "prompt_completion", "instruction", "messages", "sharegpt")
TrainOn = make_choice("TrainOn", "all", "last")
Template = make_choice("Template", "chat", "plain")
Truncation = make_choice("Truncation", "drop", "truncate", "error")
ModelSource = make_choice("ModelSource", "hub", "gguf", "tiny")
TinyArchitecture = make_choice("TinyArchitecture", "llama", "gpt2")
TinyDtype = make_choice("TinyDtype", "float32", "bfloat16")
ModelDtype = make_choice("ModelDtype", "float32", "bfloat16", "float16", "auto")
Precision = make_choice("Precision", "auto", "fp32", "bf16", "fp16")
LossPrecision = make_choice("LossPrecision", "auto", "fp32", "bf16")
NanPolicy = make_choice("NanPolicy", "stop", "skip")
Sampling = make_choice("Sampling", "random", "group_by_length", "sequential")
Compile = make_choice("Compile", "off", "on", "auto")  # trainer.compile (quote off/on in YAML files)
Direction = make_choice("Direction", "minimize", "maximize")
DecodingStrategy = make_choice("DecodingStrategy", "greedy", "sample", "beam")
EvaluationEngine = make_choice("EvaluationEngine", "transformers", "vllm")
Strategy = make_choice("Strategy", "single", "ddp", "deepspeed")
WandbMode = make_choice("WandbMode", "offline", "online", "disabled")
ParamType = make_choice("ParamType", "float", "int", "categorical")  # a sweep parameter's
WeightsDtype = make_choice("WeightsDtype", "float32", "bfloat16", "float16")  # an export's
ServerEngine = make_choice("ServerEngine", "builtin", "vllm")
# PEFT's add_weighted_adapter combination types (pipeline.merge).
MergeMethod = make_choice("MergeMethod", "linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                          "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
