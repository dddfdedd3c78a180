"""Slow tier: the real default model (SmolLM2-135M-Instruct from the packaged GGUF) for a few
steps, through the same entry point as `python -m pipeline.train`."""

from __future__ import annotations

import pytest

from tests.conftest import read_json, run_train

pytestmark = pytest.mark.slow


def test_default_model_trains_a_few_steps_and_improves_eval_loss(tmp_path):
    run_dir = tmp_path / "run"
    run_train(["trainer.max_steps=6", "trainer.save_steps=null", "data.validation_size=16",
               "data.test_size=8", "trainer.per_device_train_batch_size=4", "logger=none"], run_dir)
    metrics = read_json(run_dir / "metrics.json")
    assert read_json(run_dir / "run.json")["status"] == "success"
    # SmolLM2-135M: 30 layers, LoRA r=16 on q_proj (576->576) and v_proj (576->192).
    assert metrics["params/trainable"] == 30 * (16 * (576 + 576) + 16 * (576 + 192)) == 921_600
    assert 134_000_000 < metrics["params/total"] < 136_000_000
    assert metrics["tuned/eval/loss"] < metrics["base/eval/loss"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_default_model_qlora_trains(tmp_path):
    run_dir = tmp_path / "run"
    run_train(["adapter=qlora", "trainer.max_steps=2",
               "trainer.save_steps=null", "data.validation_size=8", "data.test_size=8",
               "trainer.per_device_train_batch_size=2", "logger=none"], run_dir)
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["params/trainable"] == 921_600 and metrics["train/steps"] == 2
    assert metrics["base/eval/loss"] < 10  # a real pretrained model, not random weights


def test_the_estimate_reads_a_gguf_config_without_converting_its_weights(tmp_path):
    """``pipeline.estimate`` needs the architecture only: from a fresh cache it reads the GGUF
    file's metadata (seconds) instead of converting the weights (half a minute), and counts the
    same parameters as from the converted folder."""
    from pipeline.commands.compose import compose_train
    from pipeline.trainer import memory

    fresh = compose_train([f"paths.cache_dir={tmp_path}"])
    counts = memory.count_for_config(fresh)
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing converted
    assert [p.name for p in (tmp_path / "models").iterdir()] == [p.name for p in (tmp_path / "models").glob("*-config")]
    assert counts.trainable == 921_600 and counts.total == memory.count_for_config(compose_train([])).total
