"""Report stage: compare methods on quality and cost across the runs of a multirun or sweep.

    python -m pipeline.report outputs/multirun/<date>/<time>          # run folders, no W&B needed
    python -m pipeline.report --wandb-project my-project --group <group>   # from W&B (online)

Writes ``report/`` in the folder (or ``--out``): ``report.md`` and ``report.csv`` (one row per
method: mean and standard deviation over seeds of each quality and cost figure), PNG plots
(quality vs trainable parameters, quality vs peak memory, loss curves, before/after bars) and
``report.html`` showing them together. Failed, pruned and unfinished runs are listed, not dropped.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

COST_KEYS = ("params/trainable", "params/trainable_pct", "params/total", "perf/peak_rss_mb",
             "perf/peak_cuda_mb", "perf/train_tokens_per_s", "perf/train_runtime_s",
             "perf/wall_time_s", "perf/artifact_mb")
QUALITY_PREFIXES = ("base/", "tuned/", "delta/")
PREFERRED_METRICS = ("tuned/test/bleu", "tuned/test/rougeL", "tuned/test/f1", "tuned/test/accuracy",
                     "tuned/test/loss", "tuned/eval/loss")


@dataclass
class Run:
    """One run as the report sees it."""

    name: str
    method: str
    seed: Optional[int]
    data: str
    status: str
    metrics: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None


# --------------------------------------------------------------------------- collecting


def _read_json(path: Path) -> Dict[str, Any]:
    from pipeline.tracking import read_json

    return read_json(path) if path.exists() else {}


def runs_from_folder(folder: Path) -> List[Run]:
    """Every run folder (one with ``run.json``) below ``folder``, the report's own excluded."""
    import yaml

    runs = []
    for info_path in sorted(folder.rglob("run.json")):
        run_dir = info_path.parent
        if "report" in run_dir.relative_to(folder).parts:
            continue
        info = _read_json(info_path)
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
        history_path = run_dir / "history.jsonl"
        history = ([json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
                   if history_path.exists() else [])
        runs.append(Run(
            name=str(run_dir.relative_to(folder)), method=(config.get("adapter") or {}).get("method", "?"),
            seed=config.get("seed", info.get("seed")), data=(config.get("data") or {}).get("name", "?"),
            status=info.get("status", "unknown"), metrics=_read_json(run_dir / "metrics.json"),
            history=history, error=info.get("error")))
    return runs


def runs_from_wandb(project: str, group: Optional[str], entity: Optional[str] = None) -> List[Run]:
    """The runs of a W&B project (and group) through ``wandb.Api`` (needs the service)."""
    import wandb

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    filters = {"group": group, "jobType": "train"} if group else {"jobType": "train"}
    runs = []
    for r in api.runs(path, filters=filters):
        config = r.config or {}
        summary = {k: v for k, v in dict(r.summary).items() if isinstance(v, (int, float))}
        history = [row for row in r.scan_history(keys=["train/loss", "_step"])]
        state = {"finished": "success", "failed": "failed", "crashed": "failed"}.get(r.state, r.state)
        runs.append(Run(name=r.name, method=(config.get("adapter") or {}).get("method", "?"),
                        seed=config.get("seed"), data=(config.get("data") or {}).get("name", "?"),
                        status=state, metrics=summary,
                        history=[{"step": h.get("_step"), "train/loss": h.get("train/loss")} for h in history]))
    return runs


# --------------------------------------------------------------------------- aggregating


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def metric_keys(runs: List[Run]) -> List[str]:
    keys = {k for r in runs for k in r.metrics}
    quality = sorted(k for k in keys if k.startswith(QUALITY_PREFIXES))
    return quality + [k for k in COST_KEYS if k in keys]


def summarize(runs: List[Run]) -> Dict[str, Dict[str, Any]]:
    """Per method: number of seeds, and mean/std of every quality and cost key."""
    ok = [r for r in runs if r.status == "success"]
    keys = metric_keys(ok)
    table: Dict[str, Dict[str, Any]] = {}
    for method in sorted({r.method for r in ok}):
        group = [r for r in ok if r.method == method]
        row: Dict[str, Any] = {"runs": len(group), "seeds": sorted(r.seed for r in group if r.seed is not None)}
        for key in keys:
            values = [float(r.metrics[key]) for r in group if key in r.metrics]
            row[key] = mean_std(values)
        table[method] = row
    return table


def pick_metric(table: Dict[str, Dict[str, Any]], wanted: Optional[str]) -> str:
    available = {k for row in table.values() for k in row if "/" in k}
    if wanted:
        if wanted not in available:
            raise SystemExit(f"--metric {wanted!r} is not in the runs; available: {', '.join(sorted(available))}")
        return wanted
    return next((m for m in PREFERRED_METRICS if m in available), sorted(available)[0])


def overlaps(table: Dict[str, Dict[str, Any]], metric: str) -> List[str]:
    """Pairs of methods whose difference in ``metric`` is smaller than their combined spread."""
    notes = []
    methods = sorted(table)
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            (ma, sa), (mb, sb) = table[a].get(metric, (math.nan, 0)), table[b].get(metric, (math.nan, 0))
            spread = math.hypot(sa, sb)
            if spread > 0 and abs(ma - mb) < spread:
                notes.append(f"{a} vs {b}: the difference in {metric} ({abs(ma - mb):.3g}) is smaller "
                             f"than their spread over seeds ({spread:.3g}); not a reliable ranking")
    return notes


# --------------------------------------------------------------------------- writing


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        mean, std = value
        if math.isnan(mean):
            return "-"
        return f"{mean:.4g} ± {std:.2g}" if std else f"{mean:.4g}"
    return str(value)


def headline_keys(table: Dict[str, Dict[str, Any]], metric: str) -> List[str]:
    """The columns a reader compares first: the primary metric before/after, the other tuned
    metrics of its evaluation set, and the cost figures. The CSV keeps every column."""
    present = {k for row in table.values() for k in row if "/" in k}
    suffix = metric.split("/", 1)[1] if metric.startswith(QUALITY_PREFIXES) else metric
    evaluation_set = suffix.split("/", 1)[0]
    keys = [k for k in (f"base/{suffix}", f"tuned/{suffix}", f"delta/{suffix}") if k in present]
    keys += sorted(k for k in present if k.startswith(f"tuned/{evaluation_set}/") and k not in keys)
    costs = ("params/trainable", "params/trainable_pct", "perf/peak_cuda_mb", "perf/peak_rss_mb",
             "perf/train_tokens_per_s", "perf/wall_time_s", "perf/artifact_mb")
    return keys + [k for k in costs if k in present]


def write_tables(table: Dict[str, Dict[str, Any]], out: Path, metric: str) -> List[str]:
    """``report.csv`` (every key, mean and std columns) and the headline Markdown table lines."""
    keys = sorted({k for row in table.values() for k in row if "/" in k},
                  key=lambda k: (not k.startswith(QUALITY_PREFIXES), k))
    with (out / "report.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "runs", *[c for k in keys for c in (f"{k} mean", f"{k} std")]])
        for method, row in table.items():
            writer.writerow([method, row["runs"], *[v for k in keys for v in row.get(k, (math.nan, math.nan))]])
    keys = headline_keys(table, metric)
    lines = ["| method | runs | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    lines += [f"| {m} | {row['runs']} | " + " | ".join(_fmt(row.get(k, (math.nan, 0))) for k in keys) + " |"
              for m, row in table.items()]
    return lines


def plot(runs: List[Run], table: Dict[str, Dict[str, Any]], metric: str, out: Path) -> List[Path]:
    """The four PNG plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def scatter(cost_key: str, label: str, filename: str, log: bool) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, row in table.items():
            (x, _), (y, yerr) = row.get(cost_key, (math.nan, 0)), row.get(metric, (math.nan, 0))
            if math.isnan(x) or math.isnan(y):
                continue
            ax.errorbar([x], [y], yerr=[yerr], fmt="o", capsize=4)
            ax.annotate(method, (x, y), textcoords="offset points", xytext=(6, 4))
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {label}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        paths.append(out / filename)

    scatter("params/trainable", "trainable parameters", "quality_vs_params.png", log=True)
    memory = "perf/peak_cuda_mb" if any("perf/peak_cuda_mb" in r for r in table.values()) else "perf/peak_rss_mb"
    scatter(memory, f"peak memory (MB, {memory.split('_')[1]})", "quality_vs_memory.png", log=False)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in table:
        curves = [[(h["step"], h["train/loss"]) for h in r.history if "train/loss" in h and h.get("step")]
                  for r in runs if r.method == method and r.status == "success"]
        steps = sorted({s for c in curves for s, _ in c})
        means = [statistics.fmean([l for c in curves for s2, l in c if s2 == s]) for s in steps]
        if steps:
            ax.plot(steps, means, marker=".", label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss (mean over seeds)")
    ax.set_title("training loss per method")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    paths.append(out / "loss_curves.png")

    suffix = metric.split("/", 1)[1] if metric.startswith(QUALITY_PREFIXES) else metric
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = list(table)
    for offset, side in ((-0.2, "base"), (0.2, "tuned")):
        values = [table[m].get(f"{side}/{suffix}", (math.nan, 0)) for m in methods]
        ax.bar([i + offset for i in range(len(methods))], [v[0] for v in values], width=0.4,
               yerr=[v[1] for v in values], capsize=3, label=side)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel(suffix)
    ax.set_title(f"before / after: {suffix}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "before_after.png", dpi=110)
    plt.close(fig)
    paths.append(out / "before_after.png")
    return paths


def write_report(runs: List[Run], out: Path, metric: Optional[str] = None) -> Dict[str, Any]:
    """Writes the tables, plots and HTML page into ``out``; returns what it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(runs)
    if not table:
        raise SystemExit("no successful run to compare; statuses: "
                         + ", ".join(sorted({f'{r.name}: {r.status}' for r in runs})))
    metric = pick_metric(table, metric)
    lines = [f"# Method comparison ({len(runs)} runs)", "",
             f"Mean ± standard deviation over seeds. Primary metric: `{metric}`; every metric is "
             "in report.csv.", ""]
    lines += write_tables(table, out, metric)
    notes = overlaps(table, metric)
    if notes:
        lines += ["", "## Differences within the spread", ""] + [f"- {n}" for n in notes]
    others = [r for r in runs if r.status != "success"]
    lines += ["", "## Runs not compared", ""]
    lines += [f"- `{r.name}` ({r.method}, seed {r.seed}): **{r.status}**" + (f": {r.error}" if r.error else "")
              for r in others] or ["- none: every run succeeded"]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    images = plot(runs, table, metric, out)
    _write_html(out, lines, images)
    return {"table": table, "metric": metric, "notes": notes, "images": images,
            "not_compared": [r.name for r in others]}


def _write_html(out: Path, markdown_lines: List[str], images: List[Path]) -> None:
    rows = [l for l in markdown_lines if l.startswith("|") and not l.startswith("|---")]
    cells = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in rows]
    table = "<table>" + "".join(
        "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{c}</{'th' if i == 0 else 'td'}>" for c in row) + "</tr>"
        for i, row in enumerate(cells)) + "</table>"
    prose = "".join(f"<p>{html.escape(l)}</p>" for l in markdown_lines if l and not l.startswith("|"))
    pictures = "".join(f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" '
                       f'alt="{p.stem}">' for p in images)
    (out / "report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>Method comparison</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:48%;margin:1%}</style>"
        f"{table}{prose}<div>{pictures}</div>", encoding="utf-8")


def log_to_wandb(result: Dict[str, Any], out: Path, project: str, group: Optional[str], mode: str) -> None:
    """Logs the report as its own W&B run (job type ``report``): the table and the plots."""
    import wandb

    table = result["table"]
    keys = sorted({k for row in table.values() for k in row if "/" in k})
    wb_table = wandb.Table(columns=["method", "runs", *[f"{k} mean" for k in keys], *[f"{k} std" for k in keys]],
                           data=[[m, row["runs"], *[row.get(k, (math.nan, 0))[0] for k in keys],
                                  *[row.get(k, (math.nan, 0))[1] for k in keys]] for m, row in table.items()])
    run = wandb.init(project=project, group=group, job_type="report", mode=mode, dir=str(out),
                     name=f"report-{group}", settings=wandb.Settings(x_disable_stats=True))
    run.log({"report/comparison": wb_table, **{f"report/{p.stem}": wandb.Image(str(p)) for p in result["images"]}})
    run.finish()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Compare methods across the runs of a multirun or sweep.")
    parser.add_argument("folder", nargs="?", help="a multirun or sweep folder of run folders")
    parser.add_argument("--wandb-project", help="read runs from this W&B project instead (online)")
    parser.add_argument("--wandb-entity")
    parser.add_argument("--group", help="the W&B group of the runs")
    parser.add_argument("--out", help="where to write (default: <folder>/report)")
    parser.add_argument("--metric", help="primary quality metric (default: tuned/test/bleu if present)")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"],
                        help="log the report as a W&B run of job type report (default offline)")
    args = parser.parse_args(argv)
    if args.wandb_project:
        runs = runs_from_wandb(args.wandb_project, args.group, args.wandb_entity)
        out = Path(args.out or f"report-{args.group or args.wandb_project}")
    elif args.folder:
        folder = Path(args.folder)
        if not folder.is_dir():
            raise SystemExit(f"{folder} is not a folder")
        runs = runs_from_folder(folder)
        out = Path(args.out) if args.out else folder / "report"
    else:
        parser.error("give a folder, or --wandb-project")
    result = write_report(runs, out, args.metric)
    print((out / "report.md").read_text())
    if args.wandb_mode != "disabled":
        project = args.wandb_project or "pipeline"
        from pipeline.tracking import multirun_group

        group = args.group or (multirun_group(Path(args.folder)) if args.folder else None)
        log_to_wandb(result, out, project, group, args.wandb_mode)
    print(f"report written to {out}")


if __name__ == "__main__":
    main()
