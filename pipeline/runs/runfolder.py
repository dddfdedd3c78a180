"""The run folder: its layout, its status, atomic writes, and the readers that find a run again.

A run folder holds: ``config.yaml`` (resolved), ``.hydra/`` (Hydra's own copy and the
overrides), ``run.json`` (status, seed, git SHA and dirty flag, package versions, parameter
counts, cost figures, error), ``metrics.json`` (final metrics), ``history.jsonl`` (logged
metrics by step), ``eval/`` (base measurement, predictions), ``adapter/`` or ``model/`` (what
serving loads) and ``wandb/``. Every file is written atomically (:mod:`pipeline.runs.atomic`),
so none is ever half-written. What a finished run trained is read back by
:func:`pipeline.adapters.saved.read_run`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import yaml

from pipeline.config.errors import PipelineError
from pipeline.config.options import PACKAGE_DIR
from pipeline.runs import atomic
from pipeline.runs.checkpoints import last_checkpoint

log = logging.getLogger(__name__)


PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate",
            "hydra-core", "omegaconf", "optuna", "wandb", "deepspeed", "evaluate")


STATUSES = ("running", "success", "failed", "pruned", "interrupted")


def write_json(path: Path, payload: Any) -> None:
    """Writes JSON atomically and durably (:mod:`pipeline.runs.atomic`)."""
    atomic.write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_text(path: Path, text: str) -> None:
    """Writes a text file atomically and durably (:mod:`pipeline.runs.atomic`)."""
    atomic.write_text(path, text)


def read_json(path: Path) -> Dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def git_state(root: Path) -> Dict[str, Any]:
    """Commit SHA and dirty flag of the repository at ``root`` (nulls outside a repository)."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def package_versions(names: Iterable[str] = PACKAGES) -> Dict[str, Optional[str]]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


class RunFolderError(PipelineError, OSError):
    """The run folder cannot be created or written."""


def unwritable_reason(folder: Path) -> Optional[str]:
    """Why ``folder`` cannot be created or written (without creating it), or None."""
    existing = Path(os.path.abspath(os.path.expanduser(folder)))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


class RunFolder:
    """Owns ``run.json`` and ``metrics.json`` of one run folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.info_path = self.path / "run.json"
        self.started = time.time()
        self.unwritable = False

    def start(self, config: Dict[str, Any], overrides: list) -> None:
        """Records everything needed to reproduce the run, with status ``running``.

        Args:
            config: the resolved config as plain values (``config.yaml``).
            overrides: the command line's overrides.
        """
        self.create()
        write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        info = self.info() if self.info_path.exists() else {}
        info.update({
            "status": "running", "seed": config.get("seed"), "overrides": list(overrides),
            "command": " ".join([f"python -m pipeline.{config.get('task_name')}", *overrides]),
            "git": git_state(PACKAGE_DIR.parent), "packages": package_versions(),
            "python": platform.python_version(), "host": socket.gethostname(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "attempts": info.get("attempts", 0) + 1,
        })
        write_json(self.info_path, info)

    def create(self) -> None:
        """Creates the folder and checks that it is writable.

        Raises:
            RunFolderError: naming ``paths.run_dir`` and the reason.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test.")
            probe.close()
        except OSError as err:
            self.unwritable = True
            raise RunFolderError(f"paths.run_dir={str(self.path)!r}: cannot write the run folder "
                                 f"({err.strerror or err}); choose a writable folder with "
                                 "hydra.run.dir=... or paths.output_dir=...") from err

    def info(self) -> Dict[str, Any]:
        return read_json(self.info_path)

    def elapsed(self) -> float:
        return round(time.time() - self.started, 2)

    def update(self, **fields: Any) -> None:
        info = self.info() if self.info_path.exists() else {}
        info.update(fields)
        write_json(self.info_path, info)

    def finish(self, status: str, error: Optional[BaseException] = None, **fields: Any) -> None:
        """Marks the run ``success`` / ``failed`` / ``pruned`` / ``interrupted``."""
        assert status in STATUSES, status
        if self.unwritable:
            return  # the error that brought us here says why nothing can be recorded
        payload = {"status": status, "wall_time_s": self.elapsed(),
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        if error is not None:
            payload["error"] = f"{type(error).__name__}: {error}"
        self.update(**payload)

    def write_metrics(self, metrics: Dict[str, Any]) -> None:
        write_json(self.path / "metrics.json", metrics)


class ReplicaRunFolder(RunFolder):
    """The run folder as a rank other than 0 sees it: it reads, only rank 0 writes."""

    def start(self, config: Dict[str, Any], overrides: list) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass

    def write_metrics(self, metrics: Dict[str, Any]) -> None:
        pass


def _comparable(overrides: Iterable[str]) -> list:
    """Overrides that define "the same command": where it runs and whether it resumes do not."""
    return sorted(o for o in overrides if not o.lstrip("+~").startswith(("resume=", "paths.run_dir=")))


def find_resumable(run_dir: Path, overrides: Iterable[str]) -> Optional[Path]:
    """The run folder ``resume=auto`` continues, or None to start afresh.

    That is this very folder when it already holds a checkpoint (a fixed ``hydra.run.dir``, a
    requeued SLURM job), else the newest unfinished sibling run started with the same overrides
    (ignoring ``resume=``) that holds a checkpoint, or that was interrupted before its first
    checkpoint (it starts over in its own folder, keeping a base measurement it already took):
    re-running the same command continues it.
    """
    def has_checkpoint(folder: Path) -> bool:
        return last_checkpoint(folder / "checkpoints") is not None

    if has_checkpoint(run_dir):
        return run_dir
    wanted = _comparable(overrides)
    siblings = [p for p in run_dir.parent.parent.glob("*/*") if p != run_dir and (p / "run.json").exists()]
    for folder in sorted(siblings, key=lambda p: p.stat().st_mtime, reverse=True):
        info = read_json(folder / "run.json")
        if (info.get("status") != "success" and _comparable(info.get("overrides", [])) == wanted
                and (has_checkpoint(folder) or info.get("status") == "interrupted")):
            return folder
    return None


def move_log_handlers(old: Path, new: Path) -> None:
    """Points Hydra's file log at ``new`` (a resumed run keeps logging in its own folder)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == old:
            handler.close()
            handler.baseFilename = str(new / Path(handler.baseFilename).name)


def objective_value(metrics: Dict[str, Any], name: str) -> float:
    """The value of the objective metric.

    Raises:
        KeyError: naming the metric and listing the available names.
    """
    if name not in metrics:
        raise KeyError(f"objective.metric={name!r} is not among this run's metrics: "
                       f"{', '.join(sorted(metrics))}")
    return float(metrics[name])
