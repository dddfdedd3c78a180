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
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline import config as C
from pipeline import tracking

log = logging.getLogger("pipeline.sweep")

PARAM_TYPES = ("float", "int", "categorical")
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
    for key in ("sampler", "pruner"):
        if sweep[key] is not None and "_target_" not in sweep[key]:
            problems.append(f"sweep.{key} needs _target_ (an Optuna class, e.g. optuna.pruners.MedianPruner)")
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
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                failed_trial_callback=_mark_stale_run if heartbeat_s else None)
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
                              pruner=_instantiate(cfg.sweep.pruner) or optuna.pruners.NopPruner())
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
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics is None or not state.is_world_process_zero:
                return
            if metric not in metrics:  # validated up front; this would be a wiring bug
                raise C.PipelineError(f"the evaluation logged no {metric} to report for pruning; "
                                      f"it logged {', '.join(sorted(metrics))}")
            value = float(metrics[metric])
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
        sampler=_instantiate(cfg.sweep.sampler), pruner=_instantiate(cfg.sweep.pruner),
        directions=directions, load_if_exists=True)
    found = [d.name.lower() for d in study.directions]
    if found != directions:
        raise C.ConfigError([f"study {cfg.sweep.name!r} in {url} has directions {found}, this sweep "
                             f"{directions}: give the sweep another sweep.name"])
    return study, url


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


def run(config: DictConfig, launcher: Any, arguments: List[str]) -> Any:
    """The sweep: ask, launch, tell until the study holds ``sweep.n_trials`` trials.

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
    launched = 0
    with Heartbeat(study._storage, config.sweep.heartbeat_s) as heartbeat:
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # trials of killed workers
            counts = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))
            if counts["FAIL"] >= config.sweep.max_failures:
                report(study, folder, config, passed)
                raise C.PipelineError(
                    f"sweep {config.sweep.name} stopped: {counts['FAIL']} failed trials reached "
                    f"sweep.max_failures={config.sweep.max_failures}; see the error user attribute "
                    f"of each failed trial in {folder / 'report.md'}")
            remaining = config.sweep.n_trials - sum(counts[s] for s in COUNTED)
            if remaining <= 0:
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
                batch.append(trial)
                jobs.append([*passed, *trial_overrides, f"sweep.name={config.sweep.name}",
                             f"sweep.storage={_format(url)}", f"sweep.trial={trial.number}"])
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
                log.info("trial %d: %s %s | %s", trial.number, state, " ".join(trial.user_attrs["overrides"]),
                         progress_line(study, config.sweep.n_trials, metric_names))
    return report(study, folder, config, passed)


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


# --------------------------------------------------------------------------- the end-of-sweep report


def best_command(config: DictConfig, passed: Sequence[str], trial: Any) -> str:
    """The plain training command that reproduces a trial (its sweep file's base settings,
    the other command-line overrides, the trial's values)."""
    base = [o for o in passed if not o.startswith("sweep.")]
    return " ".join(["python -m pipeline.train", *base, *trial.user_attrs.get("overrides", [])])


def _first_objective(study: Any) -> Optional[Any]:
    """Importance target of a multi-objective study: its first objective, lower is better."""
    if len(study.directions) == 1:
        return None
    sign = -1.0 if study.directions[0].name == "MAXIMIZE" else 1.0
    return lambda t: sign * t.values[0]


def _importances(study: Any) -> Dict[str, float]:
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "too few trials": the numbers say it themselves
            return dict(optuna.importance.get_param_importances(study, target=_first_objective(study)))
    except (RuntimeError, ValueError) as err:  # no finished trials, or one distinct value
        log.info("parameter importances: not available (%s)", err)
        return {}


def _plots(study: Any, folder: Path, names: List[str], importances: Dict[str, float]) -> List[str]:
    """Optimisation history, importances and (multi-objective) Pareto front as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    plots = {}
    if len(names) == 1:
        plots["history.png"] = lambda: vis.plot_optimization_history(study, target_name=names[0])
    else:
        plots["pareto_front.png"] = lambda: vis.plot_pareto_front(study, target_names=names)
    if importances:
        plots["importances.png"] = lambda: vis.plot_param_importances(
            study, target=_first_objective(study), target_name=names[0])
    written = []
    for file, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = plot()
            figure = getattr(axes, "figure", None) or axes.flat[0].figure
            figure.set_size_inches(8, 5)
            figure.savefig(folder / f".{file}", format="png", bbox_inches="tight", dpi=100)
            (folder / f".{file}").replace(folder / file)
            plt.close(figure)
            written.append(file)
        except Exception as err:  # a plot is a convenience; the report stands without it
            log.warning("plot %s failed: %s", file, err)
    return written


def report(study: Any, folder: Path, config: DictConfig, passed: Sequence[str]) -> Dict[str, Any]:
    """Writes ``report.json``, ``report.md`` and the plots in the sweep folder; logs the summary."""
    names = [o.metric for o in objectives(config)]
    trials = study.get_trials(deepcopy=False)
    counts = dict(collections.Counter(t.state.name for t in trials))
    best = study.best_trials if len(names) > 1 else (
        [study.best_trial] if any(t.state.name == "COMPLETE" for t in trials) else [])
    rows = [{"number": t.number, "values": dict(zip(names, t.values)), "params": t.params,
             "run_dir": t.user_attrs.get("run_dir"), "command": best_command(config, passed, t)}
            for t in best]
    importances = _importances(study)
    plots = _plots(study, folder, names, importances)
    summary = {"study": config.sweep.name, "objectives": names,
               "directions": [o.direction for o in objectives(config)], "trials": counts,
               "best": rows, "importances": importances, "plots": plots,
               "failed": {t.number: t.user_attrs.get("error", "no error recorded: its worker stopped")
                          for t in trials if t.state.name == "FAIL"}}
    tracking.write_json(folder / "report.json", summary)
    text = report_markdown(summary)
    tmp = folder / ".report.md"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(folder / "report.md")
    log.info("sweep report (%s):\n%s", folder / "report.md", text)
    return summary


def report_markdown(summary: Dict[str, Any]) -> str:
    title = "Pareto front" if len(summary["objectives"]) > 1 else "Best trial"
    lines = [f"# Sweep {summary['study']}", "",
             "Trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary["trials"].items())), "",
             f"## {title}", ""]
    header = ["trial", *summary["objectives"], "params"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["best"]:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row["params"].items())
        lines.append("| " + " | ".join([str(row["number"]), *[f"{v:.4g}" for v in row["values"].values()],
                                        params]) + " |")
    for row in summary["best"]:
        where = f" ({row['run_dir']})" if row["run_dir"] else ""
        lines += ["", f"Trial {row['number']}{where}:", "", f"    {row['command']}"]
    if summary["importances"]:
        lines += ["", "## Parameter importances", ""]
        lines += [f"- {k}: {v:.3f}" for k, v in summary["importances"].items()]
    if summary["failed"]:
        lines += ["", "## Failed trials", ""]
        lines += [f"- trial {n}: {e}" for n, e in summary["failed"].items()]
    if summary["plots"]:
        lines += ["", "Plots: " + ", ".join(summary["plots"])]
    return "\n".join(lines) + "\n"
