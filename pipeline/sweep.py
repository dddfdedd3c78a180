"""Optuna sweeps: ``python -m pipeline.train -m sweep=<name>`` (definitions in ``sweeps/``).

The sweeper (``hydra_plugins/pipeline_sweeper``) asks Optuna for trials, turns their parameters
into overrides and launches them through Hydra's configured launcher (in process, or SLURM via
submitit), then tells Optuna the outcome. Each job's overrides carry the study name, storage and
trial number (``sweep.trial``), so the training process rebuilds its trial from the storage to
report intermediate values and ask whether to stop: that works in another process or on another
machine. Workers share a study only through its storage (SQLite on one machine, PostgreSQL on a
cluster); re-running the same command continues the study.

Why not Hydra's own optuna sweeper plugin: it pins optuna<3, cannot prune, cannot resume and
stops at the first failed trial.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline import config as C
from pipeline import sweep_report, tracking

log = logging.getLogger("pipeline.sweep")

PARAM_TYPES = ("float", "int", "categorical")
# sweep.pruner=<name>: pruners whose first decision is at the first evaluation (min_resource =
# trainer.eval_steps). Successive halving suits short budgets: a trial goes on only while it
# ranks in the top 1/reduction_factor of the trials that reached the same step.
PRUNERS = {
    "asha": lambda cfg: {"_target_": "optuna.pruners.SuccessiveHalvingPruner",
                         "min_resource": cfg.trainer.eval_steps, "reduction_factor": 3},
    "hyperband": lambda cfg: {"_target_": "optuna.pruners.HyperbandPruner",
                              "min_resource": cfg.trainer.eval_steps, "reduction_factor": 3},
    "median": lambda cfg: {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 3},
}
# Trials that use up the budget of sweep.n_trials (WAITING ones are enqueued, not yet run).
COUNTED = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")


# --------------------------------------------------------------------------- the sweep definition


def objectives(cfg: DictConfig) -> List[Any]:
    """The sweep's objectives: ``sweep.objectives``, or the run's single ``objective``."""
    return list(cfg.sweep.objectives) or [cfg.objective]


def optuna_name(key: str, spec: Any) -> str:
    """The Optuna parameter behind ``key``: a ``times`` parameter samples the multiple."""
    return f"{key}/{spec.times}" if spec.times else key


def is_group(key: str) -> bool:
    """``adapter`` (a config group choice) rather than ``adapter.r`` (a value)."""
    return "." not in key and (C.CONF_DIR / key).is_dir()


def intermediate_metric(cfg: DictConfig) -> Optional[str]:
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
    if spec.type not in PARAM_TYPES:
        return [f"{where}.type={spec.type!r} is not one of {', '.join(PARAM_TYPES)}"]
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
    return problems


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
    run = tracking.RunFolder(Path(run_dir)) if run_dir else None
    if run is not None and run.info_path.exists() and run.info().get("status") == "running":
        run.update(status="failed", error="the sweep worker stopped while this trial ran "
                   "(no heartbeat for 2 x sweep.heartbeat_s)")


def _instantiate(node: Optional[Any]) -> Any:
    if node is None:
        return None
    from hydra.utils import instantiate

    return instantiate(OmegaConf.to_container(node, resolve=True))


def make_pruner(cfg: DictConfig) -> Any:
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


def job_trial(cfg: DictConfig) -> Optional[Any]:
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


def start_trial(cfg: DictConfig, run: tracking.RunFolder) -> Optional[Any]:
    """Stores the job's resolved config and run folder on its trial; returns the trial."""
    trial = job_trial(cfg)
    if trial is not None:
        trial.set_user_attr("config", OmegaConf.to_container(cfg, resolve=True))
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


def pruning_callback(trial: Any, metric: str) -> Any:
    """A TrainerCallback reporting ``metric`` at each evaluation and stopping a pruned trial."""
    import optuna
    from transformers import TrainerCallback

    class Pruning(TrainerCallback):
        evaluations, seconds = 0, 0.0  # what reporting cost: kept on the trial

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


def callbacks(cfg: DictConfig, trial: Optional[Any]) -> list:
    """The pruning callback when this job is a trial of a sweep with a pruner."""
    if trial is None or cfg.sweep.pruner is None:
        return []
    return [pruning_callback(trial, intermediate_metric(cfg))]


def is_pruned(err: BaseException) -> bool:
    import sys

    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(err, optuna.TrialPruned)


# --------------------------------------------------------------------------- the sweeper's loop


class Heartbeat:
    """Records heartbeats of the trials in flight, so that other workers (and a later run of
    the same command) see which RUNNING trials belong to a dead worker and fail them."""

    def __init__(self, storage: Any, interval_s: float):
        self.storage, self.interval_s = storage, interval_s
        self.trial_ids: List[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="sweep-heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            for trial_id in list(self.trial_ids):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as err:  # a storage hiccup must not end the sweep
                    log.warning("heartbeat of trial id %s failed: %s", trial_id, err)

    def track(self, trial_ids: List[int]) -> None:
        self.trial_ids = trial_ids
        for trial_id in trial_ids:
            self.storage.record_heartbeat(trial_id)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


def _passed_through(arguments: Sequence[str]) -> List[str]:
    """Command-line overrides every trial gets; grid syntax (``a=1,2``) has no place here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(arguments))
    grids = [o.input_line for o in parsed if o.is_sweep_override()]
    if grids:
        raise C.ConfigError([f"{g}: a sweep searches sweep.params, not comma lists; add the key to "
                             "sweep.params or give one value" for g in grids])
    return [o.input_line for o in parsed if not o.get_key_element().startswith("sweep.trial")]


def open_study(cfg: DictConfig, folder: Path) -> Any:
    """Creates the study or loads it from storage (the same command continues it)."""
    import optuna

    url = storage_url(cfg.sweep, folder)
    directions = [o.direction for o in objectives(cfg)]
    study = optuna.create_study(
        study_name=cfg.sweep.name, storage=make_storage(url, cfg.sweep.heartbeat_s),
        sampler=_instantiate(cfg.sweep.sampler), pruner=make_pruner(cfg),
        directions=directions, load_if_exists=True)
    found = [d.name.lower() for d in study.directions]
    if found != directions:
        raise C.ConfigError([f"study {cfg.sweep.name!r} in {url} has directions {found}, this sweep "
                             f"{directions}: give the sweep another sweep.name"])
    names = [o.metric for o in objectives(cfg)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if study.metric_names != names:  # optuna-dashboard shows these instead of "Objective 0"
            study.set_metric_names(names)
    return study, url


class Budget:
    """The study's wall-clock budget (``sweep.timeout_min``), kept in the study's user
    attributes (``budget_used_s``, ``budget_mark``), so a resumed sweep continues it and every
    worker spends the same one.

    Used time grows by the wall time during which at least one worker was running: at each
    check a worker adds the time since the last check by any worker or since its own start,
    whichever is later (gaps between sessions do not count; parallel workers do not count twice).
    """

    def __init__(self, study: Any, timeout_min: Optional[float]):
        self.study, self.timeout_min = study, timeout_min
        self.mark = time.time()

    def used_s(self) -> float:
        """Adds this worker's time since the last mark and returns the study's total."""
        attrs = self.study.user_attrs  # read from the storage: other workers' marks included
        now = time.time()
        used = float(attrs.get("budget_used_s", 0.0)) + max(0.0, now - max(self.mark, attrs.get("budget_mark", 0.0)))
        self.study.set_user_attr("budget_used_s", used)
        self.study.set_user_attr("budget_mark", now)
        self.mark = now
        return used

    def spent(self) -> bool:
        return self.timeout_min is not None and self.used_s() >= 60 * self.timeout_min

    def summary(self) -> Dict[str, Any]:
        used = self.used_s()
        return {"used_min": used / 60, "timeout_min": self.timeout_min,
                "spent": self.timeout_min is not None and used >= 60 * self.timeout_min}


def memory_rejection(trial_cfg: DictConfig, max_gb: float) -> Optional[str]:
    """Why a trial's configuration cannot fit in ``max_gb`` GiB per device (model states, as
    ``python -m pipeline.estimate`` computes them), or None when it fits."""
    from pipeline import estimate

    needed = estimate.for_config(trial_cfg, estimate.count_for_config(trial_cfg)).total / estimate.GB
    if needed <= max_gb:
        return None
    return (f"model states need an estimated {needed:.3f} GiB per device (weights, gradients, optimizer; "
            f"activations not included) > sweep.max_memory_gb={max_gb:g}")


def _tell(study: Any, trial: Any, job: Any, metric_names: List[str]) -> str:
    """Tells Optuna one job's outcome; returns the trial's final state name."""
    from hydra.core.utils import JobStatus
    from optuna.trial import TrialState

    error = job._return_value if job.status == JobStatus.FAILED else None
    if error is None:
        # Trial.user_attrs is this process's cached copy; the job wrote to the storage.
        metrics = study._storage.get_trial_user_attrs(trial._trial_id).get("metrics", {})
        try:
            values = [tracking.objective_value(metrics, name) for name in metric_names]
        except KeyError as err:
            error = err
        else:
            study.tell(trial, values)
            return "COMPLETE"
    if is_pruned(error):
        study.tell(trial, state=TrialState.PRUNED)
        return "PRUNED"
    trial.set_user_attr("error", f"{type(error).__name__}: {error}")
    study.tell(trial, state=TrialState.FAIL)
    log.warning("trial %d failed: %s: %s", trial.number, type(error).__name__, error)
    return "FAIL"


def _rejection(compose: Optional[Callable[[List[str]], DictConfig]], job: List[str], trial: Any,
               max_gb: Optional[float]) -> Optional[str]:
    """With ``sweep.max_memory_gb``: why the trial's composed config would not fit, or None."""
    if max_gb is None or compose is None:
        return None
    try:
        return memory_rejection(compose(job), max_gb)
    except Exception as err:  # the trial itself will fail with the full error, if it is one
        log.warning("trial %d: no memory estimate (%s: %s); launching it", trial.number,
                    type(err).__name__, err)
        return None


def run(config: DictConfig, launcher: Any, arguments: List[str],
        compose: Optional[Callable[[List[str]], DictConfig]] = None) -> Any:
    """The sweep: ask, launch, tell until the study holds ``sweep.n_trials`` trials or its
    wall-clock budget (``sweep.timeout_min``) is spent.

    ``compose(overrides)`` returns a job's composed config (Hydra's config loader): with
    ``sweep.max_memory_gb`` each sampled configuration is estimated before it launches.

    Raises:
        ConfigError: a bad sweep definition (before any trial runs).
        PipelineError: when the study reaches ``sweep.max_failures`` failed trials.
    """
    import optuna
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(config)  # paths interpolate ${hydra:runtime.cwd}
    if config.sweep is None:
        raise C.ConfigError(["hydra/sweeper=pipeline_optuna needs a sweep definition: add "
                             "sweep=<name> (a file in sweeps/)"])
    problems = check(config)
    if problems:
        raise C.ConfigError(problems)
    passed = _passed_through(arguments)
    folder = Path(config.hydra.sweep.dir)
    study, url = open_study(config, folder)
    metric_names = [o.metric for o in objectives(config)]
    log.info("sweep %s: study in %s, %d trials wanted", config.sweep.name, url.split("@")[-1],
             config.sweep.n_trials)
    launched, budget = 0, Budget(study, config.sweep.timeout_min)
    with Heartbeat(study._storage, config.sweep.heartbeat_s) as heartbeat:
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # trials of killed workers
            counts = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))
            if counts["FAIL"] >= config.sweep.max_failures:
                sweep_report.report(study, folder, config, passed, budget.summary())
                raise C.PipelineError(
                    f"sweep {config.sweep.name} stopped: {counts['FAIL']} failed trials reached "
                    f"sweep.max_failures={config.sweep.max_failures}; see the error user attribute "
                    f"of each failed trial in {folder / 'report.md'}")
            remaining = config.sweep.n_trials - sum(counts[s] for s in COUNTED)
            if remaining <= 0:
                break
            if budget.spent():
                log.info("sweep %s: wall-clock budget sweep.timeout_min=%g spent; no new trials "
                         "(raise it to continue the study)", config.sweep.name, config.sweep.timeout_min)
                break
            batch, jobs = [], []
            for trial in [study.ask() for _ in range(min(config.sweep.n_jobs, remaining))]:
                try:  # an enqueued value outside the space can fail here: that trial fails
                    trial_overrides = overrides(suggest(trial, config))
                except Exception as err:
                    trial.set_user_attr("error", f"{type(err).__name__}: {err}")
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    log.warning("trial %d failed while sampling: %s", trial.number, err)
                    continue
                trial.set_user_attr("overrides", trial_overrides)
                job = [*passed, *trial_overrides, f"sweep.name={config.sweep.name}",
                       f"sweep.storage={_format(url)}", f"sweep.trial={trial.number}"]
                rejected = _rejection(compose, job, trial, config.sweep.max_memory_gb)
                if rejected:  # told as pruned: the sampler learns to avoid it, no failure counts
                    trial.set_user_attr("rejected", rejected)
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    log.info("trial %d: rejected before launch, %s | %s", trial.number, rejected,
                             " ".join(trial_overrides))
                    continue
                batch.append(trial)
                jobs.append(job)
            if not jobs:
                continue
            heartbeat.track([t._trial_id for t in batch])
            try:
                returns = launcher.launch(jobs, initial_job_idx=launched)
            except BaseException as err:  # interrupted: the trials in flight did not finish
                for trial in batch:
                    trial.set_user_attr("error", f"{type(err).__name__}: sweep stopped")
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            heartbeat.track([])
            launched += len(batch)
            for trial, job in zip(batch, returns):
                try:
                    state = _tell(study, trial, job, metric_names)
                except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it as stale
                    log.warning("trial %d was already finished by another worker", trial.number)
                    continue
                spent = (f", {budget.used_s() / 60:.1f} of {config.sweep.timeout_min:g} min"
                         if config.sweep.timeout_min else "")
                log.info("trial %d: %s %s | %s%s", trial.number, state, " ".join(trial.user_attrs["overrides"]),
                         progress_line(study, config.sweep.n_trials, metric_names), spent)
    return sweep_report.report(study, folder, config, passed, budget.summary())


def progress_line(study: Any, n_trials: int, metric_names: List[str]) -> str:
    """``trials 5/12 done (4 complete, 1 pruned, 2 running), best tuned/eval/loss 2.31 (trial 3)``
    (running: other workers' trials in flight)."""
    trials = study.get_trials(deepcopy=False)
    counts = collections.Counter(t.state.name for t in trials)
    finished = ("COMPLETE", "PRUNED", "FAIL")
    done = sum(counts[s] for s in finished)
    states = ", ".join(f"{counts[s]} {s.lower()}" for s in (*finished, "RUNNING") if counts[s])
    line = f"trials {done}/{n_trials} done ({states or 'none yet'})"
    if not counts["COMPLETE"]:
        return line
    if len(metric_names) > 1:
        return f"{line}, Pareto front of {len(study.best_trials)} trial(s)"
    best = study.best_trial
    return f"{line}, best {metric_names[0]} {best.value:.6g} (trial {best.number})"
