"""Tests for pipeline.quantization on CPU with a tiny 4-bit Llama."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import bitsandbytes as bnb  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from pipeline.quantization import (  # noqa: E402
    bnb_config,
    dequantized_state_dict,
    guard_cpu_4bit,
    linear4bit_modules,
)

NUM_LAYERS = 2
# q, k, v, o, gate, up, down per decoder layer; transformers leaves lm_head dense.
LINEARS_PER_LAYER = 7
# The 4-bit and reference paths both dequantise then matmul in fp32, so only
# summation-order noise separates them; the AVX512 bug gives O(1) relative errors.
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-5}


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4-bit models only come out of from_pretrained, so the base goes to disk first.
    folder = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 16), generator=gen)


def _load_4bit(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=bnb_config(4, quant_type="nf4", double_quant=True, compute_dtype="float32"),
        dtype=torch.float32,
        attn_implementation="eager",
    )


def _add_lora(model: torch.nn.Module) -> torch.nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    # PEFT zero-initialises B, which would leave A without gradient; use
    # seeded non-zero values for both so each gets a real gradient.
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def _lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _eval_forward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    # What an evaluation loop or generate() does between training steps.
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)


def _lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _quantized_lora(folder: Path, lora: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = _add_lora(_load_4bit(folder))
    model.load_state_dict(lora, strict=False)
    return model


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.fixture(scope="module")
def reference(base_dir: Path, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """LoRA weights and their gradients on an fp32 twin of the 4-bit model.

    The twin's linear weights are the dequantised 4-bit weights, so the only
    thing that can make the 4-bit gradients differ is the 4-bit code path.
    """
    quantized = _load_4bit(base_dir)
    # Before PEFT wraps it, so the names match the plain Llama's.
    dense = dequantized_state_dict(quantized)
    assert len(dense) == NUM_LAYERS * LINEARS_PER_LAYER
    lora = _lora_state(_add_lora(quantized))

    ref = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    result = ref.load_state_dict(dense, strict=False)
    assert not result.unexpected_keys
    ref = _add_lora(ref)
    result = ref.load_state_dict(lora, strict=False)
    assert not result.unexpected_keys
    return lora, _lora_grads(ref, batch)


def test_bnb_config_4bit_fields() -> None:
    cfg = bnb_config(4, quant_type="fp4", double_quant=False, compute_dtype="float16", quant_storage="bfloat16")
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "fp4"
    assert cfg.bnb_4bit_use_double_quant is False
    assert cfg.bnb_4bit_compute_dtype == torch.float16
    assert cfg.bnb_4bit_quant_storage == torch.bfloat16


def test_bnb_config_4bit_defaults() -> None:
    cfg = bnb_config(4)
    assert cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_use_double_quant is True
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16


def test_bnb_config_8bit() -> None:
    cfg = bnb_config(8)
    assert cfg.load_in_8bit and not cfg.load_in_4bit


@pytest.mark.parametrize("kwargs", [{"bits": 2}, {"bits": 4, "quant_type": "int4"}, {"bits": 4, "compute_dtype": "nope"}])
def test_bnb_config_rejects_bad_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        bnb_config(**kwargs)


def test_missing_bitsandbytes_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        bnb_config(4)


def test_guard_counts_linear4bit(base_dir: Path) -> None:
    model = _add_lora(_load_4bit(base_dir))
    assert not isinstance(model.get_base_model().lm_head, bnb.nn.Linear4bit)
    assert guard_cpu_4bit(model) == NUM_LAYERS * LINEARS_PER_LAYER
    assert all(m.support_avx512bf16_for_cpu is False for _, m in linear4bit_modules(model))


def test_guard_blocks_cpu_repack(base_dir: Path, batch: torch.Tensor) -> None:
    """Hardware-independent: pretend bitsandbytes detected AVX512-bf16, then guard."""
    model = _add_lora(_load_4bit(base_dir))
    for _, module in linear4bit_modules(model):
        module.support_avx512bf16_for_cpu = True
    guard_cpu_4bit(model)
    _eval_forward(model, batch)
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False) for _, m in linear4bit_modules(model)
    )


def test_guarded_grads_match_reference_after_eval(base_dir: Path, batch: torch.Tensor, reference) -> None:
    lora, ref_grads = reference
    model = _quantized_lora(base_dir, lora)
    guard_cpu_4bit(model)
    _eval_forward(model, batch)
    grads = _lora_grads(model, batch)
    assert grads.keys() == ref_grads.keys()
    assert len(grads) == NUM_LAYERS * 2 * 2  # (q, v) x (A, B) per layer
    assert all(g.abs().max() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **GRAD_TOL, msg=name)


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(),
    reason="CPU lacks AVX512-bf16, so bitsandbytes never takes the repacking path the guard prevents",
)
def test_unguarded_grads_are_wrong_after_eval(base_dir: Path, batch: torch.Tensor, reference) -> None:
    """Negative control: documents the trap that guard_cpu_4bit exists for."""
    lora, ref_grads = reference
    model = _quantized_lora(base_dir, lora)
    _eval_forward(model, batch)
    assert any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for _, m in linear4bit_modules(model))
    grads = _lora_grads(model, batch)
    assert _max_diff(grads, ref_grads) > 100 * GRAD_TOL["atol"]
