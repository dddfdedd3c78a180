"""``python -m pipeline.merge``: LoRA adapters of finished runs merged by PEFT's methods, measured on
each source run's own sets next to that run's adapter and the base; PEFT's limits refused before
any weights load, naming the keys."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from starlette.testclient import TestClient

from pipeline import serve
from pipeline.adapters.merging import merge_problems, merge_weights, source_names
from pipeline.commands.compose import typed_config
from pipeline.config.app_schema import MergeSettings
from pipeline.config.errors import ConfigError
from pipeline.merge import kept_overall, merge_metrics, problems
from tests.conftest import CONF, ROOT, python_path, read_json, run_train

FAST = ["model=tiny_llama", "debug=fast", "evaluation=perplexity"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Tiny runs on one base: two tasks at r=16, one at r=8, one DoRA."""
    d = tmp_path_factory.mktemp("sources")
    made = {"fr": ["data=django_en_fr"], "qa": ["data=chatterbot_qa"], "r8": ["adapter.r=8"], "dora": ["adapter=dora"]}
    for name, overrides in made.items():
        run_train([*FAST, *overrides], d / name)
    return {name: d / name for name in made}


def _checked(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("merge", overrides=["paths.run_dir=.", *overrides])
    return typed_config(cfg, problems)


def test_a_ties_merge_is_measured_on_each_sources_own_sets(runs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.merge", f"runs=[{runs['fr']},{runs['qa']}]",
                           "merge.method=ties", "merge.density=0.5", "evaluation=perplexity",
                           f"hydra.run.dir={tmp_path / 'merged'}"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": python_path()}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"results: {(tmp_path / 'merged').resolve()}"
    metrics = read_json(tmp_path / "merged" / "metrics.json")
    for source in ("fr", "qa"):
        for side in ("base", "source", "merged"):
            assert isinstance(metrics[f"{side}/{source}/test/loss"], float)
        # each source's own adapter was measured on its own test set: it learnt something there
        assert metrics[f"source/{source}/test/loss"] < metrics[f"base/{source}/test/loss"]
        kept = metrics[f"kept/{source}/test/loss"]
        gain = metrics[f"source/{source}/test/loss"] - metrics[f"base/{source}/test/loss"]
        assert kept == pytest.approx((metrics[f"merged/{source}/test/loss"] - metrics[f"base/{source}/test/loss"]) / gain)
    shares = [metrics["kept/fr/test/loss"], metrics["kept/qa/test/loss"]]
    assert metrics["kept/mean/test/loss"] == pytest.approx(sum(shares) / 2) and metrics["kept/min/test/loss"] == min(shares)
    # the two sources were measured on different data
    assert metrics["base/fr/test/loss"] != metrics["base/qa/test/loss"]
    adapter = tmp_path / "merged" / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert read_json(tmp_path / "merged" / "run.json")["status"] == "success"
    # ... and it serves, by the name given, on the sources' base
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("serve", overrides=[f"paths.run_dir={tmp_path / 'serve'}", "model=tiny_llama",
                                          f"adapters={{merged: {adapter}}}"])
    with TestClient(serve.build_app(cfg)) as client:
        answer = client.post("/v1/completions", json={"model": "merged", "prompt": "Hello", "max_tokens": 4,
                                                      "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "merged" and answer.json()["usage"]["completion_tokens"] > 0


def test_sources_named_like_the_aggregates_keep_their_own_figures():
    names = source_names(["runs/mean", "runs/min"])
    metrics = {}
    for name, (base, own, merged) in zip(names, [(4.0, 2.0, 3.0), (4.0, 3.0, 3.5)]):
        metrics.update(merge_metrics(name, {"base": {"test/loss": base}, "source": {"test/loss": own},
                                            "merged": {"test/loss": merged}}))
    metrics.update(kept_overall(names, metrics))
    assert metrics["kept/mean_0/test/loss"] == 0.5 and metrics["kept/min_1/test/loss"] == 0.5
    assert metrics["kept/mean/test/loss"] == 0.5 and metrics["kept/min/test/loss"] == 0.5
    assert metrics["source/mean_0/test/loss"] == 2.0 and metrics["merged/min_1/test/loss"] == 3.5


def test_adapters_with_per_layer_ranks_merge_only_by_the_methods_that_take_any_ranks():
    lora = {"peft_type": "LORA", "r": 16, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {}}
    eva = {**lora, "rank_pattern": {"model.layers.0.self_attn.q_proj": 17, "model.layers.1.self_attn.q_proj": 15}}
    assert merge_problems(MergeSettings(method="linear"), [lora, eva]) == [
        "merge.method=linear adds the adapters' matrices layer by layer, which needs one rank in every layer, but "
        "the adapters of runs[1] have per-layer ranks (adapter.init=eva redistributes them); use merge.method=cat "
        "or linear_svd (or svd), which take any ranks"]
    assert merge_problems(MergeSettings(method="cat"), [lora, eva]) == []
    assert merge_problems(MergeSettings(method="linear"), [lora, lora]) == []


@pytest.mark.parametrize("sources, overrides, message", [
    (["fr", "r8"], ["merge.method=linear"], "merge.method=linear needs runs with equal adapter.r, but they have "
                                             "[16, 8]; use merge.method=cat or linear_svd (or svd)"),
    (["fr", "qa"], ["merge.method=ties"], "merge.method=ties needs merge.density"),
    (["fr", "qa"], ["merge.density=0.5"], "merge.density applies to the pruning methods"),
    (["fr", "qa"], ["merge.weights=[1.0]"], "merge.weights has 1 values for 2 runs"),
    (["fr", "dora"], [], "runs: only LoRA adapters merge"),
    (["fr"], [], "runs has 1 run folder(s); a merge needs two or more"),
])
def test_what_peft_refuses_is_refused_before_any_weights_load(runs, sources, overrides, message):
    with pytest.raises(ConfigError) as err:
        _checked(f"runs=[{','.join(str(runs[s]) for s in sources)}]", *overrides)
    assert message in str(err.value)


def test_a_folder_that_is_not_a_run_is_named(tmp_path, runs):
    with pytest.raises(ConfigError) as err:
        _checked(f"runs=[{runs['fr']},{tmp_path}]")
    assert f"runs[1]: run='{tmp_path}' is not a run folder (no config.yaml)" in str(err.value)


def test_sources_get_unique_names_and_methods_their_default_weights():
    assert source_names(["a/x.y", "b/x.y", "c"]) == ["x_y", "x_y_1", "c"]
    # the merged adapter's name and the aggregates' (kept/mean, kept/min) are not a source's
    assert source_names(["a/mean", "b/min", "c/merged", "d/mean_0"]) == ["mean_0", "min_1", "merged_2", "mean_0_3"]
    # a suffixed name that is another source's folder name takes the next suffix
    assert source_names(["x/a_2", "y/a", "z/a"]) == ["a_2", "a", "a_3"]
    assert source_names(["x/merged_1", "y/merged"]) == ["merged_1", "merged_2"]
    assert merge_weights(MergeSettings(method="linear"), 4) == [0.25] * 4
    assert merge_weights(MergeSettings(method="ties"), 2) == [1.0, 1.0]
    assert merge_weights(MergeSettings(weights=[2.0, -1.0]), 2) == [2.0, -1.0]
