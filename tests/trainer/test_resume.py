"""Surviving kills: kill -9 and resume, preemption signals, corrupt checkpoints, best checkpoint."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.model import loading
from pipeline.runs import checkpoints
from pipeline.scoring.measurement import Evaluator
from pipeline.trainer import callbacks, fit, objective, preemption
from tests.conftest import ROOT, python_path, read_json, run_train

FAST = ["model=tiny_llama", "debug=fast", "evaluation=perplexity", "trainer.logging_steps=1"]


def cli(overrides, run_dir: Path, **kwargs) -> subprocess.Popen:
    # Each command gets its own W&B service, as separate shells would: an in-process W&B run
    # of this test session leaves WANDB_SERVICE set, and the killed run's stream would stay
    # registered in that shared service.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(PYTHONPATH=python_path(), WANDB_SILENT="true")
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def history(run_dir: Path) -> list:
    path = run_dir / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the signal: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run to reach the step")
        time.sleep(0.05)


def train_steps(rows: list) -> list:
    return [r["step"] for r in rows if "train/loss" in r]


def test_kill_9_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    overrides = [*FAST, "trainer.max_steps=6", "trainer.save_steps=1", "trainer.eval_steps=3",
                 "logger=wandb", "logger.wandb.project=tests"]
    reference = tmp_path / "reference"
    run_train(overrides, reference)

    run_dir = tmp_path / "killed"
    kill_after = random.randint(2, 4)  # the step reached varies from run to run
    proc = cli(overrides, run_dir)
    wait_for(lambda: max(train_steps(history(run_dir)), default=0) >= kill_after
             and checkpoints.last_checkpoint(run_dir / "checkpoints") is not None, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    first = read_json(run_dir / "run.json")
    assert first["status"] == "running" and not (run_dir / "metrics.json").exists()
    resumed_from = checkpoints.last_checkpoint(run_dir / "checkpoints")
    assert resumed_from is not None

    again = cli([*overrides, "resume=auto"], run_dir)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]

    info, metrics = read_json(run_dir / "run.json"), read_json(run_dir / "metrics.json")
    expected = read_json(reference / "metrics.json")
    assert info["status"] == "success" and info["attempts"] == 2
    assert metrics["train/steps"] == 6
    assert metrics["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-4)
    assert metrics["tuned/eval/loss"] == pytest.approx(expected["tuned/eval/loss"], rel=1e-4)
    assert metrics["tuned/test/loss"] == pytest.approx(expected["tuned/test/loss"], rel=1e-4)
    rows = history(run_dir)
    assert train_steps(rows) == [1, 2, 3, 4, 5, 6]  # no step logged twice across the kill
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    reference_losses = {r["step"]: r["train/loss"] for r in history(reference) if "train/loss" in r}
    assert losses == pytest.approx(reference_losses, rel=1e-4)
    # One W&B run, resumed: every offline run folder carries the id recorded in run.json.
    assert info["wandb_id"] == first["wandb_id"]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{info['wandb_id']}") for p in offline)


def test_sigterm_saves_marks_interrupted_exits_143_and_resumes(tmp_path):
    # No periodic checkpoints: the one found afterwards is the signal's.
    overrides = [*FAST, "trainer.max_steps=10", "trainer.save_steps=null", "trainer.eval_steps=null"]
    run_dir = tmp_path / "run"
    proc = cli(overrides, run_dir)
    wait_for(lambda: len(train_steps(history(run_dir))) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)

    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM: preemption.exit_code's default
    assert "interrupted: SIGTERM received" in err and "Traceback" not in err
    info = read_json(run_dir / "run.json")
    assert info["status"] == "interrupted" and info["signal"] == "SIGTERM" and info["phase"] == "training"
    reached = max(train_steps(history(run_dir)))
    assert 1 <= reached < 10
    assert info["checkpoint"] == str(run_dir / "checkpoints" / f"checkpoint-{reached}")
    assert read_json(Path(info["checkpoint"]) / "trainer_state.json")["global_step"] == reached
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapter").exists()

    run_train([*overrides, "resume=auto"], run_dir)
    info, metrics = read_json(run_dir / "run.json"), read_json(run_dir / "metrics.json")
    assert info["status"] == "success" and info["attempts"] == 2 and metrics["train/steps"] == 10
    assert train_steps(history(run_dir)) == list(range(1, 11))


def test_sigusr1_under_slurm_requeues_the_job(tmp_path, monkeypatch):
    from transformers import TrainerCallback

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")

    class SignalAtStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:  # the second step is running
                os.kill(os.getpid(), signal.SIGUSR1)

    before = signal.getsignal(signal.SIGUSR1)  # a library imported earlier may have set one
    installed = callbacks.run_callbacks
    monkeypatch.setattr(callbacks, "run_callbacks", lambda settings, run: [*installed(settings, run), SignalAtStep2()])
    run_dir = tmp_path / "run"
    with pytest.raises(preemption.Preempted, match="SIGUSR1 received") as raised:
        run_train([*FAST, "trainer.max_steps=6", "trainer.save_steps=null", "trainer.eval_steps=null",
                   "preemption.exit_code=99"], run_dir)
    assert raised.value.exit_code == 99 and raised.value.step == 2
    info = read_json(run_dir / "run.json")
    assert info["status"] == "interrupted" and info["signal"] == "SIGUSR1" and info["exit_code"] == 99
    assert (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) is before  # restored after training


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    overrides = [*FAST, "trainer.max_steps=3", "trainer.save_steps=1", "trainer.eval_steps=null",
                 "trainer.save_total_limit=3"]
    run_dir = tmp_path / "run"
    run_train(overrides, run_dir)
    expected = read_json(run_dir / "metrics.json")
    # A kill while checkpoint-3 was being written: its weights are cut short.
    weights = run_dir / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "metrics.json").unlink()

    with caplog.at_level("WARNING"):
        run_train([*overrides, "resume=auto"], run_dir)
    assert f"Skipping checkpoint checkpoint-3: {weights} is unreadable" in caplog.text
    metrics = read_json(run_dir / "metrics.json")
    assert read_json(run_dir / "run.json")["status"] == "success"
    assert metrics["train/steps"] == 3
    assert metrics["tuned/test/loss"] == pytest.approx(expected["tuned/test/loss"], rel=1e-4)
    assert train_steps(history(run_dir)) == [1, 2, 3]


def test_rotation_keeps_the_best_checkpoint_by_the_objective(tmp_path):
    # maximize the eval loss: the best checkpoint is an early one, not the latest.
    run_dir = tmp_path / "run"
    run_train([*FAST, "trainer.max_steps=4", "trainer.save_steps=1", "trainer.eval_steps=1",
               "trainer.save_total_limit=2", "trainer.learning_rate=1e-2",
               "objective.metric=tuned/eval/loss", "objective.direction=maximize"], run_dir)
    info = read_json(run_dir / "run.json")
    state = read_json(run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json")
    evals = {r["step"]: r["eval_loss"] for r in state["log_history"] if "eval_runtime" in r}
    best_step = max(evals, key=evals.get)
    assert best_step != 4
    best = run_dir / "checkpoints" / f"checkpoint-{best_step}"
    assert info["best_checkpoint"] == str(best) and info["best_metric"] == pytest.approx(evals[best_step])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted([best.name, "checkpoint-4"])
    assert info["last_checkpoint"] == str(run_dir / "checkpoints" / "checkpoint-4")


def test_best_metric_maps_the_objective_onto_the_trainer():
    assert objective.best_metric("tuned/eval/loss", "minimize", ["loss"]) == ("eval_loss", False)
    assert objective.best_metric("tuned/eval/bleu", "maximize", ["loss", "bleu"]) == ("eval_bleu", True)
    assert objective.best_metric("tuned/test/loss", "minimize", ["loss"]) is None
    assert objective.best_metric("tuned/eval/loss", "minimize", []) is None  # no evaluation during training


def test_whole_run_loss_counts_the_steps_before_the_checkpoint():
    logged = [{"step": 1, "loss": 4.0}, {"step": 3, "loss": 2.0}]  # steps 1..3 sum to 8
    assert fit.whole_run_loss(1.0, logged, start=3, end=5) == pytest.approx((8 + 2 * 1.0) / 5)
    assert fit.whole_run_loss(1.5, [], start=0, end=5) == 1.5


@pytest.mark.parametrize("phase", ["loading", "base evaluation", "final evaluation", "saving"])
def test_a_signal_in_any_phase_marks_the_run_and_resume_auto_continues(phase, tmp_path, monkeypatch):
    # The run sends itself SIGTERM as it enters the phase (training itself: the tests above).
    def signal_then(original):
        def wrapper(*args, **kwargs):
            if phase != "base evaluation" and phase != "final evaluation" or \
                    args[-1] == {"base evaluation": "base", "final evaluation": "tuned"}[phase]:
                monkeypatch.undo()  # once: the resumed run goes through
                os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)
        return wrapper

    target = {"loading": (loading, "load_model"), "base evaluation": (Evaluator, "measure"),
              "final evaluation": (Evaluator, "measure"), "saving": (fit, "save_artifact")}[phase]
    monkeypatch.setattr(*target, signal_then(getattr(*target)))
    before = signal.getsignal(signal.SIGTERM)
    overrides = [*FAST, "trainer.max_steps=4", "trainer.save_steps=4", "trainer.eval_steps=null"]
    first, second = tmp_path / "runs" / "day" / "a", tmp_path / "runs" / "day" / "b"
    if phase == "saving":  # a signal while saving waits: the run completes, then the process goes on
        run_train(overrides, first)
        assert read_json(first / "run.json")["status"] == "success" and (first / "adapter").exists()
        assert signal.getsignal(signal.SIGTERM) is before
        return
    with pytest.raises(preemption.Preempted, match=f"SIGTERM received: stopped during {phase}") as raised:
        run_train(overrides, first)
    assert raised.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) is before
    info = read_json(first / "run.json")
    assert info["status"] == "interrupted" and info["phase"] == phase and info["signal"] == "SIGTERM"
    checkpoint = first / "checkpoints" / "checkpoint-4"
    assert info["checkpoint"] == (str(checkpoint) if phase == "final evaluation" else None)

    # The same command again, as a requeued job would run it, lands in a new folder and continues
    # the interrupted one: from its checkpoint (after training), or from the start.
    run_train([*overrides, "resume=auto"], second)
    info, metrics = read_json(first / "run.json"), read_json(first / "metrics.json")
    assert not second.exists() and info["status"] == "success" and info["attempts"] == 2
    assert info["phase"] == "done" and metrics["train/steps"] == 4
    assert train_steps(history(first)) == [1, 2, 3, 4]
