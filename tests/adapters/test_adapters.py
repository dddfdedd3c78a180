"""Table-driven adapter behaviour: method -> trainable parameter names and counts on tiny Llama
(hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads: q/o 64->64, k/v 64->32)."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.adapters.registry import ADAPTERS, AdapterSettings, register_adapter
from pipeline.config.options import load_option
from pipeline.model import loading

D, KV, FF, LAYERS = 64, 32, 128, 2


def lora(r, outs):  # A: D x r, B: r x out for each target
    return LAYERS * sum(D * r + r * out for out in outs)


# method, overrides, expected trainable count, regex every trainable name matches
TABLE = [
    ("lora", {}, lora(16, [D, KV]), r"\.(q_proj|v_proj)\.lora_[AB]\.default\.weight$"),
    ("lora", {"target_modules": "all-linear", "r": 4},
     LAYERS * (4 * (D + D) + 4 * (D + KV) * 2 + 4 * (D + D) + 2 * 4 * (D + FF) + 4 * (FF + D)),
     r"\.(q|k|v|o|gate|up|down)_proj\.lora_[AB]\.default\.weight$"),
    ("dora", {}, lora(16, [D, KV]) + LAYERS * (D + KV),
     r"\.(q_proj|v_proj)\.(lora_[AB]\.default\.weight|lora_magnitude_vector\.default\.weight)$"),
    ("qlora", {}, lora(16, [D, KV]), r"\.(q_proj|v_proj)\.lora_[AB]\.default\.weight$"),
    ("qlora", {"bits": 8}, lora(16, [D, KV]), r"\.(q_proj|v_proj)\.lora_[AB]\.default\.weight$"),
    ("ia3", {}, LAYERS * (KV + KV + FF), r"\.(k_proj|v_proj|down_proj)\.ia3_l\.default$"),
    ("bottleneck", {"r": 8}, LAYERS * 2 * (2 * D * 8 + 8 + D),
     r"\.(o_proj|down_proj)\.bottleneck_(down|up)\.default\.(weight|bias)$"),
    ("bottleneck", {"r": 8, "placement": "pfeiffer"}, LAYERS * (2 * D * 8 + 8 + D),
     r"\.down_proj\.bottleneck_(down|up)\.default\.(weight|bias)$"),
    ("full", {}, None, r".*"),
    ("none", {}, 0, r"^$"),
]


def test_the_table_covers_every_registered_method():
    assert {method for method, *_ in TABLE} == set(ADAPTERS)


@pytest.mark.parametrize("method,overrides,count,pattern", TABLE,
                         ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o, *_ in TABLE])
def test_trainable_parameters(method, overrides, count, pattern, tiny_folder):
    settings = ADAPTERS[method](**overrides)
    model_cfg = load_option("model", "tiny_llama")
    architecture = loading.describe(tiny_folder, model_cfg)
    assert settings.check(architecture) == []
    torch.manual_seed(0)
    model = settings.apply(loading.load_model(tiny_folder, model_cfg, settings.quantization()), architecture)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    total_base = sum(p.numel() for p in loading.load_model(tiny_folder, model_cfg).parameters())
    expected = total_base if count is None else count
    assert sum(trainable.values()) == expected
    assert all(re.search(pattern, n) for n in trainable), sorted(trainable)[:5]
    assert loading.parameter_counts(model)[0] == expected


def test_qlora_base_is_4bit_nf4(tiny_folder):
    import bitsandbytes as bnb

    settings = ADAPTERS["qlora"]()
    model_cfg = load_option("model", "tiny_llama")
    model = loading.load_model(tiny_folder, model_cfg, settings.quantization())
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == LAYERS * 7
    assert layers[0].weight.quant_type == "nf4" and layers[0].weight.quant_state.nested  # double quant
    # Unpacked parameter count equals the unquantized model's.
    assert loading.parameter_counts(model)[1] == loading.parameter_counts(loading.load_model(tiny_folder, model_cfg))[1]


def test_registry_refuses_duplicates_and_mismatched_names():
    from dataclasses import dataclass

    with pytest.raises(ValueError, match="already registered"):
        @register_adapter("lora")
        @dataclass
        class Other(AdapterSettings):
            method: str = "lora"

    with pytest.raises(ValueError, match="expected 'x'"):
        @register_adapter("x")
        @dataclass
        class Mismatch(AdapterSettings):
            method: str = "y"


def test_gradient_checkpointing_gives_the_same_gradients(tiny_folder):
    import dataclasses

    model_cfg = load_option("model", "tiny_llama")
    architecture = loading.describe(tiny_folder, model_cfg)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    grads = []
    for checkpointing in (False, True):
        cfg = dataclasses.replace(model_cfg, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = ADAPTERS["lora"](lora_dropout=0.0).apply(loading.load_model(tiny_folder, cfg), architecture)
        for name, param in model.named_parameters():  # non-zero B so gradients reach A too
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        model.train()
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
