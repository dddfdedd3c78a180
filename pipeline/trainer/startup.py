"""A run's start: the libraries seeded and quiet in logs, and the derived numbers computed once
and logged (nanoGPT's "tokens per iteration"): parameters trainable and total, examples per
split, the global batch and the tokens per step."""

from __future__ import annotations

import logging
from typing import Any, Dict

from pipeline.config.schema import TrainConfig
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
    return figures
