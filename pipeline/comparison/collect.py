"""The runs a report compares: run folders below a multirun or sweep folder (no W&B needed), or
the runs of a W&B project and group (online). Each run's settings come from its resolved
``config.yaml`` (so an override and an experiment overlay count alike), else from the
overrides in its ``run.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from pipeline.comparison import grouping
from pipeline.runs.progress import Progress
from pipeline.runs.runfolder import read_json


@dataclass
class Run:
    """One run as the report sees it."""

    name: str
    method: str
    seed: Optional[int]
    data: str
    status: str
    metrics: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)  # dotted keys: {"adapter.r": 8, ...}
    path: Optional[Path] = None  # the run folder (None for a run read from W&B)
    loss_precision: Optional[str] = None  # what evaluation.loss_precision resolved to (run.json)


def _read_json(path: Path) -> Dict[str, Any]:
    return read_json(path) if path.exists() else {}


def _read_run(run_dir: Path, folder: Path) -> Run:
    """One run folder; its settings from ``config.yaml``, else from the overrides in ``run.json``."""
    info = _read_json(run_dir / "run.json")
    config_path = run_dir / "config.yaml"
    nested = yaml.safe_load(config_path.read_text()) if config_path.exists() else None
    config = grouping.flatten(nested) if nested else grouping.config_from_overrides(info.get("overrides", []))
    history_path = run_dir / "history.jsonl"
    history = ([json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
               if history_path.exists() else [])
    method = next((config[k] for k in grouping.METHOD_KEYS if k in config), "?")
    return Run(name=str(run_dir.relative_to(folder)), method=str(method),
               seed=config.get("seed", info.get("seed")), data=str(config.get("data.name", "?")),
               status=info.get("status", "unknown"), metrics=_read_json(run_dir / "metrics.json"),
               history=history, error=info.get("error"), config=config, path=run_dir,
               loss_precision=(info.get("loss_precision") or {}).get("resolved"))


def runs_from_folder(folder: Path) -> List[Run]:
    """Every run folder (one with ``run.json``) below ``folder``, the report's own excluded.

    A multirun's ``<n>_<method>`` folders and a sweep's ``trial_<n>`` folders alike; the
    sweep's own ``report.json``/``report.md`` are not run folders and are not read.
    """
    infos = [info for info in sorted(folder.rglob("run.json"))
             if "report" not in info.parent.relative_to(folder).parts]
    runs = []
    with Progress(len(infos), "report: reading run folders", "runs") as shown:
        for info in infos:
            runs.append(_read_run(info.parent, folder))
            shown.update()
    return runs


def runs_from_wandb(project: str, group: Optional[str], entity: Optional[str] = None) -> List[Run]:
    """The runs of a W&B project (and group) through ``wandb.Api`` (needs the service)."""
    import wandb  # lazy: about a second to import; only a report read from W&B needs it

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    filters = {"group": group, "jobType": "train"} if group else {"jobType": "train"}
    runs = []
    for r in api.runs(path, filters=filters):
        config = grouping.flatten(dict(r.config or {}))
        summary = {k: v for k, v in dict(r.summary).items() if isinstance(v, (int, float))}
        history = [row for row in r.scan_history(keys=["train/loss", "_step"])]
        state = {"finished": "success", "failed": "failed", "crashed": "failed"}.get(r.state, r.state)
        runs.append(Run(name=r.name, method=str(config.get("adapter.method", "?")),
                        seed=config.get("seed"), data=str(config.get("data.name", "?")),
                        status=state, metrics=summary, config=config,
                        history=[{"step": h.get("_step"), "train/loss": h.get("train/loss")} for h in history]))
    return runs
