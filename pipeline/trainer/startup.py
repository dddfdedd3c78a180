"""A run's start: the libraries seeded and quiet in logs, and the derived numbers computed once
and logged (nanoGPT's "tokens per iteration"): parameters trainable and total, examples per
split, the global batch, the tokens per step, and the share of one epoch the steps cover (a
default ``trainer.max_steps`` on a large file trains on a few percent of it)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict

from pipeline.config.schema import TrainConfig, TrainerConfig
from pipeline.data.splits import Splits
from pipeline.model.loading import parameter_counts, quiet_progress_bars
from pipeline.trainer.distributed import world_size

log = logging.getLogger("pipeline.train")


def prepare(seed: int) -> None:
    """Seeds Python, NumPy and torch (transformers' ``set_seed``) and turns off the libraries'
    own progress bars (the run logs its progress itself: :mod:`pipeline.runs.progress`)."""
    import transformers  # lazy: transformers loads torch

    quiet_progress_bars()
    transformers.set_seed(seed)


def summary(cfg: TrainConfig, model: Any, splits: Splits) -> Dict[str, Any]:
    """Logs the derived numbers once (nanoGPT's "tokens per iteration") and returns them."""
    trainable, total = parameter_counts(model)
    world = world_size()
    global_batch = cfg.trainer.per_device_train_batch_size * cfg.trainer.gradient_accumulation_steps * world
    train = splits.stats["train"]
    figures = {"params/trainable": trainable, "params/total": total,
               "params/trainable_pct": 100.0 * trainable / total, "data/train_examples": train["examples"],
               "data/validation_examples": splits.stats["validation"]["examples"],
               "data/test_examples": splits.stats["test"]["examples"],
               "data/validation_in_train": splits.stats["overlap"]["validation"]["normalized"],
               "data/test_in_train": splits.stats["overlap"]["test"]["normalized"],
               "train/global_batch_size": global_batch}
    log.info("data: %s | train %d examples (%d dropped as longer than %d tokens), eval %s, test %s",
             splits.stats["format"], train["examples"], train["dropped_too_long"], cfg.data.max_length,
             splits.stats["validation"]["examples"], splits.stats["test"]["examples"])
    log.info("params: %s trainable / %s total = %.4f%% (adapter=%s)",
             f"{trainable:,}", f"{total:,}", figures["params/trainable_pct"], cfg.adapter.method)
    log.info("batch: global %d (= %d per device x %d accumulation x %d processes), ~%.0f tokens per step",
             global_batch, cfg.trainer.per_device_train_batch_size, cfg.trainer.gradient_accumulation_steps,
             world, global_batch * train["tokens"] / max(train["examples"], 1))
    plan = coverage(cfg.trainer, train["examples"], global_batch)
    log.info("%s", plan.describe())
    figures.update({"train/planned_steps": plan.steps, "train/steps_per_epoch": plan.steps_per_epoch,
                    "train/epoch_share": plan.epoch_share})
    return figures


@dataclass
class Coverage:
    """How much of the training split the run trains on: the steps, and what one epoch takes."""

    steps: int
    steps_per_epoch: int
    examples: int  # in the training split
    global_batch: int
    by_steps: bool  # trainer.max_steps decides (else trainer.num_train_epochs)

    @property
    def epoch_share(self) -> float:
        """The epochs the steps cover: 0.02 is 2% of the training examples seen once."""
        return self.steps / self.steps_per_epoch

    def describe(self) -> str:
        seen = self.steps * self.global_batch
        text = (f"training: {self.steps} steps x {self.global_batch} examples = {seen:,} examples, "
                f"{self.epoch_share:.3g} epoch(s) of the {self.examples:,} training examples")
        if self.by_steps and self.epoch_share < 1:
            text += (f" ({100 * self.epoch_share:.2g}% of one epoch; one full epoch: "
                     f"trainer.max_steps={self.steps_per_epoch} or trainer.max_steps=-1 trainer.num_train_epochs=1)")
        return text


def coverage(trainer: TrainerConfig, examples: int, global_batch: int) -> Coverage:
    """The steps the Trainer will run and one epoch's steps (as the Trainer counts them: a
    last partial batch is a step). With packing, ``examples`` are the examples before packing,
    so the steps per epoch are an upper bound."""
    per_epoch = max(1, math.ceil(examples / global_batch))
    by_steps = trainer.max_steps > 0
    steps = trainer.max_steps if by_steps else max(1, math.ceil(trainer.num_train_epochs * per_epoch))
    return Coverage(steps, per_epoch, examples, global_batch, by_steps)
