"""The objective of a run: which metrics a run of a config reports (what ``objective.metric``,
a sweep's objectives and constraints may name), and the objective as the Trainer's
best-checkpoint metric when evaluations during training measure it."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from pipeline.config.schema import TrainConfig

# What every training run reports besides its base/tuned/delta evaluation metrics.
TRAINING_METRICS = ["train/loss", "train/steps", "train/tokens", "perf/train_tokens_per_s",
                    "perf/train_runtime_s", "perf/peak_rss_mb", "perf/wall_time_s", "perf/artifact_mb",
                    "params/trainable", "params/total", "params/trainable_pct"]


def metric_names(cfg: TrainConfig) -> List[str]:
    """Every final metric name a run of ``cfg`` can report (for ``objective.metric``)."""
    ev = cfg.evaluation
    generated = []
    for name in ev.metrics:
        if name in ("accuracy", "macro_f1"):
            generated += [name, "unparsable_rate", *[f"f1/{label}" for label in ev.labels or []]]
        elif not name.startswith("evaluate:"):
            generated.append(name)
    sets = [s for s, size in (("eval", cfg.data.validation_size), ("test", cfg.data.test_size)) if size > 0]
    names = [f"{side}/{s}/{m}" for side in ("base", "tuned", "delta") for s in sets + list(ev.extra_datasets)
             for m in ["loss", "perplexity"] + (generated if s in ev.splits or s in ev.extra_datasets else [])]
    return sorted(set(names)) + TRAINING_METRICS


def result_line(metrics: Dict[str, Any], objective: str, direction: str, primary: Optional[str]) -> str:
    """A run's result in one line: the objective's value, then base -> tuned on the objective's
    metric and on ``primary`` (``test/bleu``: the first generation metric on its first set)."""
    parts = [f"result: {objective} = {_value(metrics.get(objective))} ({direction})"]
    shown = []
    for name in (objective.partition("/")[2] if objective.startswith(("base/", "tuned/", "delta/")) else None,
                 primary):
        if name and name not in shown and f"tuned/{name}" in metrics:
            shown.append(name)
            parts.append(f"{name} base {_value(metrics.get(f'base/{name}'))} -> tuned {_value(metrics[f'tuned/{name}'])}")
    return "; ".join(parts)


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"


def primary_metric(cfg: TrainConfig) -> Optional[str]:
    """``<set>/<metric>`` of the first generation metric on the first evaluated set, or None."""
    if not cfg.evaluation.metrics or not cfg.evaluation.splits:
        return None
    return f"{cfg.evaluation.splits[0]}/{cfg.evaluation.metrics[0]}"


def reports_any(cfg: TrainConfig, name: str) -> bool:
    """Whether a run of ``cfg`` can report metric ``name`` (an ``evaluate:`` metric's names are
    known only once it has run: then any name is taken; so are a benchmark's, whose metrics its
    task defines: ``<side>/benchmark/<task>/<metric>`` for a task in
    ``evaluation.benchmarks.tasks``)."""
    side, _, rest = name.partition("/")
    if side in ("base", "tuned", "delta") and rest.startswith("benchmark/"):
        task, _, metric = rest[len("benchmark/"):].partition("/")
        return task in cfg.evaluation.benchmarks.tasks and bool(metric)
    return name in metric_names(cfg) or any(m.startswith("evaluate:") for m in cfg.evaluation.metrics)


def best_metric(objective: str, direction: str, logged: List[str]) -> Optional[Tuple[str, bool]]:
    """The Trainer's ``(metric_for_best_model, greater_is_better)`` for the run's objective.

    ``tuned/eval/<name>`` is what the Trainer logs as ``eval_<name>`` at each evaluation during
    training, so checkpoint rotation then keeps the best checkpoint by the objective.

    Args:
        objective: ``objective.metric``, e.g. ``tuned/eval/loss``.
        direction: ``minimize`` or ``maximize``.
        logged: the metric names evaluations during training log (``loss``, and generation
            metrics with ``evaluation.during_training``); empty when there are none.

    Returns:
        None for an objective not measured during training (test metrics, costs).
    """
    name = objective[len("tuned/eval/"):] if objective.startswith("tuned/eval/") else None
    if name not in logged:
        return None
    return f"eval_{name}", direction == "maximize"




def best_for(cfg: TrainConfig, has_validation: bool) -> Optional[Tuple[str, bool]]:
    """The objective as the Trainer's metric_for_best_model, when evaluations during training
    measure it (so checkpoint rotation keeps the best checkpoint)."""
    logged = []
    if cfg.trainer.eval_steps and has_validation:
        logged = ["loss"]
        if cfg.evaluation.during_training:
            logged += [m.split("/")[-1] for m in metric_names(cfg) if m.startswith("tuned/eval/")
                       and not m.endswith(("/loss", "/perplexity"))]
    return best_metric(cfg.objective.metric, cfg.objective.direction, logged)
