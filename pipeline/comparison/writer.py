"""A report comparing configurations on quality and cost across the runs of a multirun or sweep
(``python -m pipeline.report``).

A row of the report is one configuration: the settings that differ between the runs, except
``seed`` and the ``--ignore`` keys. The seeds of a configuration are aggregated.

Writes ``report/`` in the folder (or ``--out``): ``report.md`` and ``report.csv`` (one row per
configuration: n and mean and standard deviation over seeds of each quality and cost figure),
each configuration's difference to a baseline with a paired bootstrap interval over examples
and seeds, the Pareto front of quality vs cost, retention on the sets the runs do not train on
(does tuning forget?), PNG plots (:mod:`pipeline.comparison.plots`) and ``report.html`` showing
them together (:mod:`pipeline.comparison.page`). Failed, pruned and unfinished runs are listed,
not dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pipeline.comparison import grouping, paired, pareto, plots
from pipeline.comparison.collect import Run
from pipeline.comparison.page import (QUALITY_PREFIXES, benchmark_lines, configuration_lines, not_compared_lines,
                                     paired_lines, pareto_lines, precision_lines, retention_lines, retention_names,
                                     write_csv, write_html)
from pipeline.runs import atomic

COST_KEYS = ("params/trainable", "params/trainable_pct", "params/total", "perf/peak_rss_mb",
             "perf/peak_cuda_mb", "perf/train_tokens_per_s", "perf/train_runtime_s",
             "perf/wall_time_s", "perf/artifact_mb")
PREFERRED_METRICS = ("tuned/test/bleu", "tuned/test/rougeL", "tuned/test/f1", "tuned/test/accuracy",
                     "tuned/test/loss", "tuned/eval/loss")
PREDICTIONS = Path("eval") / "predictions.jsonl"


def metric_keys(runs: List[Run]) -> List[str]:
    keys = {k for r in runs for k in r.metrics}
    quality = sorted(k for k in keys if k.startswith(QUALITY_PREFIXES))
    return quality + [k for k in COST_KEYS if k in keys]


def summarize_groups(configurations: grouping.Configurations) -> Dict[str, Dict[str, Any]]:
    """Per configuration: its method, varied settings, n (runs), seeds, and the mean/std over
    its runs of every quality and cost key."""
    keys = metric_keys([r for runs in configurations.groups.values() for r in runs])
    table: Dict[str, Dict[str, Any]] = {}
    for label, group in configurations.groups.items():
        row: Dict[str, Any] = {
            "method": " / ".join(sorted({r.method for r in group})),
            "config": {k: group[0].config.get(k, grouping.ABSENT) for k in configurations.varied},
            "runs": len(group), "seeds": sorted(r.seed for r in group if r.seed is not None)}
        for key in keys:
            row[key] = grouping.mean_std([float(r.metrics[key]) for r in group if key in r.metrics])
        table[label] = row
    return table


def summarize(runs: List[Run], ignore: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """:func:`summarize_groups` of :func:`pipeline.comparison.grouping.group_runs`: one row per configuration."""
    return summarize_groups(grouping.group_runs(runs, ignore))


def pick_metric(table: Dict[str, Dict[str, Any]], wanted: Optional[str]) -> str:
    available = {k for row in table.values() for k in row if "/" in k}
    if wanted:
        if wanted not in available:
            raise SystemExit(f"--metric {wanted!r} is not in the runs; available: {', '.join(sorted(available))}")
        return wanted
    return next((m for m in PREFERRED_METRICS if m in available), sorted(available)[0])


def prediction_rows(configurations: grouping.Configurations) -> Dict[str, Optional[List[paired.Rows]]]:
    """Per configuration, each run's prediction rows, read once for every section that pairs
    examples; None where a run has none to read."""
    rows: Dict[str, Optional[List[paired.Rows]]] = {}
    for label, group in configurations.groups.items():
        paths = [r.path / PREDICTIONS if r.path is not None else None for r in group]
        rows[label] = None if any(p is None or not p.exists() for p in paths) \
            else [paired.read_predictions(p) for p in paths]
    return rows


def paired_differences(configurations: grouping.Configurations, rows: Dict[str, Optional[List[paired.Rows]]],
                       metric: str, baseline: str, replicates: int
                       ) -> Tuple[Dict[str, paired.Difference], Optional[str]]:
    """Each configuration's paired bootstrap difference to ``baseline`` in ``metric``.

    Args:
        configurations: the runs by configuration.
        rows: their prediction rows (:func:`prediction_rows`).

    Returns:
        The differences, and why there are none when they could not be computed.
    """
    ref = paired.MetricRef.parse(metric)
    if ref is None:
        return {}, f"`{metric}` is not a `base/`, `tuned/` or `delta/` evaluation metric"
    runs = [r for group in configurations.groups.values() for r in group]
    missing = [r.name for r in runs if r.path is None or not (r.path / PREDICTIONS).exists()]
    if missing:
        return {}, f"no {PREDICTIONS.as_posix()} in: {', '.join(missing)}"
    try:
        return paired.paired_bootstrap(rows, baseline, ref, replicates), None
    except ValueError as err:
        return {}, str(err)


def _choose(runs: List[Run], table: Dict[str, Dict[str, Any]], metric: Optional[str],
            baseline: Optional[str]) -> Tuple[str, str]:
    """The primary metric and the baseline configuration, defaulted and checked.

    Raises:
        SystemExit: No successful run, an unknown metric or an unknown baseline.
    """
    if not table:
        raise SystemExit("no successful run to compare; statuses: "
                         + ", ".join(sorted({f'{r.name}: {r.status}' for r in runs})))
    metric = pick_metric(table, metric)
    baseline = baseline or next(iter(table))
    if baseline not in table:
        raise SystemExit(f"--baseline {baseline!r} is not a configuration; choose one of: {', '.join(table)}")
    return metric, baseline


def write_report(runs: List[Run], out: Path, metric: Optional[str] = None, ignore: Sequence[str] = (),
                 baseline: Optional[str] = None, replicates: int = 1000) -> Dict[str, Any]:
    """Writes the tables, plots and HTML page into ``out``; returns what it wrote.

    Args:
        runs: Every run, whatever its status (only successful ones are compared).
        out: The report folder.
        metric: The primary quality metric (default: the first of ``PREFERRED_METRICS`` present).
        ignore: Settings (keys or prefixes) that do not make runs different configurations.
        baseline: The configuration the others are compared with (default: the first row).
        replicates: Bootstrap resamples of the paired differences.

    Raises:
        SystemExit: No successful run, an unknown metric or an unknown baseline.
    """
    out.mkdir(parents=True, exist_ok=True)
    configurations = grouping.group_runs(runs, ignore)
    table = summarize_groups(configurations)
    metric, baseline = _choose(runs, table, metric, baseline)
    rows = prediction_rows(configurations)
    differences, why_not = paired_differences(configurations, rows, metric, baseline, replicates)
    costs, front = pareto.pareto(table, metric)
    retention = paired.retention(configurations.groups, retention_names(metric))
    benchmarks = paired.benchmark_changes(configurations.groups, rows, replicates)
    notes = grouping.overlaps(table, metric)
    varied = ", ".join(f"`{k}`" for k in configurations.keys) or "nothing (one configuration)"
    lines = [f"# Comparison of {len(table)} configurations ({len(runs)} runs)", "",
             f"Configurations differ in {varied}. Mean ± standard deviation over the n runs (seeds) "
             f"of each. Primary metric: `{metric}`; every metric is in report.csv.", "",
             "## Configurations", ""]
    lines += configuration_lines(table, configurations.keys, metric)
    lines += paired_lines(differences, why_not, metric, baseline)
    lines += pareto_lines(table, metric, costs, front)
    lines += retention_lines(retention)
    lines += benchmark_lines(benchmarks)
    if notes:
        lines += ["", "## Differences within the spread", ""] + [f"- {n}" for n in notes]
    lines += precision_lines(runs)
    lines += not_compared_lines(runs)
    write_csv(table, configurations.varied, out / "report.csv")
    images = plots.plot(configurations.groups, table, metric, (costs, front), out)
    lines += ["", "## Plots", ""] + [f"![{title}]({p.name})\n" for title, p in images.items()
                                     if title != "Pareto front"]
    text = "\n".join(lines) + "\n"
    atomic.write_text(out / "report.md", text)
    write_html(out, text, f"Comparison of {len(table)} configurations")
    return {"table": table, "metric": metric, "notes": notes, "images": list(images.values()),
            "keys": configurations.keys, "baseline": baseline, "differences": differences,
            "pareto": front, "pareto_costs": costs, "retention": retention, "benchmarks": benchmarks,
            "not_compared": [r.name for r in runs if r.status != "success"]}
