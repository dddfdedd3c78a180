"""trainer.precision=auto and QLoRA's compute_dtype=auto, on either kind of CPU.

The detectors are forced both ways, so every branch runs on any machine; one test checks the
real detector against the CPU's own flags.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from pipeline.adapters.registry import ADAPTERS
from pipeline.model import precision
from pipeline.scoring import measurement
from pipeline.trainer import build
from tests.conftest import compose_train, read_json, run_train

FAST = ["model=tiny_llama", "debug=fast", "logger=none"]


@pytest.fixture
def cpu_kind(monkeypatch: pytest.MonkeyPatch):
    """Pretend to be a CPU machine with (True) or without (False) native bf16."""

    def force(native: bool) -> None:
        monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda: None)
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)

    return force


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_cpu(cpu_kind, native, expected) -> None:
    cpu_kind(native)
    choice = precision.resolve("auto")
    assert (choice.requested, choice.precision) == ("auto", expected)
    assert ("AVX512-bf16" in choice.reason) and (("native" in choice.reason) == native)
    assert precision.compute_dtype("auto") == {"bf16": "bfloat16", "fp32": "float32"}[expected]
    lora = ADAPTERS["qlora"]()
    assert lora.quantization().compute_dtype == precision.compute_dtype("auto")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda(monkeypatch: pytest.MonkeyPatch, native, expected) -> None:
    import torch

    monkeypatch.setattr(precision, "cuda_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    choice = precision.resolve("auto")
    assert choice.precision == expected and "CUDA device Fake GPU" in choice.reason


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept(cpu_kind, requested) -> None:
    for native in (True, False):
        cpu_kind(native)
        assert precision.resolve(requested).precision == requested
    assert precision.compute_dtype("float16") == "float16"


def test_the_detector_reads_the_cpu_flags() -> None:
    """On Linux x86 the real detector agrees with /proc/cpuinfo (AVX512-bf16 or AMX)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "flags" not in cpuinfo.read_text():
        pytest.skip("no x86 /proc/cpuinfo flags here")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    assert precision.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_auto_is_the_default_and_a_bad_value_is_refused(tmp_path) -> None:
    cfg = compose_train(FAST, tmp_path)
    assert cfg.trainer.precision == "auto"
    with pytest.raises(ConfigCompositionException) as err:
        compose_train([*FAST, "trainer.precision=fp8"], tmp_path)
    assert "Invalid value 'fp8', expected one of [auto, fp32, bf16, fp16]" in str(err.value.__cause__)


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_a_run_records_and_trains_in_the_choice(cpu_kind, monkeypatch, tmp_path, native, expected) -> None:
    cpu_kind(native)
    seen, losses = [], []
    real, real_loss = build.training_arguments, measurement.evaluate_loss

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    def loss_spy(*args):
        losses.append(args[-1])  # bf16: whether the losses ran under bf16 autocast
        return real_loss(*args)

    monkeypatch.setattr(build, "training_arguments", spy)
    monkeypatch.setattr(measurement, "evaluate_loss", loss_spy)
    run_train([*FAST, "trainer.max_steps=2", f"paths.base_cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    info = read_json(tmp_path / "run" / "run.json")
    record = info["precision"]
    assert record["requested"] == "auto" and record["resolved"] == expected and record["reason"]
    assert seen and all(args.bf16 == (expected == "bf16") and not args.fp16 for args in seen)
    # Losses (base and tuned alike) follow evaluation.loss_precision=auto: bf16 where native.
    assert info["loss_precision"]["resolved"] == expected and info["loss_precision"]["reason"]
    assert len(losses) == 4 and set(losses) == {expected == "bf16"}  # eval and test, base and tuned


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_loss_precision_can_be_set_either_way(cpu_kind, requested) -> None:
    for native in (True, False):
        cpu_kind(native)
        choice = precision.resolve_loss(requested)
        assert choice.precision == requested and "was set" in choice.reason
    with pytest.raises(ValueError, match="evaluation.loss_precision='fp16'"):
        precision.resolve_loss("fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_bf16_training_on_cuda(tmp_path) -> None:
    """A bf16 run on the GPU: it trains there (the loss falls, the model states and the peak are
    measured on CUDA) and records bf16."""
    run_train([*FAST, "trainer.precision=bf16", "trainer.max_steps=8", "trainer.learning_rate=1e-2",
               f"paths.base_cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    info, metrics = read_json(tmp_path / "run" / "run.json"), read_json(tmp_path / "run" / "metrics.json")
    assert info["precision"]["resolved"] == "bf16"
    assert metrics["tuned/eval/loss"] < metrics["base/eval/loss"]
    assert 0 < metrics["perf/model_state_cuda_mb"] < metrics["perf/peak_cuda_mb"]
