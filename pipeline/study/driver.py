"""The sweep's driver: ask Optuna for trials, launch them, tell the outcomes; with heartbeats for
the trials in flight, a wall-clock budget shared by every worker, and memory-aware rejection
before launch. The sweep definition and its Optuna objects are :mod:`pipeline.study.definition`,
what runs inside a trial's job :mod:`pipeline.study.trial`. Hydra's side (its launcher, the
trials' composed configs) is the sweeper plugin's (``hydra_plugins/pipeline_sweeper``), which
hands this module typed configs and a function that launches jobs.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from pipeline.config.errors import ConfigError, PipelineError
from pipeline.config.schema import TrainConfig
from pipeline.runs.runfolder import objective_value
from pipeline.study import summary
from pipeline.study.definition import (COUNTED, SweptConfig, check, format_value, instantiated, make_pruner,
                                       make_storage, objectives, overrides, storage_url, suggest)
from pipeline.study.trial import is_pruned
from pipeline.trainer import memory

# Runs a batch of jobs (each its overrides), numbered from the given index; returns per job the
# exception it failed with, or None when it finished.
Launch = Callable[[List[List[str]], int], List[Optional[BaseException]]]
# A job's overrides -> its composed, typed config (raises when it does not compose).
Compose = Callable[[List[str]], SweptConfig]

log = logging.getLogger("pipeline.sweep")



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


def open_study(cfg: SweptConfig, folder: Path) -> Tuple[Any, str]:
    """Creates the study or loads it from storage (the same command continues it)."""
    import optuna  # lazy: optuna takes a second to import; only sweeps need it

    url = storage_url(cfg.sweep, folder)
    directions = [o.direction for o in objectives(cfg)]
    study = optuna.create_study(
        study_name=cfg.sweep.name, storage=make_storage(url, cfg.sweep.heartbeat_s),
        sampler=instantiated(cfg.sweep.sampler), pruner=make_pruner(cfg),
        directions=directions, load_if_exists=True)
    found = [d.name.lower() for d in study.directions]
    if found != directions:
        raise ConfigError([f"study {cfg.sweep.name!r} in {url} has directions {found}, this sweep "
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


def memory_rejection(trial_cfg: TrainConfig, max_gb: float) -> Optional[str]:
    """Why a trial's configuration cannot fit in ``max_gb`` GiB per device (model states, as
    ``python -m pipeline.estimate`` computes them), or None when it fits."""
    needed = memory.for_config(trial_cfg, memory.count_for_config(trial_cfg)).total / memory.GB
    if needed <= max_gb:
        return None
    return (f"model states need an estimated {needed:.3f} GiB per device (weights, gradients, optimizer; "
            f"activations not included) > sweep.max_memory_gb={max_gb:g}")


def _tell(study: Any, trial: Any, error: Optional[BaseException], metric_names: List[str]) -> str:
    """Tells Optuna one job's outcome (``error``: what it failed with, None when it finished);
    returns the trial's final state name."""
    from optuna.trial import TrialState  # lazy: optuna takes a second to import

    if error is None:
        # Trial.user_attrs is this process's cached copy; the job wrote to the storage.
        metrics = study._storage.get_trial_user_attrs(trial._trial_id).get("metrics", {})
        try:
            values = [objective_value(metrics, name) for name in metric_names]
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


def _composition_error(compose: Optional[Compose], job: List[str]) -> Tuple[Optional[SweptConfig], Optional[str]]:
    """(the job's composed config, None), or (None, why it does not compose): such a trial fails
    alone instead of stopping the launch of the whole sweep."""
    if compose is None:
        return None, None
    try:
        return compose(job), None
    except Exception as err:  # e.g. a sampled float for an integer key
        cause = f": {str(err.__cause__).splitlines()[0]}" if err.__cause__ else ""
        return None, f"{type(err).__name__}: {err}{cause}"


def _rejection(composed: Optional[SweptConfig], trial: Any, max_gb: Optional[float]) -> Optional[str]:
    """With ``sweep.max_memory_gb``: why the trial's composed config would not fit, or None."""
    if max_gb is None or composed is None:
        return None
    try:
        return memory_rejection(composed, max_gb)
    except Exception as err:  # the trial itself will fail with the full error, if it is one
        log.warning("trial %d: no memory estimate (%s: %s); launching it", trial.number,
                    type(err).__name__, err)
        return None


def _open(cfg: SweptConfig, folder: Path) -> Tuple[Any, str]:
    """Checks the sweep definition and opens its study: (study, storage url)."""
    if cfg.sweep is None:
        raise ConfigError(["hydra/sweeper=pipeline_optuna needs a sweep definition: add "
                           "sweep=<name> (a file in sweeps/), or merge_sweep=<name> for pipeline.merge "
                           "(a file in sweeps/merge/)"])
    problems = check(cfg)
    if problems:
        raise ConfigError(problems)
    study, url = open_study(cfg, folder)
    log.info("sweep %s: study in %s, %d trials wanted", cfg.sweep.name, url.split("@")[-1],
             cfg.sweep.n_trials)
    return study, url


def _trials_left(study: Any, config: SweptConfig, folder: Path, budget: Budget, report: Callable[[], Any]) -> int:
    """How many trials to ask for now (0: the sweep is done).

    Raises:
        PipelineError: when the study reached ``sweep.max_failures`` failed trials.
    """
    import optuna  # lazy: optuna takes a second to import

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of killed workers
    counts = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))
    if counts["FAIL"] >= config.sweep.max_failures:
        report()
        raise PipelineError(
            f"sweep {config.sweep.name} stopped: {counts['FAIL']} failed trials reached "
            f"sweep.max_failures={config.sweep.max_failures}; see the error user attribute "
            f"of each failed trial in {folder / 'report.md'}")
    remaining = config.sweep.n_trials - sum(counts[s] for s in COUNTED)
    if remaining > 0 and budget.spent():
        log.info("sweep %s: wall-clock budget sweep.timeout_min=%g spent; no new trials "
                 "(raise it to continue the study)", config.sweep.name, config.sweep.timeout_min)
        return 0
    return max(remaining, 0)


def _ask(study: Any, config: SweptConfig, count: int, passed: List[str], identity: List[str],
         compose: Optional[Compose]) -> Tuple[List[Any], List[List[str]]]:
    """Asks Optuna for ``count`` trials: (the trials to launch, their jobs' overrides: ``passed``,
    the trial's values, then ``identity``, the study's name and storage, and the trial). A trial
    that cannot be sampled or whose config does not compose fails; one that would not fit
    (``sweep.max_memory_gb``) is told as pruned, so the sampler learns to avoid it and no
    failure counts."""
    import optuna  # lazy: optuna takes a second to import

    batch, jobs = [], []
    for trial in [study.ask() for _ in range(count)]:
        try:  # an enqueued value outside the space can fail here: that trial fails
            trial_overrides = overrides(suggest(trial, config))
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d failed while sampling: %s", trial.number, err)
            continue
        trial.set_user_attr("overrides", trial_overrides)
        job = [*passed, *trial_overrides, *identity, f"sweep.trial={trial.number}"]
        composed, error = _composition_error(compose, job)
        if error:
            trial.set_user_attr("error", error)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d failed: its config does not compose: %s", trial.number, error)
            continue
        rejected = _rejection(composed, trial, config.sweep.max_memory_gb)
        if rejected:
            trial.set_user_attr("rejected", rejected)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log.info("trial %d: rejected before launch, %s | %s", trial.number, rejected,
                     " ".join(trial_overrides))
            continue
        batch.append(trial)
        jobs.append(job)
    return batch, jobs


def _launch(launch: Launch, batch: List[Any], jobs: List[List[str]], first_index: int, study: Any,
            heartbeat: Heartbeat) -> List[Optional[BaseException]]:
    """Runs the jobs; if the launch is interrupted, the trials in flight fail (they did not
    finish) before the interruption goes on."""
    import optuna  # lazy: optuna takes a second to import

    heartbeat.track([t._trial_id for t in batch])
    try:
        returns = launch(jobs, first_index)
    except BaseException as err:
        for trial in batch:
            trial.set_user_attr("error", f"{type(err).__name__}: sweep stopped")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    heartbeat.track([])
    return returns


def _tell_all(study: Any, config: SweptConfig, batch: List[Any], errors: List[Optional[BaseException]],
              budget: Budget, metric_names: List[str]) -> None:
    """Tells Optuna each job's outcome and logs a progress line per trial."""
    import optuna  # lazy: optuna takes a second to import

    for trial, error in zip(batch, errors):
        try:
            state = _tell(study, trial, error, metric_names)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it as stale
            log.warning("trial %d was already finished by another worker", trial.number)
            continue
        spent = (f", {budget.used_s() / 60:.1f} of {config.sweep.timeout_min:g} min"
                 if config.sweep.timeout_min else "")
        log.info("trial %d: %s %s | %s%s", trial.number, state, " ".join(trial.user_attrs["overrides"]),
                 progress_line(study, config.sweep.n_trials, metric_names), spent)


def run(cfg: SweptConfig, folder: Path, launch: Launch, passed: List[str],
        compose: Optional[Compose] = None) -> Dict[str, Any]:
    """The sweep: ask, launch, tell until the study holds ``sweep.n_trials`` trials or its
    wall-clock budget (``sweep.timeout_min``) is spent; returns its report.

    Args:
        cfg: the sweep's composed config (``sweep`` set), typed: a ``TrainConfig`` (the trials
            train), or a ``MergeConfig`` (the trials merge; :data:`pipeline.study.definition.MERGING`).
        folder: the sweep folder (``hydra.sweep.dir``): study storage, report, trial folders.
        launch: runs a batch of jobs (Hydra's configured launcher).
        passed: the command line's overrides, which every trial gets.
        compose: a job's overrides -> its typed config: with ``sweep.max_memory_gb`` each sampled
            configuration is estimated before it launches; a trial whose config does not
            compose fails alone.

    Raises:
        ConfigError: a bad sweep definition (before any trial runs).
        PipelineError: when the study reaches ``sweep.max_failures`` failed trials.
    """
    study, url = _open(cfg, folder)
    metric_names = [o.metric for o in objectives(cfg)]
    budget = Budget(study, cfg.sweep.timeout_min)
    identity = [f"sweep.name={cfg.sweep.name}", f"sweep.storage={format_value(url)}"]

    def report() -> Dict[str, Any]:
        return summary.report(study, folder, cfg, passed, budget.summary())

    launched = 0
    with Heartbeat(study._storage, cfg.sweep.heartbeat_s) as heartbeat:
        while (left := _trials_left(study, cfg, folder, budget, report)) > 0:
            batch, jobs = _ask(study, cfg, min(cfg.sweep.n_jobs, left), passed, identity, compose)
            if not jobs:
                continue
            errors = _launch(launch, batch, jobs, launched, study, heartbeat)
            launched += len(batch)
            _tell_all(study, cfg, batch, errors, budget, metric_names)
    return report()


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
    broken = sum(summary.infeasible(t) for t in trials)
    line += f", {broken} infeasible" if broken else ""
    best = summary.best_trials(study, multi_objective=False)
    if not best:
        return f"{line}, no feasible trial yet"
    return f"{line}, best {metric_names[0]} {best[0].value:.6g} (trial {best[0].number})"
