"""Standard benchmarks through lm-evaluation-harness: on local task YAMLs written here (a
multiple-choice task, a generate-until task with a filter, and a group of both), indexed from
this folder alone (``TaskManager(include_defaults=False)``), never the network."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipeline.config.errors import ConfigError, PipelineError
from pipeline.scoring import benchmarks
from tests.conftest import read_json, run_train

FAST = ["model=tiny_llama", "debug=fast"]

MC = """task: toy_sum_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

GEN = """task: toy_sum_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

GROUP = """group: toy_sums
task: [toy_sum_mc, toy_sum_gen]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
"""


def write_tasks(folder: Path, examples: int = 24) -> Path:
    """A folder of task YAMLs with their data: sums as multiple choice and as generation."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(folder / "mc.jsonl", "w") as mc, open(folder / "gen.jsonl", "w") as gen:
        for _ in range(examples):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            choices = [str(a + b), str(a + b + 1), str(a * b + 3), str(a + b - 1)]
            mc.write(json.dumps({"question": f"What is {a} plus {b}?", "choices": choices, "label": 0}) + "\n")
            gen.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n")
    (folder / "mc.yaml").write_text(MC.format(data=folder / "mc.jsonl"))
    (folder / "gen.yaml").write_text(GEN.format(data=folder / "gen.jsonl"))
    (folder / "group.yaml").write_text(GROUP)
    return folder


@pytest.fixture
def tasks(tmp_path) -> Path:
    return write_tasks(tmp_path / "tasks")


def test_metric_names_follow_one_rule():
    assert benchmarks.metric_key("acc,none") == "acc"
    assert benchmarks.metric_key("acc_stderr,none") == "acc_stderr"
    assert benchmarks.metric_key("exact_match,strict-match") == "exact_match_strict-match"
    assert benchmarks.metric_key("exact_match_stderr,strict-match") == "exact_match_strict-match_stderr"
    assert benchmarks.metric_key("alias") is None


def test_training_run_measures_base_and_tuned_and_caches_the_base(tmp_path, tasks):
    bench = ["evaluation.benchmarks.tasks=[toy_sum_mc,toy_sum_gen]", f"evaluation.benchmarks.include_path={tasks}",
             "evaluation.benchmarks.limit=12"]
    first, second = tmp_path / "a" / "run", tmp_path / "a" / "again"
    run_train([*FAST, *bench], first)
    metrics = read_json(first / "metrics.json")
    for side in ("base", "tuned"):
        assert 0.0 <= metrics[f"{side}/benchmark/toy_sum_mc/acc"] <= 1.0
        assert metrics[f"{side}/benchmark/toy_sum_mc/acc_stderr"] > 0
        assert f"{side}/benchmark/toy_sum_mc/acc_norm" in metrics
        assert f"{side}/benchmark/toy_sum_gen/exact_match_strict-match" in metrics
    assert metrics["delta/benchmark/toy_sum_mc/acc"] == pytest.approx(
        metrics["tuned/benchmark/toy_sum_mc/acc"] - metrics["base/benchmark/toy_sum_mc/acc"])
    assert "delta/benchmark/toy_sum_mc/acc_stderr" not in metrics  # a standard error is not a score
    rows = [json.loads(line) for line in (first / "eval" / "predictions.jsonl").read_text().splitlines()]
    mc = [r for r in rows if r["set"] == "benchmark/toy_sum_mc"]
    assert len(mc) == 12 and {r["index"] for r in mc} == set(range(12))
    assert all(set(r["base_scores"]) == set(r["tuned_scores"]) == {"acc", "acc_norm"} for r in mc)
    for row in mc:  # the reference is the right choice's text; the output one of the choices
        a, b = (int(w.rstrip("?")) for w in row["prompt"].split()[3:6:2])
        assert row["reference"] == str(a + b)
        assert row["tuned"] in {str(a + b), str(a + b + 1), str(a * b + 3), str(a + b - 1)}
    # per-example scores average to the task's figure
    assert sum(r["tuned_scores"]["acc"] for r in mc) / 12 == pytest.approx(metrics["tuned/benchmark/toy_sum_mc/acc"])
    assert read_json(first / "run.json")["base_measurement"] == "measured"

    run_train([*FAST, *bench], second)  # same base, tasks and settings: the cached base
    assert read_json(second / "run.json")["base_measurement"] == "cached"
    again = read_json(second / "metrics.json")
    assert again["base/benchmark/toy_sum_mc/acc"] == metrics["base/benchmark/toy_sum_mc/acc"]

    (tasks / "mc.jsonl").write_text((tasks / "mc.jsonl").read_text() + "\n")  # the task's data changed
    third = tmp_path / "a" / "changed"
    run_train([*FAST, *bench], third)
    assert read_json(third / "run.json")["base_measurement"] == "measured"


def test_a_group_reports_its_totals_unless_subtasks_are_asked_for(tmp_path, tasks):
    run_train([*FAST, "evaluation.benchmarks.tasks=[toy_sums]", f"evaluation.benchmarks.include_path={tasks}",
               "evaluation.benchmarks.limit=6", "evaluation.splits=[]"], tmp_path / "run")
    names = {k for k in read_json(tmp_path / "run" / "metrics.json") if "/benchmark/" in k}
    assert {k.split("/")[2] for k in names} == {"toy_sums"}
    assert "tuned/benchmark/toy_sums/acc" in names


def test_unknown_task_and_missing_folder_fail_before_any_model_loads(tmp_path, tasks):
    with pytest.raises(ConfigError) as err:
        run_train([*FAST, "evaluation.benchmarks.tasks=[toy_sum_mcq]", f"evaluation.benchmarks.include_path={tasks}"],
                  tmp_path / "run")
    assert "'toy_sum_mcq' is not an lm-eval task" in str(err.value) and "did you mean toy_sum_mc" in str(err.value)
    with pytest.raises(ConfigError, match="include_path=.* is not a folder"):
        run_train([*FAST, "evaluation.benchmarks.tasks=[x]", f"evaluation.benchmarks.include_path={tmp_path / 'no'}"],
                  tmp_path / "run2")


def test_a_task_whose_dataset_cannot_be_fetched_is_named(tmp_path, monkeypatch, tiny_folder, tokenizer):
    folder = tmp_path / "hub_tasks"
    folder.mkdir()
    (folder / "t.yaml").write_text("task: needs_hub\ndataset_path: no-such-org/no-such-dataset\ntest_split: test\n"
                                   "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\n"
                                   "doc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    # Offline as a user sets it; datasets and huggingface_hub read these when first imported, and
    # earlier tests may have imported them: their flags too (without them a lookup waits on the network).
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from pipeline.config.schema import BenchmarksConfig

    cfg = BenchmarksConfig(tasks=["needs_hub"], include_path=str(folder))
    with pytest.raises(PipelineError, match="benchmark task 'needs_hub' needs its dataset"):
        from transformers import AutoModelForCausalLM

        benchmarks.run(AutoModelForCausalLM.from_pretrained(tiny_folder), tokenizer, cfg)


@pytest.mark.slow
def test_a_sweep_with_a_benchmark_floor_never_reports_a_trial_that_breaks_it(tmp_path, tasks):
    """Two trials of the shipped floor sweep on the tiny model: a learning rate too small to move
    any answer (change 0: feasible at max_drop 0) and one that moves them both ways (its paired
    interval reaches below 0: infeasible), which has the lower validation loss, so that only the
    constraint keeps it from being the best."""
    import optuna

    from tests.study.test_sweep import load, run_sweep, sweep_command

    name, folder = "lora_benchmark_floor", tmp_path / "sweeps" / "lora_benchmark_floor"
    folder.mkdir(parents=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")
    study.enqueue_trial({"adapter.r": 16, "trainer.learning_rate": 3e-2})  # outside the space: passed on
    study.enqueue_trial({"adapter.r": 16, "trainer.learning_rate": 1e-5})
    run_sweep(sweep_command(name, tmp_path, "sweep.n_trials=2", "evaluation.benchmarks.tasks=[toy_sum_mc]",
                            f"evaluation.benchmarks.include_path={tasks}", "evaluation.benchmarks.limit=24",
                            "sweep.constraints=[{metric:benchmark/toy_sum_mc/acc,max_drop:0}]",
                            f"paths.base_cache_dir={tmp_path / 'cache'}"))
    trials = {t.params["trainer.learning_rate"]: t for t in load(folder, name).trials}
    bold, timid = trials[3e-2], trials[1e-5]
    assert bold.state.name == timid.state.name == "COMPLETE"
    assert bold.value < timid.value  # the better objective ...
    broken = bold.user_attrs["constraints"]["benchmark/toy_sum_mc/acc"]
    assert broken["low"] < 0 < broken["violation"] and bold.constraints == {
        "benchmark/toy_sum_mc/acc": pytest.approx(broken["violation"])}  # ... breaks the floor
    met = timid.user_attrs["constraints"]["benchmark/toy_sum_mc/acc"]
    assert met["violation"] <= 0 and met["examples"] == 24
    # the interval is the run's own, from its predictions: recomputed here from the file
    from pipeline.scoring.resampling import MetricRef, change_interval, read_predictions

    rows = read_predictions(folder / f"trial_{bold.number}" / "eval" / "predictions.jsonl")
    again = change_interval([rows], MetricRef.parse("delta/benchmark/toy_sum_mc/acc"))
    assert (again.low, again.change) == pytest.approx((broken["low"], broken["change"]))
    report = read_json(folder / "report.json")
    assert [row["number"] for row in report["best"]] == [timid.number]
    assert list(report["infeasible"]) == [str(bold.number)]
    text = (folder / "report.md").read_text()
    assert "## Infeasible trials (never best, never served)" in text and f"- trial {bold.number}: " in text


@pytest.mark.slow
def test_multirun_report_shows_benchmark_changes_with_paired_intervals(tmp_path, tasks):
    """A real multirun over two learning rates with a benchmark: the report's benchmark section
    has one row per configuration and metric, the interval from the runs' own examples."""
    import subprocess
    import sys

    from pipeline.comparison import collect, writer
    from pipeline.scoring.resampling import read_predictions
    from tests.conftest import ROOT, python_path

    sweep = tmp_path / "multirun"
    out = subprocess.run([sys.executable, "-m", "pipeline.train", "-m", "trainer.learning_rate=1e-5,3e-2",
                          *FAST, "evaluation=perplexity", "logger=none", "evaluation.benchmarks.tasks=[toy_sum_mc]",
                          f"evaluation.benchmarks.include_path={tasks}", "evaluation.benchmarks.limit=24",
                          f"hydra.sweep.dir={sweep}", f"paths.base_cache_dir={tmp_path / 'cache'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**__import__("os").environ, "PYTHONPATH": python_path()})
    assert out.returncode == 0, out.stderr[-3000:]
    runs = collect.runs_from_folder(sweep)
    result = writer.write_report(runs, sweep / "report", replicates=500)
    assert set(result["benchmarks"]) == {"trainer.learning_rate=1e-05", "trainer.learning_rate=0.03"}
    for label, changes in result["benchmarks"].items():
        assert [(c.task, c.name, c.runs) for c in changes] == [("toy_sum_mc", "acc", 1), ("toy_sum_mc", "acc_norm", 1)]
        run = next(r for r in runs if r.config["trainer.learning_rate"] == float(label.split("=")[1]))
        rows = [r for r in read_predictions(run.path / "eval" / "predictions.jsonl") if r["set"] == "benchmark/toy_sum_mc"]
        acc = changes[0]
        assert acc.interval.examples == len(rows) == 24
        assert acc.interval.change == pytest.approx(run.metrics["delta/benchmark/toy_sum_mc/acc"])
        assert acc.interval.low <= acc.interval.change <= acc.interval.high
    moved = result["benchmarks"]["trainer.learning_rate=0.03"][0]
    assert moved.interval.low < moved.interval.high  # answers changed: an interval of some width
    text = (sweep / "report" / "report.md").read_text()
    section = text.split("## Benchmarks before and after (lm-evaluation-harness)")[1].split("\n## ")[0]
    c = moved.interval
    assert "| toy_sum_mc | acc | 1 |" in section and f"{c.change:+.4g} [{c.low:+.4g}, {c.high:+.4g}] | 24 |" in section


def test_evaluate_benchmarks_a_finished_run_into_a_new_folder(tmp_path, tasks, tiny_folder):
    """``pipeline.evaluate run=... evaluation.benchmarks.tasks=[...]``: base and tuned model of a
    saved LoRA run on a benchmark, in the evaluation's own folder; the run is untouched."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline import evaluate
    from tests.adapter_factory import make_lora, make_run
    from tests.conftest import ROOT

    run = make_run(tmp_path / "run", make_lora(tiny_folder, tmp_path / "lora", seed=1), [])
    before = sorted(p.name for p in run.rglob("*"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"run={run}", "evaluation.splits=[]", "evaluation.metrics=[]", "evaluation.benchmarks.tasks=[toy_sum_gen]",
            f"evaluation.benchmarks.include_path={tasks}", "evaluation.benchmarks.limit=5",
            f"paths.run_dir={tmp_path / 'ev'}", f"paths.root_dir={ROOT}"])
    metrics = evaluate.evaluate(cfg)
    for side in ("base", "tuned", "delta"):
        assert f"{side}/benchmark/toy_sum_gen/exact_match_strict-match" in metrics
    rows = [json.loads(line) for line in (tmp_path / "ev" / "eval" / "predictions.jsonl").read_text().splitlines()]
    bench = [r for r in rows if r["set"] == "benchmark/toy_sum_gen"]
    assert [r["index"] for r in bench] == list(range(5))
    assert all(isinstance(r["tuned"], str) and isinstance(r["base"], str) for r in bench)  # the filtered answers
    assert sorted(p.name for p in run.rglob("*")) == before
