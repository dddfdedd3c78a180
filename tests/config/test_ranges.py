"""Every numeric setting declares its range, and a value outside it is refused at validation with
the key, the value and the range (pipeline/config/ranges.py)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from pipeline.adapters.registry import ADAPTERS
from pipeline.commands.compose import compose_train
from pipeline.config.app_schema import EvaluateConfig, ExportConfig, MergeConfig, ServeConfig
from pipeline.config.errors import ConfigError
from pipeline.config.ranges import Range, bounded, field_range, range_problems
from pipeline.config.schema import SweepConfig, TrainConfig

ROOTS = [TrainConfig, EvaluateConfig, ServeConfig, ExportConfig, MergeConfig, SweepConfig, *ADAPTERS.values()]


def _numeric(hint) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    return any(a in (int, float) for a in args) and bool not in args


def _schemas():
    """Every dataclass reachable from the entry points' schemas and the adapter methods'."""
    seen, todo = set(), list(ROOTS)
    while todo:
        schema = todo.pop()
        if schema in seen:
            continue
        seen.add(schema)
        for hint in typing.get_type_hints(schema).values():
            for inner in [hint, *typing.get_args(hint), *(a for h in typing.get_args(hint) for a in typing.get_args(h))]:
                if dataclasses.is_dataclass(inner) and isinstance(inner, type):
                    todo.append(inner)
    return sorted(seen, key=lambda s: s.__qualname__)


def test_the_walk_reaches_every_stage_schema():
    names = {s.__name__ for s in _schemas()}
    assert {"DataConfig", "TrainerConfig", "DecodingConfig", "ServerConfig", "ExportSettings", "SweepParam",
            "TinyModelConfig", "LoraSettings", "QLoraSettings", "BottleneckSettings", "MixSource"} <= names


@pytest.mark.parametrize("schema", _schemas(), ids=lambda s: s.__qualname__)
def test_every_numeric_field_declares_a_range_or_is_marked_unbounded(schema):
    hints = typing.get_type_hints(schema)
    undeclared = [f.name for f in dataclasses.fields(schema) if _numeric(hints[f.name]) and field_range(f) is None]
    assert not undeclared, f"{schema.__qualname__}: declare bounded(...) or unbounded(why=...) for {undeclared}"
    for spec in dataclasses.fields(schema):
        allowed = field_range(spec)
        if allowed is not None and allowed.unbounded:
            assert allowed.why, f"{schema.__qualname__}.{spec.name}: unbounded needs its reason"


@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_steps=-5"], "trainer.max_steps=-5 must be > 0, or -1 (-1: train trainer.num_train_epochs instead)"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 must be > 0, or -1"),
    (["trainer.warmup_ratio=1"], "trainer.warmup_ratio=1.0 must be in [0, 1)"),
    (["trainer.eval_steps=0"], "trainer.eval_steps=0 must be > 0 or null"),
    (["evaluation.decoding.top_p=1.5"], "evaluation.decoding.top_p=1.5 must be in (0, 1]"),
    (["evaluation.decoding.temperature=0"], "evaluation.decoding.temperature=0.0 must be > 0"),
    (["seed=-1"], "seed=-1 must be in 0..4294967295"),
    (["distributed.master_port=70000"], "distributed.master_port=70000 must be in 1..65535"),
    (["adapter.lora_dropout=1"], "adapter.lora_dropout=1.0 must be in [0, 1)"),
    (["adapter=qlora", "adapter.bits=3"], "adapter.bits=3 must be 4 or 8"),
    (["data.test_size=-0.1"], "data.test_size=-0.1 must be >= 0"),
    (["model=tiny_llama", "model.tiny.num_layers=0"], "model.tiny.num_layers=0 must be > 0"),
    (["sweep=lora_rank_alpha_lr", "sweep.heartbeat_s=0"], "sweep.heartbeat_s=0 must be > 0"),
])
def test_a_value_outside_its_range_is_refused_with_key_value_and_range(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_train(overrides)
    assert message in str(err.value)


def test_every_out_of_range_value_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        compose_train(["trainer.max_steps=-5", "adapter.r=0", "evaluation.batch_size=0", "trainer.learning_rate=nan"])
    assert len(err.value.problems) == 4, err.value.problems
    assert "adapter.r=0 must be > 0; use adapter=full to train all weights" in err.value.problems


def test_special_values_and_null_pass():
    cfg = compose_train(["trainer.max_steps=-1", "trainer.eval_steps=null", "trainer.max_grad_norm=0"])
    assert cfg.trainer.max_steps == -1 and cfg.trainer.eval_steps is None


def test_ranges_in_words():
    assert Range(gt=0).describe() == "> 0"
    assert Range(ge=0, lt=1).describe() == "in [0, 1)"
    assert Range(ge=1, le=255).describe(nullable=True) == "in 1..255 or null"
    assert Range(one_of=(4, 8)).describe() == "4 or 8"
    assert not Range(gt=0).contains(float("nan")) and not Range(gt=0).contains(True)


def test_nested_lists_and_maps_are_walked():
    @dataclasses.dataclass
    class Leaf:
        n: int = bounded(1, gt=0)

    @dataclasses.dataclass
    class Root:
        items: list = dataclasses.field(default_factory=lambda: [Leaf(1), Leaf(0)])
        named: dict = dataclasses.field(default_factory=lambda: {"a": Leaf(-2)})

    assert range_problems(Root()) == ["items[1].n=0 must be > 0", "named.a.n=-2 must be > 0"]


def test_a_map_of_numbers_checks_each_value():
    with pytest.raises(ConfigError) as err:
        compose_train(["+trainer.learning_rate_per_method.lora=-1"])
    assert "trainer.learning_rate_per_method.lora=-1.0 must be > 0" in str(err.value)
