"""What a command prints: its own log and what concerns the user's config and data, not the
notices libraries print about themselves (:mod:`pipeline.runs.quiet`); ``hydra.verbose=true`` and
``--verbose`` show those again.

The commands run as subprocesses: pytest captures warnings and logging itself, so only a real
process shows what a terminal would.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import pytest

from pipeline.runs import quiet
from tests.conftest import ROOT, python_path

FAST = ["model=tiny_llama", "debug=fast"]  # debug=fast also turns W&B off (logger=none)

# A line that reads like a warning, a failure, a W&B notice or a progress bar.
NOISY = re.compile(r"warn|fail|error|deprecat|pip install|offline|wandb|w&b|it/s\]|examples/s\]", re.IGNORECASE)
# Hydra's console format, which names the logger: ``[time][logger][LEVEL] - message``.
LOG_LINE = re.compile(r"^\[[\d\- :,]+\]\[(?P<logger>[\w.]+)\]\[[A-Z]+\] - ")
# The only lines that may read like that, each with its reason.
ALLOWED = {
    "our own log (settings, data and results of this run: warnings about them included)":
        re.compile(r"^\[[\d\- :,]+\]\[pipeline\.[\w.]+\]\[[A-Z]+\] - "),
    "the line that says where the results are": re.compile(r"^results: "),
}
# What the libraries print about themselves, as quiet drops it.
NOTICES = [*(start for starts in quiet.LOGGED_NOTICES.values()
             for start in (starts if isinstance(starts, tuple) else (starts,))),
           *(message.strip("`") for _, message, _ in quiet.WARNED_NOTICES),
           "Running in WANDB offline mode"]


def _environment(tmp_path: Path) -> Dict[str, str]:
    """A user's environment: W&B set to offline there (a cluster's usual setting), and none of
    the switches quiet sets, so that the run shows what it prints by default."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WANDB_SILENT", "PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", *quiet.PROGRESS_BAR_SWITCHES)}
    return {**env, "PYTHONPATH": python_path(), "WANDB_MODE": "offline",
            "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}  # nothing cached: datasets builds its splits


def _run(args: List[str], tmp_path: Path) -> str:
    """Runs ``python <args>`` and returns what it printed (stdout and stderr, bars' carriage
    returns as line ends)."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=_environment(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return (done.stdout + done.stderr).replace("\r", "\n")


def _train(tmp_path: Path, *extra: str) -> str:
    return _run(["-m", "pipeline.train", *FAST, f"paths.output_dir={tmp_path / 'outputs'}",
                 f"paths.data_cache_dir={tmp_path / 'data_cache'}", f"paths.base_cache_dir={tmp_path / 'base_cache'}",
                 *extra], tmp_path)


def _unexplained(output: str) -> List[str]:
    """The lines that read like a warning (or a bar) and match no allowed pattern. An indented
    line after an allowed one continues it (a table in our own log)."""
    found, allowed = [], False
    for line in output.splitlines():
        if allowed and line.startswith(" "):
            continue
        allowed = any(pattern.match(line) for pattern in ALLOWED.values())
        if NOISY.search(line) and not allowed:
            found.append(line)
    return found


def test_default_training_shows_only_its_own_lines(tmp_path):
    output = _train(tmp_path)
    assert _unexplained(output) == []
    loggers = {m["logger"] for m in map(LOG_LINE.match, output.splitlines()) if m}
    assert loggers and all(name.startswith("pipeline.") for name in loggers), loggers
    assert not re.search(r"wandb|w&b", output, re.IGNORECASE)  # W&B is off: nothing may say it is offline
    assert "results: " in output


def test_hydra_verbose_shows_the_library_notices_again(tmp_path):
    output = _train(tmp_path, "hydra.verbose=true")
    # Which notices a machine gets depends on it (bitsandbytes' only where the CPU has
    # AVX512-bf16, DeepSpeed's only without CUDA); PEFT's FutureWarning comes everywhere.
    assert any(notice in output for notice in NOTICES), output[-3000:]
    assert "Running in WANDB offline mode" not in output  # not noise but untrue: W&B is off


def test_data_preview_builds_its_splits_without_bars_unless_verbose(tmp_path):
    quiet_output = _run(["-m", "pipeline.data", "--examples", "1", "model=tiny_llama"], tmp_path / "quiet")
    verbose_output = _run(["-m", "pipeline.data", "--verbose", "--examples", "1", "model=tiny_llama"],
                          tmp_path / "verbose")
    assert "Generating train split" not in quiet_output and _unexplained(quiet_output) == []
    assert "Generating train split" in verbose_output


def test_the_other_argparse_commands_take_verbose(tmp_path):
    assert "total per device" in _run(["-m", "pipeline.estimate", "--verbose", "model=tiny_llama"], tmp_path)
    where = subprocess.run([sys.executable, "-m", "pipeline.vllm_engine", "--verbose", "where"], cwd=ROOT,
                           env=_environment(tmp_path), capture_output=True, text=True, timeout=120)
    assert "unrecognized arguments" not in where.stderr and where.returncode in (0, 1), where.stderr


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def installed(monkeypatch):
    """:func:`quiet.install` in this process, its environment and state put back afterwards."""
    for name in ("WANDB_MODE", *quiet.PROGRESS_BAR_SWITCHES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(quiet, "_showing_everything", False)
    with warnings.catch_warnings():
        yield quiet.install


def test_only_the_listed_notices_are_dropped(installed):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        installed(verbose=False, logs_to_wandb=False)
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("data.max_length=8 cuts 3 examples", UserWarning, "splits.py", 1,
                               module="pipeline.data.splits")
    assert [str(w.message) for w in caught] == ["data.max_length=8 cuts 3 examples"]

    name, notice = next(iter(quiet.LOGGED_NOTICES.items()))
    records = _Records()
    for logger in (logging.getLogger(name), logging.getLogger("pipeline.train")):
        logger.addHandler(records)
        try:
            logger.warning("%s: details", notice)
            logger.warning("a warning of its own")
        finally:
            logger.removeHandler(records)
    assert records.messages == ["a warning of its own", f"{notice}: details", "a warning of its own"]
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and not quiet.showing_everything()


def test_wandb_mode_says_whether_the_command_logs(installed, monkeypatch):
    monkeypatch.setattr(quiet, "_USERS_WANDB_MODE", "offline")
    installed(verbose=True, logs_to_wandb=False)
    assert os.environ["WANDB_MODE"] == "disabled" and quiet.showing_everything()
    installed(verbose=True, logs_to_wandb=True)  # the next job of a multirun logs: the user's setting again
    assert os.environ["WANDB_MODE"] == "offline"
    assert "HF_DATASETS_DISABLE_PROGRESS_BARS" not in os.environ  # verbose: the bars stay
