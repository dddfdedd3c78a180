"""Checkpoints: which are complete, which to resume from, and the run history cut back to one.

The Trainer writes checkpoints in place; a kill during a save leaves a partial folder. These
functions find the newest complete one (skipping partial ones with a warning), name the file
that makes a given one unusable, and rewind ``history.jsonl`` to what it held at a checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import zipfile

from safetensors import safe_open

from pipeline.config.errors import PipelineError
from pipeline.runs.atomic import write_text

log = logging.getLogger(__name__)

PREFIX = "checkpoint"  # the Trainer's checkpoint folders: checkpoint-<step> (its PREFIX_CHECKPOINT_DIR)


def history_lines(path: Path) -> List[str]:
    """Complete rows of ``history.jsonl`` (a kill can leave a partial last line: dropped)."""
    if not path.exists():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.endswith("\n")]


def rewind_history(path: Path, checkpoint: Optional[str]) -> int:
    """Cuts ``history.jsonl`` back to what it held when ``checkpoint`` was saved.

    Without this, the steps between that checkpoint and a kill would appear twice once the
    resumed run logs them again. Without a checkpoint (a fresh start), only the base model's
    rows (step 0) are kept. Written to a temporary file and renamed.

    Returns:
        The number of rows kept.
    """
    lines = history_lines(path)
    if not lines:
        return 0
    rows = None
    if checkpoint is not None:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        rows = state.get("stateful_callbacks", {}).get("RecordMetrics", {}).get("attributes", {}).get("rows")
        step = state["global_step"]
    else:
        step = 0
    if rows is None:  # a checkpoint saved without the row count: cut by step
        lines = [line for line in lines if json.loads(line)["step"] <= step]
    else:
        lines = lines[:rows]
    write_text(path, "".join(lines))
    return len(lines)


class CheckpointError(PipelineError, ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` is not a complete Trainer checkpoint (naming the file), or None.

    The Trainer writes a checkpoint in place, not to a temporary folder: weights, then
    optimizer, scheduler and RNG state, and ``trainer_state.json`` last. A kill during the save
    leaves a folder without (or with a truncated) ``trainer_state.json``, or a truncated file
    before it. Checked cheaply: JSON parsed, safetensors headers and sizes, the zip directory
    (at the end of the file) of each ``torch.save`` file.
    """
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return f"{state} is missing (the save did not finish)"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, UnicodeDecodeError) as err:
        return f"{state} is unreadable ({type(err).__name__}: {err})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return f"{folder} holds no *.safetensors weights"
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types
            return f"{path} is unreadable ({err})"
    for path in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as err:
            return f"{path} is unreadable ({err})"
    return None


def _checkpoints_newest_first(output_dir: Path) -> List[Path]:
    found = [p for p in output_dir.glob(f"{PREFIX}-*")
             if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)


def last_checkpoint(output_dir: Path) -> Optional[str]:
    """The newest complete checkpoint folder, or None.

    An incomplete or corrupt newer one (a kill during its save) is skipped with a warning, so
    the run continues from the previous complete one.
    """
    if not output_dir.is_dir():
        return None
    for folder in _checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        log.warning("Skipping checkpoint %s: %s", folder.name, problem)
    return None


def resume_checkpoint(path: Path) -> str:
    """The checkpoint that ``resume=<path>`` names: the folder itself, or a run folder's newest
    complete one.

    Raises:
        CheckpointError: naming the file that makes the checkpoint unusable, or saying that a
            run folder holds no complete checkpoint.
    """
    path = Path(path)
    if path.name.startswith("checkpoint-"):
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"resume={path}: cannot resume from this checkpoint: {problem}; "
                                  "name an earlier checkpoint or use resume=auto")
        return str(path)
    found = last_checkpoint(path / "checkpoints")
    if found is None:
        raise CheckpointError(f"resume={path}: no complete checkpoint in {path / 'checkpoints'}")
    return found
