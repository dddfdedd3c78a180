"""The comparison report's PNG plots: quality vs cost, loss curves, before/after bars and the
Pareto front, drawn with matplotlib's Agg backend (no display needed).

Each plot takes the report's per-configuration table (``{label: {metric: (mean, std)}}``, see
``pipeline.comparison.writer.summarize_groups``) and writes one PNG.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from pipeline.comparison import paired
from pipeline.runs.atomic import open_atomic

Table = Dict[str, Dict[str, Any]]


def _figure(width: float = 6.0, columns: int = 1) -> Tuple[Any, Any]:
    import matplotlib  # lazy: matplotlib takes a second to import; only reports draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib takes a second to import; only reports draw

    return plt.subplots(1, columns, figsize=(width * columns, 4), squeeze=False)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt  # lazy: matplotlib takes a second to import; only reports draw

    fig.tight_layout()
    with open_atomic(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return path


def scatter(table: Table, metric: str, cost: str, log: bool, path: Path) -> Path:
    """Each configuration's ``metric`` (with its spread over seeds) against one cost."""
    fig, axes = _figure()
    ax = axes[0][0]
    for label, row in table.items():
        (x, _), (y, yerr) = row.get(cost, (math.nan, 0)), row.get(metric, (math.nan, 0))
        if not (math.isnan(x) or math.isnan(y)):
            ax.errorbar([x], [y], yerr=[yerr], fmt="o", capsize=4)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if log:
        ax.set_xscale("log")
    ax.set(xlabel=cost, ylabel=metric, title=f"{metric} vs {cost}")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def loss_curves(groups: Mapping[str, Sequence[Any]], path: Path) -> Path:
    """The training loss by step of each configuration, the mean over its runs' ``history``."""
    fig, axes = _figure()
    ax = axes[0][0]
    for label, runs in groups.items():
        curves = [[(h["step"], h["train/loss"]) for h in r.history if "train/loss" in h and h.get("step")]
                  for r in runs]
        steps = sorted({s for c in curves for s, _ in c})
        if steps:
            ax.plot(steps, [statistics.fmean([v for c in curves for s2, v in c if s2 == s]) for s in steps],
                    marker=".", label=label)
    ax.set(xlabel="step", ylabel="train/loss (mean over seeds)", title="training loss per configuration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def before_after(table: Table, metric: str, path: Path) -> Path:
    """Bars of the base and the tuned model's value of ``metric``'s evaluation metric."""
    suffix = paired.metric_suffix(metric)
    fig, axes = _figure()
    ax = axes[0][0]
    labels = list(table)
    for offset, side in ((-0.2, "base"), (0.2, "tuned")):
        values = [table[m].get(f"{side}/{suffix}", (math.nan, 0)) for m in labels]
        ax.bar([i + offset for i in range(len(labels))], [v[0] for v in values], width=0.4,
               yerr=[v[1] for v in values], capsize=3, label=side)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel=suffix, title=f"before / after: {suffix}")
    ax.legend()
    return _save(fig, path)


def pareto_plot(table: Table, metric: str, costs: List[str], front: List[str], path: Path) -> Path:
    """One panel per cost; the non-dominated configurations filled and labelled."""
    fig, axes = _figure(width=4.5, columns=len(costs))
    for ax, cost in zip(axes[0], costs):
        for label, row in table.items():
            x, y = row[cost][0], row.get(metric, (math.nan, 0))[0]
            on_front = label in front
            ax.plot([x], [y], "o", color="C0" if on_front else "0.7", fillstyle="full" if on_front else "none")
            if on_front:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
        ax.set_xscale("log" if cost == "params/trainable" else "linear")
        ax.margins(x=0.2)  # room for the labels of the outermost points
        ax.set(xlabel=cost, ylabel=metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Pareto front: {metric} vs cost (filled: non-dominated)")
    return _save(fig, path)


def plot(groups: Mapping[str, Sequence[Any]], table: Table, metric: str,
         pareto: Tuple[List[str], List[str]], out: Path) -> Dict[str, Path]:
    """Every plot of the report.

    Args:
        groups: Per configuration label, its runs (their ``history`` gives the loss curves).
        table: Per configuration, the mean and std of each metric.
        metric: The primary quality metric.
        pareto: The cost keys and the non-dominated configurations (no plot without costs).
        out: The folder the PNGs are written to.

    Returns:
        The PNG paths by title ("Pareto front" for the front's).
    """
    memory = "perf/peak_cuda_mb" if any("perf/peak_cuda_mb" in r for r in table.values()) else "perf/peak_rss_mb"
    plots = {
        "Quality vs trainable parameters": scatter(table, metric, "params/trainable", True,
                                                   out / "quality_vs_params.png"),
        "Quality vs peak memory": scatter(table, metric, memory, False, out / "quality_vs_memory.png"),
        "Training loss": loss_curves(groups, out / "loss_curves.png"),
        "Before and after": before_after(table, metric, out / "before_after.png"),
    }
    costs, front = pareto
    if costs:
        plots["Pareto front"] = pareto_plot(table, metric, costs, front, out / "pareto.png")
    return plots
