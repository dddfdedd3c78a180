"""Inside a trial's training job: the Optuna trial rebuilt from the study's storage (the job may
run in another process or on another machine), what the job records on it (config, run folder,
W&B run, final metrics), and the callback that reports intermediate values and stops a pruned
trial."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pipeline.config.errors import PipelineError
from pipeline.config.options import plain
from pipeline.config.schema import TrainConfig
from pipeline.runs.runfolder import RunFolder
from pipeline.scoring.resampling import MetricRef, change_interval, higher_is_better, read_predictions
from pipeline.study.definition import SweptConfig, intermediate_metric, make_pruner, make_storage, pruner_spec

log = logging.getLogger("pipeline.sweep")


def job_trial(cfg: SweptConfig) -> Optional[Any]:
    """The Optuna trial this job (training, or a merge) runs (None outside a sweep), rebuilt from
    storage."""
    if cfg.sweep is None or cfg.sweep.trial is None:
        return None
    import optuna  # lazy: optuna takes a second to import; only sweeps need it

    study = optuna.load_study(study_name=cfg.sweep.name, storage=make_storage(cfg.sweep.storage),
                              sampler=optuna.samplers.RandomSampler(),  # the job never samples
                              pruner=make_pruner(cfg) or optuna.pruners.NopPruner())
    # Optuna has no public lookup from a trial number to the id a Trial is built from.
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, cfg.sweep.trial)
    return optuna.trial.Trial(study, trial_id)


def start_trial(cfg: SweptConfig, run: RunFolder) -> Optional[Any]:
    """Stores the job's resolved config and run folder on its trial; returns the trial."""
    trial = job_trial(cfg)
    if trial is not None:
        trial.set_user_attr("config", plain(cfg))
        trial.set_user_attr("run_dir", str(run.path))
        run.update(sweep={"study": cfg.sweep.name, "trial": cfg.sweep.trial})
    return trial


def record_wandb(trial: Optional[Any], wandb_run: Optional[Any]) -> None:
    """Puts the trial's W&B run on it (optuna-dashboard shows user attributes next to the
    trial, so it leads back to the run): ``wandb_run_id``, and ``wandb_run``, the run's URL
    when it syncs online, else its offline folder (``wandb sync <folder>`` uploads it)."""
    if trial is None or wandb_run is None:
        return
    try:
        url = wandb_run.url  # None (or an error, depending on the version) when offline
    except Exception:
        url = None
    trial.set_user_attr("wandb_run_id", wandb_run.id)
    trial.set_user_attr("wandb_run", url or str(Path(wandb_run.dir).parent))


def record_metrics(trial: Optional[Any], metrics: Dict[str, Any]) -> None:
    """Stores the run's final metrics on its trial (the sweeper reads the objectives there)."""
    if trial is not None:
        trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()
                                        if isinstance(v, (int, float))})


def constraint_results(cfg: TrainConfig, predictions: Path) -> Dict[str, Dict[str, float]]:
    """Each of ``sweep.constraints`` on this run: the change (tuned minus base) with its paired
    95% interval over the examples, and ``violation``, which Optuna reads (feasible when <= 0):
    how far the interval's bad end goes beyond ``max_drop`` (``-max_drop - low`` for a score,
    ``high - max_drop`` for a loss).

    Raises:
        PipelineError: when the run's predictions cannot score a constraint's metric.
    """
    if cfg.sweep is None or not cfg.sweep.constraints:
        return {}
    rows = read_predictions(predictions)
    results = {}
    for constraint in cfg.sweep.constraints:
        ref = MetricRef.parse(f"delta/{constraint.metric}")
        try:
            interval = change_interval([rows], ref)
        except ValueError as err:
            raise PipelineError(f"sweep constraint on {constraint.metric}: {err}") from err
        violation = (-constraint.max_drop - interval.low if higher_is_better(ref.name)
                     else interval.high - constraint.max_drop)
        results[constraint.metric] = {"change": interval.change, "low": interval.low, "high": interval.high,
                                      "examples": interval.examples, "max_drop": constraint.max_drop,
                                      "violation": violation}
    return results


def record_constraints(trial: Optional[Any], results: Dict[str, Dict[str, float]]) -> None:
    """Puts the constraint results on the trial (Optuna's ``set_constraint``: samplers then
    prefer feasible regions, and ``best_trial``/``best_trials`` exclude infeasible trials) and
    logs each."""
    for metric, r in results.items():
        log.info("constraint %s: change %+.4g [%+.4g, %+.4g] over %d examples, max_drop %g: %s", metric,
                 r["change"], r["low"], r["high"], r["examples"], r["max_drop"],
                 "met" if r["violation"] <= 0 else "broken (the trial is infeasible)")
    if trial is not None and results:
        trial.set_user_attr("constraints", results)
        for metric, r in results.items():
            trial.set_constraint(metric, r["violation"])


def pruner_rungs(cfg: TrainConfig) -> Optional[Tuple[int, int]]:
    """``(min_resource, reduction_factor)`` when the pruner is successive halving or Hyperband.

    Those decide only at steps ``min_resource * reduction_factor**k`` (every bracket of Hyperband
    too), so a trial evaluates there and nowhere else. None for other pruners (the median pruner
    reads every evaluation) and for ``min_resource: auto`` (its rungs are known only later).
    """
    spec = pruner_spec(cfg)
    if spec is None:
        return None
    kind = str(spec.get("_target_", "")).rsplit(".", 1)[-1]
    defaults = {"SuccessiveHalvingPruner": ("auto", 4), "HyperbandPruner": (1, 3)}  # Optuna's
    if kind not in defaults:
        return None
    low = spec.get("min_resource", defaults[kind][0])
    factor = spec.get("reduction_factor", defaults[kind][1])
    return (low, factor) if isinstance(low, int) and isinstance(factor, int) else None


def is_rung(step: int, rungs: Tuple[int, int]) -> bool:
    """Whether successive halving with ``rungs = (min_resource, reduction_factor)`` decides at
    ``step``: 5, 15, 45, ... for (5, 3)."""
    low, factor = rungs
    if step < low or step % low:
        return False
    multiple = step // low
    while multiple % factor == 0:
        multiple //= factor
    return multiple == 1


def pruning_callback(trial: Any, metric: str, rungs: Optional[Tuple[int, int]] = None) -> Any:
    """A TrainerCallback reporting ``metric`` at each evaluation and stopping a pruned trial.

    With ``rungs`` (see :func:`pruner_rungs`), evaluations happen only at the steps where the
    pruner decides: the evaluations in between would cost as much and change nothing.
    """
    import optuna  # lazy: optuna takes a second to import; only sweeps need it
    from transformers import TrainerCallback  # lazy: transformers loads torch

    class Pruning(TrainerCallback):
        evaluations, seconds = 0, 0.0  # what reporting cost: kept on the trial

        def on_step_end(self, args, state, control, **kwargs):
            if rungs is not None:  # runs after the Trainer's own schedule, and overrides it
                control.should_evaluate = is_rung(state.global_step, rungs)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics is None or not state.is_world_process_zero:
                return
            if metric not in metrics:  # validated up front; this would be a wiring bug
                raise PipelineError(f"the evaluation logged no {metric} to report for pruning; "
                                      f"it logged {', '.join(sorted(metrics))}")
            value = float(metrics[metric])
            self.evaluations += 1
            self.seconds += float(metrics.get("eval_runtime", 0.0))
            trial.set_user_attr("intermediate_evaluations", {"count": self.evaluations,
                                                             "seconds": round(self.seconds, 3)})
            trial.report(value, state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {state.global_step}: {metric}={value:.4g}")

    return Pruning()


def callbacks(cfg: TrainConfig, trial: Optional[Any]) -> List[Any]:
    """The pruning callback when this job is a trial of a sweep with a pruner."""
    if trial is None or cfg.sweep.pruner is None:
        return []
    return [pruning_callback(trial, intermediate_metric(cfg), pruner_rungs(cfg))]


def is_pruned(err: BaseException) -> bool:
    """Whether ``err`` is the pruner stopping a trial (optuna is loaded only in sweeps)."""
    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(err, optuna.TrialPruned)
