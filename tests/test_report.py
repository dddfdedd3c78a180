"""The method-comparison report from a synthetic multirun folder: values, plots, failed runs."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from pipeline import report

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
    result = report.write_report(report.runs_from_folder(multirun), multirun / "report")
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
    for name in ("quality_vs_params", "quality_vs_memory", "loss_curves", "before_after"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 4


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
    if records.returncode != 0 or summary.returncode != 0:
        pytest.skip(f"wandb leet inspect unavailable: {records.stderr[-300:]}")
    assert '"job_type":"report"' in records.stdout.replace(" ", "")
    logged = set(json.loads(summary.stdout)["summary"])
    assert {"report/comparison", "report/quality_vs_params", "report/loss_curves"} <= logged


def test_report_cli_without_successful_runs_says_so(tmp_path):
    run = tmp_path / "0_lora"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(SystemExit, match="no successful run to compare"):
        report.main([str(tmp_path), "--wandb-mode", "disabled"])


def test_unknown_metric_lists_available(multirun):
    with pytest.raises(SystemExit, match="available: .*tuned/test/bleu"):
        report.write_report(report.runs_from_folder(multirun), multirun / "report", "tuned/test/rouge")


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
    runs = report.runs_from_folder(sweep)
    assert sorted((r.method, r.seed) for r in runs) == sorted(
        (m, s) for m in ("full", "lora", "qlora", "bottleneck") for s in (1, 2))
    rates = {r.method: yaml.safe_load((sweep / r.name / "config.yaml").read_text())["trainer"]["learning_rate"]
             for r in runs}
    assert rates == {"full": 5e-5, "lora": 1e-3, "qlora": 1e-3, "bottleneck": 1e-3}
    result = report.write_report(runs, sweep / "report")
    assert {m: row["runs"] for m, row in result["table"].items()} == {
        "full": 2, "lora": 2, "qlora": 2, "bottleneck": 2}


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
    runs = report.runs_from_wandb("proj", "2026-11-30_10-00-00", entity="team")
    assert calls == [("team/proj", {"group": "2026-11-30_10-00-00", "jobType": "train"})]
    assert [(r.method, r.seed, r.status) for r in runs] == [("lora", 1, "success"), ("lora", 2, "success"),
                                                            ("full", 1, "failed")]
    assert runs[0].metrics == {"tuned/test/bleu": 10.0, "params/trainable": 10}  # tables dropped
    assert runs[0].history == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]
    table = report.summarize(runs)
    assert table["lora"]["tuned/test/bleu"] == pytest.approx((11.0, math.sqrt(2)))
