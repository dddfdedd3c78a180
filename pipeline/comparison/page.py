"""The report's outputs: its Markdown sections, ``report.csv``, ``report.html`` (self-contained,
plots embedded) and its tables as W&B tables. :mod:`pipeline.comparison.writer` compares the
runs and calls these.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from markdown_it import MarkdownIt

from pipeline.comparison import grouping, paired
from pipeline.comparison.collect import Run
from pipeline.runs import atomic

QUALITY_PREFIXES = ("base/", "tuned/", "delta/")  # metric names of the quality columns


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        mean, std = value
        if math.isnan(mean):
            return "-"
        return f"{mean:.4g} ± {std:.2g}" if std else f"{mean:.4g}"
    return str(value)


def _cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|")


def headline_keys(table: Dict[str, Dict[str, Any]], metric: str) -> List[str]:
    """The columns a reader compares first: the primary metric before/after, the other tuned
    metrics of its evaluation set, and the cost figures. The CSV keeps every column."""
    present = {k for row in table.values() for k in row if "/" in k}
    suffix = paired.metric_suffix(metric)
    evaluation_set = suffix.split("/", 1)[0]
    keys = [k for k in (f"base/{suffix}", f"tuned/{suffix}", f"delta/{suffix}") if k in present]
    keys += sorted(k for k in present if k.startswith(f"tuned/{evaluation_set}/") and k not in keys)
    costs = ("params/trainable", "params/trainable_pct", "perf/peak_cuda_mb", "perf/peak_rss_mb",
             "perf/train_tokens_per_s", "perf/wall_time_s", "perf/artifact_mb")
    return keys + [k for k in costs if k in present]


def write_csv(table: Dict[str, Dict[str, Any]], varied: List[str], path: Path) -> None:
    """``report.csv``: configuration, method, every varied setting, n, and every metric's mean and std."""
    keys = sorted({k for row in table.values() for k in row if "/" in k},
                  key=lambda k: (not k.startswith(QUALITY_PREFIXES), k))
    with atomic.open_atomic(path, newline="") as f:
        writer = csv.writer(f)
        varied = [k for k in varied if k != "adapter.method"]  # the method column has it
        writer.writerow(["configuration", "method", *varied, "runs",
                         *[c for k in keys for c in (f"{k} mean", f"{k} std")]])
        for label, row in table.items():
            writer.writerow([label, row["method"], *[grouping.value_text(row["config"][k], True) for k in varied],
                             row["runs"], *[v for k in keys for v in row.get(k, (math.nan, math.nan))]])


def configuration_lines(table: Dict[str, Dict[str, Any]], keys: List[str], metric: str) -> List[str]:
    """The headline Markdown table: a column per setting that names the configurations (none
    when that is the method alone), n, then :func:`headline_keys`."""
    shown = [] if len(keys) == 1 and keys[0] in grouping.METHOD_KEYS else keys
    columns = shown + ["n"] + headline_keys(table, metric)
    lines = ["| configuration | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, row in table.items():
        cells = [grouping.value_text(row["config"][k], False) for k in shown] + [row["runs"]]
        cells += [row.get(k, (math.nan, 0)) for k in headline_keys(table, metric)]
        lines.append(f"| {_cell(label)} | " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def tie_remark(difference: paired.Difference) -> str:
    """What a comparison in which every run scores each example the same shows instead of a
    difference ('' for any other)."""
    if difference.constant is not None:
        return f"constant: every run scores {difference.constant:.4g} on every example; no difference to test"
    if difference.identical:
        return "identical: every run scores each example the same; no difference to test"
    return ""


def paired_lines(differences: Dict[str, paired.Difference], note: Optional[str], metric: str,
                 baseline: str) -> List[str]:
    """The section of paired differences to the baseline (or why there is none, or that the
    metric is the same on every example of every run)."""
    lines = ["", f"## Paired differences to {baseline}", ""]
    if not differences:
        return lines + [f"Not computed: {note or 'a single configuration'}."]
    first = next(iter(differences.values()))
    if first.identical:
        return lines + [f"Not compared: `{metric}` is {tie_remark(first)}. Every run gives each of the "
                        f"{first.examples} shared examples, all of them together and each of the "
                        f"{first.replicates} resamples the same score, so it cannot tell the configurations "
                        "apart; choose a metric that does with `--metric`."]
    weighting = (" Each side's loss on a resample weighs each example's mean token loss by its "
                 "tokens, as the set's loss does." if paired.MetricRef.parse(metric).name in paired.LOSS_METRICS
                 else "")
    lines += [f"Difference in `{metric}` (configuration minus `{baseline}`), with a paired bootstrap "
              f"95% interval: {first.replicates} resamples of the {first.examples} shared examples, "
              f"the same for both sides, each side the mean over its seeds.{weighting} `*`: the interval "
              "excludes 0.", "",
              "| configuration | difference | 95% interval | significant |", "|---|---:|---:|---|"]
    for label, d in differences.items():
        mark = "*" if d.significant else ""
        lines.append(f"| {_cell(label)} | {d.difference:+.4g}{mark} | [{d.low:+.4g}, {d.high:+.4g}] | "
                     f"{'yes' if d.significant else 'no'} |")
    return lines


def pareto_lines(table: Dict[str, Dict[str, Any]], metric: str, costs: List[str], front: List[str]) -> List[str]:
    """The section listing the non-dominated configurations over quality and cost."""
    lines = ["", "## Pareto front: quality vs cost", ""]
    if not costs:
        return lines + ["Not computed: no cost figure is recorded for every configuration."]
    direction = "higher" if paired.higher_is_better(metric) else "lower"
    lines += [f"The configurations no other one dominates: none is at least as good on `{metric}` "
              f"({direction} is better) and on every cost ({', '.join(f'`{c}`' for c in costs)}; lower "
              "is better) while better on one of them.", "",
              "| configuration | " + " | ".join([metric, *costs]) + " |", "|---|" + "---:|" * (1 + len(costs))]
    lines += [f"| {_cell(label)} | " + " | ".join(_cell(table[label][k]) for k in [metric, *costs]) + " |"
              for label in front]
    return lines + (["", "![Pareto front](pareto.png)"] if front else [])


def precision_lines(runs: List[Run]) -> List[str]:
    """A warning when the compared runs measured their losses in different precisions
    (``evaluation.loss_precision=auto`` follows each machine: bf16 where it is native)."""
    counts: Dict[str, int] = {}
    for run in runs:
        if run.status == "success" and run.loss_precision:
            counts[run.loss_precision] = counts.get(run.loss_precision, 0) + 1
    if len(counts) < 2:
        return []
    found = ", ".join(f"{p} in {n} run(s)" for p, n in sorted(counts.items()))
    return ["", "## Measured differently", "",
            f"- Losses were measured in {found}: bf16 moves a loss by up to about 1% "
            "(benchmarks/eval_loss.py), so loss differences between these runs include that. "
            "For runs on mixed machines, set `evaluation.loss_precision=fp32` for all."]


def not_compared_lines(runs: List[Run]) -> List[str]:
    others = [r for r in runs if r.status != "success"]
    lines = ["", "## Runs not compared", ""]
    return lines + ([f"- `{r.name}` ({r.method}, seed {r.seed}): **{r.status}**" + (f": {r.error}" if r.error else "")
                     for r in others] or ["- none: every run succeeded"])


RETENTION_HOWTO = (
    "No run measured a set it does not train on. To see whether tuning makes the model forget, "
    "add `evaluation.extra_datasets=[chatterbot_qa]` to the training command (the test split of "
    "that data option, or of any other one the runs do not train on, measured before and after "
    "tuning), as `experiment=compare_methods` does.")


def retention_names(metric: str) -> List[str]:
    """The metrics of the retention section: the loss, and the primary metric's when another."""
    ref = paired.MetricRef.parse(metric)
    return ["loss"] + ([ref.name] if ref and ref.name != "loss" else [])


def _signed(value: Tuple[float, float]) -> str:
    mean, std = value
    return f"{mean:+.4g} ± {std:.2g}" if std else f"{mean:+.4g}"


def retention_lines(retention: Dict[str, List[paired.Retention]]) -> List[str]:
    """The section on the sets the runs do not train on (or how to measure one)."""
    lines = ["", "## Retention (does it forget?)", ""]
    items = [item for rows in retention.values() for item in rows]
    if not items:
        return lines + [RETENTION_HOWTO]
    sets = ", ".join(f"`{s}`" for s in sorted({i.split for i in items}))
    names = list(dict.fromkeys(i.name for i in items))
    worse = "; ".join(f"`{n}`: {'lower' if paired.higher_is_better(n) else 'higher'} is worse" for n in names)
    lines += [f"Scores on {sets}, which the runs do not train on (`evaluation.extra_datasets`): the base "
              "model, the tuned model and the change from base to tuned (per run), mean ± standard deviation "
              "over the n runs (seeds). A higher loss after tuning (a positive change) means the model forgot "
              f"some of what it knew ({worse}); worse = yes: the mean change goes the bad way.", "",
              "| configuration | set | metric | n | base | tuned | change | worse |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for label, rows in retention.items():
        lines += [f"| {_cell(label)} | {r.split} | {r.name} | {r.runs} | {_cell(r.base)} | {_cell(r.tuned)} "
                  f"| {_signed(r.change)} | {'yes' if r.worse else 'no'} |" for r in rows]
    return lines


BENCHMARK_HOWTO = (
    "No run measured a standard benchmark. To see what tuning costs in general ability, add "
    "`evaluation.benchmarks.tasks=[arc_easy]` (any lm-eval task or group, or your own task YAMLs with "
    "`evaluation.benchmarks.include_path=<folder>`) to the training command; the base and the tuned model "
    "are both measured, and the base once per sweep.")


def benchmark_lines(changes: Dict[str, List[paired.BenchmarkChange]]) -> List[str]:
    """The section on standard benchmarks before and after tuning (or how to measure them)."""
    lines = ["", "## Benchmarks before and after (lm-evaluation-harness)", ""]
    items = [item for rows in changes.values() for item in rows]
    if not items:
        return lines + [BENCHMARK_HOWTO]
    lines += ["Base and tuned scores: mean ± standard deviation over the n runs (seeds). Change: tuned minus "
              "base with its paired bootstrap 95% interval over the task's examples (the same examples for "
              "both models, the runs' mean on each resample); worse = yes: the whole interval lies on the bad "
              "side of no change. At a few hundred examples an interval spans several points: read it, not "
              "the point change.", "",
              "| configuration | task | metric | n | base | tuned | change [95% interval] | examples | worse |",
              "|---|---|---|---:|---:|---:|---|---:|---|"]
    for label, rows in changes.items():
        for c in rows:
            if c.interval is None:
                change, examples = f"n/a ({c.why})", ""
            else:
                change = f"{c.interval.change:+.4g} [{c.interval.low:+.4g}, {c.interval.high:+.4g}]"
                examples = str(c.interval.examples)
            lines.append(f"| {_cell(label)} | {c.task} | {c.name} | {c.runs} | {_cell(c.base)} | {_cell(c.tuned)} "
                         f"| {change} | {examples} | {'yes' if c.worse else 'no'} |")
    return lines


STYLE = """
body{margin:0;background:#f6f7f9;color:#1f2328;font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif}
main{max-width:72rem;margin:0 auto;padding:1.5rem 2rem 3rem;background:#fff;min-height:100vh}
h1{font-size:1.6rem;border-bottom:2px solid #d0d7de;padding-bottom:.3rem}
h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #eaeef2;padding-bottom:.2rem}
table{display:block;max-width:100%;overflow-x:auto;border-collapse:collapse;font-size:13px;margin:.6rem 0 1rem}
th,td{border:1px solid #d0d7de;padding:4px 9px;white-space:nowrap}
th{background:#f3f4f6}
tbody tr:nth-child(even){background:#fafbfc}
code{background:#f3f4f6;padding:1px 4px;border-radius:4px;font-size:90%}
img{display:block;max-width:100%;height:auto;margin:1rem auto}
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_html(out: Path, markdown_text: str, title: str) -> None:
    """``report.html``: the Markdown rendered (raw HTML in it escaped, e.g. an error message
    with ``<...>``), its PNG images embedded, so the page is one self-contained file."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown_text)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                child.attrSet("src", _data_uri(out / str(child.attrGet("src"))))
    body = md.renderer.render(tokens, md.options, {})
    atomic.write_text(
        out / "report.html",
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body><main>\n{body}</main></body></html>\n")


WandbRows = Tuple[List[str], List[List[Any]]]  # a W&B table's columns and rows


def _configuration_rows(result: Dict[str, Any]) -> WandbRows:
    table = result["table"]
    settings = [k for k in result["keys"] if k not in grouping.METHOD_KEYS]  # the method has its column
    keys = sorted({k for row in table.values() for k in row if "/" in k})
    columns = ["configuration", "method", *settings, "runs", *[f"{k} mean" for k in keys],
               *[f"{k} std" for k in keys]]
    return columns, [[label, row["method"], *[grouping.value_text(row["config"][k], True) for k in settings],
                      row["runs"], *[row.get(k, (math.nan, 0))[0] for k in keys],
                      *[row.get(k, (math.nan, 0))[1] for k in keys]] for label, row in table.items()]


def wandb_tables(result: Dict[str, Any]) -> Dict[str, WandbRows]:
    """The report's tables as W&B columns and rows, by their W&B key: the configurations, and
    the paired differences, Pareto view and retention when the report has them."""
    metric, costs = result["metric"], result["pareto_costs"]
    tables = {"report/comparison": _configuration_rows(result)}
    if result["differences"]:
        tables["report/paired_differences"] = (
            ["configuration", "baseline", "metric", "difference", "low", "high", "significant", "examples",
             "remark"],
            [[label, result["baseline"], metric, d.difference, d.low, d.high, d.significant, d.examples,
              tie_remark(d)] for label, d in result["differences"].items()])
    if costs:  # not report/pareto: that is the Pareto plot's key
        tables["report/pareto_front"] = (["configuration", metric, *costs, "non_dominated"], [
            [label, row.get(metric, (math.nan, 0))[0], *[row[k][0] for k in costs], label in result["pareto"]]
            for label, row in result["table"].items()])
    changes = [(label, c) for label, rows in result.get("benchmarks", {}).items() for c in rows]
    if changes:
        tables["report/benchmarks"] = (
            ["configuration", "task", "metric", "runs", "base mean", "base std", "tuned mean", "tuned std",
             "change", "low", "high", "examples", "worse"],
            [[label, c.task, c.name, c.runs, *c.base, *c.tuned,
              *((c.interval.change, c.interval.low, c.interval.high, c.interval.examples) if c.interval
                else (math.nan, math.nan, math.nan, 0)), c.worse] for label, c in changes])
    retention = [(label, r) for label, rows in result["retention"].items() for r in rows]
    if retention:
        tables["report/retention"] = (
            ["configuration", "set", "metric", "runs", "base mean", "base std", "tuned mean", "tuned std",
             "change mean", "change std", "worse"],
            [[label, r.split, r.name, r.runs, *r.base, *r.tuned, *r.change, r.worse] for label, r in retention])
    return tables


def log_to_wandb(result: Dict[str, Any], out: Path, project: str, group: Optional[str], mode: str) -> None:
    """Logs the report as its own W&B run (job type ``report``): every table of
    :func:`wandb_tables` as a ``wandb.Table`` and every plot as a ``wandb.Image``."""
    import wandb  # lazy: about a second to import; only when the report is logged to W&B

    tables = {key: wandb.Table(columns=columns, data=rows) for key, (columns, rows) in wandb_tables(result).items()}
    images = {f"report/{p.stem}": wandb.Image(str(p)) for p in result["images"]}
    run = wandb.init(project=project, group=group, job_type="report", mode=mode, dir=str(out),
                     name=f"report-{group}", settings=wandb.Settings(x_disable_stats=True))
    run.log({**tables, **images})
    run.finish()
