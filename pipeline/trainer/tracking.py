"""What a run costs and where it is tracked: peak memory (CPU and CUDA, model states) and W&B
naming, grouping, offline runs and their summaries. The run folder itself is
:mod:`pipeline.runs.runfolder`."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from pipeline.config.options import plain
from pipeline.config.schema import TrainConfig, WandbConfig
from pipeline.runs.runfolder import RunFolder

log = logging.getLogger(__name__)


def _status_kb(field_name: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory() -> bool:
    """Starts this run's own peak-memory window.

    The jobs of a Hydra multirun share one process, whose peak RSS would otherwise carry over
    from an earlier, larger job. Linux resets the peak (VmHWM) on writing 5 to clear_refs.

    Returns:
        Whether the CPU peak could be reset (else the figure is the process's peak).
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb() -> Dict[str, float]:
    """Peak resident memory since :func:`reset_peak_memory`, and peak CUDA allocation when
    CUDA was used."""
    hwm_kb = _status_kb("VmHWM")
    rss_kb = hwm_kb if hwm_kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"perf/peak_rss_mb": rss_kb / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["perf/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if "max" in _model_state_bytes:
            peak["perf/model_state_cuda_mb"] = _model_state_bytes["max"] / 2**20
    return peak


_model_state_bytes: Dict[str, int] = {}


def model_state_callback() -> Any:
    """A TrainerCallback measuring the model states on CUDA: the memory allocated just before an
    optimizer step, from the second on (weights, gradients and optimizer states; backward has
    freed the activations, and the optimizer makes its states at its first step). That is what
    :mod:`pipeline.trainer.memory` predicts; :func:`peak_memory_mb` reports it as
    ``perf/model_state_cuda_mb``. Does nothing without CUDA."""
    from transformers import TrainerCallback  # lazy: transformers loads torch

    _model_state_bytes.clear()

    class ModelStateMemory(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            torch = sys.modules.get("torch")
            if state.global_step >= 1 and torch is not None and torch.cuda.is_available():
                allocated = torch.cuda.memory_allocated()
                _model_state_bytes["max"] = max(_model_state_bytes.get("max", 0), allocated)

    return ModelStateMemory()


def wandb_init(settings: WandbConfig, run_dir: Path, config: Dict[str, Any], name: str,
               group: Optional[str], tags: list, resume_id: Optional[str] = None) -> Any:
    """Starts (or resumes) the W&B run of this run folder; offline needs no account.

    The run id is stored in ``run.json`` by the caller, so a resumed training continues the
    same W&B run instead of starting a duplicate.
    """
    try:
        import wandb  # lazy: about a second to import, and only runs that log need it
    except ImportError as err:  # pragma: no cover - wandb is a core dependency
        raise ImportError("logger=wandb needs wandb: pip install wandb (or use logger=none)") from err

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=settings.project, entity=settings.entity, group=group, name=name,
        tags=list(tags), job_type=settings.job_type, mode=str(settings.mode), dir=str(run_dir),
        config=config, id=resume_id, resume="allow" if resume_id else None,
        settings=wandb.Settings(save_code=False, x_disable_stats=True, console="off"))


def start_wandb(cfg: TrainConfig, run: RunFolder, multirun: Optional[Path] = None,
                resolved: Optional[Dict[str, Any]] = None) -> Any:
    """Starts the run's W&B run (None with ``logger=none``), resuming the id an earlier attempt
    of the same run folder recorded.

    Args:
        cfg: the run's config (W&B's config is its plain values).
        run: the run folder (W&B writes into it).
        multirun: the folder of the multirun this run is a job of: its jobs share a W&B group.
        resolved: settings as the run resolved them, shown in W&B's config instead of the
            configured ones (``trainer.precision``: ``auto`` -> what it picked).
    """
    settings = cfg.logger.wandb
    if settings is None or settings.mode == "disabled":
        return None
    group = settings.group
    if group is None and multirun is not None:
        group = multirun_group(multirun)  # every job of a multirun shares it
    tags = [cfg.adapter.method, cfg.data.name, cfg.model.name, *cfg.tags, *settings.tags]
    config = plain(cfg)
    for key, value in (resolved or {}).items():
        section, name = key.split(".")
        config[section][name] = value
    wandb_run = wandb_init(settings, run.path, config,
                           name=settings.name or run.path.name, group=group, tags=tags,
                           resume_id=run.info().get("wandb_id"))
    run.update(wandb_id=wandb_run.id, wandb_dir=str(Path(wandb_run.dir).parent))
    return wandb_run


def multirun_group(sweep_dir: Path) -> str:
    """The W&B group of a multirun's jobs (and of its report): ``<date>_<time>`` of its folder."""
    return f"{sweep_dir.parent.name}_{sweep_dir.name}"


def finish_wandb(wandb_run: Any, metrics: Dict[str, Any], predictions: Optional[Path] = None) -> None:
    """Puts the final metrics in the W&B summary and the predictions in a Table, then closes."""
    if wandb_run is None:
        return
    import wandb  # lazy: about a second to import, and only runs that log need it

    wandb_run.summary.update(metrics)
    if predictions is not None and predictions.exists():
        columns = ["set", "index", "prompt", "reference", "base", "tuned"]
        rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
        table = wandb.Table(columns=columns + ["base_scores", "tuned_scores"],
                            data=[[r[c] for c in columns] + [json.dumps(r["base_scores"]),
                                                             json.dumps(r["tuned_scores"])] for r in rows])
        wandb_run.log({"eval/predictions": table})
    wandb_run.finish()


def abort_wandb(exit_code: int, preempted: bool = False) -> None:
    """Closes a W&B run left open by a failure, marking it failed there too; a ``preempted``
    one is marked preempting (resumable: ``resume=auto`` continues the same W&B run id)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        if preempted:
            wandb.run.mark_preempting()
        wandb.run.finish(exit_code=exit_code)
