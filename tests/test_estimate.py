"""The memory estimate before launch, checked against DeepSpeed's own estimator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline import estimate
from pipeline.commands.compose import typed_config
from pipeline.model import loading
from pipeline.trainer import memory
from tests.conftest import compose_train

# Llama-2-7B's size and its largest layer (an embedding), 2 nodes x 8 GPUs.
TOTAL, LARGEST, PER_NODE, NODES = 6_738_415_616, 131_072_000, 8, 2


def _deepspeed_rows(capsys, stage: int) -> dict:
    """DeepSpeed's printed per-GPU figures (GB), keyed by its options column."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    capsys.readouterr()
    if stage == 2:
        estimate_zero2_model_states_mem_needs_all_cold(TOTAL, num_gpus_per_node=PER_NODE, num_nodes=NODES)
    else:
        estimate_zero3_model_states_mem_needs_all_cold(TOTAL, LARGEST, num_gpus_per_node=PER_NODE,
                                                       num_nodes=NODES)
    rows = re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.+)$", capsys.readouterr().out, re.M)
    # The offload device prints as "cpu " or "OffloadDeviceEnum.cpu" depending on Python's version.
    return {options.replace("OffloadDeviceEnum.", "").replace(" ", ""): float(gpu) for _, gpu, options in rows}


@pytest.mark.parametrize("stage, offload, options", [
    (2, False, "offload_optimizer=none"),
    (2, True, "offload_optimizer=cpu"),
    (3, False, "offload_param=none,offload_optimizer=none,zero_init=1"),
    (3, True, "offload_param=cpu,offload_optimizer=cpu,zero_init=1"),
])
def test_full_finetuning_matches_deepspeeds_estimate(capsys, stage, offload, options):
    counts = memory.ParameterCounts(total=TOTAL, trainable=TOTAL, quantized=0, largest_layer=LARGEST)
    ours = memory.estimate(counts, stage=stage, processes=PER_NODE * NODES, mixed_precision=True, deepspeed=True,
                      offload_optimizer=offload, offload_params=offload)
    theirs = _deepspeed_rows(capsys, stage)[options]
    assert ours.total / memory.GB == pytest.approx(theirs, abs=0.006)  # DeepSpeed prints 2 decimals


def test_sharding_and_adapters_shrink_the_estimate():
    full = memory.ParameterCounts(total=1000, trainable=1000, quantized=0, largest_layer=100)
    zero = {s: memory.estimate(full, stage=s, processes=4, mixed_precision=True, deepspeed=True) for s in (1, 2, 3)}
    assert zero[1].optimizer == 12 * 1000 / 4 and zero[1].gradients == 6 * 1000
    assert zero[2].gradients == 6 * 1000 / 4 and zero[2].weights == 2 * 1000
    assert zero[3].weights == 2 * 1000 / 4 and zero[3].gathered_layer == 400
    ddp = memory.estimate(full, stage=0, processes=4, mixed_precision=True, deepspeed=False, weight_bytes=4)
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4000, 4000, 8000)
    qlora = memory.ParameterCounts(total=1000, trainable=10, quantized=800, largest_layer=100)
    q = memory.estimate(qlora, stage=0, processes=1, mixed_precision=True, deepspeed=True)
    assert q.weights == 200 * 2 + 800 * 0.5 and q.optimizer == 10 * 12


def test_counts_from_the_config_match_the_loaded_model(tmp_path, tiny_folder):
    cfg = typed_config(compose_train(["model=tiny_llama", "debug=fast", "adapter=lora"], tmp_path))
    counts = memory.count_for_config(cfg)
    loaded = loading.load_model(tiny_folder, cfg.model)
    adapted = cfg.adapter.apply(loaded, loading.describe(tiny_folder, cfg.model))
    assert (counts.trainable, counts.total) == loading.parameter_counts(adapted)
    qcfg = typed_config(compose_train(["model=tiny_llama", "debug=fast", "adapter=qlora"], tmp_path))
    qcounts = memory.count_for_config(qcfg)
    assert qcounts.trainable == counts.trainable and qcounts.quantized > 0
    text = memory.describe(qcfg, qcounts)
    assert "adapter=qlora" in text and "total per device" in text


@pytest.mark.parametrize("shape, parameters, tied", [
    ("synthetic_llama_1b", 1_235_814_400, True),   # Llama-3.2-1B
    ("synthetic_llama_3b", 3_212_749_824, True),   # Llama-3.2-3B
    ("synthetic_llama_8b", 8_030_261_248, False),  # Llama-3.1-8B
])
def test_synthetic_shapes_count_as_the_real_models_without_building_weights(tmp_path, shape, parameters, tied):
    """Real shapes with random weights: counted (and estimated) from their config alone, in
    seconds; only a run builds the weights."""
    cfg = typed_config(compose_train([f"model={shape}", "adapter=full"], tmp_path / "run"))
    counts = memory.count_for_config(cfg)
    assert counts.total == counts.trainable == parameters
    folder = Path(loading.config_folder(cfg.model, cfg.paths.cache_dir, cfg.data.seed))
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 128256 and config["tie_word_embeddings"] is tied
    assert not list(folder.glob("*.safetensors")) and (folder / "tokenizer.json").exists()
    # QLoRA's estimate at this shape: 4-bit linear layers, 16-bit embeddings (and head).
    qlora = estimate.predict([f"model={shape}", "adapter=qlora"])
    lora = estimate.predict([f"model={shape}", "adapter=lora"])
    assert qlora.gradients == lora.gradients and qlora.weights < 0.45 * lora.weights


def test_a_tiny_vocabulary_below_the_tokenizers_is_refused(tmp_path):
    cfg = typed_config(compose_train(["model=tiny_llama", "model.tiny.vocab_size=100"], tmp_path / "run"))
    with pytest.raises(loading.ModelError, match="model.tiny.vocab_size=100 is smaller than the tokenizer's"):
        loading.config_folder(cfg.model, cfg.paths.cache_dir, cfg.data.seed)


def test_the_cli_names_a_bad_override_without_a_traceback(capsys):
    assert estimate.main(["model=tiny_llama", "distributed.strategy=fsdp"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Error merging override distributed.strategy=fsdp\n")
    assert "Invalid value 'fsdp', expected one of [single, ddp, deepspeed]" in err and "Traceback" not in err
    assert estimate.main(["model=tiny_llama", "adapter.r=0"]) == 1
    assert "adapter.r=0 must be > 0" in capsys.readouterr().err
