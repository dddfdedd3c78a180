"""LoRA initialisations as config (``adapter.init``): each trains; PiSSA and OLoRA, which move the
base weights, save an adapter converted for the original base, so that evaluating the saved
adapter over the untouched base reproduces the tuned model and the base is the original one;
the combinations PEFT cannot serve are refused with both keys; a multirun over init x rsLoRA
reports one row per configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.commands.compose import compose_train as compose_checked
from pipeline.comparison import collect, writer
from pipeline.config.errors import ConfigError
from tests.conftest import ROOT, python_path, read_json, run_train

FAST = ["model=tiny_llama", "debug=fast", "evaluation=perplexity"]


@pytest.mark.parametrize("init, extra", [("gaussian", []), ("pissa", ["adapter.use_rslora=true"]),
                                         ("pissa", ["adapter.pissa_niter=4"]), ("olora", [])])
def test_each_init_trains_and_its_saved_adapter_is_the_tuned_model_over_the_original_base(init, extra, tmp_path):
    run_dir = tmp_path / "run"
    run_train([*FAST, f"adapter.init={init}", *extra], run_dir)
    trained = read_json(run_dir / "metrics.json")
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    moves_base = init != "gaussian"
    # PiSSA/OLoRA: converted (the initial adapter folded in: twice the rank), loadable without
    # decomposing the base again; the folder it was converted against is gone.
    assert config["r"] == (32 if moves_base else 16)
    assert config["init_lora_weights"] is True if moves_base else config["init_lora_weights"] == "gaussian"
    assert not (run_dir / "initial_adapter").exists()
    again = subprocess.run([sys.executable, "-m", "pipeline.evaluate", f"run={run_dir}",
                            f"hydra.run.dir={tmp_path / 'ev'}"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": python_path()}, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    evaluated = read_json(tmp_path / "ev" / "metrics.json")
    for split in ("eval", "test"):
        # the saved adapter over the original base is the model that was measured as tuned ...
        assert evaluated[f"tuned/{split}/loss"] == pytest.approx(trained[f"tuned/{split}/loss"], rel=1e-4)
        # ... and the base measured before training was the original base, not the residual
        assert evaluated[f"base/{split}/loss"] == pytest.approx(trained[f"base/{split}/loss"], rel=1e-4)
    assert trained["tuned/eval/loss"] < trained["base/eval/loss"]


@pytest.mark.parametrize("overrides, message", [
    (["adapter=dora", "adapter.init=pissa"], "adapter.init=pissa with adapter=dora: DoRA's magnitude"),
    (["adapter=qlora", "adapter.init=olora"], "adapter.init=olora with adapter=qlora: it decomposes the base weights"),
    (["adapter.pissa_niter=4"], "adapter.pissa_niter=4 applies to adapter.init=pissa only (adapter.init=default)"),
    (["adapter.init=pissa", "distributed=zero3", "distributed.nproc_per_node=2"],
     "adapter.init=pissa under ZeRO-3"),
    (["adapter.init=loftq"], "Invalid value 'loftq', expected one of [default, gaussian, pissa, olora]"),
])
def test_combinations_peft_cannot_serve_are_refused_naming_both_keys(overrides, message):
    with pytest.raises(Exception) as err:
        compose_checked(overrides)
    assert message in str(err.value) + str(err.value.__cause__)
    if isinstance(err.value, ConfigError):
        assert len(err.value.problems) == 1, err.value.problems


def test_dora_and_qlora_take_the_inits_that_leave_the_base_alone():
    assert compose_checked(["adapter=dora", "adapter.init=gaussian"]).adapter.init_lora_weights() == "gaussian"
    assert compose_checked(["adapter=qlora", "adapter.init=gaussian"]).adapter.init_lora_weights() == "gaussian"
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
