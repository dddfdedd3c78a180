"""What a command prints: its own log and every warning about the user's config and data, not
the notices libraries print about themselves that say nothing about this run.

Each entry point calls :func:`install` before the stages import torch, transformers, peft,
bitsandbytes or DeepSpeed (all imported lazily): bitsandbytes and DeepSpeed log their notices
while being imported, transformers prints its W&B line then. A notice is matched by its library's
logger or module and the start of its text, never by level or category alone, so that a warning
about the run's own settings or data still shows. ``hydra.verbose=true`` (the Hydra commands) and
``--verbose`` (the argparse ones) show them all again.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from typing import Dict, Optional, Tuple, Type, Union

# Notices logged through Python's logging: the library's logger -> how the message begins (or
# a tuple of beginnings).
LOGGED_NOTICES: Dict[str, Union[str, Tuple[str, ...]]] = {
    # peft imports bitsandbytes whenever it is installed, so every run and every server does,
    # and on a CPU with AVX512-bf16 bitsandbytes then asks the Hub's kernels-community for a
    # faster 4-bit matmul. It logs the refusal (an unverified publisher, or no network) with
    # advice to `pip install kernels`, and uses its own kernel, which only QLoRA on a CPU calls.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    # accelerate imports DeepSpeed whenever it is installed (every Trainer, DeepSpeed used or
    # not), and DeepSpeed warns that it found no CUDA device. The device a run uses is in its
    # own start-up log (the precision line); DeepSpeed still detects what it would.
    "DeepSpeed": "Setting accelerator to CPU",
    # The Trainer rotates checkpoints by modification time; for checkpoints written within one
    # second (a short run) it calls the filesystem's mtime unreliable and orders them by step,
    # the order they were written in.
    "transformers.trainer_utils": "mtime may not be reliable",
    # rouge_score logs at INFO, through absl, that it uses its default tokenizer, once per scorer.
    "absl": "Using default tokenizer",
    # lm-eval warns, twice per model benchmarked, that it was handed a model object rather than a
    # hub name (its own loading options then do not apply) in one process: exactly how
    # pipeline.scoring.benchmarks measures the model in memory.
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
}
# absl gives its logger a class of its own when it creates it; asking for that logger before
# absl is imported would create a plain one in its place. Its records reach the root logger's
# handlers (Hydra's console and log file), which filter them instead.
_LOGGERS_LEFT_TO_THEIR_LIBRARY = ("absl",)

# Notices sent through ``warnings.warn``: (category, how the message begins, the module warning).
WARNED_NOTICES: Tuple[Tuple[Type[Warning], str, str], ...] = (
    # PEFT's PeftModel reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps
    # a model (every adapter trained, evaluated or served); nothing in the run's config calls it.
    (FutureWarning, "`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
    # PEFT advises converting a PiSSA/OLoRA adapter for the original base when the adapter as
    # initialised is saved; that save is the first step of exactly this conversion
    # (pipeline.adapters.lora.save_converted), which every such run does.
    (UserWarning, "PiSSA changes the base weights", r"peft\.peft_model"),
    (UserWarning, "OLoRA changes the base weights", r"peft\.peft_model"),
    # PEFT suggests building an EVA adapter's LoRA matrices on the meta device, to leave EVA's
    # forward passes the memory they take; next to the base those matrices are small.
    (UserWarning, "lora with eva initialization used with low_cpu_mem_usage=False", r"peft\.mapping_func"),
)

# datasets' own switch for its progress bars ("Generating train split", "Map"), read when it is
# imported: a run logs its progress itself (pipeline.runs.progress). A value the user set wins.
PROGRESS_BAR_SWITCHES: Dict[str, str] = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}

# The user's own WANDB_MODE, before a command sets it (see _declare_wandb).
_USERS_WANDB_MODE: Optional[str] = os.environ.get("WANDB_MODE")
_showing_everything = False


class LibraryNotices(logging.Filter):
    """Drops the records of :data:`LOGGED_NOTICES`; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        start = LOGGED_NOTICES.get(record.name)
        return start is None or not record.getMessage().startswith(start)


_FILTER = LibraryNotices()


def install(verbose: bool = False, logs_to_wandb: bool = False) -> None:
    """Keeps the libraries' notices about themselves off the terminal and the log for this
    process (unless ``verbose``), and makes ``WANDB_MODE`` say whether the command logs to W&B.

    Called by each entry point before its stages import the libraries; calling it again (the
    jobs of a multirun, after Hydra set up their logging) is harmless.

    Args:
        verbose: show everything (``hydra.verbose=true``, ``--verbose``): notices and progress bars.
        logs_to_wandb: whether this command logs to W&B (``logger=wandb`` in a mode other than
            ``disabled``); no other command does.
    """
    global _showing_everything
    _showing_everything = verbose
    _declare_wandb(logs_to_wandb)
    if verbose:
        return
    for name, value in PROGRESS_BAR_SWITCHES.items():
        os.environ.setdefault(name, value)
    for category, start, module in WARNED_NOTICES:
        warnings.filterwarnings("ignore", message=start, category=category, module=module)
    for name in LOGGED_NOTICES:
        if name not in _LOGGERS_LEFT_TO_THEIR_LIBRARY:
            logging.getLogger(name).addFilter(_FILTER)  # on the logger: DeepSpeed's has its own handler
    for handler in logging.getLogger().handlers:
        handler.addFilter(_FILTER)


def add_verbose_switch(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` for the commands that take plain arguments (Hydra's own switch is
    ``hydra.verbose=true``): pass ``args.verbose`` to :func:`install`."""
    parser.add_argument("--verbose", action="store_true",
                        help="also show the libraries' own notices and progress bars")


def showing_everything() -> bool:
    """Whether the user asked to see the libraries' notices and progress bars too."""
    return _showing_everything


def _declare_wandb(logs_to_wandb: bool) -> None:
    """Sets W&B's own switch, ``WANDB_MODE``, to what this command does with W&B.

    transformers prints "Running in WANDB offline mode" when its W&B integration is imported
    (with the Trainer) under ``WANDB_MODE=offline``, whether or not anything logs to W&B. A
    command that does not log sets ``WANDB_MODE=disabled``, so nothing says W&B is offline while
    it is off; one that logs gets the user's own setting back (a multirun's jobs share this
    process). Our ``wandb.init`` passes its mode explicitly, which wins over the environment.
    """
    if not logs_to_wandb:
        os.environ["WANDB_MODE"] = "disabled"
    elif _USERS_WANDB_MODE is None:
        os.environ.pop("WANDB_MODE", None)
    else:
        os.environ["WANDB_MODE"] = _USERS_WANDB_MODE
