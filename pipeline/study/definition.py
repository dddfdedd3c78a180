"""A sweep's definition (``sweep=<name>``, a file in ``sweeps/``): its checks before any trial,
its search space sampled into a trial's overrides, and the Optuna objects it names (storage,
sampler, pruner).

``python -m pipeline.train -m sweep=<name>`` (and ``python -m pipeline.merge -m
merge_sweep=<name>``, whose trials are merges: :data:`MERGING`): the sweeper
(``hydra_plugins/pipeline_sweeper``) asks Optuna for trials, turns their parameters into
overrides and launches them through Hydra's configured launcher (in process, or SLURM via
submitit), then tells Optuna the outcome (:mod:`pipeline.study.driver`). Each job's overrides
carry the study name, storage and trial number (``sweep.trial``), so the job rebuilds its trial
from the storage to record its metrics, report intermediate values and ask whether to stop (:mod:`pipeline.study.trial`): that works in another
process or on another machine. Workers share a study only through its storage (SQLite on one
machine, PostgreSQL on a cluster); re-running the same command continues the study.

Why not Hydra's own optuna sweeper plugin: it pins optuna<3, cannot prune, cannot resume and
stops at the first failed trial.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from pipeline.adapters.registry import ADAPTERS
from pipeline.config.app_schema import MergeConfig
from pipeline.config.options import CONF_DIR, group_options, plain
from pipeline.config.schema import ObjectiveConfig, SweepConfig, SweepParam, TrainConfig
from pipeline.runs.runfolder import RunFolder
from pipeline.study import merge_sweep
from pipeline.trainer.objective import metric_names, reports_any

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


# --------------------------------------------------------------------------- what the trials run

# The typed config of a command whose trials a sweep runs.
SweptConfig = Union[TrainConfig, MergeConfig]


@dataclasses.dataclass(frozen=True)
class Target:
    """What differs between the commands a sweep's trials run; the rest of a sweep (space,
    storage, budget, failures, report) is the same for all."""

    command: str  # the entry point: ``python -m pipeline.<command>`` reproduces a trial
    metric_names: Callable[[Any], List[str]]  # what a trial of this config reports (listed in errors)
    reports: Callable[[Any, str], bool]  # whether a trial of this config reports a metric
    problems: Callable[[Any, List[ObjectiveConfig]], List[str]]  # this command's own rules
    objectives: Callable[[Any, ObjectiveConfig], List[ObjectiveConfig]] = lambda cfg, objective: [objective]
    per_element: Callable[[Any], Dict[str, int]] = lambda cfg: {}  # list keys sampled one value per element


def _training_problems(cfg: TrainConfig, declared: List[ObjectiveConfig]) -> List[str]:
    """Constraints, and pruning where a pruner is set (any objective a run reports is allowed)."""
    return _check_constraints(cfg) + (_check_pruning(cfg) if cfg.sweep.pruner is not None else [])


def target_of(cfg: SweptConfig) -> Target:
    """Training's rules, or merging's for a ``MergeConfig``."""
    return MERGING if isinstance(cfg, MergeConfig) else TRAINING


# --------------------------------------------------------------------------- the sweep definition


def declared_objectives(cfg: SweptConfig) -> List[ObjectiveConfig]:
    """``sweep.objectives``, or the run's single ``objective``, as the sweep file writes them."""
    return list(cfg.sweep.objectives) or [cfg.objective]


def objectives(cfg: SweptConfig) -> List[ObjectiveConfig]:
    """The sweep's objectives: ``sweep.objectives``, or the run's single ``objective`` (a merge
    sweep's ``kept/*/...`` expanded to one per source)."""
    expand = target_of(cfg).objectives
    return [each for objective in declared_objectives(cfg) for each in expand(cfg, objective)]


def optuna_name(key: str, spec: SweepParam) -> str:
    """The Optuna parameter behind ``key``: a ``times`` parameter samples the multiple."""
    return f"{key}/{spec.times}" if spec.times else key


def is_group(key: str) -> bool:
    """``adapter`` (a config group choice) rather than ``adapter.r`` (a value)."""
    return "." not in key and (CONF_DIR / key).is_dir()


def intermediate_metric(cfg: TrainConfig) -> Optional[str]:
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
    settings = ADAPTERS.get(option)
    return settings is None or key in {f.name for f in dataclasses.fields(settings)}


def _check_param(cfg: SweptConfig, key: str, spec: SweepParam, earlier: List[str]) -> List[str]:
    where = f"sweep.params.{key}"
    problems = []
    if key in target_of(cfg).per_element(cfg) and spec.type == "categorical":
        problems.append(f"{where} takes one value per element, each sampled alike: give type float or int "
                        "with low and high")
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
        options = group_options(key)
        unknown = [c for c in spec.choices or [] if c not in options]
        if unknown:
            problems.append(f"{where} has choices {unknown} that are not {key} options; "
                            f"available: {', '.join(options)}")
    elif key.startswith("adapter.") and "adapter" in cfg.sweep.params:
        if not any(_has_setting(o, key[len("adapter."):]) for o in cfg.sweep.params["adapter"].choices or []):
            problems.append(f"{where}: none of the sampled adapters has this setting")
    elif not _has_key(cfg, key):
        problems.append(f"{where}: {key} is not a key of the {target_of(cfg).command} config")
    elif spec.type == "categorical":
        problems += [f"{where} has choice {value!r} that {key} does not take: {why}"
                     for value, why in _refused_values(cfg, key, spec.choices or [])]
    return problems


def _parent(cfg: SweptConfig, key: str) -> Tuple[Any, str]:
    """The schema object holding dotted ``key`` and the key's last part (None when absent)."""
    *path, leaf = key.split(".")
    node: Any = cfg
    for part in path:
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return None, leaf
    return node, leaf


def _has_key(cfg: SweptConfig, key: str) -> bool:
    node, leaf = _parent(cfg, key)
    if isinstance(node, dict):
        return leaf in node
    return dataclasses.is_dataclass(node) and leaf in {f.name for f in dataclasses.fields(node)}


def _refused_values(cfg: SweptConfig, key: str, values: List[Any]) -> List[Tuple[Any, str]]:
    """(value, why) for each value the schema refuses at ``key``: a choice outside its Enum, a
    text for a number. Every trial would otherwise fail while its config is composed."""
    node, leaf = _parent(cfg, key)
    if not dataclasses.is_dataclass(node):
        return []  # a free-form map (trainer.extra, ...): anything goes
    probe, refused = OmegaConf.structured(node), []
    for value in values:
        try:
            OmegaConf.update(probe, leaf, value, merge=False)
        except ValidationError as err:
            refused.append((value, str(err).splitlines()[0]))
    return refused


def check(cfg: SweptConfig) -> List[str]:
    """Every problem with the sweep definition across its fields, before any trial runs (key,
    value and fix); each value's own range is checked with the config's
    (:mod:`pipeline.config.ranges`)."""
    sweep = cfg.sweep
    problems = []
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", sweep.name):
        problems.append(f"sweep.name={sweep.name!r} must be letters, digits, _ . - (it names a folder)")
    if sweep.trial is not None:
        problems.append("sweep.trial is set by the sweeper for each job; remove it")
    if not sweep.params:
        problems.append("sweep.params is empty: add at least one parameter to search")
    earlier: List[str] = []
    for key, spec in sweep.params.items():
        problems += _check_param(cfg, key, spec, earlier)
        earlier.append(key)
    target = target_of(cfg)
    for i, objective in enumerate(objectives(cfg)):
        if objective.direction not in ("minimize", "maximize"):
            problems.append(f"objective #{i} direction={objective.direction!r} must be minimize or maximize")
        if not target.reports(cfg, objective.metric):
            problems.append(f"objective metric {objective.metric!r} is not a metric a run reports; "
                            f"available: {', '.join(target.metric_names(cfg))}")
    problems += target.problems(cfg, declared_objectives(cfg))
    if sweep.sampler is not None and "_target_" not in sweep.sampler:
        problems.append("sweep.sampler needs _target_ (an Optuna class, e.g. optuna.samplers.TPESampler)")
    if isinstance(sweep.pruner, str) and sweep.pruner not in PRUNERS:
        problems.append(f"sweep.pruner={sweep.pruner!r} is not one of {', '.join(PRUNERS)}; or give "
                        "{_target_: <an optuna.pruners class>, ...}, or null")
    elif sweep.pruner is not None and not isinstance(sweep.pruner, str) and \
            (not isinstance(sweep.pruner, dict) or "_target_" not in sweep.pruner):
        problems.append(f"sweep.pruner needs _target_ (an Optuna class, e.g. optuna.pruners.MedianPruner) "
                        f"or a preset name ({', '.join(PRUNERS)})")
    return problems


def _check_constraints(cfg: TrainConfig) -> List[str]:
    """Each constraint names a ``<set>/<metric>`` a run reports for both models."""
    problems = []
    for i, constraint in enumerate(cfg.sweep.constraints):
        metric = constraint.metric
        if metric.split("/", 1)[0] in ("base", "tuned", "delta"):
            problems.append(f"sweep.constraints #{i} metric={metric!r}: name the metric without its side "
                            f"({metric.split('/', 1)[1]}): a constraint compares the tuned model with the base")
        elif not reports_any(cfg, f"tuned/{metric}"):
            names = sorted({m.split("/", 1)[1] for m in metric_names(cfg) if m.startswith("tuned/")})
            problems.append(f"sweep.constraints #{i} metric={metric!r} is not a metric a run reports for both "
                            f"models; available: {', '.join(names)}"
                            + (", benchmark/<task>/<metric> for a task of evaluation.benchmarks.tasks"
                               if cfg.evaluation.benchmarks.tasks else ""))
    return problems


def _check_pruning(cfg: TrainConfig) -> List[str]:
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


TRAINING = Target("train", metric_names, reports_any, _training_problems)
MERGING = Target("merge", merge_sweep.metric_names, merge_sweep.reports, merge_sweep.problems,
                 merge_sweep.objectives, merge_sweep.per_source)


# --------------------------------------------------------------------------- Optuna objects


def storage_url(sweep: SweepConfig, folder: Path) -> str:
    """``sweep.storage``, or an SQLite file in the sweep folder."""
    if sweep.storage:
        return str(sweep.storage)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / 'study.db'}"


def make_storage(url: str, heartbeat_s: Optional[int] = None) -> Any:
    """An Optuna RDB storage; with ``heartbeat_s``, trials of a killed worker become FAIL."""
    import optuna  # lazy: optuna (and SQLAlchemy) take a second to import; only sweeps need them
    import sqlalchemy.exc

    # SQLite serialises writers; a worker waits for the lock instead of failing at once.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    # Optuna 4.9 renamed the stale-trial callback; the old name still works there, with a warning.
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
    run = RunFolder(Path(run_dir)) if run_dir else None
    if run is not None and run.info_path.exists() and run.info().get("status") == "running":
        run.update(status="failed", error="the sweep worker stopped while this trial ran "
                   "(no heartbeat for 2 x sweep.heartbeat_s)")


def instantiated(spec: Optional[Dict[str, Any]]) -> Any:
    """The Optuna object ``{_target_: <class>, <arguments>}`` describes (None for None)."""
    return None if spec is None else instantiate(plain(spec))


def pruner_spec(cfg: SweptConfig) -> Optional[Dict[str, Any]]:
    """``sweep.pruner`` as ``{_target_: ..., ...}`` (a preset filled in), or None."""
    spec = cfg.sweep.pruner
    return PRUNERS[spec](cfg) if isinstance(spec, str) else spec


def make_pruner(cfg: SweptConfig) -> Any:
    """The Optuna pruner of ``sweep.pruner`` (a preset name or ``{_target_: ...}``), or None."""
    return instantiated(pruner_spec(cfg))


def format_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_./:+-]+", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def suggest(trial: Any, cfg: SweptConfig) -> Dict[str, Any]:
    """Samples the search space: ``{key: value}`` for this trial.

    Conditional: ``adapter.<setting>`` is sampled only when the trial's adapter has that setting
    (e.g. dropout for LoRA, not IA3); a ``times`` value is a multiple of an earlier value. A list
    key that takes one value per element (``merge.weights``: one per source run) samples each
    element as its own parameter (``merge.weights.0``, ``merge.weights.1``, ...).
    """
    values: Dict[str, Any] = {}
    lengths = target_of(cfg).per_element(cfg)
    for key, spec in cfg.sweep.params.items():
        if key.startswith("adapter.") and \
                not _has_setting(values.get("adapter", cfg.adapter.method), key[len("adapter."):]):
            continue
        name = optuna_name(key, spec)
        if key in lengths:
            values[key] = [_sampled(trial, f"{name}.{i}", spec) for i in range(lengths[key])]
            continue
        value = _sampled(trial, name, spec)
        values[key] = value * values[spec.times] if spec.times else value
    return values


def _sampled(trial: Any, name: str, spec: SweepParam) -> Any:
    if spec.type == "categorical":
        return trial.suggest_categorical(name, list(spec.choices))
    if spec.type == "int":
        return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)


def overrides(values: Dict[str, Any]) -> List[str]:
    return [f"{key}={format_value(value)}" for key, value in values.items()]
