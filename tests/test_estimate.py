"""The memory estimate before launch, checked against DeepSpeed's own estimator."""

from __future__ import annotations

import re

import pytest

from pipeline import estimate as E
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
    counts = E.ParameterCounts(total=TOTAL, trainable=TOTAL, quantized=0, largest_layer=LARGEST)
    ours = E.estimate(counts, stage=stage, processes=PER_NODE * NODES, mixed_precision=True, deepspeed=True,
                      offload_optimizer=offload, offload_params=offload)
    theirs = _deepspeed_rows(capsys, stage)[options]
    assert ours.total / E.GB == pytest.approx(theirs, abs=0.006)  # DeepSpeed prints 2 decimals


def test_sharding_and_adapters_shrink_the_estimate():
    full = E.ParameterCounts(total=1000, trainable=1000, quantized=0, largest_layer=100)
    zero = {s: E.estimate(full, stage=s, processes=4, mixed_precision=True, deepspeed=True) for s in (1, 2, 3)}
    assert zero[1].optimizer == 12 * 1000 / 4 and zero[1].gradients == 6 * 1000
    assert zero[2].gradients == 6 * 1000 / 4 and zero[2].weights == 2 * 1000
    assert zero[3].weights == 2 * 1000 / 4 and zero[3].gathered_layer == 400
    ddp = E.estimate(full, stage=0, processes=4, mixed_precision=True, deepspeed=False, weight_bytes=4)
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4000, 4000, 8000)
    qlora = E.ParameterCounts(total=1000, trainable=10, quantized=800, largest_layer=100)
    q = E.estimate(qlora, stage=0, processes=1, mixed_precision=True, deepspeed=True)
    assert q.weights == 200 * 2 + 800 * 0.5 and q.optimizer == 10 * 12


def test_counts_from_the_config_match_the_loaded_model(tmp_path, tiny_folder):
    from pipeline import model as models

    cfg = compose_train(["model=tiny_llama", "debug=fast", "adapter=lora"], tmp_path)
    counts = E.count_for_config(cfg)
    loaded = models.load_model(tiny_folder, cfg.model)
    from omegaconf import OmegaConf

    adapted = OmegaConf.to_object(cfg.adapter).apply(loaded, models.describe(tiny_folder, cfg.model))
    assert (counts.trainable, counts.total) == models.parameter_counts(adapted)
    qcfg = compose_train(["model=tiny_llama", "debug=fast", "adapter=qlora"], tmp_path)
    qcounts = E.count_for_config(qcfg)
    assert qcounts.trainable == counts.trainable and qcounts.quantized > 0
    text = E.describe(qcfg, qcounts)
    assert "adapter=qlora" in text and "total per device" in text
