"""End to end on the tiny model: one run per method, run-folder contents, reload, resume, failures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.adapters.registry import ADAPTERS
from pipeline.adapters.saved import load_adapter
from pipeline.config.errors import ConfigError
from pipeline.trainer import tracking
from tests.conftest import ROOT, read_json, run_train

FAST = ["model=tiny_llama", "debug=fast"]
METHODS = sorted(ADAPTERS)  # every registered method


def base_model(run_dir: Path):
    from transformers import AutoModelForCausalLM

    config = read_json(run_dir / "adapter" / "adapter_config.json")
    return AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_saves_and_reloads(method, tmp_path):
    run_dir = tmp_path / "run"
    objective = run_train([*FAST, f"adapter={method}"], run_dir)

    info, metrics = read_json(run_dir / "run.json"), read_json(run_dir / "metrics.json")
    assert info["status"] == "success" and info["seed"] == 42
    assert info["overrides"][-3:] == [*FAST, f"adapter={method}"]
    assert info["packages"]["transformers"] and "sha" in info["git"] and "dirty" in info["git"]
    assert "method: " + method in (run_dir / "config.yaml").read_text()
    assert objective == metrics["tuned/eval/loss"] == info["objective"]["tuned/eval/loss"]
    for key in ("base/eval/loss", "base/test/loss", "delta/test/loss", "params/trainable",
                "params/total", "perf/peak_rss_mb"):
        assert key in metrics, key
    # The leakage check's counts: in run.json in full, in metrics.json per held-out set.
    assert metrics["data/test_in_train"] == info["data_overlap"]["test"]["normalized"]
    assert info["data_overlap"]["test"]["examples"] == 8 and info["data_overlap"]["validation"]["examples"] == 8
    assert metrics["params/total"] > 3_000_000

    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    if method == "none":  # evaluation only: nothing trains, nothing is saved
        assert metrics["params/trainable"] == 0 and "train/steps" not in metrics
        assert not any("train/loss" in row for row in history) and info["base_measurement"] == "measured"
        assert not (run_dir / "adapter").exists() and not (run_dir / "model").exists()
        return
    assert metrics["train/steps"] == 4 and metrics["perf/train_tokens_per_s"] > 0
    assert any("train/loss" in row for row in history) and history[0]["step"] == 0
    assert any("eval/loss" in row and row["step"] == 2 for row in history)

    if method == "full":
        from transformers import AutoModelForCausalLM

        assert (run_dir / "model" / "model.safetensors").exists()
        assert AutoModelForCausalLM.from_pretrained(run_dir / "model").num_parameters() > 3_000_000
        return

    files = {p.name for p in (run_dir / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # no pickles
    base = base_model(run_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = load_adapter(base, run_dir / "adapter").eval()
        assert not torch.allclose(tuned(ids).logits, base_logits)  # the adapter was trained
        with tuned.disable_adapter():
            torch.testing.assert_close(tuned(ids).logits, base_logits)


def test_evaluations_during_training_do_not_change_what_is_trained(tmp_path):
    """Each evaluation's data loader draws a seed from the global RNG; unless evaluation leaves the
    RNG as it found it, every later dropout mask shifts, and a sweep trial (which evaluates every
    few steps so its pruner can act) trains another model than the same config run alone."""
    from safetensors.torch import load_file

    common = [*FAST, "adapter.lora_dropout=0.3", "trainer.max_steps=6", "trainer.save_steps=null"]
    run_train([*common, "trainer.eval_steps=1"], tmp_path / "evaluated")
    run_train([*common, "trainer.eval_steps=null"], tmp_path / "alone")

    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
        return [row["train/loss"] for row in rows if "train/loss" in row]

    assert len(losses(tmp_path / "evaluated")) == 6
    assert losses(tmp_path / "evaluated") == losses(tmp_path / "alone")
    evaluated = load_file(tmp_path / "evaluated" / "adapter" / "adapter_model.safetensors")
    alone = load_file(tmp_path / "alone" / "adapter" / "adapter_model.safetensors")
    for name, weight in alone.items():
        assert torch.equal(evaluated[name], weight), name


def test_resume_auto_continues_the_unfinished_run(tmp_path):
    overrides = [*FAST, "trainer.save_steps=2", "trainer.eval_steps=null"]
    first = tmp_path / "runs" / "2026-01-01" / "10-00-00_lora"
    run_train(overrides, first)
    # Make it look killed after step 3: the step-4 checkpoint and final outputs never happened.
    shutil.rmtree(first / "checkpoints" / "checkpoint-4")
    shutil.rmtree(first / "adapter")
    (first / "metrics.json").unlink()
    info = read_json(first / "run.json")
    info["status"] = "interrupted"
    (first / "run.json").write_text(json.dumps(info))

    second = tmp_path / "runs" / "2026-01-01" / "10-05-00_lora"
    second.mkdir(parents=True)
    run_train([*overrides, "resume=auto"], second)

    assert not second.exists()  # the new folder was folded into the resumed one
    info, metrics = read_json(first / "run.json"), read_json(first / "metrics.json")
    assert info["status"] == "success" and info["attempts"] == 2
    assert metrics["train/steps"] == 4 and (first / "adapter" / "adapter_model.safetensors").exists()
    base = read_json(first / "eval" / "base.json")["metrics"]
    assert metrics["base/eval/loss"] == base["eval/loss"]  # measured once, before the kill
    state = read_json(first / "checkpoints" / "checkpoint-4" / "trainer_state.json")
    assert state["global_step"] == 4


def test_resume_auto_starts_fresh_when_nothing_to_resume(tmp_path):
    run_dir = tmp_path / "runs" / "d" / "t"
    run_train([*FAST, "resume=auto"], run_dir)
    assert read_json(run_dir / "run.json")["attempts"] == 1


def test_non_finite_loss_stops_and_marks_failed(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(Exception, match=r"training loss is (nan|inf) at step \d+; lower trainer.learning_rate"):
        run_train([*FAST, "adapter=full", "trainer.learning_rate=1e30", "trainer.max_grad_norm=0",
                   "trainer.warmup_ratio=0"], run_dir)
    info = read_json(run_dir / "run.json")
    assert info["status"] == "failed" and "NonFiniteLossError" in info["error"]
    assert not (run_dir / "metrics.json").exists()


def test_non_finite_loss_skip_policy_drops_the_steps_and_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    run_train([*FAST, "adapter=full", "trainer.learning_rate=1e30", "trainer.max_grad_norm=0",
               "trainer.warmup_ratio=0", "trainer.nan_policy=skip", "evaluation=perplexity",
               "objective.metric=train/steps"], run_dir)
    metrics = read_json(run_dir / "metrics.json")
    assert read_json(run_dir / "run.json")["status"] == "success"
    assert metrics["train/steps"] == 4 and 1 <= metrics["train/skipped_steps"] <= 3


def test_validation_error_marks_run_failed(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError):
        run_train([*FAST, "adapter.r=0"], run_dir)
    info = read_json(run_dir / "run.json")
    assert info["status"] == "failed" and "adapter.r=0 must be > 0" in info["error"]


def test_cli_debug_fast_runs_and_bad_data_exits_nonzero(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "pipeline.train", *FAST, "logger=none",
                         f"hydra.run.dir={tmp_path / 'ok'}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert read_json(tmp_path / "ok" / "run.json")["status"] == "success"
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    bad = subprocess.run([sys.executable, "-m", "pipeline.train", *FAST, "data=my_jsonl",
                          f"data.path={bad_file}", f"hydra.run.dir={tmp_path / 'bad'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0
    assert f"{bad_file}:2: not valid JSON" in bad.stderr
    assert read_json(tmp_path / "bad" / "run.json")["status"] == "failed"


def test_wandb_offline_run_is_recorded_in_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_train([*FAST, "logger=wandb", "logger.wandb.project=tests", "tags=[smoke]"], run_dir)
    info, metrics = read_json(run_dir / "run.json"), read_json(run_dir / "metrics.json")
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{info['wandb_id']}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    out = subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(offline[0])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"wandb leet inspect --summary failed: {out.stderr[-500:]}"
    inspected = json.loads(out.stdout)
    assert inspected["project"] == "tests" and inspected["name"] == run_dir.name
    assert {"lora", "django_en_fr", "tiny_llama", "smoke"} <= set(inspected["tags"])
    summary = inspected["summary"]
    assert summary["tuned/eval/loss"] == pytest.approx(metrics["tuned/eval/loss"])
    assert summary["params/trainable"] == metrics["params/trainable"]


@pytest.mark.slow
def test_debug_overfit_memorises_a_handful_of_examples(tmp_path):
    run_train(["model=tiny_llama", "adapter=full", "debug=overfit"], tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert losses[0] > 9 and losses[-1] < 1.5  # from chance level (ln 49152 = 10.8) to memorised


def test_peak_memory_is_per_run_inside_one_process():
    big = torch.ones(400 * 2**20 // 4)  # 400 MB touched
    before = tracking.peak_memory_mb()["perf/peak_rss_mb"]
    del big
    if not tracking.reset_peak_memory():
        pytest.skip("this kernel does not allow resetting the peak RSS (/proc/self/clear_refs)")
    after = tracking.peak_memory_mb()["perf/peak_rss_mb"]
    assert after < before - 300, (before, after)


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    # Three identical runs aimed at one folder name, as a SLURM job array started in one second
    # is: each claims a folder of its own and keeps its own results.
    base = tmp_path / "runs" / "12-00-00_lora"
    cmd = [sys.executable, "-m", "pipeline.train", *FAST, "logger=none", f"paths.output_dir={tmp_path}",
           f"hydra.run.dir=${{unique_dir:{base}}}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors[0][-2000:]
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["12-00-00_lora", "12-00-00_lora_2", "12-00-00_lora_3"]
    for name in folders:
        info = read_json(tmp_path / "runs" / name / "run.json")
        assert info["status"] == "success" and (tmp_path / "runs" / name / "metrics.json").exists()
        assert (tmp_path / "runs" / name / "adapter" / "adapter_model.safetensors").exists()
