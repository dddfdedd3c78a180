"""Merge sweeps (``python -m pipeline.merge -m merge_sweep=<name> 'runs=[...]'``, files in
sweeps/merge/): the training sweeps' driver and report over merges, objectives read off the
sources' validation sets, one weight sampled per source; and a merge folder served, evaluated and
exported as a run."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from starlette.testclient import TestClient

from pipeline import export, serve
from pipeline.commands.compose import typed_config
from pipeline.config.app_schema import MergeConfig
from pipeline.config.schema import ObjectiveConfig, SweepParam
from pipeline.server import plan
from pipeline.study import definition
from tests.conftest import CONF, ROOT, read_json, run_train
from tests.server.test_serve import compose_serve
from tests.study.test_sweep import env, load
from tests.test_export import compose_export

MERGE_SWEEPS = sorted(p.stem for p in (ROOT / "sweeps" / "merge").glob("*.yaml"))
FAST = ["model=tiny_llama", "debug=fast", "evaluation=perplexity"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list:
    """Two tiny runs on one base, trained on different data."""
    d = tmp_path_factory.mktemp("sources")
    for name, data in (("fr", "django_en_fr"), ("qa", "chatterbot_qa")):
        run_train([*FAST, f"data={data}"], d / name)
    return [str(d / "fr"), str(d / "qa")]


def compose_merge_sweep(name: str, runs: list, tmp_path: Path, *overrides: str) -> MergeConfig:
    """A merge sweep's composed config, typed (as the sweeper hands it to the driver)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("merge", overrides=["paths.run_dir=.", f"merge_sweep={name}", f"runs=[{','.join(runs)}]",
                                          f"paths.output_dir={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    assert cfg.hydra.sweeper._target_.endswith("PipelineOptunaSweeper")
    assert cfg.hydra.sweep.dir == f"{tmp_path}/sweeps/{name}"
    with open_dict(cfg):
        del cfg["hydra"]
    return typed_config(cfg)


@pytest.mark.parametrize("name", MERGE_SWEEPS)
def test_every_merge_sweep_file_composes_and_passes_checks(name, runs, tmp_path):
    assert {"merge_ties_weights", "merge_ties_pareto"} <= set(MERGE_SWEEPS)
    cfg = compose_merge_sweep(name, runs, tmp_path)
    assert definition.check(cfg) == [] and cfg.sweep.name == name
    assert f"python -m pipeline.merge -m merge_sweep={name} 'runs=[" in (ROOT / "sweeps" / "merge" / f"{name}.yaml").read_text()
    # every objective is read off the validation sets (eval), one per source for kept/*/...
    metrics = [o.metric for o in definition.objectives(cfg)]
    assert metrics == {"merge_ties_weights": ["kept/mean/eval/loss"],
                       "merge_ties_pareto": ["kept/fr/eval/loss", "kept/qa/eval/loss"]}[name]


def test_merge_weights_are_sampled_one_per_source(runs, tmp_path):
    cfg = compose_merge_sweep("merge_ties_weights", runs, tmp_path)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    values = definition.suggest(trial, cfg)
    assert len(values["merge.weights"]) == 2 and 0.1 <= values["merge.density"] <= 1.0
    assert set(trial.params) == {"merge.weights.0", "merge.weights.1", "merge.density"}
    assert definition.overrides(values)[0] == f"merge.weights=[{values['merge.weights'][0]},{values['merge.weights'][1]}]"


def test_a_merge_sweep_refuses_test_objectives_foreign_keys_and_training_knobs(runs, tmp_path):
    cfg = compose_merge_sweep("merge_ties_weights", runs, tmp_path)
    sweep = dataclasses.replace(cfg.sweep, pruner="median", max_memory_gb=10.0, params={
        **cfg.sweep.params, "trainer.learning_rate": SweepParam(type="float", low=1e-4, high=1e-3),
        "merge.weights": SweepParam(type="categorical", choices=[1.0])})
    bad = dataclasses.replace(cfg, sweep=sweep, objective=ObjectiveConfig("kept/mean/test/loss", "maximize"))
    problems = "\n".join(definition.check(bad))
    for message in ("objective metric 'kept/mean/test/loss' is measured on the sources' test sets: a merge sweep "
                    "chooses by the validation sets and reports the rest; use 'kept/mean/eval/loss'",
                    "sweep.params.trainer.learning_rate: trainer.learning_rate is not a key of the merge config",
                    "sweep.params.merge.weights takes one value per element",
                    "sweep.pruner='median': a merge trial reports no values before it ends; set sweep.pruner=null",
                    "sweep.max_memory_gb estimates training memory"):
        assert message in problems
    unknown = dataclasses.replace(cfg, objective=ObjectiveConfig("kept/mean/eval/bleu", "maximize"))
    assert "objective metric 'kept/mean/eval/bleu' is not a metric a run reports; available: " in \
        "\n".join(definition.check(unknown))
    constant = dataclasses.replace(cfg, objective=ObjectiveConfig("base/fr/eval/loss", "minimize"))
    assert "does not depend on the merge" in "\n".join(definition.check(constant))


def test_a_pareto_merge_sweep_reports_each_sources_validation_kept_and_serves(runs, tmp_path):
    name = "merge_ties_pareto"
    folder = tmp_path / "sweeps" / name
    done = subprocess.run([sys.executable, "-m", "pipeline.merge", "-m", f"merge_sweep={name}",
                           f"runs=[{','.join(runs)}]", "sweep.n_trials=3", "evaluation=perplexity",
                           f"paths.output_dir={tmp_path}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = load(folder, name)
    objectives = ["kept/fr/eval/loss", "kept/qa/eval/loss"]
    assert study.metric_names == objectives and len(study.trials) == 3
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    cfg = compose_merge_sweep(name, runs, tmp_path)
    reported = set(definition.MERGING.metric_names(cfg))
    for t in study.trials:
        trial_dir = folder / f"trial_{t.number}"
        metrics = read_json(trial_dir / "metrics.json")
        # the objectives are the merge's own validation figures; the test sets are only reported
        assert t.values == [metrics[m] for m in objectives]
        assert t.user_attrs["metrics"]["kept/fr/test/loss"] == metrics["kept/fr/test/loss"]
        assert t.user_attrs["run_dir"] == str(trial_dir) and read_json(trial_dir / "run.json")["status"] == "success"
        weights = [t.params["merge.weights.0"], t.params["merge.weights.1"]]
        assert read_json(trial_dir / "run.json")["sweep"] == {"study": name, "trial": t.number}
        assert f"merge.weights=[{weights[0]},{weights[1]}]" in t.user_attrs["overrides"]
        # what the sweep check accepts as objectives is what a merge writes
        assert {k for k, v in metrics.items() if v is not None} <= reported
    report = read_json(folder / "report.json")
    front = {row["number"] for row in report["best"]}
    assert report["objectives"] == objectives and front == {t.number for t in study.best_trials}
    text = (folder / "report.md").read_text()
    assert "## Pareto front" in text and "| trial | kept/fr/eval/loss | kept/qa/eval/loss | params |" in text
    assert f"python -m pipeline.merge merge_sweep={name} runs=[{','.join(runs)}]" in text
    assert f"python -m pipeline.serve sweep={name} paths.output_dir={tmp_path}" in text
    # serve sweep=<name>: every Pareto-front merge, each as trial_<n>, on the sources' base
    scfg = compose_serve([], tmp_path / "serve")
    scfg.sweep, scfg.paths.output_dir = name, str(tmp_path)
    app = plan.build_app(serve.with_sweep(typed_config(scfg)))
    assert set(app.state.service.pool.choices) == {"tiny_llama", *(f"trial_{n}" for n in front)}


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("merged") / "linear"
    done = subprocess.run([sys.executable, "-m", "pipeline.merge", f"runs=[{','.join(runs)}]", "merge.method=linear",
                           "evaluation=perplexity", f"hydra.run.dir={folder}"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_a_merge_folder_serves_as_a_run(merged, runs, tmp_path):
    described = (merged / "merged_from.yaml").read_text()
    assert "tiny_llama" in described and "django_en_fr" in described  # the first source's base and data
    cfg = compose_serve([f"run={merged}"], tmp_path)
    with TestClient(serve.build_app(cfg)) as client:
        answer = client.post("/v1/completions", json={"model": "tuned", "prompt": "Hello", "max_tokens": 4,
                                                      "temperature": 0})
        names = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0 and set(names) == {"tuned", "tiny_llama"}


def test_a_merge_folder_evaluates_as_a_run(merged, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.evaluate", f"run={merged}", "evaluation=perplexity",
                           f"hydra.run.dir={tmp_path / 'ev'}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated, merge = read_json(tmp_path / "ev" / "metrics.json"), read_json(merged / "metrics.json")
    # the folder reads as its first source's run: that source's base and sets, the merged adapter as
    # the tuned model, so evaluate finds what the merge measured on them
    for split in ("eval", "test"):
        for side, measured in (("base", "base"), ("tuned", "merged")):
            assert evaluated[f"{side}/{split}/loss"] == pytest.approx(merge[f"{measured}/fr/{split}/loss"], rel=1e-4)
        assert evaluated[f"delta/{split}/loss"] == pytest.approx(
            evaluated[f"tuned/{split}/loss"] - evaluated[f"base/{split}/loss"])
    assert read_json(tmp_path / "ev" / "run.json")["status"] == "success"
    assert read_json(tmp_path / "ev" / "run.json")["evaluated"] == str(merged / "adapter")
    assert (tmp_path / "ev" / "eval" / "predictions.jsonl").exists()


def test_a_merge_folder_exports_as_a_run(merged, tmp_path):
    target = export.export(compose_export([f"run={merged}"], tmp_path))
    assert target == merged / "export" / "vllm"
    assert (target / "adapter" / "adapter_config.json").exists()
    assert read_json(target / "export.json")["run"] == str(merged)
    merged_model = export.export(compose_export([f"run={merged}", "export.merge=true"], tmp_path))
    assert (merged_model / "config.json").exists() and list(merged_model.glob("*.safetensors"))
