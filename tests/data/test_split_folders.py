"""A folder as data.path: its files read as splits by datasets' own naming rules, the missing
splits carved from train, unnamed files pooled, conflicts refused, and where each split came from
recorded in the stats (run.json's data_sources), the log and the preview."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from pipeline.config.schema import DataConfig
from pipeline.data import cache
from pipeline.data.records import DataError
from pipeline.data.splits import build_datasets
from tests.conftest import ROOT, read_json, run_train, write_jsonl


def data_cfg(path, **kw) -> DataConfig:
    base = dict(name="t", path=str(path), seed=1, max_length=256)
    base.update(kw)
    return DataConfig(**base)


def records(tag: str, n: int) -> List[Dict[str, str]]:
    return [{"prompt": f"{tag} question {i}", "completion": f"{tag} answer {i}"} for i in range(n)]


def folder_of(root: Path, files: Dict[str, int]) -> Path:
    """A folder holding ``{relative path: records}``, each record's answer tagged with its file."""
    for name, n in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, records(name, n))
    return root


def from_file(splits, split: str) -> set:
    """The files the examples of a split came from (the tag in each answer)."""
    return {answer.split(" answer ")[0] for answer in getattr(splits, split)["reference"]}


@pytest.mark.parametrize("files, train, validation, test", [
    ({"train.jsonl": 30, "validation.jsonl": 4, "test.jsonl": 5}, ["train.jsonl"], "validation.jsonl", "test.jsonl"),
    ({"training.jsonl": 30, "dev.jsonl": 4, "testing.jsonl": 5}, ["training.jsonl"], "dev.jsonl", "testing.jsonl"),
    ({"my_train.jsonl": 30, "my_val.jsonl": 4, "my_eval.jsonl": 5}, ["my_train.jsonl"], "my_val.jsonl",
     "my_eval.jsonl"),
    ({"train-00000-of-00002.jsonl": 15, "train-00001-of-00002.jsonl": 15, "valid-00000-of-00001.jsonl": 4,
      "test-00000-of-00001.jsonl": 5},
     ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"], "valid-00000-of-00001.jsonl",
     "test-00000-of-00001.jsonl"),
    ({"data/train-00000-of-00001.jsonl": 30, "data/validation-00000-of-00001.jsonl": 4,
      "data/test-00000-of-00001.jsonl": 5},
     ["data/train-00000-of-00001.jsonl"], "data/validation-00000-of-00001.jsonl", "data/test-00000-of-00001.jsonl"),
    ({"train/a.jsonl": 30, "validation/a.jsonl": 4, "test/a.jsonl": 5}, ["train/a.jsonl"], "validation/a.jsonl",
     "test/a.jsonl"),
], ids=["names", "synonyms", "words-in-names", "shards", "data-shards", "sub-folders"])
def test_a_folders_split_files_are_its_splits_never_reshuffled(tokenizer, tmp_path, files, train, validation, test):
    folder = folder_of(tmp_path / "d", files)
    splits = build_datasets(data_cfg(folder, validation_size=0.1, test_size=0.1), tokenizer)
    assert from_file(splits, "train") == set(train) and len(splits.train) == 30  # nothing carved from train
    assert splits.validation["reference"] == [r["completion"] for r in records(validation, 4)]  # whole, in order
    assert splits.test["reference"] == [r["completion"] for r in records(test, 5)]
    assert splits.stats["held_out"] == ["test", "validation"]
    main = splits.stats["sources"]["main"]
    assert main["files"] == {"train": [str(folder / f) for f in train], "validation": [str(folder / validation)],
                             "test": [str(folder / test)]}
    assert (main["train"], main["validation"], main["test"], main["carved"], main["unread"]) == (30, 4, 5, [], [])


def test_files_other_than_data_do_not_decide_the_layout(tokenizer, tmp_path):
    # datasets' public get_data_patterns would take the images' train/ folder as the layout and
    # leave train.jsonl and test.jsonl in no split.
    folder = folder_of(tmp_path / "d", {"train.jsonl": 20, "test.jsonl": 5})
    (folder / "images" / "train").mkdir(parents=True)
    (folder / "images" / "train" / "cat.png").write_bytes(b"\x89PNG")
    splits = build_datasets(data_cfg(folder, validation_size=2), tokenizer)
    assert from_file(splits, "test") == {"test.jsonl"} and len(splits.test) == 5
    assert from_file(splits, "train") == {"train.jsonl"} and len(splits.train) == 18


def test_a_missing_split_is_carved_from_train_and_the_log_says_so(tokenizer, tmp_path, caplog):
    folder = folder_of(tmp_path / "d", {"train.jsonl": 50, "test.jsonl": 7})
    caplog.set_level(logging.INFO)
    splits = build_datasets(data_cfg(folder, validation_size=0.1, test_size=0.1), tokenizer)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (45, 5, 7)
    assert from_file(splits, "validation") == {"train.jsonl"} and from_file(splits, "test") == {"test.jsonl"}
    assert not set(splits.train["reference"]) & set(splits.validation["reference"])
    train = str(folder / "train.jsonl")
    assert f"data: validation: 5 examples, 10% carved from {train}" in caplog.text
    assert f"data: test: 7 examples from {folder / 'test.jsonl'}" in caplog.text
    assert f"data: train: 45 examples from {train}" in caplog.text
    main = splits.stats["sources"]["main"]
    assert main["carved"] == ["validation"] and main["files"]["validation"] == [train]
    # run.json is JSON: the record goes through as it is.
    assert json.loads(json.dumps(splits.stats["sources"])) == splits.stats["sources"]
    caplog.clear()
    assert build_datasets(data_cfg(folder, validation_size=0), tokenizer).validation is None
    assert "data: validation: none (data.validation_size=0)" in caplog.text


def test_a_folder_without_split_names_is_pooled_and_the_log_says_how_to_name_files(tokenizer, tmp_path, caplog):
    folder = folder_of(tmp_path / "d", {"part1.jsonl": 20, "part2.jsonl": 20})
    caplog.set_level(logging.INFO)
    splits = build_datasets(data_cfg(folder, validation_size=4, test_size=4), tokenizer)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (32, 4, 4)
    assert from_file(splits, "train") == {"part1.jsonl", "part2.jsonl"}  # both files, shuffled together
    assert ("no file has a split name (part1.jsonl, part2.jsonl): pooled and split by data.validation_size"
            in caplog.text)
    assert "name them for their split: train.jsonl, validation.jsonl, test.jsonl" in caplog.text
    both = [str(folder / "part1.jsonl"), str(folder / "part2.jsonl")]
    main = splits.stats["sources"]["main"]
    assert main["files"] == {"train": both, "validation": both, "test": both}
    assert main["carved"] == ["validation", "test"]


def test_data_files_without_a_split_name_beside_named_ones_are_not_read_and_named(tokenizer, tmp_path, caplog):
    folder = folder_of(tmp_path / "d", {"train.jsonl": 20, "test.jsonl": 5, "notes.jsonl": 3})
    with caplog.at_level(logging.WARNING):
        splits = build_datasets(data_cfg(folder, validation_size=2), tokenizer)
    assert "notes.jsonl" not in from_file(splits, "train") | from_file(splits, "validation") | from_file(splits, "test")
    assert "1 data file(s) not read: notes.jsonl (no split name in its path)" in caplog.text
    assert splits.stats["sources"]["main"]["unread"] == [str(folder / "notes.jsonl")]


def test_an_explicit_held_out_path_wins_over_the_folders_file(tokenizer, tmp_path, caplog):
    folder = folder_of(tmp_path / "d", {"train.jsonl": 20, "validation.jsonl": 4, "test.jsonl": 5})
    other = write_jsonl(tmp_path / "mine.jsonl", records("mine", 3))
    with caplog.at_level(logging.WARNING):
        splits = build_datasets(data_cfg(folder, validation_path=str(other)), tokenizer)
    assert from_file(splits, "validation") == {"mine"} and from_file(splits, "test") == {"test.jsonl"}
    assert from_file(splits, "train") == {"train.jsonl"}  # validation.jsonl is neither trained on nor used
    assert "validation.jsonl (split validation: data.validation_path is read instead)" in caplog.text
    main = splits.stats["sources"]["main"]
    assert main["files"]["validation"] == [str(other)] and main["unread"] == [str(folder / "validation.jsonl")]


def test_data_splits_picks_a_folders_splits(tokenizer, tmp_path, caplog):
    folder = folder_of(tmp_path / "d", {"train.jsonl": 20, "validation.jsonl": 4, "test.jsonl": 5})
    with caplog.at_level(logging.WARNING):
        splits = build_datasets(data_cfg(folder, validation_size=2, splits={"train": "train", "test": "validation"}),
                                tokenizer)
    assert from_file(splits, "test") == {"validation.jsonl"} and len(splits.test) == 4
    assert from_file(splits, "validation") == {"train.jsonl"} and len(splits.train) == 18
    assert "test.jsonl (split test: data.splits does not name it)" in caplog.text


@pytest.mark.parametrize("files, settings, message", [
    ({"train.jsonl": 9, "validation.jsonl": 3}, dict(validation_path="OTHER", splits={"validation": "validation"}),
     r"data.validation_path='.*other.jsonl' and data.splits.validation='validation' both name the validation set"),
    ({"train.jsonl": 9, "test.jsonl": 3}, dict(splits={"train": "train", "test": "train"}),
     r"data.splits.test='train' is the training split as well"),
    ({"part1.jsonl": 9}, dict(splits={"train": "train", "test": "test"}),
     r"data.splits=.* names splits, but no file in data.path=.* has a split name \(part1.jsonl\)"),
    ({"train.jsonl": 9}, dict(splits={"train": "train", "test": "dev"}),
     r"data.splits.test='dev': no file in data.path=.* is named for that split \(its files give train: train.jsonl\)"),
    ({"train.jsonl": 9}, dict(source_split="training_set"),
     r"data.source_split='training_set': no file in data.path=.* is named for that split"),
    ({"test.jsonl": 3, "validation.jsonl": 3}, {},
     r"data.source_split='train': no file in data.path=.* is named for that split \(its files give validation: "
     r"validation.jsonl; test: test.jsonl\)"),
    ({"train.jsonl": 9, "train_test.jsonl": 3}, {},
     r"train_test.jsonl has the names of 2 splits \(train, test\) in its path"),
], ids=["path-and-splits", "held-out-is-train", "splits-without-names", "absent-split", "absent-source-split",
        "no-train", "two-names"])
def test_contradicting_settings_are_errors_naming_the_key(tokenizer, tmp_path, files, settings, message):
    folder = folder_of(tmp_path / "d", files)
    if settings.get("validation_path") == "OTHER":
        settings["validation_path"] = str(write_jsonl(tmp_path / "other.jsonl", records("other", 2)))
    with pytest.raises(DataError, match=message):
        build_datasets(data_cfg(folder, **settings), tokenizer)


def test_data_splits_for_a_single_file_is_refused(tokenizer, tmp_path):
    # It would read the whole file as train and as each named split.
    path = write_jsonl(tmp_path / "all.jsonl", records("all", 20))
    with pytest.raises(DataError, match=r"data.splits=\{'validation': 'validation'\} names splits, but "
                                        r"data.path=.*all.jsonl' is one file; bring the held-out sets with "
                                        r"data.validation_path / data.test_path"):
        build_datasets(data_cfg(path, splits={"validation": "validation"}), tokenizer)


def test_a_split_of_several_jsonl_files_names_file_and_line(tokenizer, tmp_path):
    folder = folder_of(tmp_path / "d", {"train-00000-of-00002.jsonl": 3})
    shard = write_jsonl(folder / "train-00001-of-00002.jsonl", [records("x", 1)[0], "", {"prompt": "p"}])
    with pytest.raises(DataError) as err:
        build_datasets(data_cfg(folder, format="prompt_completion", validation_size=1, test_size=1), tokenizer)
    assert str(err.value) == (f"{shard}:3: field 'completion' must be a string, but it is missing; "
                              "fields present: ['prompt']")
    # A later file with fields the first has not: datasets refuses it, and says only that it failed.
    write_jsonl(shard, [{"prompt": "p", "completion": "c", "answer": "a"}])
    with pytest.raises(DataError) as err:
        build_datasets(data_cfg(folder, validation_size=1, test_size=1), tokenizer)
    assert str(err.value).startswith(f"data.path='{folder}' (split train): {shard} has fields ['answer'] that "
                                     f"{folder / 'train-00000-of-00002.jsonl'} has not; ")


def test_the_cache_key_follows_files_into_sub_folders(tokenizer, tmp_path):
    folder = folder_of(tmp_path / "d", {"train/a.jsonl": 20, "test/b.jsonl": 5})
    cfg = data_cfg(folder)
    before = cache.fingerprint(cfg, tokenizer)
    (folder / "test" / "b.jsonl").rename(folder / "train" / "b.jsonl")  # the same bytes, another split
    assert cache.fingerprint(cfg, tokenizer) != before


def test_the_preview_shows_which_files_made_which_split(tmp_path):
    folder = folder_of(tmp_path / "d", {"train.jsonl": 20, "test.jsonl": 4, "notes.jsonl": 2})
    done = subprocess.run([sys.executable, "-m", "pipeline.data", "--examples", "0", "model=tiny_llama",
                           "data=my_jsonl", f"data.path={folder}", "data.validation_size=0.1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"  train: 18 examples from {folder / 'train.jsonl'}\n" in done.stdout
    assert f"  validation: 2 examples, 10% carved from {folder / 'train.jsonl'}\n" in done.stdout
    assert f"  test: 4 examples from {folder / 'test.jsonl'}\n" in done.stdout
    assert f"not read from {folder}: {folder / 'notes.jsonl'}" in done.stdout
    assert "| test | 4 |" in done.stdout and "| train | 18 |" in done.stdout


def test_run_json_records_which_files_made_which_split(tmp_path):
    folder = folder_of(tmp_path / "d", {"train.jsonl": 40, "test.jsonl": 8})
    run_dir = tmp_path / "run"
    run_train(["model=tiny_llama", "debug=fast", "adapter=none", "data=my_jsonl", f"data.path={folder}",
               "data.validation_size=8"], run_dir)
    sources = read_json(run_dir / "run.json")["data_sources"]
    assert sources["main"]["files"] == {"train": [str(folder / "train.jsonl")],
                                        "validation": [str(folder / "train.jsonl")],
                                        "test": [str(folder / "test.jsonl")]}
    assert (sources["main"]["train"], sources["main"]["validation"], sources["main"]["test"]) == (32, 8, 8)
    assert sources["main"]["carved"] == ["validation"]
