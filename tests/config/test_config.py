"""Every config option composes and validates; typos, wrong types and cross-field conflicts fail
with messages that name key, value and fix."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
import typing

import pytest
from hydra.errors import ConfigCompositionException
import yaml
from omegaconf import OmegaConf

from pipeline.adapters.registry import ADAPTERS, check_architecture
from pipeline.commands.compose import checked_train, typed_config
from pipeline.config.choices import Choice
from pipeline.config.errors import ConfigError
from pipeline.config.options import load_option, plain
from pipeline.config.schema import ArchitectureInfo, TrainConfig, TrainerConfig
from tests.conftest import CONF, ROOT, compose_train, write_jsonl

# Options whose mandatory values (???) a user supplies on the command line.
REQUIRED = {
    ("data", "my_jsonl"): ["data.path={jsonl}"],
    ("data", "hub"): ["data.path=some-org/some-dataset"],
    ("model", "hub"): ["model.path=some-org/some-model"],
    ("evaluation", "classification"): ["evaluation.labels=[positive,negative]"],
}
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def all_options():
    for group in GROUPS:
        for path in sorted((CONF / group).rglob("*.yaml")):
            yield group, path.relative_to(CONF / group).with_suffix("").as_posix()


@pytest.mark.parametrize("group,option", list(all_options()))
def test_every_option_composes_and_validates(group, option, tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    extra = [o.format(jsonl=jsonl) for o in REQUIRED.get((group, option), [])]
    typed = checked_train(compose_train([f"{group}={option}", *extra], tmp_path))  # every check but the architecture's
    assert isinstance(typed, TrainConfig) and typed.adapter.method in ADAPTERS


def test_walk_covers_every_group_and_adapter():
    options = set(all_options())
    assert {g for g, _ in options} >= {"data", "model", "adapter", "trainer", "logger", "paths",
                                       "experiment", "debug"}
    assert {o for g, o in options if g == "adapter"} == set(ADAPTERS)


def test_typo_in_key_fails_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["trainer.learning_rat=1e-4"], tmp_path)
    assert "learning_rat" in str(err.value.__cause__ or err.value)


def test_wrong_type_fails_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["adapter.r=abc"], tmp_path)
    assert "adapter.r" in str(err.value.__cause__)


def _choice_keys(schema: type, prefix: str):
    """(dotted key, Choice enum) for every field of ``schema`` typed with a choice, recursively."""
    for f in dataclasses.fields(schema):
        kind = typing.get_type_hints(schema)[f.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is typing.Union and len(inner) == 1:  # Optional[X]: X
            kind = inner[0]
        if isinstance(kind, type) and issubclass(kind, Choice):
            yield f"{prefix}{f.name}", kind
        elif dataclasses.is_dataclass(kind):
            yield from _choice_keys(kind, f"{prefix}{f.name}.")


# (the adapter option it needs, dotted key, its Choice enum): the train config's own choices,
# then each registered adapter method's.
CHOICES = [("model=tiny_llama" if key.startswith("model.tiny.") else "", key, choice)
           for key, choice in _choice_keys(TrainConfig, "")] + [
    (f"adapter={method}", key, choice) for method, settings in sorted(ADAPTERS.items())
    for key, choice in _choice_keys(settings, "adapter.")]


def test_every_choice_is_typed():
    keys = {key for _, key, _ in CHOICES}
    assert keys >= {"data.format", "data.train_on", "data.template", "data.truncation", "model.source",
                    "model.dtype", "trainer.precision", "trainer.sampling", "trainer.nan_policy",
                    "evaluation.loss_precision", "evaluation.decoding.strategy", "evaluation.engine",
                    "objective.direction", "distributed.strategy", "adapter.bias", "adapter.quant_type",
                    "adapter.compute_dtype", "adapter.placement", "adapter.non_linearity",
                    "model.tiny.architecture", "model.tiny.dtype"}
    for _, _, choice in CHOICES:  # Hydra's submitit launcher pickles configs holding them
        member = next(iter(choice))
        assert pickle.loads(pickle.dumps(member)) is member


@pytest.mark.parametrize("option,key,choice", CHOICES, ids=[f"{o or 'train'}:{k}" for o, k, _ in CHOICES])
def test_a_choice_outside_its_values_fails_at_composition(option, key, choice, tmp_path):
    """Each choice is checked when the config is composed, naming the key and the values."""
    group = [option] if option else []
    with pytest.raises(ConfigCompositionException) as err:
        compose_train([*group, f"{key}=nonsense"], tmp_path)
    cause = str(err.value.__cause__)
    assert f"Invalid value 'nonsense', expected one of [{', '.join(choice.values())}]" in cause
    assert f"full_key: {key}" in cause
    # ... and every allowed value composes, and reads back as the plain string it was given
    for value in choice.values():
        cfg = compose_train([*group, f"{key}={value}"], tmp_path)
        assert OmegaConf.select(cfg, key) == value and f"{OmegaConf.select(cfg, key)}" == value


def test_the_typed_config_holds_schema_objects_and_records_plain_values(tmp_path):
    """Entry points convert the composed config once; stages get dataclasses, records strings."""
    cfg = compose_train(["adapter=qlora", "trainer.sampling=sequential"], tmp_path)
    typed = typed_config(cfg)
    assert isinstance(typed, TrainConfig) and isinstance(typed.trainer, TrainerConfig)
    assert type(typed.adapter).__name__ == "QLoraSettings" and typed.adapter.quantization().bits == 4
    assert typed.trainer.sampling == "sequential" and isinstance(typed.trainer.sampling, str)
    values = plain(typed)
    assert values == plain(cfg)
    assert type(values["trainer"]["sampling"]) is str and values["trainer"]["sampling"] == "sequential"
    assert yaml.safe_load(yaml.safe_dump(values)) == values  # config.yaml is plain YAML
    assert json.loads(json.dumps(values)) == values  # and W&B / trial attributes plain JSON


def test_a_missing_value_names_its_key_when_typed(tmp_path):
    cfg = compose_train(["data=my_jsonl"], tmp_path)
    with pytest.raises(ConfigError, match=r"data.path is required"):
        typed_config(cfg)


def test_setting_of_another_method_fails_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["adapter=full", "adapter.lora_alpha=16"], tmp_path)
    assert str(err.value) == ("Could not override 'adapter.lora_alpha': not a setting; it is a setting of "
                              "adapter=dora/lora/qlora, not of adapter=full")


def test_appended_setting_of_another_method_is_named(tmp_path):
    cfg = compose_train(["adapter=full", "+adapter.lora_alpha=16"], tmp_path)
    with pytest.raises(ConfigError) as err:
        checked_train(cfg)
    assert "adapter.lora_alpha=16 is not a setting of adapter=full" in str(err.value)
    assert "adapter=dora/lora/qlora" in str(err.value)


def test_all_problems_reported_at_once(tmp_path):
    cfg = compose_train(["adapter.r=0", "trainer.learning_rate=-1", "data.validation_size=0.5",
                         "data.test_size=0.6"], tmp_path)
    with pytest.raises(ConfigError) as err:
        checked_train(cfg)
    text = str(err.value)
    assert "adapter.r=0 must be > 0; use adapter=full to train all weights" in text
    assert "trainer.learning_rate=-1.0 must be > 0" in text
    assert "leaves no training examples" in text
    assert len(err.value.problems) == 3


def test_missing_data_file_is_named(tmp_path):
    cfg = compose_train(["data=my_jsonl", "data.path=/nonexistent/train.jsonl"], tmp_path)
    with pytest.raises(ConfigError, match=r"data.path='/nonexistent/train.jsonl' does not exist"):
        checked_train(cfg)


def _architecture(model_type="llama", linear=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj")):
    names = [f"model.layers.0.{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}" for n in linear]
    return ArchitectureInfo(model_type=model_type, module_names=names, linear_modules=names,
                              hidden_size=64, num_layers=1)


def test_unknown_target_module_lists_available(tmp_path):
    typed = checked_train(compose_train(["adapter.target_modules=[q_proj,qkv]"], tmp_path))
    # without the architecture the names cannot be checked: the config alone passes
    assert typed.adapter.target_modules == ["q_proj", "qkv"]
    with pytest.raises(ConfigError) as err:
        check_architecture(typed.adapter, _architecture())
    text = str(err.value)
    assert "adapter.target_modules has unknown module name(s) ['qkv'] for model_type=llama" in text
    assert "available linear modules: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in text


def test_all_linear_is_accepted(tmp_path):
    typed = checked_train(compose_train(["experiment=lora_all_linear"], tmp_path))
    assert typed.adapter.target_modules == "all-linear"
    assert typed.adapter.check(_architecture()) == []
    check_architecture(typed.adapter, _architecture())
    # ... where an unknown name in a list is refused on the same architecture
    assert typed.adapter.check(None) == [] and len(dataclasses.replace(
        typed.adapter, target_modules=["qkv"]).check(_architecture())) == 1


def test_qlora_refuses_unquantizable_architecture(tmp_path):
    typed = checked_train(compose_train(["adapter=qlora", "model=tiny_gpt2"], tmp_path))
    with pytest.raises(ConfigError, match="model_type=gpt2 cannot be quantized.*use adapter=lora"):
        check_architecture(typed.adapter, _architecture("gpt2", ("c_attn", "c_proj")))


@pytest.mark.parametrize("override,message", [
    ("adapter.bits=3", "adapter.bits=3 must be 4 or 8"),
])
def test_qlora_settings_checked(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        checked_train(compose_train(["adapter=qlora", override], tmp_path))


def test_bottleneck_settings_checked(tmp_path):
    cfg = compose_train(["adapter=bottleneck", "adapter.r=-1"], tmp_path)
    with pytest.raises(ConfigError) as err:
        checked_train(cfg)
    assert "adapter.r=-1 must be > 0" in str(err.value)


def test_load_option_reads_a_group_option():
    model = load_option("model", "smollm2_135m")
    assert model.source == "gguf" and model.gguf_file.endswith(".gguf")
    with pytest.raises(ConfigError, match="available: hub, smollm2_135m, synthetic_llama_1b, synthetic_llama_3b, synthetic_llama_8b, tiny_gpt2, tiny_llama"):
        load_option("model", "nope")


def test_cli_cfg_job_prints_composed_config():
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "--cfg", "job", "adapter=qlora"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "method: qlora" in out.stdout and "quant_type: nf4" in out.stdout


def test_cli_typo_exits_nonzero_naming_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "trainer.learning_rat=1",
                          f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "learning_rat" in out.stderr


# The methods vLLM generates with, from the registry (a method's ``vllm`` class attribute).
VLLM_METHODS = sorted(name for name, settings in ADAPTERS.items() if settings.vllm)
NOT_VLLM_METHODS = sorted(name for name, settings in ADAPTERS.items() if not settings.vllm)


def test_vllm_method_lists_cover_the_registry():
    assert set(VLLM_METHODS) | set(NOT_VLLM_METHODS) == set(ADAPTERS)
    assert {"lora", "full", "none"} <= set(VLLM_METHODS) and {"dora", "qlora", "ia3", "bottleneck"} <= set(NOT_VLLM_METHODS)


@pytest.mark.parametrize("overrides,message", [
    *[([f"adapter={method}"], f"vLLM does not generate with adapter={method}") for method in NOT_VLLM_METHODS],
    (["evaluation.decoding.strategy=beam", "evaluation.metrics=[bleu]"], "strategy=beam is not supported"),
    (["distributed=ddp", "distributed.nproc_per_node=2"], "every rank of distributed.nproc_per_node=2"),
])
def test_evaluation_engine_vllm_is_checked_at_composition(overrides, message, tmp_path):
    engine = [] if any(o.startswith("evaluation.engine") for o in overrides) else ["evaluation.engine=vllm"]
    with pytest.raises(ConfigError, match=message):
        checked_train(compose_train([*engine, *overrides], tmp_path))


@pytest.mark.parametrize("adapter", VLLM_METHODS)
def test_evaluation_engine_vllm_accepts_what_vllm_runs(adapter, tmp_path):
    typed = checked_train(compose_train(["evaluation.engine=vllm", f"adapter={adapter}"], tmp_path))
    assert typed.evaluation.engine == "vllm" and typed.adapter.method == adapter
