"""Evaluation stage: batched generation, base vs tuned on the same prompts, predictions file,
objective checks, extra datasets, generation metrics during training, and re-evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.commands.compose import checked_train
from pipeline.config.errors import ConfigError
from pipeline.config.schema import DecodingConfig
from pipeline.data.packing import collator
from pipeline.data.splits import build_datasets
from pipeline.scoring.generation import cut_at_stop, generate
from pipeline.scoring import losses, prefix
from pipeline.scoring.losses import evaluate_loss
from pipeline.scoring.measurement import Measurement, _without_training_autocast, before_after_table
from tests.data.test_data import data_cfg
from tests.conftest import ROOT, compose_train, read_json, run_train, write_jsonl

FAST = ["model=tiny_llama", "debug=fast"]


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    # At its 0.02-std initialisation the tiny model only ever repeats "\n"; larger random weights
    # make greedy outputs differ per prompt, so that mixing up the order would show.
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    return model


def test_batched_generation_equals_one_by_one_and_keeps_order(tiny_model, tokenizer):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True)
               for t in ("Hello there, how are you today?", "Hi", "Translate: Save the file now")]
    decoding = DecodingConfig(max_new_tokens=6, seed=0)
    tokenizer.padding_side = "right"  # generation pads on the left, then restores what it found
    tiny_model.train()
    batched = generate(tiny_model, tokenizer, prompts, decoding, batch_size=3)
    single = [generate(tiny_model, tokenizer, [p], decoding, batch_size=1)[0] for p in prompts]
    assert batched == single and all(batched) and len(set(batched)) == 3
    assert tokenizer.padding_side == "right" and tiny_model.training


def test_generation_restores_the_mode_when_it_fails(tiny_model, tokenizer, monkeypatch):
    tokenizer.padding_side = "right"
    tiny_model.train()
    seen = []

    def failing_generate(**kwargs):
        mask = kwargs["attention_mask"]
        seen.append((tiny_model.training, mask[:, -1].all().item()))
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tiny_model, "generate", failing_generate)
    with pytest.raises(RuntimeError, match="out of memory"):
        generate(tiny_model, tokenizer, ["Hi", "Hello there"],
                         DecodingConfig(max_new_tokens=2, seed=0), batch_size=2)
    assert seen == [(False, True)]  # generation ran in eval mode, padded on the left
    assert tokenizer.padding_side == "right" and tiny_model.training
    tiny_model.eval()


def test_stop_strings_cut_outputs():
    assert cut_at_stop("Bonjour\n### next", ["###", "\n\n"]) == "Bonjour"
    assert cut_at_stop("abc", []) == "abc"


def test_measurement_round_trip(tmp_path):
    m = Measurement({"test/bleu": 1.5, "eval/loss": 2.0}, {"test": ["a"]}, {"test": [{"bleu": 1.5}]},
                    {"eval": [{"loss": 2.0, "loss_tokens": 3}]})
    m.save(tmp_path / "base.json")
    assert Measurement.load(tmp_path / "base.json") == m
    assert Measurement.load(tmp_path / "missing.json") is None
    # One saved before per-example losses were kept reads back without them.
    (tmp_path / "old.json").write_text(json.dumps({"metrics": m.metrics, "outputs": m.outputs,
                                                   "per_example": m.per_example}))
    assert Measurement.load(tmp_path / "old.json") == Measurement(m.metrics, m.outputs, m.per_example, {})


def test_comparison_table_lists_base_tuned_delta():
    table = before_after_table({"base/test/bleu": 2.0, "tuned/test/bleu": 12.5,
                                         "delta/test/bleu": 10.5, "train/loss": 1.0})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "tuned", "delta"]
    assert lines[1].split() == ["test/bleu", "2", "12.5", "+10.5"]


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """A finished ``debug=fast`` run on the tiny model: 8 validation and 8 test examples."""
    run_dir = tmp_path_factory.mktemp("fast") / "run"
    run_train(FAST, run_dir)
    return run_dir


def _predictions(run_dir):
    return [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]


def _token_weighted(rows, side):
    """The set's loss from its rows: each example's mean token loss weighted by its tokens."""
    scores = [r[f"{side}_scores"] for r in rows]
    return sum(s["loss"] * s["loss_tokens"] for s in scores) / sum(s["loss_tokens"] for s in scores)


def test_run_writes_predictions_and_base_tuned_delta_metrics(fast_run):
    metrics = read_json(fast_run / "metrics.json")
    for name in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "loss", "perplexity"):
        assert metrics[f"delta/test/{name}"] == pytest.approx(
            metrics[f"tuned/test/{name}"] - metrics[f"base/test/{name}"])
    rows = [r for r in _predictions(fast_run) if r["set"] == "test"]
    assert len(rows) == 8 and _predictions(fast_run)[:8] == rows  # the test rows come first, as before
    assert set(rows[0]) == {"set", "index", "prompt", "reference", "base", "tuned", "base_scores",
                            "tuned_scores"}
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n") and rows[0]["reference"]
    assert set(rows[0]["tuned_scores"]) >= {"bleu", "chrf", "rougeL"}
    # Corpus ROUGE-L is the mean of the per-example scores.
    mean = sum(r["tuned_scores"]["rougeL"] for r in rows) / len(rows)
    assert metrics["tuned/test/rougeL"] == pytest.approx(mean)


def test_predictions_hold_each_examples_loss_on_the_validation_and_test_sets(fast_run):
    """Every loss example has a row with its base and tuned loss, the validation set's too,
    though it generates nothing; weighted by their tokens they give the set's loss back."""
    metrics = read_json(fast_run / "metrics.json")
    rows = _predictions(fast_run)
    by_set = {name: [r for r in rows if r["set"] == name] for name in ("eval", "test")}
    assert len(rows) == 16 and [len(r) for r in by_set.values()] == [8, 8]
    validation = by_set["eval"]
    assert [r["index"] for r in validation] == list(range(8)) and all(r["prompt"] and r["reference"] for r in validation)
    assert all(r["base"] is None and r["tuned"] is None for r in validation)  # the validation set generates nothing
    assert all(set(r["base_scores"]) == set(r["tuned_scores"]) == {"loss", "loss_tokens"} for r in validation)
    assert all({"loss", "loss_tokens", "bleu"} <= set(r["tuned_scores"]) for r in by_set["test"])
    for name, side in [(n, s) for n in ("eval", "test") for s in ("base", "tuned")]:
        assert _token_weighted(by_set[name], side) == pytest.approx(metrics[f"{side}/{name}/loss"], rel=1e-6)
    assert [r["tuned_scores"]["loss"] for r in validation] != [r["base_scores"]["loss"] for r in validation]
    assert metrics["data/eval_loss_examples"] == metrics["data/test_loss_examples"] == 8


def test_unknown_objective_lists_available_names(tmp_path):
    cfg = compose_train([*FAST, "objective.metric=tuned/test/blue"], tmp_path)
    with pytest.raises(ConfigError) as err:
        checked_train(cfg)
    assert "objective.metric='tuned/test/blue' is not a metric this run reports" in str(err.value)
    assert "tuned/test/bleu" in str(err.value) and "delta/eval/loss" in str(err.value)


def test_unknown_metric_and_missing_labels_are_reported(tmp_path):
    cfg = compose_train([*FAST, "evaluation.metrics=[bleu,meteor,accuracy]"], tmp_path)
    with pytest.raises(ConfigError) as err:
        checked_train(cfg)
    assert "unknown metric 'meteor'" in str(err.value)
    assert "evaluation.labels must list the label set" in str(err.value)


def test_extra_dataset_and_generation_metrics_during_training(tmp_path):
    """An extra set is measured like the test set; an example beyond ``evaluation.max_examples``
    generates nothing and still has its row with its loss."""
    run_dir = tmp_path / "run"
    run_train([*FAST, "evaluation.extra_datasets=[chatterbot_qa]", "evaluation.max_examples=4",
               "evaluation.during_training=true", "evaluation.during_training_examples=4",
               "objective.metric=tuned/chatterbot_qa/rougeL"], run_dir)
    metrics = read_json(run_dir / "metrics.json")
    for side in ("base", "tuned", "delta"):
        assert f"{side}/chatterbot_qa/bleu" in metrics and f"{side}/chatterbot_qa/loss" in metrics
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert any("eval/bleu" in row and row["step"] == 2 for row in history)
    rows = _predictions(run_dir)
    assert list(dict.fromkeys(r["set"] for r in rows)) == ["test", "chatterbot_qa", "eval"]
    extra = [r for r in rows if r["set"] == "chatterbot_qa"]
    assert len(extra) == metrics["data/chatterbot_qa_loss_examples"] > 4
    assert all(r["tuned"] is not None for r in extra[:4]) and all(r["tuned"] is None for r in extra[4:])
    assert all("rougeL" in r["tuned_scores"] for r in extra[:4]) and all("rougeL" not in r["tuned_scores"] for r in extra[4:])
    for side in ("base", "tuned"):
        assert _token_weighted(extra, side) == pytest.approx(metrics[f"{side}/chatterbot_qa/loss"], rel=1e-6)


def test_classification_by_generation(tmp_path):
    records = [{"prompt": f"Is {n} even?", "completion": "yes" if n % 2 == 0 else "no"} for n in range(40)]
    path = write_jsonl(tmp_path / "cls.jsonl", records)
    run_dir = tmp_path / "run"
    run_train([*FAST, "data=my_jsonl", f"data.path={path}", "evaluation=classification",
               "evaluation.labels=[yes,no]", "evaluation.max_examples=8",
               "evaluation.decoding.max_new_tokens=4", "objective.metric=tuned/test/accuracy"], run_dir)
    metrics = read_json(run_dir / "metrics.json")
    for key in ("accuracy", "macro_f1", "f1/yes", "f1/no", "unparsable_rate"):
        assert 0 <= metrics[f"tuned/test/{key}"] <= 100


def test_evaluate_reproduces_the_runs_tuned_metrics(fast_run, tmp_path):
    run_dir = fast_run
    out = subprocess.run([sys.executable, "-m", "pipeline.evaluate", f"run={run_dir}",
                          "evaluation.max_examples=8", "evaluation.batch_size=4",
                          "evaluation.decoding.max_new_tokens=16", f"hydra.run.dir={tmp_path / 'ev'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "base vs tuned" in out.stdout
    trained, again = read_json(run_dir / "metrics.json"), read_json(tmp_path / "ev" / "metrics.json")
    for name in ("bleu", "rougeL", "chrf"):
        assert again[f"tuned/test/{name}"] == pytest.approx(trained[f"tuned/test/{name}"])
    assert again["tuned/test/loss"] == pytest.approx(trained["tuned/test/loss"], rel=1e-4)
    # The base (adapter disabled, same weights) matches the base measured before training.
    assert again["base/test/loss"] == pytest.approx(trained["base/test/loss"], rel=1e-4)
    # Each example's loss too, on the validation set as on the test set.
    evaluated, measured = _predictions(tmp_path / "ev"), _predictions(run_dir)
    assert [(r["set"], r["index"]) for r in evaluated] == [(r["set"], r["index"]) for r in measured]
    for side in ("base", "tuned"):
        assert [r[f"{side}_scores"]["loss"] for r in evaluated] == pytest.approx(
            [r[f"{side}_scores"]["loss"] for r in measured], rel=1e-4)
    assert read_json(tmp_path / "ev" / "run.json")["status"] == "success"


def test_evaluate_without_run_or_adapter_fails_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "model=tiny_llama",
                          f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1
    assert "give run=<run folder>, or adapter_path=<adapter or model folder>" in out.stderr


def test_evaluate_checks_its_config_before_any_model_loads(tiny_folder, tmp_path, monkeypatch):
    """``pipeline.evaluate`` validates its settings against the run's data, all problems at once,
    before a model loads (a misspelled metric used to fail only after the base had generated)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline import evaluate
    from pipeline.model import loading
    from tests.adapter_factory import make_lora, make_run

    run = make_run(tmp_path / "run", make_lora(tiny_folder, tmp_path / "lora", seed=1), [])
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model loaded before the checks"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"run={run}", "evaluation.metrics=[blue]", "evaluation.splits=[eval,dev]",
                                             f"paths.run_dir={tmp_path / 'ev'}", f"paths.root_dir={ROOT}"])
    with pytest.raises(ConfigError) as err:
        evaluate.evaluate(cfg)
    assert "evaluation.metrics has unknown metric 'blue'" in str(err.value)
    assert "evaluation.splits has 'dev'; use eval and/or test" in str(err.value)
    info = read_json(tmp_path / "ev" / "run.json")
    assert info["status"] == "failed" and "unknown metric 'blue'" in info["error"]


def test_loss_is_token_weighted_and_independent_of_batch_size(tiny_model, tokenizer, tmp_path):

    records = [{"prompt": "p" * n, "completion": "word " * (3 * n + 1)} for n in (1, 4, 9, 2, 7)]
    rows = build_datasets(data_cfg(write_jsonl(tmp_path / "d.jsonl", records)), tokenizer).train
    losses = [evaluate_loss(tiny_model, rows, collator(tokenizer, packing), bs, "test")
              for bs, packing in ((1, False), (2, False), (5, False), (5, True))]
    for other in losses[1:]:
        assert other["test/loss"] == pytest.approx(losses[0]["test/loss"], rel=1e-5)
    assert losses[0]["test/perplexity"] == pytest.approx(2.718281828 ** losses[0]["test/loss"])


@pytest.mark.parametrize("packing, behind_prefix, keeps_logits", [
    (False, True, True), (True, False, True), (False, False, False), (True, False, False)])
def test_each_examples_loss_is_its_mean_token_loss_and_weighs_back_to_the_set_loss(
        tiny_model, tokenizer, tmp_path, monkeypatch, packing, behind_prefix, keeps_logits):
    """Per example, the mean cross-entropy over its own completion tokens, whatever the batch
    layout (behind the shared prefix, padded or packed rows, with or without logits_to_keep);
    weighted by their token counts the examples give back the set's token-weighted loss."""
    records = [{"prompt": "p" * n, "completion": "word " * (3 * n + 1)} for n in (1, 4, 9, 2, 7)]
    rows = build_datasets(data_cfg(write_jsonl(tmp_path / "d.jsonl", records)), tokenizer).train
    alone = [evaluate_loss(tiny_model, rows.select([i]), collator(tokenizer, False), 1, "test")["test/loss"]
             for i in range(len(rows))]
    if not behind_prefix:
        monkeypatch.setattr(prefix.SharedPrefix, "build", classmethod(lambda cls, *args, **kwargs: None))
    monkeypatch.setattr(losses, "_keeps_logits", lambda model: keeps_logits)
    measured = evaluate_loss(tiny_model, rows, collator(tokenizer, packing), 3, "test")
    examples = measured.examples
    assert [e["loss_tokens"] for e in examples] == [sum(t != -100 for t in r[1:]) for r in rows["labels"]]
    assert [e["loss"] for e in examples] == pytest.approx(alone, rel=1e-5)
    assert len(set(alone)) == len(alone)  # distinct: an example's loss put on another would show
    weighted = sum(e["loss"] * e["loss_tokens"] for e in examples) / sum(e["loss_tokens"] for e in examples)
    assert measured["test/loss"] == pytest.approx(weighted, rel=1e-6)
    assert measured["test/loss"] != pytest.approx(sum(alone) / len(alone), rel=1e-3)  # not the plain mean


def test_loss_under_bf16_autocast_is_close_to_fp32(tiny_model, tokenizer, tmp_path, monkeypatch):
    """evaluation.loss_precision=bf16 runs the forward under autocast; the loss stays close."""
    import torch


    records = [{"prompt": "question " * n, "completion": "an answer of some words " * n} for n in (1, 4, 9, 2)]
    rows = build_datasets(data_cfg(write_jsonl(tmp_path / "d.jsonl", records)), tokenizer).train
    autocast = []
    real_forward = tiny_model.forward

    def spy(*args, **kwargs):
        autocast.append(torch.is_autocast_enabled("cpu"))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", spy)
    exact = evaluate_loss(tiny_model, rows, collator(tokenizer, False), 2, "test")
    assert autocast and not any(autocast)
    autocast.clear()
    cheap = evaluate_loss(tiny_model, rows, collator(tokenizer, False), 2, "test", bf16=True)
    assert autocast and all(autocast)
    assert cheap["test/loss"] != exact["test/loss"]  # it did run in another precision
    assert cheap["test/loss"] == pytest.approx(exact["test/loss"], rel=1e-2)


def test_loss_through_logits_to_keep_equals_the_full_logits(tiny_model, tokenizer, tmp_path, monkeypatch):
    """Only completion positions go through the output layer; the loss must not change."""

    records = [{"prompt": "question " * n, "completion": "yes" if n % 2 else "a longer answer here"}
               for n in (1, 4, 9, 2, 7, 3)]
    rows = build_datasets(data_cfg(write_jsonl(tmp_path / "d.jsonl", records)), tokenizer).train
    calls = []
    real_forward = tiny_model.forward

    def spy(*args, **kwargs):
        if "cache" in kwargs:  # a batch behind the shared prefix (the prefix itself keeps only its last)
            calls.append(kwargs.get("logits_to_keep"))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", spy)
    kept = {packing: evaluate_loss(tiny_model, rows, collator(tokenizer, packing), 3, "test")
            for packing in (False, True)}
    assert len(calls) == 4 and all(c is not None and 0 < len(c) for c in calls)  # the cheap path ran
    monkeypatch.setattr(losses, "_keeps_logits", lambda model: False)
    calls.clear()
    full = evaluate_loss(tiny_model, rows, collator(tokenizer, False), 3, "test")
    assert not calls  # without logits_to_keep, the batches run whole, through the collator
    for packing in (False, True):
        assert kept[packing]["test/loss"] == pytest.approx(full["test/loss"], rel=1e-6)


def test_measurement_undoes_the_autocast_accelerate_leaves_after_bf16_training(tiny_model):
    """After a bf16 run, accelerate keeps the model's forward under autocast; the tuned model is
    measured as it is saved and served (float32), like the base model before it."""
    import copy

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    ids = torch.tensor([[1, 20, 300, 4000, 5, 6]])
    with torch.no_grad():
        expected = tiny_model(input_ids=ids).logits
    model = copy.deepcopy(tiny_model)
    AcceleratorState._reset_state(True)  # an earlier test's Trainer may have set another precision
    try:
        Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)
    finally:
        AcceleratorState._reset_state(True)  # no bf16 state leaks into later tests' Trainers
    with torch.no_grad():
        patched = model(input_ids=ids).logits
        assert not torch.equal(patched, expected)  # the trap: bf16 logits
        with _without_training_autocast(model):
            assert torch.equal(model(input_ids=ids).logits, expected)
        assert torch.equal(model(input_ids=ids).logits, patched)  # the training setup is restored
