"""What a merge sweep (``python -m pipeline.merge -m merge_sweep=<name>``, files in
``sweeps/merge/``) may optimise and search: the metric names a merge of the given runs reports,
its objectives (``kept/*/eval/<metric>`` is one objective per source, whose Pareto front is the
trade-off between the sources), and the rules only merging has. :mod:`pipeline.study.definition`
dispatches to these for a ``MergeConfig``; the rest of a sweep (storage, budget, failures,
report) is the same as training's.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, List

from pipeline.adapters.merging import AGGREGATES, source_names
from pipeline.adapters.saved import read_run
from pipeline.config.app_schema import MergeConfig
from pipeline.config.errors import ConfigError
from pipeline.config.schema import DataConfig, EvaluationConfig, ObjectiveConfig
from pipeline.trainer.objective import metric_names as training_metric_names

# pipeline.merge's metric names: <side>/<source>/<set>/<metric>, and kept/<aggregate>/<set>/<metric>
# (AGGREGATES).
SIDES = ("base", "source", "merged", "kept")
EACH = "*"  # kept/*/eval/loss: one objective per source
VALIDATION = "eval"  # the set objectives are measured on; the test sets are reported only
# One value per source run (merge.weights=[w1, w2, ...]): sampled as merge.weights.0, .1, ...
PER_SOURCE = ("merge.weights",)


def measured_names(evaluation: EvaluationConfig, data: DataConfig) -> List[str]:
    """``<set>/<metric>`` for each metric a measurement of ``data``'s sets reports: the tuned
    side of a training run's names, which depend on these two settings only (so the rule of
    which metric each set gets stays in one place, :mod:`pipeline.trainer.objective`)."""
    names = training_metric_names(SimpleNamespace(evaluation=evaluation, data=data))
    return [name.split("/", 1)[1] for name in names if name.startswith("tuned/")]


def metric_names(cfg: MergeConfig) -> List[str]:
    """Every metric a merge of ``cfg.runs`` reports (none while a run cannot be read: the
    merge's own checks name it)."""
    per_source: Dict[str, set] = {}
    for name, run in zip(source_names(cfg.runs), cfg.runs):
        try:
            per_source[name] = set(measured_names(cfg.evaluation, read_run(run).data))
        except ConfigError:
            return []
    names = [f"{side}/{source}/{m}" for source, measured in per_source.items() for m in measured for side in SIDES]
    common = set.intersection(*per_source.values()) if per_source else set()
    names += [f"kept/{overall}/{m}" for m in common for overall in AGGREGATES]
    return sorted(names)


def reports(cfg: MergeConfig, name: str) -> bool:
    """Whether a merge of ``cfg.runs`` reports ``name`` (an ``evaluate:`` metric's names are
    known only once it has run)."""
    if any(m.startswith("evaluate:") for m in cfg.evaluation.metrics):
        return name.split("/", 1)[0] in SIDES
    return name in metric_names(cfg)


def objectives(cfg: MergeConfig, objective: ObjectiveConfig) -> List[ObjectiveConfig]:
    """``objective``, or for ``kept/*/...`` one objective per source run."""
    side, _, rest = objective.metric.partition("/")
    if not rest.startswith(f"{EACH}/"):
        return [objective]
    return [ObjectiveConfig(f"{side}/{name}/{rest[2:]}", objective.direction) for name in source_names(cfg.runs)]


def per_source(cfg: MergeConfig) -> Dict[str, int]:
    """The keys that take one value per source run, and how many."""
    return {key: len(cfg.runs) for key in PER_SOURCE}


def problems(cfg: MergeConfig, declared: List[ObjectiveConfig]) -> List[str]:
    """What only a merge sweep refuses: objectives that do not depend on the merge or are read
    off the test sets, and the training sweeps' pruning, constraints and memory limit."""
    found = []
    for objective in declared:
        parts = objective.metric.split("/")
        if parts[0] in ("base", "source"):
            found.append(f"objective metric {objective.metric!r} does not depend on the merge; use "
                         f"merged/... or kept/... (e.g. kept/mean/{VALIDATION}/loss)")
        elif len(parts) > 2 and parts[2] != VALIDATION:
            fixed = "/".join([*parts[:2], VALIDATION, *parts[3:]])
            found.append(f"objective metric {objective.metric!r} is measured on the sources' {parts[2]} sets: a "
                         f"merge sweep chooses by the validation sets and reports the rest; use {fixed!r}")
    sweep = cfg.sweep
    if sweep.pruner is not None:
        found.append(f"sweep.pruner={sweep.pruner!r}: a merge trial reports no values before it ends; set "
                     "sweep.pruner=null")
    if sweep.constraints:
        found.append("sweep.constraints compare a tuned model with its base over one run's examples; a merge "
                     "sweep has none: drop them, or make a floor an objective (kept/min/...)")
    if sweep.max_memory_gb is not None:
        found.append("sweep.max_memory_gb estimates training memory; a merge trial loads the base and the "
                     "adapters once: drop it")
    return found
