"""Tests for pipeline.model.quantization on CPU with a tiny 4-bit Llama."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# bitsandbytes and peft are hard dependencies: a broken install fails these tests, never skips them.
import bitsandbytes as bnb
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline import evaluate
from pipeline.adapters.saved import read_run
from pipeline.config.options import load_option
from pipeline.config.schema import QuantizationSettings
from pipeline.model import loading
from pipeline.model.quantization import bnb_config, dequantized_state_dict, guard_cpu_4bit, linear4bit_modules
from pipeline.server.pool import ModelPool, source_from_path
from tests.adapter_factory import make_lora, make_run

NUM_LAYERS = 2
# q, k, v, o, gate, up, down per decoder layer; transformers leaves lm_head dense.
LINEARS_PER_LAYER = 7
# The 4-bit and reference paths both dequantise then matmul in fp32, so only
# summation-order noise separates them; the AVX512 bug gives missing or O(1)-wrong gradients.
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-5}
# Attention projections and the MLP output: after the bitsandbytes repack the first lose their
# gradient entirely, the second keep one that is wrong (see the negative control).
TARGETS = ["q_proj", "v_proj", "down_proj"]


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


def _load_4bit(folder: Path, device: str = "cpu") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=bnb_config(4, quant_type="nf4", double_quant=True, compute_dtype="float32"),
        dtype=torch.float32,
        attn_implementation="eager",
        **({"device_map": {"": device}} if device != "cpu" else {}),
    )


def _add_lora(model: torch.nn.Module) -> torch.nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
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


def _eval_forward(model: torch.nn.Module, ids: torch.Tensor, kind: str = "forward") -> None:
    # What an evaluation loop (forward) or generation does between training steps. generate()
    # decodes one token at a time, where bitsandbytes takes its gemv_4bit kernel.
    model.eval()
    with torch.no_grad():
        if kind == "generate":
            model.generate(input_ids=ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]),
                           max_new_tokens=3, do_sample=False, pad_token_id=0)
        else:
            model(input_ids=ids)


def _lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Every LoRA parameter's gradient after one training step; None where none arrived."""
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters() if "lora_" in n}


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
    grads = _lora_grads(ref, batch)
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())
    return lora, grads


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


@pytest.mark.parametrize("kind", ["forward", "generate"])
@pytest.mark.parametrize("rows", [1, 2])
def test_guarded_grads_match_reference_after_eval(base_dir: Path, batch: torch.Tensor, reference,
                                                 kind: str, rows: int) -> None:
    lora, ref_grads = reference
    model = _quantized_lora(base_dir, lora)
    guard_cpu_4bit(model)
    _eval_forward(model, batch[:rows], kind)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for _, m in linear4bit_modules(model))
    grads = _lora_grads(model, batch)
    assert grads.keys() == ref_grads.keys()
    assert len(grads) == NUM_LAYERS * len(TARGETS) * 2  # A and B per target per layer
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **GRAD_TOL, msg=name)


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(),
    reason="CPU lacks AVX512-bf16, so bitsandbytes never takes the repacking path the guard prevents",
)
def test_unguarded_grads_are_missing_or_wrong_after_eval(base_dir: Path, batch: torch.Tensor, reference) -> None:
    """Negative control: what happens without guard_cpu_4bit on an AVX512-bf16 CPU.

    The eval forward repacks every 4-bit weight; from then on training calls gemv_4bit, which
    has no backward, so no gradient flows back through a frozen 4-bit weight. LoRA on the
    attention projections (whose output only reaches the loss through o_proj) gets no gradient
    at all; LoRA on the first layer's down_proj still gets one through the residual stream, but
    without the later layers' share, so it is wrong.
    """
    lora, ref_grads = reference
    model = _quantized_lora(base_dir, lora)
    _eval_forward(model, batch)
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for _, m in linear4bit_modules(model))
    grads = _lora_grads(model, batch)
    missing = sorted(n for n, g in grads.items() if g is None)
    assert missing == sorted(n for n in grads if "q_proj" in n or "v_proj" in n)
    first_down = [n for n in grads if "layers.0.mlp.down_proj" in n]
    assert len(first_down) == 2
    for name in first_down:
        error = (grads[name] - ref_grads[name]).abs().max() / ref_grads[name].abs().max()
        assert error > 0.2, f"{name}: relative error {error:.3g}, expected the gradient to be wrong"


# ----------------------------------------------------------------- every 4-bit load is guarded
# These force bitsandbytes' AVX512-bf16 detection on, so they check the guard on any CPU.

QUANTIZATION = QuantizationSettings(bits=4, quant_type="nf4", double_quant=True, compute_dtype="float32")


@pytest.fixture
def avx512bf16_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Linear4bit built from now on believes the CPU has AVX512-bf16."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    probe = bnb.nn.Linear4bit(8, 8)
    assert probe.support_avx512bf16_for_cpu is True  # the forcing works


@pytest.fixture
def loaded_models(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every model that ``pipeline.model.loading.load_model`` returns while the test runs."""
    seen: list = []
    real = loading.load_model

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(loading, "load_model", spy)
    return seen


def _assert_guarded_after_eval(model: torch.nn.Module, ids: torch.Tensor) -> None:
    modules = linear4bit_modules(model)
    assert modules, "expected a 4-bit model"
    assert all(m.support_avx512bf16_for_cpu is False for _, m in modules)
    for kind in ("forward", "generate"):
        _eval_forward(model, ids[:1], kind)  # one row: the gemv_4bit decode path
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for _, m in modules)


def test_load_model_guards_every_4bit_load(base_dir: Path, batch: torch.Tensor, avx512bf16_forced, reference) -> None:
    """What train() does: load through pipeline.model.loading, evaluate, then train on the same weights."""
    model_cfg = load_option("model", "tiny_llama", dtype="float32", attn_implementation="eager")
    model = loading.load_model(str(base_dir), model_cfg, QUANTIZATION)
    _assert_guarded_after_eval(model, batch)
    lora, ref_grads = reference
    tuned = _add_lora(model)
    tuned.load_state_dict(lora, strict=False)
    grads = _lora_grads(tuned, batch)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **GRAD_TOL, msg=name)


@pytest.fixture
def qlora_run(tiny_folder: str, tmp_path: Path) -> Path:
    return make_run(tmp_path / "qrun", make_lora(tiny_folder, tmp_path / "lora", seed=1), ["adapter=qlora"])


def test_evaluate_loads_a_qlora_run_guarded(qlora_run: Path, batch: torch.Tensor, avx512bf16_forced,
                                            loaded_models: list, tiny_folder: str) -> None:
    saved = read_run(str(qlora_run))
    assert saved.settings.quantization().bits == 4
    tuned, base = evaluate._models(tiny_folder, saved)
    assert base is None and len(loaded_models) == 1
    _assert_guarded_after_eval(tuned, batch)


def test_server_loads_a_qlora_run_guarded(qlora_run: Path, batch: torch.Tensor, avx512bf16_forced,
                                          loaded_models: list) -> None:
    import os

    base_cfg = load_option("model", "tiny_llama")
    source = source_from_path("tuned", str(qlora_run), base_cfg, "run")
    pool = ModelPool(base_cfg, "base", [source], os.environ.get("PIPELINE_CACHE_DIR", "~/.cache/pipeline"), 42)
    assert any(linear4bit_modules(m) for m in loaded_models)
    _assert_guarded_after_eval(pool.choices["tuned"].model, batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_qlora_grads_match_a_dequantised_reference(base_dir: Path, batch: torch.Tensor) -> None:
    """QLoRA on CUDA, bitsandbytes' own kernels: one step's LoRA gradients equal those of a float
    twin whose linear weights are the dequantised 4-bit ones, after an evaluation forward and a
    generation too (the CPU's failure mode, checked where the real users are)."""
    quantized = _load_4bit(base_dir, "cuda")
    dense = dequantized_state_dict(quantized)
    assert len(dense) == NUM_LAYERS * LINEARS_PER_LAYER
    model = _add_lora(quantized)
    lora = _lora_state(model)
    ref = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").to("cuda")
    assert not ref.load_state_dict({k: v.to("cuda") for k, v in dense.items()}, strict=False).unexpected_keys
    ref = _add_lora(ref)
    assert not ref.load_state_dict(lora, strict=False).unexpected_keys
    ids = batch.to("cuda")
    ref_grads = _lora_grads(ref, ids)
    assert len(ref_grads) == NUM_LAYERS * len(TARGETS) * 2
    for kind in ("forward", "generate"):
        _eval_forward(model, ids, kind)
        grads = _lora_grads(model, ids)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            assert grad is not None and grad.abs().max() > 0, name
            # cuBLAS may pick TF32-free kernels that still sum in another order than the twin's.
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-5, msg=f"{kind}: {name}")
