"""What the training covers is stated at start-up: the steps, the share of one epoch they are, the
override for one full epoch, and, once a few steps have run, that epoch's time on this machine."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from pipeline.config.schema import TrainerConfig
from pipeline.trainer import callbacks
from pipeline.trainer.startup import coverage


def test_a_default_step_budget_on_a_large_file_says_how_little_of_it_trains():
    plan = coverage(TrainerConfig(max_steps=20), examples=8000, global_batch=8)
    assert (plan.steps, plan.steps_per_epoch, plan.epoch_share) == (20, 1000, 0.02)
    assert plan.describe() == (
        "training: 20 steps x 8 examples = 160 examples, 0.02 epoch(s) of the 8,000 training examples "
        "(2% of one epoch; one full epoch: trainer.max_steps=1000 or trainer.max_steps=-1 trainer.num_train_epochs=1)")


def test_epochs_count_partial_batches_and_need_no_hint():
    plan = coverage(TrainerConfig(max_steps=-1, num_train_epochs=2), examples=10, global_batch=4)
    assert (plan.steps, plan.steps_per_epoch, plan.epoch_share) == (6, 3, 2.0)
    assert "one full epoch" not in plan.describe()


def test_the_epoch_time_is_logged_once_from_the_measured_steps(caplog, monkeypatch):
    now = {"s": 0.0}
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: now["s"])
    callback = callbacks.epoch_time_callback(steps_per_epoch=1000, steps=20, after=3)
    with caplog.at_level(logging.INFO, logger=callbacks.log.name):
        for step in range(1, 8):
            now["s"] = 5.0 + step  # one second a step after a first step with its warm-up
            callback.on_step_end(None, SimpleNamespace(global_step=step, is_world_process_zero=True), None)
    lines = [r.getMessage() for r in caplog.records if "one epoch" in r.getMessage()]
    assert lines == ["one epoch (1000 steps) would take about 16 min 40 s on this machine (1.00 s per step with "
                     "its evaluations and checkpoints, measured over 3 steps); this run: 20 steps"]
