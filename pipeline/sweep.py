"""Optuna sweeps: ``python -m pipeline.train -m sweep=<name>`` (definitions in ``sweeps/``).

The sweeper (``hydra_plugins/pipeline_sweeper``) asks Optuna for trials, turns their parameters
into overrides and launches them through Hydra's configured launcher (in process, or SLURM via
submitit), then tells Optuna the outcome. Each job's overrides carry the study name, storage and
trial number (``sweep.trial``), so the training process rebuilds its trial from the storage to
report intermediate values and ask whether to stop: that works in another process or on another
machine. Workers share a study only through its storage (SQLite on one machine, PostgreSQL on a
cluster); re-running the same command continues the study.

The sweeper works on the composed train config (a ``DictConfig``: it checks keys that may not
exist yet); a trial's training job passes its ``TrainConfig`` object. The functions both call
read both alike (attribute access only) and are typed ``Any``.

Why not Hydra's own optuna sweeper plugin: it pins optuna<3, cannot prune, cannot resume and
stops at the first failed trial.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from pipeline import config as C
from pipeline import runfolder

log = logging.getLogger("pipeline.sweep")

# sweep.pruner=<name>: pruners whose first decision is at the first evaluation (min_resource =
# trainer.eval_steps). Successive halving suits short budgets: a trial goes on only while it
# ranks in the top 1/reduction_factor of the trials that reached the same step (4: Optuna's
# default and ASHA's; with 3 the shipped sweep trained 0.50x the steps of an unpruned one, with
# 4 fewer: benchmarks/README.md).
PRUNERS = {
    "asha": lambda cfg: {"_target_": "optuna.pruners.SuccessiveHalvingPruner",
                         "min_resource": cfg.trainer.eval_steps, "reduction_factor": 4},
    "hyperband": lambda cfg: {"_target_": "optuna.pruners.HyperbandPruner",
                              "min_resource": cfg.trainer.eval_steps, "reduction_factor": 3},
    "median": lambda cfg: {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 3},
}
# Trials that use up the budget of sweep.n_trials (WAITING ones are enqueued, not yet run).
COUNTED = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")


# --------------------------------------------------------------------------- the sweep definition


def objectives(cfg: Any) -> List[Any]:
    """The sweep's objectives: ``sweep.objectives``, or the run's single ``objective``."""
    return list(cfg.sweep.objectives) or [cfg.objective]


def optuna_name(key: str, spec: Any) -> str:
    """The Optuna parameter behind ``key``: a ``times`` parameter samples the multiple."""
    return f"{key}/{spec.times}" if spec.times else key


def is_group(key: str) -> bool:
    """``adapter`` (a config group choice) rather than ``adapter.r`` (a value)."""
    return "." not in key and (C.CONF_DIR / key).is_dir()


def intermediate_metric(cfg: Any) -> Optional[str]:
    """The Trainer's per-evaluation metric that tracks the (first) objective, or None.

    ``tuned/eval/loss`` is ``eval_loss`` at every evaluation; ``tuned/eval/<m>`` is ``eval_<m>``
    when ``evaluation.during_training`` generates on the validation slice.
    """
    metric = objectives(cfg)[0].metric
    prefix = "tuned/eval/"
    if not metric.startswith(prefix):
        return None
    name = metric[len(prefix):]
    if name == "loss":
        return "eval_loss"
    if cfg.evaluation.during_training and name in cfg.evaluation.metrics:
        return f"eval_{name}"
    return None


def _has_setting(option: str, key: str) -> bool:
    """Whether adapter option ``option`` has setting ``key`` (dropout only where it exists)."""
    import dataclasses

    settings = C.ADAPTERS.get(option)
    return settings is None or key in {f.name for f in dataclasses.fields(settings)}


def _check_param(cfg: DictConfig, key: str, spec: Any, earlier: List[str]) -> List[str]:
    where = f"sweep.params.{key}"
    problems = []
    if spec.type == "categorical":
        if not spec.choices:
            problems.append(f"{where} is categorical: give it choices, e.g. choices: [8, 16]")
    elif spec.low is None or spec.high is None or not spec.low < spec.high:
        problems.append(f"{where} needs low < high (got low={spec.low}, high={spec.high})")
    elif spec.log and spec.low <= 0:
        problems.append(f"{where}.low={spec.low} must be > 0 with log: true")
    if spec.times is not None and spec.times not in earlier:
        problems.append(f"{where}.times={spec.times!r} must name a parameter listed before it")
    if is_group(key):
        options = {p.stem for p in (C.CONF_DIR / key).glob("*.yaml")}
        unknown = [c for c in spec.choices or [] if c not in options]
        if unknown:
            problems.append(f"{where} has choices {unknown} that are not {key} options; "
                            f"available: {', '.join(sorted(options))}")
    elif key.startswith("adapter.") and "adapter" in cfg.sweep.params:
        if not any(_has_setting(o, key[len("adapter."):]) for o in cfg.sweep.params.adapter.choices or []):
            problems.append(f"{where}: none of the sampled adapters has this setting")
    elif OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False) == "<absent>":
        problems.append(f"{where}: {key} is not a key of the train config")
    elif spec.type == "categorical":
        problems += [f"{where} has choice {value!r} that {key} does not take: {why}"
                     for value, why in _refused_values(cfg, key, spec.choices or [])]
    return problems


def _refused_values(cfg: DictConfig, key: str, values: List[Any]) -> List[Tuple[Any, str]]:
    """(value, why) for each value the schema refuses at ``key``: a choice outside its Enum, a
    text for a number. Every trial would otherwise fail while its config is composed."""
    from omegaconf.errors import ValidationError

    probe, refused = cfg.copy(), []
    for value in values:
        try:
            OmegaConf.update(probe, key, value, merge=False)
        except ValidationError as err:
            refused.append((value, str(err).splitlines()[0]))
    return refused


def check(cfg: DictConfig) -> List[str]:
    """Every problem with the sweep definition, before any trial runs (key, value and fix)."""
    sweep = cfg.sweep
    problems = []
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", sweep.name):
        problems.append(f"sweep.name={sweep.name!r} must be letters, digits, _ . - (it names a folder)")
    for key in ("n_trials", "n_jobs", "max_failures", "heartbeat_s"):
        if sweep[key] <= 0:
            problems.append(f"sweep.{key}={sweep[key]} must be > 0")
    for key in ("timeout_min", "max_memory_gb"):
        if sweep[key] is not None and not sweep[key] > 0:
            problems.append(f"sweep.{key}={sweep[key]} must be > 0 or null (no limit)")
    if sweep.trial is not None:
        problems.append("sweep.trial is set by the sweeper for each job; remove it")
    if not sweep.params:
        problems.append("sweep.params is empty: add at least one parameter to search")
    earlier: List[str] = []
    for key, spec in sweep.params.items():
        problems += _check_param(cfg, key, spec, earlier)
        earlier.append(key)
    names = C.metric_names(cfg)
    for i, objective in enumerate(objectives(cfg)):
        if objective.direction not in ("minimize", "maximize"):
            problems.append(f"objective #{i} direction={objective.direction!r} must be minimize or maximize")
        if objective.metric not in names and not any(m.startswith("evaluate:") for m in cfg.evaluation.metrics):
            problems.append(f"objective metric {objective.metric!r} is not a metric a run reports; "
                            f"available: {', '.join(names)}")
    if sweep.sampler is not None and "_target_" not in sweep.sampler:
        problems.append("sweep.sampler needs _target_ (an Optuna class, e.g. optuna.samplers.TPESampler)")
    if isinstance(sweep.pruner, str) and sweep.pruner not in PRUNERS:
        problems.append(f"sweep.pruner={sweep.pruner!r} is not one of {', '.join(PRUNERS)}; or give "
                        "{_target_: <an optuna.pruners class>, ...}, or null")
    elif sweep.pruner is not None and not isinstance(sweep.pruner, str) and \
            (not isinstance(sweep.pruner, DictConfig) or "_target_" not in sweep.pruner):
        problems.append(f"sweep.pruner needs _target_ (an Optuna class, e.g. optuna.pruners.MedianPruner) "
                        f"or a preset name ({', '.join(PRUNERS)})")
    if sweep.pruner is not None:
        problems += _check_pruning(cfg)
    return problems


def _check_pruning(cfg: DictConfig) -> List[str]:
    """Pruning needs one objective that the Trainer measures at its evaluation steps."""
    problems = []
    if len(objectives(cfg)) > 1:
        problems.append("sweep.pruner needs a single objective (Optuna prunes on one reported "
                        "value); set sweep.pruner=null for a multi-objective sweep")
    elif intermediate_metric(cfg) is None:
        metric = objectives(cfg)[0].metric
        problems.append(f"sweep.pruner: objective {metric!r} is not measured during training; use "
                        "tuned/eval/loss, or tuned/eval/<metric> with evaluation.during_training=true "
                        "and the metric in evaluation.metrics, or set sweep.pruner=null")
    if not cfg.trainer.eval_steps:
        problems.append("sweep.pruner needs trainer.eval_steps (the steps at which trials report); "
                        "set it in the sweep file, e.g. trainer.eval_steps=10")
    if not cfg.data.validation_size > 0:
        problems.append("sweep.pruner needs a validation split: data.validation_size > 0")
    return problems


# --------------------------------------------------------------------------- Optuna objects


def storage_url(sweep: Any, folder: Path) -> str:
    """``sweep.storage``, or an SQLite file in the sweep folder."""
    if sweep.storage:
        return str(sweep.storage)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / 'study.db'}"


def make_storage(url: str, heartbeat_s: Optional[int] = None) -> Any:
    """An Optuna RDB storage; with ``heartbeat_s``, trials of a killed worker become FAIL."""
    import optuna

    # SQLite serialises writers; a worker waits for the lock instead of failing at once.
    import sqlalchemy.exc

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    # Optuna 4.9 renamed the stale-trial callback; the old name still works there, with a warning.
    import inspect

    renamed = "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
    stale = {("heartbeat_stale_trial_callback" if renamed else "failed_trial_callback"): _mark_stale_run} \
        if heartbeat_s else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                                              **stale)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as err:
            # Workers started together on a fresh storage race to create its tables (SQLite
            # says "table ... already exists", PostgreSQL a unique violation); the loser finds
            # them made on its next try.
            raced = isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)
            if attempt == 4 or not raced:
                raise
            time.sleep(1 + attempt)


def _mark_stale_run(study: Any, trial: Any) -> None:
    """A trial whose worker died: its run folder (when this machine sees it) says so too."""
    run_dir = trial.user_attrs.get("run_dir")
    run = runfolder.RunFolder(Path(run_dir)) if run_dir else None
    if run is not None and run.info_path.exists() and run.info().get("status") == "running":
        run.update(status="failed", error="the sweep worker stopped while this trial ran "
                   "(no heartbeat for 2 x sweep.heartbeat_s)")


def _instantiate(node: Optional[Any]) -> Any:
    if node is None:
        return None
    from hydra.utils import instantiate

    return instantiate(OmegaConf.to_container(node, resolve=True))


def make_pruner(cfg: Any) -> Any:
    """The Optuna pruner of ``sweep.pruner`` (a preset name or ``{_target_: ...}``), or None."""
    spec = cfg.sweep.pruner
    if isinstance(spec, str):
        return _instantiate(OmegaConf.create(PRUNERS[spec](cfg)))
    return _instantiate(spec)


def _format(value: Any) -> str:
    """A value as Hydra's override grammar reads it back."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_./:+-]+", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def suggest(trial: Any, cfg: DictConfig) -> Dict[str, Any]:
    """Samples the search space: ``{key: value}`` for this trial.

    Conditional: ``adapter.<setting>`` is sampled only when the trial's adapter has that setting
    (e.g. dropout for LoRA, not IA3); a ``times`` value is a multiple of an earlier value.
    """
    values: Dict[str, Any] = {}
    for key, spec in cfg.sweep.params.items():
        adapter = values.get("adapter", cfg.adapter.method)
        if key.startswith("adapter.") and not _has_setting(adapter, key[len("adapter."):]):
            continue
        name = optuna_name(key, spec)
        if spec.type == "categorical":
            value = trial.suggest_categorical(name, OmegaConf.to_container(spec.choices))
        elif spec.type == "int":
            value = trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1),
                                      log=spec.log)
        else:
            value = trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
        values[key] = value * values[spec.times] if spec.times else value
    return values


def overrides(values: Dict[str, Any]) -> List[str]:
    return [f"{key}={_format(value)}" for key, value in values.items()]


# --------------------------------------------------------------------------- inside a trial's job


def job_trial(cfg: Any) -> Optional[Any]:
    """The Optuna trial this training job runs (None outside a sweep), rebuilt from storage."""
    if cfg.sweep is None or cfg.sweep.trial is None:
        return None
    import optuna

    study = optuna.load_study(study_name=cfg.sweep.name, storage=make_storage(cfg.sweep.storage),
                              sampler=optuna.samplers.RandomSampler(),  # the job never samples
                              pruner=make_pruner(cfg) or optuna.pruners.NopPruner())
    # Optuna has no public lookup from a trial number to the id a Trial is built from.
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, cfg.sweep.trial)
    return optuna.trial.Trial(study, trial_id)


def start_trial(cfg: Any, run: runfolder.RunFolder) -> Optional[Any]:
    """Stores the job's resolved config and run folder on its trial; returns the trial."""
    trial = job_trial(cfg)
    if trial is not None:
        trial.set_user_attr("config", C.plain(cfg))
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


def pruner_rungs(cfg: Any) -> Optional[Tuple[int, int]]:
    """``(min_resource, reduction_factor)`` when the pruner is successive halving or Hyperband.

    Those decide only at steps ``min_resource * reduction_factor**k`` (every bracket of Hyperband
    too), so a trial evaluates there and nowhere else. None for other pruners (the median pruner
    reads every evaluation) and for ``min_resource: auto`` (its rungs are known only later).
    """
    spec = cfg.sweep.pruner
    if spec is None:
        return None
    spec = OmegaConf.create(PRUNERS[spec](cfg)) if isinstance(spec, str) else spec
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
    import optuna
    from transformers import TrainerCallback

    class Pruning(TrainerCallback):
        evaluations, seconds = 0, 0.0  # what reporting cost: kept on the trial

        def on_step_end(self, args, state, control, **kwargs):
            if rungs is not None:  # runs after the Trainer's own schedule, and overrides it
                control.should_evaluate = is_rung(state.global_step, rungs)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics is None or not state.is_world_process_zero:
                return
            if metric not in metrics:  # validated up front; this would be a wiring bug
                raise C.PipelineError(f"the evaluation logged no {metric} to report for pruning; "
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


def callbacks(cfg: Any, trial: Optional[Any]) -> list:
    """The pruning callback when this job is a trial of a sweep with a pruner."""
    if trial is None or cfg.sweep.pruner is None:
        return []
    return [pruning_callback(trial, intermediate_metric(cfg), pruner_rungs(cfg))]


def is_pruned(err: BaseException) -> bool:
    import sys

    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(err, optuna.TrialPruned)
