"""Data stage: formats, loss masking, splits, truncation, and errors naming file:line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.commands import validation
from pipeline.config.options import load_option
from pipeline.config.schema import DataConfig, MixSource
from pipeline.data import cache
from pipeline.data.packing import IGNORE_INDEX
from pipeline.data.records import DataError
from pipeline.data.splits import Example, _keys, build_datasets, split_examples
from tests.conftest import ROOT, write_jsonl


def data_cfg(path, **kw) -> DataConfig:
    base = dict(name="t", path=str(path), validation_size=0, test_size=0, seed=1, max_length=256)
    base.update(kw)
    return DataConfig(**base)


def label_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])


def test_prompt_completion_loss_covers_completion_and_end_of_turn_only(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hi", "completion": "Bonjour à tous"}])
    row = build_datasets(data_cfg(path), tokenizer).train[0]
    assert label_text(tokenizer, row["input_ids"], row["labels"]) == "Bonjour à tous<|im_end|>\n"
    masked = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l == IGNORE_INDEX])
    assert masked.endswith("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")
    assert row["prompt"].endswith("<|im_start|>assistant\n") and row["reference"] == "Bonjour à tous"


def test_instruction_format_joins_instruction_and_input(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Translate.", "input": "Save", "output": "Enregistrer"},
        {"instruction": "Greet.", "input": "", "output": "Salut"}])
    ds = build_datasets(data_cfg(path, format="instruction"), tokenizer).train
    prompts = sorted(ds["prompt"])
    assert any("Translate.\n\nSave<|im_end|>" in p for p in prompts)
    assert any("Greet.<|im_end|>" in p for p in prompts)  # empty input adds nothing
    texts = {label_text(tokenizer, r["input_ids"], r["labels"]) for r in ds}
    assert texts == {"Enregistrer<|im_end|>\n", "Salut<|im_end|>\n"}


def test_multi_turn_messages_train_on_every_assistant_turn(tokenizer, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    row = build_datasets(data_cfg(path), tokenizer).train[0]
    assert label_text(tokenizer, row["input_ids"], row["labels"]) == "Hello<|im_end|>\nGoodbye<|im_end|>\n"
    assert row["reference"] == "Goodbye"


def test_plain_template_masks_prompt_and_appends_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    row = build_datasets(data_cfg(path, template="plain"), tokenizer).train[0]
    assert label_text(tokenizer, row["input_ids"], row["labels"]) == "4" + tokenizer.eos_token


def test_system_prompt_is_prepended(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "completion": "y"}])
    row = build_datasets(data_cfg(path, system_prompt="Only French."), tokenizer).train[0]
    assert row["prompt"].startswith("<|im_start|>system\nOnly French.<|im_end|>")


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json"])
def test_csv_parquet_json_load_through_datasets(tokenizer, tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"]})
    path = tmp_path / f"d.{suffix}"
    {"csv": lambda: frame.to_csv(path, index=False), "parquet": lambda: frame.to_parquet(path),
     "json": lambda: path.write_text(json.dumps(frame.to_dict("records")))}[suffix]()
    splits = build_datasets(data_cfg(path), tokenizer)
    assert sorted(splits.train["reference"]) == ["x", "y", "z"]
    assert splits.stats["format"] == "prompt_completion"


def test_split_is_deterministic_disjoint_and_sized():
    cfg = data_cfg("x", validation_size=0.2, test_size=5)
    examples = [Example([{"role": "user", "content": str(i)}], f"r{i}") for i in range(50)]
    a, b = split_examples(examples, cfg), split_examples(examples, cfg)
    assert [e.where for e in a["test"]] == [e.where for e in b["test"]]
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (35, 10, 5)
    ids = [{e.where for e in a[s]} for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    other = split_examples(examples, data_cfg("x", validation_size=0.2, test_size=5, seed=2))
    assert [e.where for e in other["test"]] != [e.where for e in a["test"]]


def test_fractions_are_capped_and_counts_kept(caplog):
    import logging

    caplog.set_level(logging.INFO, "pipeline.data")
    examples = [Example([{"role": "user", "content": str(i)}], f"r{i}") for i in range(1000)]
    capped = split_examples(examples, data_cfg("x", validation_size=0.1, test_size=0.2,
                                               max_validation_examples=30, max_test_examples=50))
    assert (len(capped["train"]), len(capped["validation"]), len(capped["test"])) == (920, 30, 50)
    assert "data.test_size=0.2 of 1000 examples is 200: capped at 50 by data.max_test_examples" in caplog.text
    counts = split_examples(examples, data_cfg("x", validation_size=80, test_size=0.02,
                                               max_validation_examples=30, max_test_examples=50))
    assert (len(counts["validation"]), len(counts["test"])) == (80, 20)  # a count, and a fraction under the cap
    uncapped = split_examples(examples, data_cfg("x", validation_size=0.1, test_size=0.2,
                                                 max_validation_examples=None, max_test_examples=None))
    assert (len(uncapped["validation"]), len(uncapped["test"])) == (100, 200)


def long_records(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "short", "completion": "ok"},
        {"prompt": "word " * 100, "completion": "long one"}])


def test_truncation_drop_counts_dropped(tokenizer, tmp_path):
    splits = build_datasets(data_cfg(long_records(tmp_path), max_length=40), tokenizer)
    assert len(splits.train) == 1 and splits.stats["train"]["dropped_too_long"] == 1


def test_truncation_truncate_keeps_examples_with_labels_left(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "word " * 100}])
    splits = build_datasets(data_cfg(path, max_length=40, truncation="truncate"), tokenizer)
    row = splits.train[0]
    assert len(row["input_ids"]) == 40 and splits.stats["train"]["truncated"] == 1
    assert any(l != IGNORE_INDEX for l in row["labels"])


def test_truncation_error_names_file_and_line(tokenizer, tmp_path):
    path = long_records(tmp_path)
    with pytest.raises(DataError, match=rf"{path}:2: \d+ tokens exceed data.max_length=40"):
        build_datasets(data_cfg(path, max_length=40, truncation="error"), tokenizer)


def test_malformed_jsonl_line_names_file_and_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "a", "completion": "b"}', "",
                                              '{"prompt": "c", "completion": }'])
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        build_datasets(data_cfg(path), tokenizer)


def test_malformed_json_is_one_message_with_its_line_and_no_library_lines(tokenizer, tmp_path, capfd, caplog):
    lines = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    lines[6] = '{"prompt": "x", "completion": }'
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    capfd.readouterr()
    with pytest.raises(DataError) as err:
        build_datasets(data_cfg(path), tokenizer)
    assert str(err.value) == (f"{path}:7: not valid JSON (Expecting value at column 31); "
                              "each line must be one JSON object")
    # datasets logged pyarrow's error (row 6, counted from 0) and drew a progress bar: pytest
    # keeps the one in caplog and the other in capfd.
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records if r.name.startswith("datasets")] == []
    # As a user sees it: the one line, whatever pytest's capture hides in-process.
    done = subprocess.run([sys.executable, "-m", "pipeline.data", "model=tiny_llama", "data=my_jsonl",
                           f"data.path={path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr == f"error: {err.value}\n"


def test_a_json_file_of_json_lines_names_its_bad_line(tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid JSON"):
        build_datasets(data_cfg(path), tokenizer)
    path.write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": "c", "completion": }]\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid JSON \(Expecting value"):
        build_datasets(data_cfg(path), tokenizer)


def test_wrong_field_names_name_file_line_and_fields(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"},
                                              {"prompt": "c", "answer": "d"}])
    with pytest.raises(DataError) as err:
        build_datasets(data_cfg(path, format="prompt_completion"), tokenizer)
    # datasets gives every record the file's columns (None where absent): those are not listed.
    assert str(err.value) == (f"{path}:2: field 'completion' must be a string, but it is missing; "
                              "fields present: ['answer', 'prompt']")


def test_undetectable_format_lists_columns(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"cannot tell the format from the columns \['question', 'answer'\]"):
        build_datasets(data_cfg(path), tokenizer)


def test_empty_file_fails_clearly(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="holds no records|cannot be read"):
        build_datasets(data_cfg(path), tokenizer)


def test_bad_message_role_names_record(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "human", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}])
    with pytest.raises(DataError, match=rf"{path}:1: messages\[0\] must be"):
        build_datasets(data_cfg(path), tokenizer)


def test_too_small_dataset_for_splits_fails(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    with pytest.raises(DataError, match="cannot hold data.test_size"):
        build_datasets(data_cfg(path, validation_size=1, test_size=2), tokenizer)


def test_shipped_datasets_build(tokenizer):
    for name in ("django_en_fr", "chatterbot_qa"):
        option = load_option("data", name, seed=0)
        splits = build_datasets(option, tokenizer)
        assert len(splits.train) > 300 and splits.validation is not None and splits.test is not None


def test_sharegpt_is_detected_and_trains_on_every_or_the_last_assistant_turn(tokenizer, tmp_path):
    conversations = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                     {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                     {"from": "gpt", "value": "Goodbye"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": conversations, "id": "x1"}])
    splits = build_datasets(data_cfg(path), tokenizer)
    assert splits.stats["format"] == "sharegpt"
    row = splits.train[0]
    assert label_text(tokenizer, row["input_ids"], row["labels"]) == "Hello<|im_end|>\nGoodbye<|im_end|>\n"
    assert "<|im_start|>system\nBe brief.<|im_end|>" in row["prompt"] and row["reference"] == "Goodbye"
    last = build_datasets(data_cfg(path, train_on="last"), tokenizer).train[0]
    assert label_text(tokenizer, last["input_ids"], last["labels"]) == "Goodbye<|im_end|>\n"
    assert last["input_ids"] == row["input_ids"]  # the same text; only the loss mask differs


def test_sharegpt_speaker_without_a_role_names_record_and_fix(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                 {"from": "gpt", "value": "Yo"}]},
                                              {"conversations": [{"from": "narrator", "value": "Hi"}]}])
    with pytest.raises(DataError, match=rf"{path}:2: conversations\[0\] must be .*data.sharegpt_roles"):
        build_datasets(data_cfg(path), tokenizer)
    mapped = data_cfg(path, sharegpt_roles={"human": "user", "gpt": "assistant", "narrator": "user"})
    with pytest.raises(DataError, match=rf"{path}:2: the last message must be the assistant's"):
        build_datasets(mapped, tokenizer)


def test_overlap_between_train_and_held_out_is_counted_and_dedup_removes_it(tokenizer, tmp_path, caplog):
    records = [{"prompt": f"Translate: item {i}", "completion": f"élément {i}"} for i in range(40)]
    records += [{"prompt": "Translate: item 3", "completion": "élément 3"},  # exact copies
                {"prompt": "Translate: item 5", "completion": "élément 5"},
                {"prompt": "  TRANSLATE:   Item 7!", "completion": "autre"}]  # the same prompt, normalised
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = data_cfg(path, validation_size=10, test_size=10, seed=0)
    with caplog.at_level("WARNING"):
        splits = build_datasets(cfg, tokenizer)
    found = splits.stats["overlap"]
    # Count by hand from the same split.

    examples = [Example([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
                        str(i)) for i, r in enumerate(records)]
    parts = split_examples(examples, cfg)
    train_exact = {_keys(e)[0] for e in parts["train"]}
    train_prompts = {_keys(e)[1] for e in parts["train"]}
    for name in ("validation", "test"):
        assert found[name]["exact"] == sum(_keys(e)[0] in train_exact for e in parts[name])
        assert found[name]["normalized"] == sum(_keys(e)[1] in train_prompts for e in parts[name])
    total = found["validation"]["normalized"] + found["test"]["normalized"]
    assert total >= 1, "the duplicates were all placed in one split; pick another seed"
    assert "also occur in train" in caplog.text

    deduped = build_datasets(data_cfg(path, validation_size=10, test_size=10, seed=0, dedup=True), tokenizer)
    removed = deduped.stats["overlap"]["removed_from_train"]
    assert removed == found["train_examples"] >= 1
    assert len(deduped.train) == len(splits.train) - removed
    assert deduped.stats["sources"]["main"]["train"] == len(deduped.train)  # counted after dedup
    held_out = {p for ds in (deduped.validation, deduped.test) for p in ds["prompt"]}
    assert not held_out & set(deduped.train["prompt"])  # nothing held out is trained on


def test_preview_marks_loss_tokens_and_sizes_the_splits(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    conversations = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                     {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": conversations}] * 12 +
                       [{"conversations": [{"from": "human", "value": "word " * 300}, {"from": "gpt", "value": "x"}]}])
    done = subprocess.run([sys.executable, "-m", "pipeline.data", "--examples", "3", "model=tiny_llama",
                           "data=my_jsonl", f"data.path={path}", "data.validation_size=2", "data.test_size=2",
                           "data.max_length=64"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout  # not a terminal: brackets, no colour codes
    assert "format sharegpt" in out and "\x1b[" not in out
    assert "[[Hello<|im_end|>\n]]" in out and "[[Goodbye<|im_end|>\n]]" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"train", "validation", "test"} <= set(rows)
    over = sum(int(rows[s].split("|")[7]) for s in ("train", "validation", "test"))
    assert over == 1  # the one long conversation, whichever split it landed in
    assert "one epoch:" in out and "held-out examples also in train" in out
    bad = subprocess.run([sys.executable, "-m", "pipeline.data", "model=tiny_llama", "data=my_jsonl",
                          f"data.path={tmp_path / 'missing.jsonl'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    choice = subprocess.run([sys.executable, "-m", "pipeline.data", "model=tiny_llama", "data.template=jinja"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert choice.returncode == 1 and "Traceback" not in choice.stderr
    assert "Invalid value 'jinja', expected one of [chat, plain]\n    full_key: data.template" in choice.stderr


def test_three_files_are_kept_as_the_user_split_them(tokenizer, tmp_path):
    def records(tag, n):
        return [{"prompt": f"{tag} question {i}", "completion": f"{tag} answer {i}"} for i in range(n)]

    train = write_jsonl(tmp_path / "train.jsonl", records("train", 30))
    val = write_jsonl(tmp_path / "val.jsonl", records("val", 5))
    test = write_jsonl(tmp_path / "test.jsonl", records("test", 7))
    cfg = data_cfg(train, validation_path=str(val), test_path=str(test), validation_size=0.1, test_size=0.1)
    splits = build_datasets(cfg, tokenizer)
    # Nothing re-split: every train record trains, the held-out files are whole and in order.
    assert len(splits.train) == 30 and all(r.startswith("train") for r in splits.train["reference"])
    assert splits.validation["reference"] == [f"val answer {i}" for i in range(5)]
    assert splits.test["reference"] == [f"test answer {i}" for i in range(7)]
    assert splits.stats["held_out"] == ["test", "validation"]
    # A count caps a given set (a seeded sample, the same every time); a fraction keeps it whole.
    capped = build_datasets(data_cfg(train, test_path=str(test), test_size=3, validation_size=4), tokenizer)
    assert len(capped.test) == 3 and set(capped.test["reference"]) <= {f"test answer {i}" for i in range(7)}
    assert len(capped.validation) == 4 and len(capped.train) == 26  # validation still carved from train
    assert capped.test["reference"] == build_datasets(
        data_cfg(train, test_path=str(test), test_size=3, validation_size=4), tokenizer).test["reference"]
    # A bad held-out file is named by its own key and line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        build_datasets(data_cfg(train, test_path=str(bad)), tokenizer)
    with pytest.raises(DataError, match=r"data.validation_path='.*nope.jsonl' does not exist"):
        build_datasets(data_cfg(train, validation_path=str(tmp_path / "nope.jsonl")), tokenizer)


def test_a_mix_adds_a_seeded_share_of_another_sources_training_split(tokenizer, tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [{"prompt": f"task {i}", "completion": f"t{i}"} for i in range(40)])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": [{"from": "human", "value": f"chat {i}"},
                                                                    {"from": "gpt", "value": f"c{i}"}]}
                                                 for i in range(50)])
    other = {"data": "my_jsonl", "overrides": {"path": str(chat), "validation_size": 5, "test_size": 5}}
    cfg = data_cfg(task, validation_size=4, test_size=4, mix=[MixSource(**other, fraction=0.25)])
    splits = build_datasets(cfg, tokenizer)
    # 25% of the 32 task training examples, drawn from the chat source's 40 training examples.
    assert splits.stats["sources"] == {
        "main": {"test": 4, "validation": 4, "train": 32, "carved": ["validation", "test"], "unread": [],
                 "files": {"train": [str(task)], "validation": [str(task)], "test": [str(task)]}},
        "0:my_jsonl": {"train": 8, "files": {"train": [str(chat)]}}}
    mixed = [r for r in splits.train["reference"] if r.startswith("c")]
    assert len(splits.train) == 40 and len(mixed) == 8
    assert all(r.startswith("t") for ds in (splits.validation, splits.test) for r in ds["reference"])
    # Only the source's own training split is drawn from: its held-out examples stay unseen.
    chat_cfg = load_option("data", "my_jsonl", seed=cfg.seed, path=str(chat), validation_size=5, test_size=5)
    chat_held_out = set(build_datasets(chat_cfg, tokenizer).test["reference"]) | \
        set(build_datasets(chat_cfg, tokenizer).validation["reference"])
    assert not chat_held_out & set(mixed)
    # Deterministic for a seed; a count works as well as a fraction; more than there is: all.
    assert build_datasets(cfg, tokenizer).train["reference"] == splits.train["reference"]
    counted = build_datasets(data_cfg(task, validation_size=4, test_size=4,
                                      mix=[MixSource(**other, examples=500)]), tokenizer)
    assert counted.stats["sources"]["0:my_jsonl"] == {"train": 40, "files": {"train": [str(chat)]}}


def test_mix_settings_are_checked(tmp_path):
    problems = validation._check_data(data_cfg(tmp_path, mix=[MixSource(data="my_jsonl"),
                                                     MixSource(data="nope", examples=3)]))
    assert any("data.mix[0] (my_jsonl) needs examples (a count) or fraction" in p for p in problems)
    assert any("data.mix[1].data='nope' is not a data option" in p for p in problems)


def test_tokenized_splits_are_cached_by_what_they_depend_on(tokenizer, tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q {i}", "completion": f"a {i}"} for i in range(30)])
    cache_dir = str(tmp_path / "cache")
    cfg = data_cfg(path, validation_size=3, test_size=3)
    first = build_datasets(cfg, tokenizer, cache_dir)
    with caplog.at_level("INFO"):
        again = build_datasets(cfg, tokenizer, cache_dir)
    assert (first.stats["tokenization"], again.stats["tokenization"]) == ("tokenized", "cached")
    assert "tokenized splits reused from the cache" in caplog.text
    for name in ("train", "validation", "test"):
        assert getattr(again, name).to_list() == getattr(first, name).to_list()
    assert again.stats["overlap"] == first.stats["overlap"] and again.stats["sources"] == first.stats["sources"]
    # Anything the rows depend on tokenizes again: a setting, the file's content, the template.
    assert build_datasets(data_cfg(path, validation_size=3, test_size=3, system_prompt="Answer."),
                          tokenizer, cache_dir).stats["tokenization"] == "tokenized"
    original = tokenizer.chat_template
    tokenizer.chat_template = original.replace("<|im_start|>", "<|im_start|> ")
    try:
        assert build_datasets(cfg, tokenizer, cache_dir).stats["tokenization"] == "tokenized"
    finally:
        tokenizer.chat_template = original
    write_jsonl(path, [{"prompt": f"q {i}", "completion": f"b {i}"} for i in range(30)])
    changed = build_datasets(cfg, tokenizer, cache_dir)
    assert changed.stats["tokenization"] == "tokenized" and changed.train[0]["reference"].startswith("b")
    # A damaged entry is not trusted: a warning, then tokenized afresh.
    key = cache.fingerprint(cfg, tokenizer)
    (tmp_path / "cache" / key / "stats.json").write_text("{")
    with caplog.at_level("WARNING"):
        assert build_datasets(cfg, tokenizer, cache_dir).stats["tokenization"] == "tokenized"
    assert "is unreadable" in caplog.text


def test_a_folder_of_named_split_files_keeps_its_splits(tokenizer, tmp_path):
    # What data.splits does for a hub dataset, offline: datasets assigns a folder's files to
    # splits by their names.
    folder = tmp_path / "named"
    folder.mkdir()
    for name, n in (("train", 20), ("validation", 3), ("test", 4)):
        write_jsonl(folder / f"{name}.jsonl", [{"prompt": f"{name} {i}", "completion": f"{name} {i}"} for i in range(n)])
    splits = build_datasets(data_cfg(folder, validation_size=0.1, test_size=0.1,
                                     splits={"train": "train", "validation": "validation", "test": "test"}), tokenizer)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (20, 3, 4)
    assert splits.test["reference"] == [f"test {i}" for i in range(4)]
    with pytest.raises(DataError, match=r"data.splits.test='dev': no file in data.path=.* is named for that split"):
        build_datasets(data_cfg(folder, splits={"train": "train", "test": "dev"}), tokenizer)
    # As a user writes it on the command line (a typed dict would refuse the new keys).
    import subprocess
    import sys

    from tests.conftest import ROOT

    def preview(*overrides):
        return subprocess.run([sys.executable, "-m", "pipeline.data", "--examples", "0", "model=tiny_llama",
                               "data=my_jsonl", f"data.path={folder}", *overrides],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    done = preview("data.splits={train: train, validation: validation, test: test}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "validation from split validation, test from split test" in done.stdout
    assert "| test | 4 |" in done.stdout and "| validation | 3 |" in done.stdout
    bad = preview("data.splits={train: train, dev: dev}")
    assert bad.returncode == 1 and "data.splits=" in bad.stderr and "must map train/validation/test" in bad.stderr
    typo = preview("data.split=x")
    assert typo.returncode == 1 and typo.stderr.startswith("error:") and "Traceback" not in typo.stderr
