"""The base measurement cache: what its fingerprint depends on, reuse across runs, bad entries."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.commands.compose import typed_config
from pipeline.config.options import plain
from pipeline.config.schema import QuantizationSettings
from pipeline.data.packing import collator
from pipeline.data.splits import build_datasets
from pipeline.model import loading, precision
from pipeline.scoring import base_cache
from pipeline.scoring.measurement import Evaluator
from tests.conftest import compose_train, read_json, run_train

FAST = ["model=tiny_llama", "debug=fast", "logger=none"]


def _key(tmp_path: Path, overrides, folder: str = None, quantization=None) -> str:
    """The fingerprint train() computes for a composed config."""
    cfg = typed_config(compose_train([*FAST, *overrides], tmp_path / "run"))
    folder = folder or loading.resolve_folder(cfg.model, cfg.paths.cache_dir, cfg.data.seed)
    tokenizer = loading.load_tokenizer(folder, cfg.model)
    splits = build_datasets(cfg.data, tokenizer)
    evaluator = Evaluator.build(cfg.evaluation, splits, tokenizer, seed=cfg.data.seed,
                                plain_template=cfg.data.template == "plain", collate=collator(tokenizer, False),
                                loss_batch_size=cfg.trainer.per_device_eval_batch_size)
    return base_cache.fingerprint(folder, plain(cfg.model), quantization, evaluator)


def _predictions(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def copied_model(tiny_folder, tmp_path_factory) -> Path:
    """A copy of the tiny model's folder whose files a test may change."""
    target = tmp_path_factory.mktemp("model") / "tiny"
    shutil.copytree(tiny_folder, target)
    return target


def test_every_input_changes_the_fingerprint(tmp_path, copied_model) -> None:
    base = _key(tmp_path, [], str(copied_model))
    other_precision = "fp32" if precision.resolve_loss("auto").precision == "bf16" else "bf16"
    assert base == _key(tmp_path, [], str(copied_model))  # deterministic
    assert base == _key(tmp_path, ["seed=7"], str(copied_model))  # greedy decoding: seed-free
    assert base == _key(tmp_path, ["trainer.precision=bf16"], str(copied_model))  # measured without autocast
    changed = {
        "template": _key(tmp_path, ["data.template=plain"], str(copied_model)),
        "examples": _key(tmp_path, ["data.test_size=6"], str(copied_model)),
        "max_length": _key(tmp_path, ["data.max_length=48"], str(copied_model)),
        "decoding": _key(tmp_path, ["evaluation.decoding.max_new_tokens=5"], str(copied_model)),
        "sampling": _key(tmp_path, ["evaluation.decoding.strategy=sample", "seed=7"], str(copied_model)),
        "sampling seed": _key(tmp_path, ["evaluation.decoding.strategy=sample", "seed=8"], str(copied_model)),
        "metrics": _key(tmp_path, ["evaluation.metrics=[bleu]"], str(copied_model)),
        "labels": _key(tmp_path, ["evaluation=classification", "evaluation.labels=[yes,no]"], str(copied_model)),
        "batch size": _key(tmp_path, ["evaluation.batch_size=3"], str(copied_model)),
        "loss precision": _key(tmp_path, [f"evaluation.loss_precision={other_precision}"], str(copied_model)),
        "model dtype": _key(tmp_path, ["model.dtype=bfloat16"], str(copied_model)),
        "quantization": _key(tmp_path, [], str(copied_model), QuantizationSettings(bits=4, quant_type="nf4")),
        "another base": _key(tmp_path, []),  # the same weights in another folder
    }
    tokenizer_file = copied_model / "tokenizer_config.json"
    config = json.loads(tokenizer_file.read_text())
    tokenizer_file.write_text(json.dumps({**config, "model_max_length": 12345}))
    changed["tokenizer"] = _key(tmp_path, [], str(copied_model))
    weights = copied_model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    changed["weights"] = _key(tmp_path, [], str(copied_model))
    keys = [base, *changed.values()]
    assert len(set(keys)) == len(keys), {"base": base[:8], **{k: v[:8] for k, v in changed.items()}}


def test_two_seeds_measure_the_base_once_and_agree(tmp_path) -> None:
    shared = [f"paths.base_cache_dir={tmp_path / 'cache'}"]
    for seed in (1, 2):
        run_train([*FAST, *shared, f"seed={seed}"], tmp_path / f"s{seed}")
    first, second = (read_json(tmp_path / f"s{s}" / "run.json") for s in (1, 2))
    assert (first["base_measurement"], second["base_measurement"]) == ("measured", "cached")
    assert first["base_fingerprint"] == second["base_fingerprint"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{first['base_fingerprint']}.json"]
    m1, m2 = (read_json(tmp_path / f"s{s}" / "metrics.json") for s in (1, 2))
    assert {k: v for k, v in m1.items() if k.startswith("base/")} == \
        {k: v for k, v in m2.items() if k.startswith("base/")}
    assert m1["tuned/eval/loss"] != m2["tuned/eval/loss"]  # the seeds did train differently
    # what each number is over (debug=fast: 8 validation and 8 test examples, 8 prompts)
    assert (m2["data/eval_loss_examples"], m2["data/test_loss_examples"], m2["data/test_generation_examples"]) \
        == (8, 8, 8)
    first_row = json.loads((tmp_path / "s2" / "history.jsonl").read_text().splitlines()[0])
    assert first_row["step"] == 0  # the cached base still starts the loss curve
    assert first_row["eval/loss"] == m2["base/eval/loss"]
    measured, cached = (_predictions(tmp_path / f"s{s}") for s in (1, 2))
    base_cached = read_json(tmp_path / "s2" / "eval" / "base.json")
    assert [p["base"] for p in cached if p["set"] == "test"] == base_cached["outputs"]["test"]
    # Each example's base loss is kept and restored: the same in the run that measured the base
    # and in the run that found it in the cache, on the validation set as on the test set.
    assert [(p["set"], p["base_scores"]["loss"]) for p in cached] == \
        [(p["set"], p["base_scores"]["loss"]) for p in measured]
    assert {p["set"] for p in cached} == {"eval", "test"}
    assert len(base_cached["losses"]["eval"]) == len(base_cached["losses"]["test"]) == 8


def test_opt_out_and_a_bad_entry_measure_again(tmp_path, caplog) -> None:
    shared = [f"paths.base_cache_dir={tmp_path / 'cache'}"]
    run_train([*FAST, *shared], tmp_path / "a")
    key = read_json(tmp_path / "a" / "run.json")["base_fingerprint"]
    run_train([*FAST, *shared, "evaluation.cache_base=false"], tmp_path / "b")
    info = read_json(tmp_path / "b" / "run.json")
    assert info["base_measurement"] == "measured" and info["base_fingerprint"] is None

    entry = tmp_path / "cache" / f"{key}.json"
    good = entry.read_text()
    for broken in (good[: len(good) // 2],  # a partial write
                   json.dumps({**json.loads(good), "fingerprint": "0" * 64}),  # another entry's
                   json.dumps({**json.loads(good), "outputs": {"test": ["x"]}}),  # too few outputs
                   # an entry without each example's loss (as written before they were kept)
                   json.dumps({k: v for k, v in json.loads(good).items() if k != "losses"})):
        entry.write_text(broken)
        caplog.clear()
        run_train([*FAST, *shared], tmp_path / "c")
        assert read_json(tmp_path / "c" / "run.json")["base_measurement"] == "measured"
        assert "ignoring the cached base measurement" in caplog.text
        assert json.loads(entry.read_text()) == json.loads(good)  # measured again and rewritten
        shutil.rmtree(tmp_path / "c")
