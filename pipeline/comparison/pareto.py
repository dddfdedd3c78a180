"""The Pareto front of quality vs cost over a report's configurations: which ones no other
beats on the metric without costing more in trainable parameters, peak memory or wall time."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from pipeline.comparison.paired import higher_is_better


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether point ``a`` is at least as good as ``b`` everywhere and better somewhere.

    Args:
        a: Quality first (higher is better), then costs (lower is better).
        b: The same for the other point.
    """
    no_worse = a[0] >= b[0] and all(x <= y for x, y in zip(a[1:], b[1:]))
    return no_worse and tuple(a) != tuple(b)


def pareto_front(points: Mapping[str, Sequence[float]], maximize: bool = True) -> List[str]:
    """The labels of the non-dominated points, in the order given.

    Args:
        points: Per label, quality then each cost (lower cost is better).
        maximize: Whether higher quality is better (False for a loss).

    Returns:
        Labels no other point dominates; equal points are all kept.
    """
    signed = {k: (v[0] if maximize else -v[0], *v[1:]) for k, v in points.items()}
    return [k for k, p in signed.items() if not any(dominates(q, p) for q in signed.values())]


def pareto_costs(table: Dict[str, Dict[str, Any]]) -> List[str]:
    """The cost keys of the Pareto view every configuration has: trainable parameters, peak
    memory (CUDA when measured, else RSS) and wall time."""
    def everywhere(key: str) -> bool:
        return all(not math.isnan(row.get(key, (math.nan, 0))[0]) for row in table.values())

    memory = "perf/peak_cuda_mb" if everywhere("perf/peak_cuda_mb") else "perf/peak_rss_mb"
    return [k for k in ("params/trainable", memory, "perf/wall_time_s") if everywhere(k)]


def pareto(table: Dict[str, Dict[str, Any]], metric: str) -> Tuple[List[str], List[str]]:
    """The cost keys used and the non-dominated configurations over ``metric`` and those costs."""
    costs = pareto_costs(table)
    points = {label: (row[metric][0], *(row[k][0] for k in costs)) for label, row in table.items()
              if not math.isnan(row.get(metric, (math.nan, 0))[0])}
    return costs, pareto_front(points, maximize=higher_is_better(metric))
