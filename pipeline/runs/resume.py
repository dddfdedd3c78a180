"""What ``resume=`` continues: the run folder (``auto``: this one or the newest unfinished run of
the same command; a path: that run folder or checkpoint) and the checkpoint within it.

A fresh run folder that turns out to be a resume is removed (Hydra wrote only its copy of the
config there) and the log follows the run into the folder it continues.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterable, Optional

from pipeline.runs.checkpoints import last_checkpoint, resume_checkpoint
from pipeline.runs.runfolder import RunFolder, find_resumable, move_log_handlers

log = logging.getLogger(__name__)


def resume_folder(resume: str, run_dir: Path, overrides: Iterable[str]) -> Path:
    """The run folder that ``resume`` continues (``run_dir`` when there is none to continue).

    Args:
        resume: the ``resume`` setting: ``never``, ``auto``, or a run folder or checkpoint.
        run_dir: the fresh run folder of this command.
        overrides: this command's overrides (``auto`` looks for a run started with the same).

    Raises:
        CheckpointError: for a named checkpoint that cannot be resumed from.
    """
    if resume == "never":
        return run_dir
    found = Path(resume) if resume != "auto" else find_resumable(run_dir, overrides)
    if found is None:
        return run_dir
    if resume != "auto" and found != run_dir:
        resume_checkpoint(found)  # a corrupt one fails here, before the folder is reused
    return found.parent.parent if found.name.startswith("checkpoint-") else found


def move_to(run: RunFolder, found: Path) -> RunFolder:
    """``run`` itself when ``found`` is its folder; else the folder ``found``, with the log
    following it and the fresh folder removed (it holds nothing but Hydra's copy of the config)."""
    if found == run.path:
        return run
    log.info("Resuming the run in %s", found)
    move_log_handlers(run.path, found)
    shutil.rmtree(run.path, ignore_errors=True)
    return type(run)(found)


def checkpoint(resume: str, run_dir: Path) -> Optional[str]:
    """The checkpoint to continue from: the one ``resume=<checkpoint>`` names (it must be
    complete), else the run folder's newest complete one (None: start afresh)."""
    if resume not in ("never", "auto") and Path(resume).name.startswith("checkpoint-"):
        return resume_checkpoint(Path(resume))
    return last_checkpoint(run_dir / "checkpoints")
