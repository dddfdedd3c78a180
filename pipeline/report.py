"""Report stage: compare configurations on quality and cost across the runs of a multirun or sweep.

    python -m pipeline.report outputs/multirun/<date>/<time>          # run folders, no W&B needed
    python -m pipeline.report outputs/sweeps/<name>                   # the trial_<N> folders of a sweep
    python -m pipeline.report --wandb-project my-project --group <group>   # from W&B (online)

A row of the report is one configuration: the settings that differ between the runs (read from
each run's resolved ``config.yaml``, so an override and an experiment overlay count alike),
except ``seed`` and the ``--ignore`` keys. The seeds of a configuration are aggregated.

Writes ``report/`` in the folder (or ``--out``): ``report.md`` and ``report.csv`` (one row per
configuration: n and mean and standard deviation over seeds of each quality and cost figure),
each configuration's difference to a baseline with a paired bootstrap interval over examples
and seeds, the Pareto front of quality vs cost, retention on the sets the runs do not train on
(does tuning forget?), PNG plots (:mod:`pipeline.plots`) and ``report.html`` showing them
together. Failed, pruned and unfinished runs are listed, not dropped. The tables and plots are
also logged to W&B as a run of job type ``report``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pipeline import atomic, comparison as C, errors, pareto as P, plots
from pipeline.report_page import (QUALITY_PREFIXES, configuration_lines, log_to_wandb, not_compared_lines,
                                  paired_lines, pareto_lines, precision_lines, retention_lines, retention_names,
                                  write_csv, write_html)

COST_KEYS = ("params/trainable", "params/trainable_pct", "params/total", "perf/peak_rss_mb",
             "perf/peak_cuda_mb", "perf/train_tokens_per_s", "perf/train_runtime_s",
             "perf/wall_time_s", "perf/artifact_mb")
PREFERRED_METRICS = ("tuned/test/bleu", "tuned/test/rougeL", "tuned/test/f1", "tuned/test/accuracy",
                     "tuned/test/loss", "tuned/eval/loss")
PREDICTIONS = Path("eval") / "predictions.jsonl"


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
    config: Dict[str, Any] = field(default_factory=dict)  # dotted keys: {"adapter.r": 8, ...}
    path: Optional[Path] = None  # the run folder (None for a run read from W&B)
    loss_precision: Optional[str] = None  # what evaluation.loss_precision resolved to (run.json)


# --------------------------------------------------------------------------- collecting


def _read_json(path: Path) -> Dict[str, Any]:
    from pipeline.runfolder import read_json

    return read_json(path) if path.exists() else {}


def _read_run(run_dir: Path, folder: Path) -> Run:
    """One run folder; its settings from ``config.yaml``, else from the overrides in ``run.json``."""
    import yaml

    info = _read_json(run_dir / "run.json")
    config_path = run_dir / "config.yaml"
    nested = yaml.safe_load(config_path.read_text()) if config_path.exists() else None
    config = C.flatten(nested) if nested else C.config_from_overrides(info.get("overrides", []))
    history_path = run_dir / "history.jsonl"
    history = ([json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
               if history_path.exists() else [])
    method = next((config[k] for k in C.METHOD_KEYS if k in config), "?")
    return Run(name=str(run_dir.relative_to(folder)), method=str(method),
               seed=config.get("seed", info.get("seed")), data=str(config.get("data.name", "?")),
               status=info.get("status", "unknown"), metrics=_read_json(run_dir / "metrics.json"),
               history=history, error=info.get("error"), config=config, path=run_dir,
               loss_precision=(info.get("loss_precision") or {}).get("resolved"))


def runs_from_folder(folder: Path) -> List[Run]:
    """Every run folder (one with ``run.json``) below ``folder``, the report's own excluded.

    A multirun's ``<n>_<method>`` folders and a sweep's ``trial_<n>`` folders alike; the
    sweep's own ``report.json``/``report.md`` are not run folders and are not read.
    """
    from pipeline.progress import Progress

    infos = [info for info in sorted(folder.rglob("run.json"))
             if "report" not in info.parent.relative_to(folder).parts]
    runs = []
    with Progress(len(infos), "report: reading run folders", "runs") as shown:
        for info in infos:
            runs.append(_read_run(info.parent, folder))
            shown.update()
    return runs


def runs_from_wandb(project: str, group: Optional[str], entity: Optional[str] = None) -> List[Run]:
    """The runs of a W&B project (and group) through ``wandb.Api`` (needs the service)."""
    import wandb

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    filters = {"group": group, "jobType": "train"} if group else {"jobType": "train"}
    runs = []
    for r in api.runs(path, filters=filters):
        config = C.flatten(dict(r.config or {}))
        summary = {k: v for k, v in dict(r.summary).items() if isinstance(v, (int, float))}
        history = [row for row in r.scan_history(keys=["train/loss", "_step"])]
        state = {"finished": "success", "failed": "failed", "crashed": "failed"}.get(r.state, r.state)
        runs.append(Run(name=r.name, method=str(config.get("adapter.method", "?")),
                        seed=config.get("seed"), data=str(config.get("data.name", "?")),
                        status=state, metrics=summary, config=config,
                        history=[{"step": h.get("_step"), "train/loss": h.get("train/loss")} for h in history]))
    return runs


# --------------------------------------------------------------------------- aggregating


def metric_keys(runs: List[Run]) -> List[str]:
    keys = {k for r in runs for k in r.metrics}
    quality = sorted(k for k in keys if k.startswith(QUALITY_PREFIXES))
    return quality + [k for k in COST_KEYS if k in keys]


def summarize_groups(configurations: C.Configurations) -> Dict[str, Dict[str, Any]]:
    """Per configuration: its method, varied settings, n (runs), seeds, and the mean/std over
    its runs of every quality and cost key."""
    keys = metric_keys([r for runs in configurations.groups.values() for r in runs])
    table: Dict[str, Dict[str, Any]] = {}
    for label, group in configurations.groups.items():
        row: Dict[str, Any] = {
            "method": " / ".join(sorted({r.method for r in group})),
            "config": {k: group[0].config.get(k, C.ABSENT) for k in configurations.varied},
            "runs": len(group), "seeds": sorted(r.seed for r in group if r.seed is not None)}
        for key in keys:
            row[key] = C.mean_std([float(r.metrics[key]) for r in group if key in r.metrics])
        table[label] = row
    return table


def summarize(runs: List[Run], ignore: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """:func:`summarize_groups` of :func:`pipeline.comparison.group_runs`: one row per configuration."""
    return summarize_groups(C.group_runs(runs, ignore))


def pick_metric(table: Dict[str, Dict[str, Any]], wanted: Optional[str]) -> str:
    available = {k for row in table.values() for k in row if "/" in k}
    if wanted:
        if wanted not in available:
            raise SystemExit(f"--metric {wanted!r} is not in the runs; available: {', '.join(sorted(available))}")
        return wanted
    return next((m for m in PREFERRED_METRICS if m in available), sorted(available)[0])


def paired_differences(configurations: C.Configurations, metric: str, baseline: str,
                       replicates: int) -> Tuple[Dict[str, C.Difference], Optional[str]]:
    """Each configuration's paired bootstrap difference to ``baseline`` in ``metric``.

    Returns:
        The differences, and why there are none when they could not be computed.
    """
    ref = C.MetricRef.parse(metric)
    if ref is None:
        return {}, f"`{metric}` is not a `base/`, `tuned/` or `delta/` evaluation metric"
    runs = [r for group in configurations.groups.values() for r in group]
    missing = [r.name for r in runs if r.path is None or not (r.path / PREDICTIONS).exists()]
    if missing:
        return {}, f"no {PREDICTIONS.as_posix()} in: {', '.join(missing)}"
    rows = {label: [C.read_predictions(r.path / PREDICTIONS) for r in group]
            for label, group in configurations.groups.items()}
    try:
        return C.paired_bootstrap(rows, baseline, ref, replicates), None
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
    configurations = C.group_runs(runs, ignore)
    table = summarize_groups(configurations)
    metric, baseline = _choose(runs, table, metric, baseline)
    differences, why_not = paired_differences(configurations, metric, baseline, replicates)
    pareto = P.pareto(table, metric)
    retention = C.retention(configurations.groups, retention_names(metric))
    notes = C.overlaps(table, metric)
    varied = ", ".join(f"`{k}`" for k in configurations.keys) or "nothing (one configuration)"
    lines = [f"# Comparison of {len(table)} configurations ({len(runs)} runs)", "",
             f"Configurations differ in {varied}. Mean ± standard deviation over the n runs (seeds) "
             f"of each. Primary metric: `{metric}`; every metric is in report.csv.", "",
             "## Configurations", ""]
    lines += configuration_lines(table, configurations.keys, metric)
    lines += paired_lines(differences, why_not, metric, baseline)
    lines += pareto_lines(table, metric, *pareto)
    lines += retention_lines(retention)
    if notes:
        lines += ["", "## Differences within the spread", ""] + [f"- {n}" for n in notes]
    lines += precision_lines(runs)
    lines += not_compared_lines(runs)
    write_csv(table, configurations.varied, out / "report.csv")
    images = plots.plot(configurations.groups, table, metric, pareto, out)
    lines += ["", "## Plots", ""] + [f"![{title}]({p.name})\n" for title, p in images.items()
                                     if title != "Pareto front"]
    text = "\n".join(lines) + "\n"
    atomic.write_text(out / "report.md", text)
    write_html(out, text, f"Comparison of {len(table)} configurations")
    return {"table": table, "metric": metric, "notes": notes, "images": list(images.values()),
            "keys": configurations.keys, "baseline": baseline, "differences": differences,
            "pareto": pareto[1], "pareto_costs": pareto[0], "retention": retention,
            "not_compared": [r.name for r in runs if r.status != "success"]}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Compare configurations across the runs of a multirun or sweep.")
    parser.add_argument("folder", nargs="?", help="a multirun or sweep folder of run folders")
    parser.add_argument("--wandb-project", help="read runs from this W&B project instead (online)")
    parser.add_argument("--wandb-entity")
    parser.add_argument("--group", help="the W&B group of the runs")
    parser.add_argument("--out", help="where to write (default: <folder>/report)")
    parser.add_argument("--metric", help="primary quality metric (default: tuned/test/bleu if present)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="a setting (a key or a prefix: data.seed, trainer) whose differences do not "
                             "make another configuration, as seed's never do (repeatable)")
    parser.add_argument("--baseline", help="the configuration the others are compared with (default: the first row)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples of the paired differences (default 1000)")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"],
                        help="log the report as a W&B run of job type report (default offline)")
    args = parser.parse_args(argv)
    if args.bootstrap < 1:
        parser.error(f"--bootstrap {args.bootstrap}: give at least 1 resample (1000 is usual)")
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
    result = write_report(runs, out, args.metric, args.ignore, args.baseline, args.bootstrap)
    print((out / "report.md").read_text())
    if args.wandb_mode != "disabled":
        project = args.wandb_project or "pipeline"
        from pipeline.tracking import multirun_group

        group = args.group or (multirun_group(Path(args.folder)) if args.folder else None)
        log_to_wandb(result, out, project, group, args.wandb_mode)
    print(f"report written to {out}")


if __name__ == "__main__":
    main()
    errors.end_process()
