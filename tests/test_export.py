"""Export: merged LoRA equals the adapter model; refusals (4-bit base, bottleneck); vLLM command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from pipeline import export
from pipeline.adapters.merging import MergeError
from pipeline.commands.compose import typed_config
from pipeline.config.app_schema import ExportConfig
from pipeline.model import loading
from tests.adapter_factory import make_bottleneck, make_lora, make_run
from tests.conftest import CONF, ROOT


def compose_export(overrides, run_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("export", overrides=[f"paths.run_dir={run_dir}", f"paths.root_dir={ROOT}",
                                            *overrides])


@pytest.fixture(scope="module")
def lora_run(tiny_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    return make_run(root / "run", make_lora(tiny_folder, root / "lora", seed=1), [])


def test_merged_model_has_the_adapter_models_logits(lora_run, tiny_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export.export(compose_export([f"run={lora_run}", "export.merge=true",
                                   f"export.output={tmp_path / 'merged'}"], tmp_path))
    assert {"model.safetensors", "config.json", "tokenizer.json", "vllm_command.sh",
            "export.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    assert not (out / "adapter_config.json").exists()

    ids = AutoTokenizer.from_pretrained(out)("The cat sat on the mat", return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_folder),
                                      lora_run / "adapter").eval()
    with torch.no_grad():
        merged_logits, tuned_logits = merged(**ids).logits, tuned(**ids).logits
        with tuned.disable_adapter():
            base_logits = tuned(**ids).logits
    assert torch.allclose(merged_logits, tuned_logits, atol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the adapter does change the model
    assert json.loads((out / "export.json").read_text())["merged"] is True


def test_adapter_export_writes_the_exact_vllm_command(lora_run, tiny_folder, tmp_path, capsys):
    out = export.export(compose_export([f"run={lora_run}", f"export.output={tmp_path / 'vllm'}",
                                   "export.lora_name=fr"], tmp_path))
    command = (out / "vllm_command.sh").read_text().strip()
    assert command == (f"vllm serve {tiny_folder} --dtype float32 --enable-lora --max-loras 2 "
                       f"--max-lora-rank 8 --lora-modules fr={(out / 'adapter').resolve()}")
    assert command in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(Exception, match="export.overwrite=true"):
        export.export(compose_export([f"run={lora_run}", f"export.output={out}"], tmp_path))


def test_merge_into_a_4bit_base_is_refused_without_dequantize(lora_run, tmp_path):
    run = make_run(tmp_path / "qrun", lora_run / "adapter", ["adapter=qlora"])
    with pytest.raises(MergeError, match=r"4-bit.*export.dequantize=true"):
        export.export(compose_export([f"run={run}", "export.merge=true"], tmp_path))
    assert not (run / "export").exists()


def test_dequantized_merge_equals_the_adapter_on_the_4bit_base(lora_run, tmp_path):
    from peft import PeftModel

    run = make_run(tmp_path / "qrun", lora_run / "adapter", ["adapter=qlora"])
    out = export.export(compose_export([f"run={run}", "export.merge=true", "export.dequantize=true"], tmp_path))
    assert out == run / "export" / "merged"
    source = export.read_source(typed_config(compose_export([f"run={run}"], tmp_path)))
    folder = loading.resolve_folder(source.model_cfg, source_cache(), source.seed)
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 20, 300, 4000, 5]])
    # The reference: the 4-bit model computing in float32, as the merged model does. load_model
    # keeps bitsandbytes off its AVX512-bf16 kernel (guard_cpu_4bit), and compute_dtype=auto
    # would pick bfloat16 on such a CPU; either would put bf16 rounding (~4e-3 here) into the
    # reference, not into the merge.
    fp32 = dataclasses.replace(source.quantization, compute_dtype="float32")
    quantized = PeftModel.from_pretrained(loading.load_model(folder, source.model_cfg, fp32),
                                          run / "adapter").eval()
    with torch.no_grad():
        expected = quantized(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), run / "adapter")(
            input_ids=ids).logits
    # Both are float32 over the same dequantised weights; only the order of summation differs
    # ((W + sBA)x against Wx + sB(Ax)): measured 4e-7 on logits of magnitude 0.7.
    assert torch.allclose(merged, expected, atol=1e-5)
    assert (merged - plain).abs().max() > 1e-3  # the 4-bit weights, not the float originals


def source_cache() -> str:
    import os

    return os.environ.get("PIPELINE_CACHE_DIR", "~/.cache/pipeline")


def test_bottleneck_merge_is_refused_with_its_reason(tiny_folder, tmp_path):
    run = make_run(tmp_path / "brun", make_bottleneck(tiny_folder, tmp_path / "bn", seed=2),
                   ["adapter=bottleneck"])
    with pytest.raises(MergeError, match="non-linear"):
        export.export(compose_export([f"run={run}", "export.merge=true"], tmp_path))
    with pytest.raises(export.ExportError, match="LoRA adapters only"):
        export.export(compose_export([f"run={run}"], tmp_path))
    assert not (run / "export").exists()


def test_the_export_dtype_is_a_checked_choice(tmp_path):
    from hydra.errors import ConfigCompositionException

    typed = typed_config(compose_export(["model=tiny_llama", "export.dtype=bfloat16"], tmp_path))
    assert isinstance(typed, ExportConfig) and typed.export.dtype == "bfloat16"
    with pytest.raises(ConfigCompositionException) as err:
        compose_export(["model=tiny_llama", "export.dtype=float64"], tmp_path)
    assert "Invalid value 'float64', expected one of [float32, bfloat16, float16]" in str(err.value.__cause__)
