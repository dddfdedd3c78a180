"""Tests for the bottleneck adapter PEFT tuner on tiny, randomly initialised models (CPU)."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from pipeline.adapters.bottleneck import layout, settings as bottleneck_settings, tuner

HIDDEN, LAYERS, R = 32, 2, 4


def make_base(kind: str, seed: int = 0) -> torch.nn.Module:
    """Build a tiny model with deterministic weights, so two calls give identical bases."""
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=128,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return LlamaForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=128, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def wrap(kind: str, **cfg) -> tuple[torch.nn.Module, PeftModel]:
    base = make_base(kind)
    return base, get_peft_model(base, tuner.BottleneckConfig(r=R, **cfg))


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every adapter weight a non-zero value, so the adapter actually changes the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if tuner.PREFIX in name:
                p.normal_(0.0, 0.5)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randint(0, 128, (2, 8))


@pytest.mark.parametrize(
    ("kind", "placement", "suffixes"),
    [
        ("llama", "houlsby", ("self_attn.o_proj", "mlp.down_proj")),
        ("llama", "pfeiffer", ("mlp.down_proj",)),
        ("gpt2", "houlsby", ("attn.c_proj", "mlp.c_proj")),
        ("gpt2", "pfeiffer", ("mlp.c_proj",)),
    ],
)
def test_trainable_parameters(kind: str, placement: str, suffixes: tuple[str, ...]) -> None:
    _, model = wrap(kind, placement=placement)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    per_position = 2 * HIDDEN * R + R + HIDDEN

    assert sum(p.numel() for p in trainable.values()) == LAYERS * len(suffixes) * per_position
    assert model.get_nb_trainable_parameters()[0] == LAYERS * len(suffixes) * per_position
    wrapped = {n for n, m in model.named_modules() if isinstance(m, tuner.BottleneckLayer)}
    assert len(wrapped) == LAYERS * len(suffixes)
    assert all(n.endswith(suffixes) for n in wrapped)
    for name in trainable:
        assert any(f".bottleneck_{part}.default." in name for part in ("down", "up")), name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not any(tuner.PREFIX in n for n in frozen)


def test_identity_at_init_then_disable_adapter(ids: torch.Tensor) -> None:
    base = make_base("llama")
    expected = logits(base, ids)
    model = get_peft_model(base, tuner.BottleneckConfig(r=R))

    assert torch.equal(logits(model, ids), expected)  # zero up-projection
    perturb(model)
    assert not torch.allclose(logits(model, ids), expected)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), expected)
    assert not torch.allclose(logits(model, ids), expected)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_and_load_roundtrip(kind: str, ids: torch.Tensor, tmp_path) -> None:
    _, model = wrap(kind, non_linearity="gelu", scaling=0.5)
    perturb(model)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK"
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert isinstance(PeftConfig.from_pretrained(tmp_path), tuner.BottleneckConfig)

    loaded = PeftModel.from_pretrained(make_base(kind), tmp_path)
    assert isinstance(loaded.peft_config["default"], tuner.BottleneckConfig)
    assert torch.equal(logits(loaded, ids), expected)


def test_multiple_named_adapters(ids: torch.Tensor) -> None:
    base = make_base("llama")
    expected = logits(base, ids)
    model = get_peft_model(base, tuner.BottleneckConfig(r=R))
    model.add_adapter("other", tuner.BottleneckConfig(r=2, placement="pfeiffer"))
    perturb(model)
    out_default = logits(model, ids)

    model.set_adapter("other")
    assert not torch.allclose(logits(model, ids), out_default)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in n for n in trainable)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert torch.equal(logits(model, ids), out_default)
    assert torch.equal(logits(model.unload(), ids), expected)


def test_register_is_idempotent_and_survives_reload(tmp_path) -> None:
    tuner.register()
    tuner.register()
    assert PeftType("BOTTLENECK") is PeftType.BOTTLENECK is PeftType["BOTTLENECK"]
    assert list(PeftType).count("BOTTLENECK") == 1

    module = importlib.reload(tuner)
    module.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.BOTTLENECK] is module.BottleneckConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.BOTTLENECK] is module.BottleneckModel
    module.BottleneckConfig(r=R).save_pretrained(tmp_path)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), module.BottleneckConfig)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("placement", {"placement": "sideways"}), ("non_linearity", {"non_linearity": "swish"}), ("r", {"r": 0})],
)
def test_invalid_config_raises(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=rf"BottleneckConfig\.{field}=.*allowed values"):
        tuner.BottleneckConfig(**kwargs)


def test_merge_is_refused_but_unload_works(ids: torch.Tensor) -> None:
    base = make_base("gpt2")
    expected = logits(base, ids)
    model = get_peft_model(base, tuner.BottleneckConfig(r=R))
    perturb(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()

    restored = model.unload()
    assert not any(isinstance(m, tuner.BottleneckLayer) for m in restored.modules())
    assert torch.equal(logits(restored, ids), expected)


def test_unknown_model_type_needs_target_modules() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(model, tuner.BottleneckConfig(r=2))
    peft_model = get_peft_model(model, tuner.BottleneckConfig(r=2, target_modules=["0"]))
    assert peft_model.get_nb_trainable_parameters()[0] == 2 * 4 * 2 + 2 + 4


class _RepeatedBatch(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, length: int = 8) -> None:
        self.ids, self.length = ids, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.ids[i % len(self.ids)]
        return {"input_ids": row, "labels": row}


def test_trainer_reduces_loss_and_only_updates_adapter(ids: torch.Tensor, tmp_path) -> None:
    model = get_peft_model(make_base("llama"), tuner.BottleneckConfig(r=R, task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    initial = loss()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=_RepeatedBatch(ids)).train()

    assert loss() < initial
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(tuner.PREFIX in n for n in changed)  # the base model is untouched
    assert {n for n in before if ".bottleneck_up." in n} <= changed


def _imported(module) -> set:
    """The modules ``module`` imports, at its top level (``top``) and anywhere (``all``)."""
    tree = ast.parse(Path(module.__file__).read_text())
    names = lambda nodes: {n.module if isinstance(n, ast.ImportFrom) else a.name  # noqa: E731
                           for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))
                           for a in (n.names if isinstance(n, ast.Import) else [None])}
    full = {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    return {"top": names(tree.body), "all": names(ast.walk(tree)) | full}


def test_settings_and_tuner_agree_on_choices() -> None:
    """Both read one layout; the tuner imports nothing from the settings, and the settings import
    the tuner (torch, peft) only inside the methods that apply or load an adapter."""
    assert set(bottleneck_settings.NonLinearity.values()) == set(tuner.ACTIVATIONS) == set(layout.NON_LINEARITIES)
    assert bottleneck_settings.Placement.values() == tuner.PLACEMENTS == layout.PLACEMENTS
    assert tuner.BOTTLENECK_TARGETS is layout.BOTTLENECK_TARGETS
    assert not any("bottleneck.settings" in name for name in _imported(tuner)["all"])
    top = _imported(bottleneck_settings)["top"]
    assert not any(name.startswith(("torch", "peft", "transformers")) or "tuner" in name for name in top)
    assert "pipeline.adapters.bottleneck.tuner" in _imported(bottleneck_settings)["all"]
