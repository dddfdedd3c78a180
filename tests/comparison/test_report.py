"""The comparison report from synthetic multirun and sweep folders: configurations, values,
paired intervals, the Pareto front, plots, the HTML page and failed runs."""

from __future__ import annotations

import base64
import csv
import json
import math
import shutil
import statistics
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml

from pipeline import report
from pipeline.comparison import collect, grouping, page, paired, pareto, writer
from pipeline.scoring import metrics

RUNS = [  # method, seed, status, tuned/test/bleu, base/test/bleu, params/trainable, peak rss
    ("lora", 1, "success", 12.0, 1.0, 1000, 3000.0),
    ("lora", 2, "success", 14.0, 1.0, 1000, 3100.0),
    ("full", 1, "success", 13.0, 1.0, 100000, 4000.0),
    ("full", 2, "success", 15.0, 1.0, 100000, 4200.0),
    ("qlora", 1, "failed", None, None, None, None),
    ("bottleneck", 1, "pruned", None, None, None, None),
]


@pytest.fixture
def multirun(tmp_path):
    root = tmp_path / "multirun" / "2026-11-30" / "10-00-00"
    for i, (method, seed, status, tuned, base, trainable, rss) in enumerate(RUNS):
        run = root / f"{i}_{method}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"adapter": {"method": method}, "seed": seed,
                                                         "data": {"name": "toy"}}))
        info = {"status": status, "seed": seed}
        if status == "failed":
            info["error"] = "OutOfMemoryError: CUDA out of memory"
        (run / "run.json").write_text(json.dumps(info))
        if status != "success":
            continue
        (run / "metrics.json").write_text(json.dumps({
            "tuned/test/bleu": tuned, "base/test/bleu": base, "delta/test/bleu": tuned - base,
            "params/trainable": trainable, "perf/peak_rss_mb": rss, "perf/train_tokens_per_s": 50.0}))
        (run / "history.jsonl").write_text("".join(
            json.dumps({"step": s, "train/loss": 3.0 - s * 0.1 * seed}) + "\n" for s in (1, 2, 3)))
    return root


def test_report_table_values_plots_and_runs_not_compared(multirun):
    result = writer.write_report(collect.runs_from_folder(multirun), multirun / "report")
    table = result["table"]
    assert table["lora"]["runs"] == 2 and table["lora"]["seeds"] == [1, 2]
    assert table["lora"]["tuned/test/bleu"] == pytest.approx((13.0, math.sqrt(2)))
    assert table["full"]["tuned/test/bleu"] == pytest.approx((14.0, math.sqrt(2)))
    assert table["full"]["perf/peak_rss_mb"] == pytest.approx((4100.0, math.sqrt(20000)))
    assert set(table) == {"lora", "full"}
    assert result["metric"] == "tuned/test/bleu"
    # lora 13 +- 1.41 vs full 14 +- 1.41: the difference (1) is within the spread (2).
    assert len(result["notes"]) == 1 and "full vs lora" in result["notes"][0]

    out = multirun / "report"
    md = (out / "report.md").read_text()
    assert "| lora | 2 |" in md and "13 ± 1.4" in md
    assert "**failed**: OutOfMemoryError: CUDA out of memory" in md and "**pruned**" in md
    with (out / "report.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["full"]["tuned/test/bleu mean"]) == pytest.approx(14.0)
    assert float(rows["lora"]["delta/test/bleu std"]) == pytest.approx(math.sqrt(2))
    for name in ("quality_vs_params", "quality_vs_memory", "loss_curves", "before_after", "pareto"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 5


def test_report_warns_when_runs_measured_losses_in_different_precisions(multirun):
    runs = sorted(p for p in multirun.iterdir() if (p / "metrics.json").exists())
    for run, resolved in zip(runs, ["bf16", "fp32", "bf16", "bf16"]):
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, "loss_precision": {"resolved": resolved}}))
    writer.write_report(collect.runs_from_folder(multirun), multirun / "report")
    md = (multirun / "report" / "report.md").read_text()
    assert "## Measured differently" in md
    assert "bf16 in 3 run(s), fp32 in 1 run(s)" in md and "evaluation.loss_precision=fp32" in md
    (runs[1] / "run.json").write_text(json.dumps({"status": "success", "seed": 2,
                                                  "loss_precision": {"resolved": "bf16"}}))
    writer.write_report(collect.runs_from_folder(multirun), multirun / "report")
    assert "Measured differently" not in (multirun / "report" / "report.md").read_text()


def test_report_is_logged_as_a_wandb_run_of_job_type_report(multirun):
    import subprocess

    out = multirun / "report"
    report.main([str(multirun), "--wandb-mode", "offline"])
    offline = list((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    records = subprocess.run(["wandb", "leet", "inspect", "--json", str(offline[0])],
                             capture_output=True, text=True, timeout=120)
    summary = subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(offline[0])],
                             capture_output=True, text=True, timeout=120)
    # A readback that fails is a failure: the report's W&B run cannot be checked otherwise.
    assert records.returncode == 0, f"wandb leet inspect failed: {records.stderr[-500:]}"
    assert summary.returncode == 0, f"wandb leet inspect --summary failed: {summary.stderr[-500:]}"
    assert '"job_type":"report"' in records.stdout.replace(" ", "")
    logged = json.loads(summary.stdout)["summary"]
    assert logged["report/comparison"]["_type"] == "table-file"
    assert {k: v["_type"] for k, v in logged.items() if isinstance(v, dict) and v.get("_type") == "image-file"} == {
        f"report/{name}": "image-file"
        for name in ("quality_vs_params", "quality_vs_memory", "loss_curves", "before_after", "pareto")}


def test_report_cli_without_successful_runs_says_so(tmp_path):
    run = tmp_path / "0_lora"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(SystemExit, match="no successful run to compare"):
        report.main([str(tmp_path), "--wandb-mode", "disabled"])


def test_unknown_metric_lists_available(multirun):
    with pytest.raises(SystemExit, match="available: .*tuned/test/bleu"):
        writer.write_report(collect.runs_from_folder(multirun), multirun / "report", "tuned/test/rouge")


@pytest.mark.slow
def test_compare_methods_multirun_and_report_on_tiny_model(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    sweep = tmp_path / "multirun"
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "-m", "experiment=compare_methods",
                          "model=tiny_llama", "debug=fast", f"hydra.sweep.dir={sweep}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = collect.runs_from_folder(sweep)
    assert sorted((r.method, r.seed) for r in runs) == sorted(
        (m, s) for m in ("full", "lora", "qlora", "bottleneck") for s in (1, 2))
    rates = {r.method: yaml.safe_load((sweep / r.name / "config.yaml").read_text())["trainer"]["learning_rate"]
             for r in runs}
    assert rates == {"full": 5e-5, "lora": 1e-3, "qlora": 1e-3, "bottleneck": 1e-3}
    result = writer.write_report(runs, sweep / "report")
    assert {m: row["runs"] for m, row in result["table"].items()} == {
        "full": 2, "lora": 2, "qlora": 2, "bottleneck": 2}
    # The per-method learning rate and adapter settings follow the method: one row per method.
    assert result["keys"] == ["adapter.method"] and "trainer.learning_rate" in result["table"]["full"]["config"]
    assert list(result["differences"]) == ["full", "lora", "qlora"]  # from the real predictions
    predictions = paired.read_predictions(sweep / runs[0].name / "eval" / "predictions.jsonl")
    test_rows = [row for row in predictions if row["set"] == "test" and row["tuned"] is not None]  # generated
    assert result["differences"]["lora"].examples == len(test_rows) > 0  # the same prompts in every run
    # The overlay also measures chatterbot_qa, which the runs do not train on: one retention row
    # per method for its loss and one for BLEU, the figures of the runs' metrics.json.
    assert {row["set"] for row in predictions} == {"test", "chatterbot_qa", "eval"}
    for method, items in result["retention"].items():
        assert [(r.split, r.name, r.runs) for r in items] == [("chatterbot_qa", "loss", 2), ("chatterbot_qa", "bleu", 2)]
        changes = [r.metrics["delta/chatterbot_qa/loss"] for r in runs if r.method == method]
        assert items[0].change[0] == pytest.approx(statistics.fmean(changes))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """``-m trainer.learning_rate=1e-4,1e-2 model=tiny_llama debug=fast``: two real runs of the
    tiny model (random weights: its outputs share no word with a reference, BLEU 0 throughout)."""
    from tests.conftest import run_train

    root = tmp_path_factory.mktemp("tiny") / "multirun" / "2026-12-02" / "09-00-00"
    for job, rate in enumerate(("1e-4", "1e-2")):
        run_train(["model=tiny_llama", "debug=fast", "logger=none", f"trainer.learning_rate={rate}"],
                  root / f"{job}_lora")
    return root


def test_report_on_tiny_runs_pairs_the_losses_and_calls_bleu_constant(tiny_runs, tmp_path):
    runs = collect.runs_from_folder(tiny_runs)
    result = writer.write_report(runs, tmp_path / "default", replicates=200)
    assert result["metric"] == "tuned/test/bleu"
    assert all(r.metrics["tuned/test/bleu"] == r.metrics["base/test/bleu"] == 0 for r in runs)
    section = _paired_section(tmp_path / "default")
    assert ("Not compared: `tuned/test/bleu` is constant: every run scores 0 on every example; no difference "
            "to test.") in section and "[+0, +0]" not in section
    for metric in ("tuned/eval/loss", "tuned/test/loss"):
        result = writer.write_report(runs, tmp_path / metric.replace("/", "_"), metric=metric, replicates=200)
        table, (label, difference), = result["table"], *result["differences"].items()
        assert label == "trainer.learning_rate=0.01" and difference.examples == 8 and not difference.identical
        # The same token-weighted losses, summed per example in float64 rather than per batch in
        # float32: the same to 1e-7 of a loss near 10.8.
        assert difference.difference == pytest.approx(table[label][metric][0]
                                                      - table["trainer.learning_rate=0.0001"][metric][0], abs=1e-5)
        assert difference.low < difference.difference < difference.high
        assert f"| {label} | {difference.difference:+.4g}" in _paired_section(tmp_path / metric.replace("/", "_"))
    result = writer.write_report(runs, tmp_path / "base", metric="base/eval/loss", replicates=200)
    assert result["differences"]["trainer.learning_rate=0.01"].identical  # one base model in both runs


def test_runs_from_wandb_reads_group_through_the_api(monkeypatch):
    import wandb

    class FakeRun:
        def __init__(self, name, method, seed, state, bleu):
            self.name, self.state = name, state
            self.config = {"adapter": {"method": method}, "seed": seed, "data": {"name": "toy"}}
            self.summary = {"tuned/test/bleu": bleu, "params/trainable": 10, "eval/predictions": {"_type": "table"}}

        def scan_history(self, keys):
            return [{"_step": 1, "train/loss": 2.0}, {"_step": 2, "train/loss": 1.5}]

    calls = []

    class FakeApi:
        def runs(self, path, filters):
            calls.append((path, filters))
            return [FakeRun("a", "lora", 1, "finished", 10.0), FakeRun("b", "lora", 2, "finished", 12.0),
                    FakeRun("c", "full", 1, "crashed", 0.0)]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    runs = collect.runs_from_wandb("proj", "2026-11-30_10-00-00", entity="team")
    assert calls == [("team/proj", {"group": "2026-11-30_10-00-00", "jobType": "train"})]
    assert [(r.method, r.seed, r.status) for r in runs] == [("lora", 1, "success"), ("lora", 2, "success"),
                                                            ("full", 1, "failed")]
    assert runs[0].metrics == {"tuned/test/bleu": 10.0, "params/trainable": 10}  # tables dropped
    assert runs[0].history == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]
    table = writer.summarize(runs)
    assert table["lora"]["tuned/test/bleu"] == pytest.approx((11.0, math.sqrt(2)))


# --------------------------------------------------------------------------- configurations


@pytest.fixture(scope="module")
def rank_multirun(tmp_path_factory):
    """``-m adapter.r=4,8 seed=1,2`` (Hydra's job order) and its report: r=8 gets about twice
    as many test examples right, costs more parameters, memory and time."""
    from tests.report_runs import write_run

    root = tmp_path_factory.mktemp("ranks") / "multirun" / "2026-12-01" / "09-00-00"
    right = {(4, 1): 5, (4, 2): 6, (8, 1): 10, (8, 2): 11}
    for job, ((r, seed), correct) in enumerate(sorted(right.items())):
        write_run(root / f"{job}_lora", [f"adapter.r={r}", f"seed={seed}"], correct,
                  {"params/trainable": 1000.0 * r, "perf/peak_rss_mb": 3000.0 + r, "perf/wall_time_s": 60.0 + r})
    return root, writer.write_report(collect.runs_from_folder(root), root / "report")


def test_multirun_over_rank_reports_one_row_per_rank_with_seeds_aggregated(rank_multirun):
    root, result = rank_multirun
    table = result["table"]
    assert list(table) == ["adapter.r=4", "adapter.r=8"]
    assert [(row["runs"], row["seeds"]) for row in table.values()] == [(2, [1, 2]), (2, [1, 2])]
    assert result["keys"] == ["adapter.r"]  # seed, paths.run_dir and decoding.seed (= seed) are not settings
    exact = [100 * 5 / 12, 100 * 6 / 12]
    assert table["adapter.r=4"]["tuned/test/exact_match"] == pytest.approx(
        (statistics.fmean(exact), statistics.stdev(exact)))
    assert table["adapter.r=8"]["params/trainable"] == pytest.approx((8000.0, 0.0))
    md = (root / "report" / "report.md").read_text()
    assert "| configuration | adapter.r | n |" in md and "| adapter.r=4 | 4 | 2 |" in md
    with (root / "report" / "report.csv").open() as f:
        rows = {r["configuration"]: r for r in csv.DictReader(f)}
    assert rows["adapter.r=8"]["adapter.r"] == "8" and rows["adapter.r=8"]["runs"] == "2"


def test_paired_difference_to_the_first_configuration_is_significant(rank_multirun):
    root, result = rank_multirun
    assert result["baseline"] == "adapter.r=4" and list(result["differences"]) == ["adapter.r=8"]
    difference = result["differences"]["adapter.r=8"]
    table = result["table"]
    assert difference.difference == pytest.approx(table["adapter.r=8"]["tuned/test/bleu"][0]
                                                  - table["adapter.r=4"]["tuned/test/bleu"][0])
    assert 0 < difference.low < difference.difference < difference.high and difference.significant
    assert (difference.examples, difference.replicates) == (12, 1000)
    md = (root / "report" / "report.md").read_text()
    interval = f"[{difference.low:+.4g}, {difference.high:+.4g}]"
    assert f"| adapter.r=8 | {difference.difference:+.4g}* | {interval} | yes |" in md


def _paired_section(folder):
    md = (folder / "report.md").read_text()
    return md.split("## Paired differences to", 1)[1].split("\n## ", 1)[0]


def _token_weighted_interval(root, metric, replicates):
    """The paired bootstrap of a loss written out: per resample, each run's loss is its examples'
    mean token losses weighted by their token counts; each configuration the mean over its seeds."""
    split, side = metric.split("/")[1], metric.split("/")[0]
    runs = {}
    for run in sorted(p for p in root.iterdir() if (p / "metrics.json").exists()):
        label = f"adapter.r={yaml.safe_load((run / 'config.yaml').read_text())['adapter']['r']}"
        rows = [r for r in paired.read_predictions(run / "eval" / "predictions.jsonl") if r["set"] == split]
        runs.setdefault(label, []).append(rows)
    n = len(runs["adapter.r=4"][0])
    rng = np.random.default_rng(0)
    indices = rng.integers(0, n, size=(replicates, n))

    def loss(rows, idx):
        scores = [rows[i][f"{side}_scores"] for i in idx]
        return sum(s["loss"] * s["loss_tokens"] for s in scores) / sum(s["loss_tokens"] for s in scores)

    def config(label, idx):
        return statistics.fmean(loss(rows, idx) for rows in runs[label])

    differences = [config("adapter.r=8", idx) - config("adapter.r=4", idx) for idx in indices]
    return tuple(np.percentile(differences, [2.5, 97.5]))


@pytest.mark.parametrize("metric", ["tuned/test/loss", "tuned/eval/loss", "tuned/eval/perplexity", "delta/test/loss"])
def test_paired_difference_in_a_loss_weighs_each_example_by_its_tokens(rank_multirun, tmp_path, metric):
    """A loss is paired from each example's loss, on the test set and on the validation set
    (which generates nothing): the point difference is that of the runs' token-weighted losses
    in the configurations table, each resample's loss token-weighted the same way."""
    root, _ = rank_multirun
    result = writer.write_report(collect.runs_from_folder(root), tmp_path, metric=metric, replicates=200)
    difference = result["differences"]["adapter.r=8"]
    table = result["table"]
    assert difference.difference == pytest.approx(table["adapter.r=8"][metric][0] - table["adapter.r=4"][metric][0])
    assert difference.examples == (12 if "/test/" in metric else 6)
    assert difference.high < 0 and difference.significant and not difference.identical  # more right, lower loss
    if metric.endswith("/loss") and metric.startswith("tuned/"):
        assert (difference.low, difference.high) == pytest.approx(_token_weighted_interval(root, metric, 200))
    interval = f"[{difference.low:+.4g}, {difference.high:+.4g}]"
    assert f"| adapter.r=8 | {difference.difference:+.4g}* | {interval} | yes |" in _paired_section(tmp_path)


def test_a_metric_constant_in_every_run_is_reported_as_such(tmp_path):
    """Exact match 0 on every example of every run: no difference of +0 in [+0, +0], but a remark
    that the metric is constant, in the Markdown, the HTML page and the W&B table."""
    from tests.report_runs import write_run

    root = tmp_path / "multirun"
    for job, (r, seed) in enumerate([(4, 1), (4, 2), (8, 1), (8, 2)]):
        write_run(root / f"{job}_lora", [f"adapter.r={r}", f"seed={seed}"], 0, {"params/trainable": 1000.0 * r})
    result = writer.write_report(collect.runs_from_folder(root), root / "report", metric="tuned/test/exact_match",
                                 replicates=100)
    difference = result["differences"]["adapter.r=8"]
    assert difference.identical and difference.constant == 0.0
    remark = "constant: every run scores 0 on every example; no difference to test"
    section = _paired_section(root / "report")
    assert f"Not compared: `tuned/test/exact_match` is {remark}." in section
    assert "12 shared examples" in section and "|" not in section and "+0" not in section
    html = (root / "report" / "report.html").read_text()
    paired_html = html.split("Paired differences to", 1)[1].split("<h2>", 1)[0]
    assert remark in paired_html and "<table>" not in paired_html
    columns, rows = page.wandb_tables(result)["report/paired_differences"]
    assert dict(zip(columns, rows[0]))["remark"] == remark


def test_runs_that_score_each_example_the_same_are_not_compared(rank_multirun, tmp_path):
    """The base model is the same in every run: its loss varies over the examples, not over the
    runs, and the report says so rather than showing a tie."""
    root, _ = rank_multirun
    result = writer.write_report(collect.runs_from_folder(root), tmp_path, metric="base/test/loss", replicates=100)
    difference = result["differences"]["adapter.r=8"]
    assert difference.identical and difference.constant is None
    assert ("Not compared: `base/test/loss` is identical: every run scores each example the same; "
            "no difference to test.") in _paired_section(tmp_path)
    assert not result["differences"]["adapter.r=8"].significant


def test_predictions_without_per_example_losses_say_so(rank_multirun, tmp_path):
    """A run measured before per-example losses were recorded: the report names the run's
    configuration, the score missing and what its rows hold, instead of a difference."""
    root, _ = rank_multirun
    old = tmp_path / "old"
    shutil.copytree(root, old, ignore=shutil.ignore_patterns("report"))
    for run in old.iterdir():
        path = run / "eval" / "predictions.jsonl"
        rows = [r for r in paired.read_predictions(path) if r["set"] == "test"]
        for row in rows:
            for side in ("base", "tuned"):
                row[f"{side}_scores"] = {k: v for k, v in row[f"{side}_scores"].items() if not k.startswith("loss")}
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    writer.write_report(collect.runs_from_folder(old), old / "report", metric="tuned/test/loss", replicates=100)
    assert ("Not computed: eval/predictions.jsonl of a run of 'adapter.r=4' has no per-example 'loss' score of "
            "the tuned model on set 'test' (it was measured before per-example losses were recorded); it has: "
            "bleu, exact_match.") in _paired_section(old / "report")
    writer.write_report(collect.runs_from_folder(old), old / "report", metric="tuned/eval/loss", replicates=100)
    assert ("Not computed: eval/predictions.jsonl of a run of 'adapter.r=4' has no row of set 'eval'."
            in _paired_section(old / "report"))


def test_pareto_front_in_the_report(rank_multirun):
    root, result = rank_multirun
    assert result["pareto"] == ["adapter.r=4", "adapter.r=8"]  # cheaper vs better: neither dominates
    md = (root / "report" / "report.md").read_text()
    assert "| configuration | tuned/test/bleu | params/trainable | perf/peak_rss_mb | perf/wall_time_s |" in md
    assert "![Pareto front](pareto.png)" in md


# --------------------------------------------------------------------------- retention


@pytest.fixture(scope="module")
def methods_multirun(tmp_path_factory):
    """full and lora over seeds 1 and 2, each measured on chatterbot_qa (tests/report_runs.py)."""
    from tests.report_runs import write_methods_multirun

    root = write_methods_multirun(tmp_path_factory.mktemp("methods") / "multirun" / "2026-12-01" / "10-00-00")
    return root, writer.write_report(collect.runs_from_folder(root), root / "report", replicates=200)


def _retention_bleu(correct):
    from tests.report_runs import ANSWERS, outputs

    return metrics.corpus_bleu(outputs(correct, ANSWERS), [[a] for a in ANSWERS])


def test_retention_gives_base_tuned_and_change_on_the_set_not_trained_on(methods_multirun):
    root, result = methods_multirun
    retention = result["retention"]
    assert {label: [(r.split, r.name, r.runs) for r in items] for label, items in retention.items()} == {
        label: [("chatterbot_qa", "loss", 2), ("chatterbot_qa", "bleu", 2)] for label in ("full", "lora")}
    full_loss, full_bleu = retention["full"]
    assert full_loss.base == pytest.approx((2.0, 0.0))
    assert full_loss.tuned == pytest.approx((2.8, statistics.stdev([2.9, 2.7])))
    assert full_loss.change == pytest.approx((0.8, statistics.stdev([0.9, 0.7]))) and full_loss.worse
    base, tuned = _retention_bleu(4), [_retention_bleu(1), _retention_bleu(2)]
    assert full_bleu.base == pytest.approx((base, 0.0))
    assert full_bleu.change == pytest.approx((statistics.fmean(tuned) - base, statistics.stdev(tuned)))
    assert full_bleu.worse  # fewer answers right: lower BLEU after tuning
    assert retention["lora"][0].change == pytest.approx((0.15, statistics.stdev([0.1, 0.2])))


def test_retention_section_in_markdown_and_csv(methods_multirun):
    root, result = methods_multirun
    md = (root / "report" / "report.md").read_text()
    section = md.split("## Retention (does it forget?)", 1)[1].split("\n## ", 1)[0]
    assert "A higher loss after tuning (a positive change) means the model forgot" in section
    assert "`loss`: higher is worse; `bleu`: lower is worse" in section
    assert "| full | chatterbot_qa | loss | 2 | 2 | 2.8 ± 0.14 | +0.8 ± 0.14 | yes |" in section
    assert "| lora | chatterbot_qa | loss | 2 | 2 | 2.15 ± 0.071 | +0.15 ± 0.071 | yes |" in section
    lora_bleu = result["retention"]["lora"][1]
    assert (f"| lora | chatterbot_qa | bleu | 2 | {lora_bleu.base[0]:.4g} | {lora_bleu.tuned[0]:.4g} ± "
            f"{lora_bleu.tuned[1]:.2g} | {lora_bleu.change[0]:+.4g} ± {lora_bleu.change[1]:.2g} | yes |") in section
    with (root / "report" / "report.csv").open() as f:
        rows = {r["configuration"]: r for r in csv.DictReader(f)}
    assert float(rows["full"]["tuned/chatterbot_qa/loss mean"]) == pytest.approx(2.8)
    assert float(rows["full"]["delta/chatterbot_qa/loss mean"]) == pytest.approx(0.8)
    assert float(rows["lora"]["delta/chatterbot_qa/loss std"]) == pytest.approx(statistics.stdev([0.1, 0.2]))


def test_without_an_extra_set_the_retention_section_says_how_to_get_one(rank_multirun):
    root, result = rank_multirun
    assert result["retention"] == {"adapter.r=4": [], "adapter.r=8": []}
    md = (root / "report" / "report.md").read_text()
    section = md.split("## Retention (does it forget?)", 1)[1].split("\n## ", 1)[0]
    assert "No run measured a set it does not train on" in section
    assert "`evaluation.extra_datasets=[chatterbot_qa]`" in section and "|" not in section


@pytest.mark.parametrize("metric, names", [("tuned/test/bleu", ["loss", "bleu"]), ("delta/test/rougeL", ["loss", "rougeL"]),
                                           ("tuned/eval/loss", ["loss"]), ("params/trainable", ["loss"])])
def test_retention_shows_the_loss_and_the_primary_metric(metric, names):
    assert page.retention_names(metric) == names


def test_extra_sets_are_those_neither_eval_nor_test():
    keys = ["base/test/bleu", "tuned/eval/loss", "delta/chatterbot_qa/loss", "tuned/my_jsonl/bleu",
            "data/chatterbot_qa_loss_examples", "perf/peak_rss_mb"]
    assert paired.extra_sets(keys) == ["chatterbot_qa", "my_jsonl"]


class _Page(HTMLParser):
    """The report page as a sequence of headings, tables, images and stray text."""

    def __init__(self):
        super().__init__()
        self.events, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)
        if tag in ("table", "img"):
            self.events.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        self.stack.pop() if self.stack and self.stack[-1] == tag else None

    def handle_data(self, data):
        if self.stack and self.stack[-1] in ("h1", "h2", "h3"):
            self.events.append((self.stack[-1], data.strip()))
        elif data.strip():
            self.events.append(("text", data.strip()))


def test_html_page_renders_headings_tables_and_embedded_pngs(rank_multirun):
    root, _ = rank_multirun
    text = (root / "report" / "report.html").read_text()
    page = _Page()
    page.feed(text)
    headings = [text for tag, text in page.events if tag in ("h1", "h2")]
    assert [tag for tag, _ in page.events if tag == "h1"] == ["h1"]
    assert headings[1:] == ["Configurations", "Paired differences to adapter.r=4",
                            "Pareto front: quality vs cost", "Retention (does it forget?)",
                            "Benchmarks before and after (lm-evaluation-harness)", "Runs not compared", "Plots"]
    texts = [text for tag, text in page.events if tag == "text"]
    assert not [t for t in texts if t.startswith("#") or t.startswith("|")]  # no raw Markdown left
    title, tables = None, 0
    for tag, value in page.events:
        if tag in ("h1", "h2"):
            title = value
        elif tag == "table":
            assert title, "a table without a heading before it"
            title, tables = None, tables + 1
    assert tables == 3
    images = [attrs for tag, attrs in page.events if tag == "img"]
    assert len(images) == 5
    for attrs in images:
        assert attrs["src"].startswith("data:image/png;base64,") and attrs["alt"]
        assert base64.b64decode(attrs["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overflow-x:auto" in text and "max-width:100%" in text  # wide tables scroll, images fit


def test_methods_of_an_experiment_are_labelled_by_method(tmp_path):
    """compare_methods varies the method, and through it the learning rate and the adapter
    settings: those follow from the method and do not split it into more rows."""
    from tests.report_runs import write_run

    for job, (method, seed) in enumerate([(m, s) for m in ("full", "lora") for s in (1, 2)]):
        write_run(tmp_path / f"{job}_{method}", ["experiment=compare_methods", f"adapter={method}", f"seed={seed}"],
                  4, {"params/trainable": 10.0})
    configurations = grouping.group_runs(collect.runs_from_folder(tmp_path))
    assert configurations.keys == ["adapter.method"]
    assert {k: [r.seed for r in runs] for k, runs in configurations.groups.items()} == {"full": [1, 2], "lora": [1, 2]}
    assert {"trainer.learning_rate", "adapter.r"} <= set(configurations.varied)
    table = writer.summarize_groups(configurations)
    assert table["full"]["config"]["trainer.learning_rate"] == 5e-5 and table["full"]["config"]["adapter.r"] == "-"


def _bare_run(folder, overrides, status="success", bleu=10.0):
    """A run folder with run.json and metrics only (no config.yaml): its overrides tell it apart."""
    folder.mkdir(parents=True)
    seed = next(int(o.split("=")[1]) for o in overrides if o.startswith("seed="))
    (folder / "run.json").write_text(json.dumps({"status": status, "seed": seed, "overrides": overrides}))
    (folder / "metrics.json").write_text(json.dumps({"tuned/test/bleu": bleu}))


def test_without_config_yaml_overrides_tell_configurations_apart_and_ignore_merges(tmp_path):
    for job, (rate, seed) in enumerate([(r, s) for r in ("1e-4", "1e-3") for s in (1, 2)]):
        _bare_run(tmp_path / f"{job}_lora", ["adapter=lora", f"trainer.learning_rate={rate}", f"seed={seed}",
                                             f"hydra.run.dir=/tmp/{job}"], bleu=10.0 + job)
    runs = collect.runs_from_folder(tmp_path)
    assert runs[0].method == "lora" and runs[0].config["trainer.learning_rate"] == 1e-4
    table = writer.summarize(runs)
    assert list(table) == ["trainer.learning_rate=0.0001", "trainer.learning_rate=0.001"]
    assert table["trainer.learning_rate=0.001"]["tuned/test/bleu"] == pytest.approx((12.5, math.sqrt(0.5)))
    merged = writer.summarize(runs, ignore=["trainer"])
    assert list(merged) == ["lora"] and merged["lora"]["runs"] == 4


def test_sweep_trial_folders_are_reported_beside_the_sweeps_own_report(tmp_path):
    from tests.report_runs import write_run

    sweep = tmp_path / "sweeps" / "lora_rank_alpha_lr"
    trials = [(8, 16, 0.001, 6), (16, 32, 0.0003, 9), (4, 8, 0.002, 0)]
    for number, (r, alpha, rate, correct) in enumerate(trials):
        overrides = ["sweep=lora_rank_alpha_lr", f"adapter.r={r}", f"adapter.lora_alpha={alpha}",
                     f"trainer.learning_rate={rate}", f"sweep.trial={number}"]
        write_run(sweep / f"trial_{number}", overrides, correct, {"params/trainable": 1000.0 * r},
                  status="pruned" if number == 2 else "success")
    (sweep / "report.json").write_text(json.dumps({"study": "lora_rank_alpha_lr", "best": []}))
    (sweep / "report.md").write_text("# Sweep lora_rank_alpha_lr\n")
    report.main([str(sweep), "--wandb-mode", "disabled", "--bootstrap", "200"])
    runs = collect.runs_from_folder(sweep)
    assert [(r.name, r.status) for r in runs] == [("trial_0", "success"), ("trial_1", "success"), ("trial_2", "pruned")]
    assert (sweep / "report.md").read_text() == "# Sweep lora_rank_alpha_lr\n"
    md = (sweep / "report" / "report.md").read_text()
    label = "adapter.lora_alpha=16, adapter.r=8, trainer.learning_rate=0.001"
    assert f"| {label} | 16 | 8 | 0.001 | 1 |" in md  # sweep.trial is not a setting
    assert "- `trial_2` (lora, seed 42): **pruned**" in md


def test_unknown_baseline_lists_the_configurations(rank_multirun, tmp_path):
    root, _ = rank_multirun
    with pytest.raises(SystemExit, match="choose one of: adapter.r=4, adapter.r=8"):
        writer.write_report(collect.runs_from_folder(root), tmp_path, baseline="adapter.r=2")
    result = writer.write_report(collect.runs_from_folder(root), tmp_path, baseline="adapter.r=8", replicates=100)
    assert list(result["differences"]) == ["adapter.r=4"] and result["differences"]["adapter.r=4"].difference < 0


def test_wandb_runs_are_grouped_by_their_config(monkeypatch):
    import wandb

    class FakeRun:
        state, summary = "finished", {}

        def __init__(self, r, seed, bleu):
            self.name, self.summary = f"r{r}-s{seed}", {"tuned/test/bleu": bleu}
            self.config = {"adapter": {"method": "lora", "r": r}, "seed": seed, "_wandb": {"t": seed}}

        def scan_history(self, keys):
            return []

    class FakeApi:
        def runs(self, path, filters):
            return [FakeRun(r, s, 10.0 * r + s) for r in (4, 8) for s in (1, 2)]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    table = writer.summarize(collect.runs_from_wandb("proj", "group"))
    assert {k: (row["runs"], row["tuned/test/bleu"][0]) for k, row in table.items()} == {
        "adapter.r=4": (2, 41.5), "adapter.r=8": (2, 81.5)}


# --------------------------------------------------------------------------- statistics


def _rows(scores, metric="exact_match", order=None):
    """Prediction rows of one run with the given per-example tuned scores."""
    rows = [{"set": "test", "index": i, "prompt": f"p{i}", "reference": "x", "base": "", "tuned": "",
             "base_scores": {metric: 0.0}, "tuned_scores": {metric: float(s)}} for i, s in enumerate(scores)]
    return [rows[i] for i in order] if order else rows


def _reference_interval(baseline, other, replicates, seed=0):
    """The paired bootstrap written out: per replicate one resample of example indices, each
    configuration's mean over the resample averaged over its seeds."""
    rng = np.random.default_rng(seed)
    n = len(baseline[0])
    differences = []
    for _ in range(replicates):
        idx = rng.integers(0, n, size=n)
        mean = lambda seeds: sum(sum(s[i] for i in idx) / n for s in seeds) / len(seeds)  # noqa: E731
        differences.append(mean(other) - mean(baseline))
    return np.percentile(differences, [2.5, 97.5])


BASELINE = [[0, 100, 0, 0, 100, 0, 0, 100, 0, 0], [0, 100, 0, 100, 100, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("other, significant", [
    ([[100, 100, 100, 0, 100, 100, 100, 100, 100, 100], [100, 100, 100, 100, 100, 100, 0, 100, 100, 100]], True),
    ([[100, 0, 0, 0, 100, 0, 0, 100, 0, 0], [0, 100, 0, 100, 0, 0, 100, 0, 0, 0]], False),
])
def test_paired_bootstrap_matches_a_hand_computed_interval(other, significant):
    configs = {"a": [_rows(s) for s in BASELINE],
               # another order and an example the baseline lacks: matched by index and prompt
               "b": [_rows(s + [100], order=list(range(len(s), -1, -1))) for s in other]}
    metric = paired.MetricRef.parse("tuned/test/exact_match")
    d = paired.paired_bootstrap(configs, "a", metric, replicates=300)["b"]
    assert (d.low, d.high) == pytest.approx(tuple(_reference_interval(BASELINE, other, 300)))
    assert d.difference == pytest.approx(np.mean(other) - np.mean(BASELINE))
    assert d.significant is significant and d.examples == 10


def test_corpus_bleu_is_recomputed_on_each_resample():
    from tests.report_runs import REFERENCES, outputs

    def rows(texts):
        return [{"set": "test", "index": i, "prompt": f"p{i}", "reference": ref, "base": "", "tuned": t,
                 "base_scores": {}, "tuned_scores": {}} for i, (ref, t) in enumerate(zip(REFERENCES, texts))]

    partial = [t[:-4] if i % 3 else t for i, t in enumerate(outputs(9))]  # some outputs cut short
    configs = {"a": [rows(outputs(4))], "b": [rows(partial), rows(outputs(10))]}
    d = paired.paired_bootstrap(configs, "a", paired.MetricRef.parse("tuned/test/bleu"), replicates=40)["b"]
    refs = [[r] for r in REFERENCES]
    rng, differences = np.random.default_rng(0), []
    for _ in range(40):
        idx = rng.integers(0, len(refs), size=len(refs))
        bleu = lambda texts: metrics.corpus_bleu([texts[i] for i in idx], [refs[i] for i in idx])  # noqa: E731
        differences.append((bleu(partial) + bleu(outputs(10))) / 2 - bleu(outputs(4)))
    assert (d.low, d.high) == pytest.approx(tuple(np.percentile(differences, [2.5, 97.5])))
    full = [metrics.corpus_bleu(texts, refs) for texts in (outputs(4), partial, outputs(10))]
    assert d.difference == pytest.approx((full[1] + full[2]) / 2 - full[0])


@pytest.mark.parametrize("points, maximize, front", [
    # quality, trainable parameters, peak memory, wall time
    ({"small": (10, 1e3, 3000, 60), "big": (14, 1e5, 4000, 90), "worse": (9, 2e3, 3500, 70),
      "same_as_small": (10, 1e3, 3000, 60), "fast": (12, 1e5, 4000, 30)}, True,
     ["small", "big", "same_as_small", "fast"]),
    # a loss: lower is better, so "big" (1.0) beats "small" and "worse" on quality
    ({"small": (2.0, 1e3, 3000, 60), "big": (1.0, 1e5, 4000, 90), "worse": (2.5, 1e3, 3000, 60)}, False,
     ["small", "big"]),
])
def test_pareto_front_keeps_the_non_dominated(points, maximize, front):
    assert pareto.pareto_front(points, maximize=maximize) == front


def test_pareto_uses_cuda_memory_when_every_configuration_has_it():
    table = {"a": {"tuned/test/bleu": (10.0, 1.0), "params/trainable": (1e3, 0), "perf/peak_cuda_mb": (900.0, 0),
                   "perf/peak_rss_mb": (3000.0, 0)},
             "b": {"tuned/test/bleu": (9.0, 1.0), "params/trainable": (2e3, 0), "perf/peak_cuda_mb": (800.0, 0),
                   "perf/peak_rss_mb": (2000.0, 0)},
             "c": {"tuned/test/bleu": (8.0, 1.0), "params/trainable": (2e3, 0), "perf/peak_cuda_mb": (950.0, 0),
                   "perf/peak_rss_mb": (1000.0, 0)}}
    assert pareto.pareto(table, "tuned/test/bleu") == (["params/trainable", "perf/peak_cuda_mb"], ["a", "b"])
    assert pareto.pareto(table, "tuned/test/loss") == (["params/trainable", "perf/peak_cuda_mb"], [])
