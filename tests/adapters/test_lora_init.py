"""LoRA initialisations as config (``adapter.init``): each trains; PiSSA and OLoRA, which move the
base weights, save an adapter converted for the original base, so that evaluating the saved
adapter over the untouched base reproduces the tuned model and the base is the original one; EVA,
fitted to training batches (its ranks found again on resuming), and LoftQ, fitted to the
quantization error of a 4-bit base (PEFT's CUDA-only step moved to the CPU here; as it is on a
GPU), need no conversion and reload alike; the combinations PEFT cannot serve are refused with
both keys; a multirun over init x rsLoRA reports one row per configuration."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.adapters.lora import MOVES_BASE
from pipeline.adapters.registry import check_architecture
from pipeline.commands.compose import compose_train as compose_checked
from pipeline.comparison import collect, writer
from pipeline.config.errors import ConfigError
from pipeline.model import loading
from pipeline.runs import resume
from tests.conftest import ROOT, python_path, read_json, run_train

FAST = ["model=tiny_llama", "debug=fast", "evaluation=perplexity"]


def _evaluated_again(run_dir: Path, out: Path) -> dict:
    """``python -m pipeline.evaluate run=<run_dir>``'s metrics: the saved adapter over the base as
    evaluate loads it (the original weights, 4-bit for QLoRA)."""
    again = subprocess.run([sys.executable, "-m", "pipeline.evaluate", f"run={run_dir}", f"hydra.run.dir={out}"],
                           cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": python_path()}, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    return read_json(out / "metrics.json")


def _assert_reloads_as_trained(trained: dict, evaluated: dict) -> None:
    for split in ("eval", "test"):
        # the saved adapter over the original base is the model that was measured as tuned ...
        assert evaluated[f"tuned/{split}/loss"] == pytest.approx(trained[f"tuned/{split}/loss"], rel=1e-4)
        # ... and the base measured before training was the original base, not the residual
        assert evaluated[f"base/{split}/loss"] == pytest.approx(trained[f"base/{split}/loss"], rel=1e-4)
    assert trained["tuned/eval/loss"] < trained["base/eval/loss"]


@pytest.mark.parametrize("init, extra", [
    ("gaussian", []), ("pissa", ["adapter.use_rslora=true"]), ("pissa", ["adapter.pissa_niter=4"]), ("olora", []),
    ("eva", []),
    # at 8 examples a batch EVA gives the first layer's projections more rank than the second's
    ("eva", ["adapter=dora", "trainer.per_device_train_batch_size=8"]),
    ("eva", ["adapter=qlora", "adapter.eva_tau=0.95"]),
])
def test_each_init_trains_and_its_saved_adapter_is_the_tuned_model_over_the_original_base(init, extra, tmp_path,
                                                                                          caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="pipeline.adapters.lora"):
        run_train([*FAST, f"adapter.init={init}", *extra], run_dir)
    trained = read_json(run_dir / "metrics.json")
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    converted = init in MOVES_BASE
    # PiSSA/OLoRA: converted (the initial adapter folded in: twice the rank), loadable without
    # decomposing the base again; the folder it was converted against is gone.
    assert config["r"] == (32 if converted else 16)
    assert config["init_lora_weights"] == (True if converted else init)
    assert not (run_dir / "initial_adapter").exists()
    if init == "eva":
        assert "adapter.init=eva: settled after" in caplog.text
        # EVA redistributes the rank budget (4 layers x r) where the batches say so; the ranks
        # travel with the adapter (its rank_pattern), so that it reloads
        ranks = {name: tensor.shape[0] for name, tensor in load_file(run_dir / "adapter" / "adapter_model.safetensors"
                                                                     ).items() if "lora_A" in name}
        assert len(ranks) == 4 and sum(ranks.values()) == 4 * 16
        redistributed = "trainer.per_device_train_batch_size=8" in extra
        assert (len(set(ranks.values())) > 1) == redistributed == bool(config["rank_pattern"])
    _assert_reloads_as_trained(trained, _evaluated_again(run_dir, tmp_path / "ev"))


def test_an_eva_run_resumed_from_a_checkpoint_finds_the_same_ranks_again(tmp_path):
    overrides = [*FAST, "adapter.init=eva", "trainer.per_device_train_batch_size=8", "trainer.max_steps=3",
                 "trainer.save_steps=1", "trainer.eval_steps=null", "trainer.save_total_limit=3"]
    run_dir = tmp_path / "run"
    run_train(overrides, run_dir)
    expected = read_json(run_dir / "metrics.json")
    pattern = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern  # ranks redistributed: a fresh default-rank adapter would not take the checkpoint
    # as if killed while writing step 3: resumed from step 2, EVA runs again before the weights load
    for done in (run_dir / "checkpoints" / "checkpoint-3", run_dir / "adapter"):
        shutil.rmtree(done)
    (run_dir / "metrics.json").unlink()
    assert Path(resume.checkpoint("auto", run_dir)).name == "checkpoint-2"  # what the Trainer loads
    run_train([*overrides, "resume=auto"], run_dir)
    resumed = read_json(run_dir / "metrics.json")
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["rank_pattern"] == pattern
    assert resumed["train/steps"] == 3
    assert resumed["tuned/test/loss"] == pytest.approx(expected["tuned/test/loss"], rel=1e-4)


@pytest.fixture
def loftq_on_the_cpu(monkeypatch):
    """PEFT's LoftQ with its one CUDA-only step (the 4-bit weight's error and its SVD) run on the
    CPU, and the device check told so: the rest (the weights read from the base's files, the
    matrices set, scaled, trained, saved, measured) is the pipeline's own and runs as it would."""
    import bitsandbytes as bnb
    import peft.import_utils
    from peft.utils import loftq_utils

    def residual_on_cpu(qweight, weight, num_bits, reduced_rank):
        error = weight.float() - bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state).float()
        factors = loftq_utils._low_rank_decomposition(error, reduced_rank=reduced_rank)
        return factors["R"], factors["L"]

    monkeypatch.setattr(loftq_utils, "_loftq_init_new", residual_on_cpu)
    monkeypatch.setattr(peft.import_utils, "is_xpu_available", lambda: True)


def test_loftq_matrices_remove_part_of_each_weights_quantization_error(loftq_on_the_cpu, tiny_folder):
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit

    cfg = compose_checked(["model=tiny_llama", "adapter=qlora", "adapter.init=loftq"])
    full = loading.load_model(tiny_folder, cfg.model).state_dict()
    model = cfg.adapter.apply(loading.load_model(tiny_folder, cfg.model, cfg.adapter.quantization()), None)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 4 and all(m.scaling["default"] == 2.0 for _, m in layers)  # lora_alpha 32 / r 16
    for name, layer in layers:
        weight = full[name.removeprefix("base_model.model.") + ".weight"].float()
        error = weight - bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        added = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        # what the layer adds is the rank-16 part of the error (unscaled it would be twice that,
        # and the error's norm would stay what it was)
        assert (error - added).norm() < 0.8 * error.norm()
        assert torch.linalg.matrix_rank(added) == 16


def test_loftq_trains_over_the_4bit_base_and_its_adapter_reloads_as_trained(loftq_on_the_cpu, tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="pipeline.adapters.lora"):
        run_train([*FAST, "adapter=qlora", "adapter.init=loftq", f"paths.base_cache_dir={tmp_path / 'cache'}"],
                  run_dir)
    assert "adapter.init=loftq: LoRA matrices fitted" in caplog.text
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    # no conversion: the base stays the 4-bit base evaluate loads again, the adapter a plain LoRA
    assert config["r"] == 16 and config["init_lora_weights"] is True
    # the base (measured with the fresh adapter disabled, as no cache held it) is the 4-bit base
    _assert_reloads_as_trained(read_json(run_dir / "metrics.json"), _evaluated_again(run_dir, tmp_path / "ev"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: PEFT's LoftQ computes there")
def test_loftq_on_cuda_reloads_as_trained(tmp_path):
    run_dir = tmp_path / "run"
    run_train([*FAST, "adapter=qlora", "adapter.init=loftq", f"paths.base_cache_dir={tmp_path / 'cache'}"], run_dir)
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] is True
    _assert_reloads_as_trained(read_json(run_dir / "metrics.json"), _evaluated_again(run_dir, tmp_path / "ev"))


@pytest.mark.parametrize("overrides, message", [
    (["adapter=dora", "adapter.init=pissa"], "adapter.init=pissa with adapter=dora: DoRA's magnitude"),
    (["adapter=qlora", "adapter.init=olora"], "adapter.init=olora with adapter=qlora: it decomposes the base weights"),
    (["adapter.pissa_niter=4"], "adapter.pissa_niter=4 applies to adapter.init=pissa only (adapter.init=default)"),
    (["adapter.init=pissa", "distributed=zero3", "distributed.nproc_per_node=2"],
     "adapter.init=pissa under ZeRO-3"),
    (["adapter.init=loftq"], "adapter.init=loftq with adapter=lora: LoftQ fits the adapter to the quantization error "
                             "of a 4-bit base; over a full-precision base PEFT replaces the base weights"),
    (["adapter=dora", "adapter.init=loftq"], "adapter.init=loftq with adapter=dora: LoftQ fits the adapter"),
    (["adapter.eva_rho=1.5"], "adapter.eva_rho=1.5 applies to adapter.init=eva only (adapter.init=default)"),
    (["adapter.init=gaussian", "adapter.eva_tau=0.9"], "adapter.eva_tau=0.9 applies to adapter.init=eva only"),
    (["adapter.init=eva", "adapter.eva_rho=0.5"], "adapter.eva_rho=0.5 must be >= 1"),
    (["adapter.init=eva", "distributed=zero3", "distributed.nproc_per_node=2"],
     "adapter.init=eva under ZeRO-3: EVA runs the model over training batches"),
    (["adapter.init=lofty"], "Invalid value 'lofty', expected one of [default, gaussian, pissa, olora, loftq, eva]"),
])
def test_combinations_peft_cannot_serve_are_refused_naming_both_keys(overrides, message):
    with pytest.raises(Exception) as err:
        compose_checked(overrides)
    assert message in str(err.value) + str(err.value.__cause__)
    if isinstance(err.value, ConfigError):
        assert len(err.value.problems) == 1, err.value.problems


def test_loftq_on_a_4bit_base_is_refused_where_peft_cannot_compute_it(tiny_folder):
    with pytest.raises(ConfigError) as err:
        compose_checked(["adapter=qlora", "adapter.init=loftq", "adapter.bits=8"])
    assert err.value.problems == ["adapter.init=loftq with adapter.bits=8: PEFT's LoftQ fits the adapter to 4-bit "
                                  "bases only; use adapter.bits=4"]
    # the device is asked of the machine that trains, once the base's config is read: a config
    # composed elsewhere (a sweep's driver, the memory estimate) passes
    cfg = compose_checked(["model=tiny_llama", "adapter=qlora", "adapter.init=loftq"])
    architecture = loading.describe(tiny_folder, cfg.model)
    if torch.cuda.is_available():
        check_architecture(cfg.adapter, architecture)
        return
    with pytest.raises(ConfigError) as err:
        check_architecture(cfg.adapter, architecture)
    assert err.value.problems == ["adapter.init=loftq with adapter=qlora needs a CUDA (or Intel XPU) device: PEFT "
                                  "0.21's LoftQ computes the quantization error there, and this machine has none; "
                                  "use adapter.init=default, gaussian or eva here"]


def test_eva_asking_for_more_components_than_the_inputs_have_is_refused_before_weights_load(tiny_folder):
    cfg = compose_checked(["model=tiny_llama", "adapter.init=eva", "adapter.r=48"])
    with pytest.raises(ConfigError) as err:
        check_architecture(cfg.adapter, loading.describe(tiny_folder, cfg.model))
    assert ("adapter.init=eva with adapter.r=48: EVA takes up to r * adapter.eva_rho = 96 principal components of "
            "each layer's inputs, more than their 64 features") in str(err.value)
    check_architecture(compose_checked(["model=tiny_llama", "adapter.init=eva", "adapter.r=48", "adapter.eva_rho=1"]
                                       ).adapter, loading.describe(tiny_folder, cfg.model))


def test_eva_without_a_batch_large_enough_for_its_svd_says_what_to_change(tiny_folder, tokenizer):
    from datasets import Dataset

    from pipeline.data.packing import collator

    cfg = compose_checked(["model=tiny_llama", "adapter.init=eva"])
    model = cfg.adapter.apply(loading.load_model(tiny_folder, cfg.model), None)
    # two labelled tokens an example, 4 examples a batch: 8 of the 32 (r * rho) EVA needs
    examples = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8, "labels": [[-100, -100, 3, 4]] * 8})
    with pytest.raises(ConfigError, match=r"adapter.init=eva: no training batch has the 32 labelled tokens .* raise "
                                          r"trainer.per_device_train_batch_size"):
        cfg.adapter.initialize_from_data(model, examples, collator(tokenizer, False), 4)


def test_eva_leaves_every_trainable_weight_in_fp32_on_a_bf16_base(tiny_folder, tokenizer):
    """A layer whose rank EVA changes is rebuilt by PEFT in the base's dtype: it goes back to fp32."""
    from datasets import Dataset

    from pipeline.data.packing import collator

    cfg = compose_checked(["model=tiny_llama", "model.dtype=bfloat16", "adapter.init=eva", "adapter.eva_tau=0.9"])
    model = cfg.adapter.apply(loading.load_model(tiny_folder, cfg.model), None)
    generator = torch.Generator().manual_seed(0)
    # few distinct tokens: the first layer's inputs span few directions, the next layer's more
    ids = [torch.randint(5, 12, (24,), generator=generator).tolist() for _ in range(32)]
    examples = Dataset.from_dict({"input_ids": ids, "labels": [[-100] * 8 + row[8:] for row in ids]})
    cfg.adapter.initialize_from_data(model, examples, collator(tokenizer, False), 8)
    ranks = {module.r["default"] for module in model.modules() if hasattr(module, "lora_A") and module.r}
    assert len(ranks) > 1  # EVA moved rank between layers, so some were rebuilt
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable


def test_dora_and_qlora_take_the_inits_that_leave_the_base_alone():
    assert compose_checked(["adapter=dora", "adapter.init=gaussian"]).adapter.init_lora_weights() == "gaussian"
    assert compose_checked(["adapter=qlora", "adapter.init=gaussian"]).adapter.init_lora_weights() == "gaussian"
    assert compose_checked(["adapter=dora", "adapter.init=eva"]).adapter.init_lora_weights() == "eva"
    assert compose_checked(["adapter=qlora", "adapter.init=eva"]).adapter.peft_config().eva_config.rho == 2.0
    assert compose_checked(["adapter.init=pissa", "adapter.pissa_niter=4"]).adapter.init_lora_weights() == "pissa_niter_4"


@pytest.mark.slow
def test_a_multirun_over_init_and_rslora_reports_one_row_per_configuration(tmp_path):
    sweep = tmp_path / "multirun"
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "-m", "adapter.init=default,pissa,olora",
                           "adapter.use_rslora=false,true", *FAST, f"hydra.sweep.dir={sweep}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": python_path()})
    assert done.returncode == 0, done.stderr[-3000:]
    result = writer.write_report(collect.runs_from_folder(sweep), sweep / "report")
    assert sorted(result["keys"]) == ["adapter.init", "adapter.use_rslora"]
    assert len(result["table"]) == 6 and all(row["runs"] == 1 for row in result["table"].values())
