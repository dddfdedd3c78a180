"""Bad input corpus: every case gives one clear error naming the key or file:line, a non-zero
exit, and a run folder marked ``failed`` with that error (never ``success``).

Most cases run in-process (fast: they fail before any weights load); a few go through the real
command line to check the exit code, the ``error:`` line and the absence of a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config.errors import ConfigError, PipelineError
from tests.conftest import ROOT, python_path, read_json, run_train, write_jsonl

FAST = ["model=tiny_llama", "debug=fast", "evaluation=perplexity"]
GOOD = {"prompt": "Say hi", "completion": "hi"}
LONG = {"prompt": "word " * 60, "completion": "word " * 60}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The bad inputs, one file each, in one folder (``{d}`` in the table)."""
    d = tmp_path_factory.mktemp("bad")
    write_jsonl(d / "malformed.jsonl", [GOOD, '{"prompt": "a", "completion": '])
    write_jsonl(d / "array_line.jsonl", [GOOD, '["a", "b"]'])
    write_jsonl(d / "wrong_fields.jsonl", [{"question": "a", "answer": "b"}] * 3)
    write_jsonl(d / "missing_field.jsonl", [GOOD, {"prompt": "a"}])
    write_jsonl(d / "wrong_type.jsonl", [{"prompt": "a", "completion": 7}, GOOD])
    write_jsonl(d / "empty_completion.jsonl", [{"prompt": "a", "completion": " "}])
    write_jsonl(d / "user_last.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    write_jsonl(d / "bad_role.jsonl", [{"messages": [{"role": "robot", "content": "hi"},
                                                     {"role": "assistant", "content": "ok"}]}])
    (d / "empty.jsonl").write_text("\n")
    (d / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9", "completion": "b"}\n')
    write_jsonl(d / "all_long.jsonl", [LONG] * 20)
    write_jsonl(d / "one_long.jsonl", [GOOD] * 12 + [LONG] + [GOOD] * 7)
    write_jsonl(d / "three.jsonl", [GOOD] * 3)
    (d / "notes.txt").write_text("prompt,completion\n")
    (d / "no_data").mkdir()
    (d / "a_file").write_text("not a folder")
    _checkpoints(d)
    return d


def _checkpoints(d: Path) -> None:
    """Checkpoint folders shaped like the Trainer's, one per way a save can be cut short."""
    import torch
    from safetensors.torch import save_file

    def checkpoint(name: str) -> Path:
        folder = d / "run" / "checkpoints" / name
        folder.mkdir(parents=True)
        save_file({"w": torch.zeros(4, 4)}, str(folder / "adapter_model.safetensors"))
        torch.save({"state": {}}, folder / "optimizer.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
        return folder

    (checkpoint("checkpoint-2") / "trainer_state.json").unlink()
    (checkpoint("checkpoint-3") / "trainer_state.json").write_text('{"global_step": ')
    weights = checkpoint("checkpoint-4") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    optimizer = checkpoint("checkpoint-5") / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:50])


# (case id, overrides, what the message must contain); {d} is the folder of bad files.
CASES = [
    # --- configuration: wrong values, unknown names, incompatible combinations
    ("adapter_rank_zero", ["adapter.r=0"], "adapter.r=0 must be > 0; use adapter=full"),
    ("unknown_adapter_method", ["adapter.method=lorra"], "adapter.method='lorra' is unknown; choose one of"),
    ("key_of_another_adapter", ["+adapter.reduction_factor=4"], "adapter.reduction_factor=4 is not a setting of adapter=lora"),
    ("unknown_target_module", ["adapter.target_modules=[qkv]"], "adapter.target_modules has unknown module name(s) ['qkv']"),
    ("hub_model_without_path", ["model=hub"], "model.path is required: set it on the command line"),
    ("missing_model_folder", ["model=hub", "model.path=/nonexistent/model"],
     "model.path='/nonexistent/model' is not an existing folder"),
    ("unknown_tokenizer_option", ["model.tokenizer=smollm3"], "model option 'smollm3' does not exist; available:"),
    ("gguf_package_not_installed", ["model.source=gguf", "model.gguf_package=no_such_pkg", "model.gguf_file=m.gguf"],
     "model.gguf_package='no_such_pkg' is not installed; install it with"),
    ("negative_learning_rate", ["trainer.learning_rate=-1"], "trainer.learning_rate=-1.0 must be > 0"),
    ("nan_learning_rate", ["trainer.learning_rate=nan"], "trainer.learning_rate=nan must be > 0"),
    ("zero_steps", ["trainer.max_steps=0"], "trainer.max_steps=0 must be > 0, or -1"),
    ("negative_steps", ["trainer.max_steps=-5"], "trainer.max_steps=-5 must be > 0, or -1 (-1: train "
     "trainer.num_train_epochs instead)"),
    ("added_misspelt_key", ["+trainer.learnig_rate=1e-4"], "trainer.learnig_rate=0.0001 is not a setting: "
     "did you mean trainer.learning_rate?"),
    ("added_unknown_key", ["+foo=1"], "foo=1 is not a setting: remove it"),
    ("typo_in_trainer_extra", ["+trainer.extra.lerning_rate=1"],
     "trainer.extra.lerning_rate is not a TrainingArguments field; did you mean learning_rate"),
    ("zero_checkpoints_kept", ["trainer.save_total_limit=0"], "trainer.save_total_limit=0 must be > 0 or null"),
    ("splits_leave_no_training", ["data.validation_size=0.6", "data.test_size=0.5"], "leaves no training examples"),
    ("negative_split", ["data.test_size=-1"], "data.test_size=-1.0 must be >= 0"),
    ("tiny_max_length", ["data.max_length=4"], "data.max_length=4 must be >= 8"),
    ("messages_with_plain_template", ["data.format=messages", "data.template=plain"],
     "data.format=messages needs data.template=chat"),
    ("data_path_not_set", ["data=my_jsonl"], "data.path is required: set it on the command line"),
    ("missing_data_file", ["data=my_jsonl", "data.path=/nonexistent/train.jsonl"],
     "data.path='/nonexistent/train.jsonl' does not exist"),
    ("unknown_objective_metric", ["objective.metric=tuned/eval/blue"],
     "objective.metric='tuned/eval/blue' is not a metric this run reports; available:"),
    ("unknown_eval_metric", ["evaluation.metrics=[blue]"], "evaluation.metrics has unknown metric 'blue'"),
    ("eval_split_without_data", ["evaluation.splits=[eval]", "data.validation_size=0", "trainer.eval_steps=null",
                                 "objective.metric=tuned/test/loss"],
     "evaluation.splits has 'eval' but data.validation_size=0"),
    ("unknown_extra_dataset", ["evaluation.extra_datasets=[alpaca]"], "evaluation.extra_datasets has 'alpaca', not a data option"),
    ("generation_during_training_without_metrics", ["evaluation.during_training=true"],
     "evaluation.during_training needs trainer.eval_steps, a validation split"),
    ("missing_resume_folder", ["resume=/nonexistent/run"], "resume='/nonexistent/run' is neither never, auto nor"),
    ("unknown_signal", ["preemption.signals=[SIGFOO]"], "preemption.signals has 'SIGFOO', not a signal name"),
    ("exit_code_zero", ["preemption.exit_code=0"], "preemption.exit_code=0 must be in 1..255"),
    # --- data files: each error names file:line (or the file)
    ("malformed_jsonl_line", ["data=my_jsonl", "data.path={d}/malformed.jsonl"], "{d}/malformed.jsonl:2: not valid JSON"),
    ("jsonl_line_not_an_object", ["data=my_jsonl", "data.path={d}/array_line.jsonl"],
     "{d}/array_line.jsonl:2: expected a JSON object per line, got list"),
    ("wrong_field_names", ["data=my_jsonl", "data.path={d}/wrong_fields.jsonl"],
     "cannot tell the format from the columns ['question', 'answer']"),
    ("record_missing_a_field", ["data=my_jsonl", "data.path={d}/missing_field.jsonl", "data.format=prompt_completion"],
     "{d}/missing_field.jsonl:2: field 'completion' must be a string, but it is missing"),
    ("field_of_wrong_type", ["data=my_jsonl", "data.path={d}/wrong_type.jsonl"],
     "{d}/wrong_type.jsonl:1: field 'completion' must be a string, but it is a int"),
    ("empty_completion", ["data=my_jsonl", "data.path={d}/empty_completion.jsonl"],
     "{d}/empty_completion.jsonl:1: the completion is empty"),
    ("conversation_ending_with_user", ["data=my_jsonl", "data.path={d}/user_last.jsonl"],
     "{d}/user_last.jsonl:1: the last message must be the assistant's"),
    ("unknown_message_role", ["data=my_jsonl", "data.path={d}/bad_role.jsonl"], "{d}/bad_role.jsonl:1: messages[0] must be"),
    ("empty_dataset", ["data=my_jsonl", "data.path={d}/empty.jsonl"], "data.path='{d}/empty.jsonl' holds no records"),
    ("not_utf8", ["data=my_jsonl", "data.path={d}/latin1.jsonl"], "{d}/latin1.jsonl:2: not valid UTF-8 (byte 0xe9"),
    ("all_sequences_too_long", ["data=my_jsonl", "data.path={d}/all_long.jsonl", "data.max_length=32",
                                "data.validation_size=2", "data.test_size=2"],
     "data: every one of the 2 test examples is longer than data.max_length=32 tokens; raise data.max_length"),
    ("sequence_too_long_with_truncation_error", ["data=my_jsonl", "data.path={d}/one_long.jsonl", "data.max_length=64",
                                                 "data.truncation=error", "data.validation_size=1", "data.test_size=1"],
     "{d}/one_long.jsonl:13: 154 tokens exceed data.max_length=64"),
    ("unsupported_file_type", ["data=my_jsonl", "data.path={d}/notes.txt"], "unsupported file type; use one of .jsonl"),
    ("folder_without_data", ["data=my_jsonl", "data.path={d}/no_data"], "the folder holds no .jsonl, .json, .csv, .parquet files"),
    ("too_few_examples_for_splits", ["data=my_jsonl", "data.path={d}/three.jsonl", "data.validation_size=2",
                                     "data.test_size=1"], "data: 3 examples cannot hold data.test_size=1.0"),
    # --- checkpoints named by resume=: each names the file that is cut short
    ("checkpoint_without_state", ["resume={d}/run/checkpoints/checkpoint-2"],
     "cannot resume from this checkpoint: {d}/run/checkpoints/checkpoint-2/trainer_state.json is missing"),
    ("checkpoint_with_truncated_state", ["resume={d}/run/checkpoints/checkpoint-3"],
     "{d}/run/checkpoints/checkpoint-3/trainer_state.json is unreadable"),
    ("checkpoint_with_truncated_weights", ["resume={d}/run/checkpoints/checkpoint-4"],
     "{d}/run/checkpoints/checkpoint-4/adapter_model.safetensors is unreadable"),
    ("checkpoint_with_truncated_optimizer", ["resume={d}/run/checkpoints/checkpoint-5"],
     "{d}/run/checkpoints/checkpoint-5/optimizer.pt is unreadable"),
]


@pytest.mark.parametrize("overrides, message", [pytest.param(o, m, id=i) for i, o, m in CASES])
def test_bad_input_fails_with_one_clear_error(overrides, message, files, tmp_path):
    run_dir = tmp_path / "run"
    message = message.format(d=files)
    with pytest.raises(PipelineError) as raised:
        run_train([*FAST, *[o.format(d=files) for o in overrides]], run_dir)
    assert message in str(raised.value)
    if isinstance(raised.value, ConfigError):
        assert len(raised.value.problems) == 1, raised.value.problems  # one error, not a cascade
    info = read_json(run_dir / "run.json")
    assert info["status"] == "failed" and message in info["error"]
    assert not (run_dir / "metrics.json").exists()


def test_corpus_has_at_least_30_distinct_cases():
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES) >= 30


def test_non_finite_loss_stops_the_run(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(PipelineError, match=r"training loss is (nan|inf) at step \d+; lower trainer.learning_rate"):
        run_train([*FAST, "adapter=full", "trainer.learning_rate=1e30", "trainer.max_grad_norm=0",
                   "trainer.warmup_ratio=0", "trainer.eval_steps=null", "trainer.save_steps=null"], run_dir)
    info = read_json(run_dir / "run.json")
    assert info["status"] == "failed" and "NonFiniteLossError: training loss is" in info["error"]
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model").exists()


def test_unwritable_run_folder_names_it(files):
    run_dir = files / "a_file" / "run"  # under a file: fails for root too, unlike permissions
    with pytest.raises(PipelineError, match=r"paths.run_dir='.*/a_file/run': cannot write the run folder"):
        run_train(FAST, run_dir)


def cli(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": python_path()}
    return subprocess.run([sys.executable, "-m", "pipeline.train", *FAST, *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides, message, folder", [
    pytest.param(["adapter.r=0"], "error: 1 configuration problem(s):\n  - adapter.r=0 must be > 0", True,
                 id="validation"),
    pytest.param(["+trainer.learnig_rate=1e-4"], "error: 1 configuration problem(s):\n  - trainer.learnig_rate="
                 "0.0001 is not a setting: did you mean trainer.learning_rate?", True, id="added_misspelt_key"),
    pytest.param(["resume={d}/run/checkpoints/checkpoint-4"],
                 "error: resume={d}/run/checkpoints/checkpoint-4: cannot resume from this checkpoint: "
                 "{d}/run/checkpoints/checkpoint-4/adapter_model.safetensors is unreadable", True,
                 id="corrupt_checkpoint"),
    # Hydra rejects these while composing, before a run folder exists; its message names the
    # option or the key and it prints no traceback.
    pytest.param(["adapter=lorra"], "Could not find 'adapter/lorra'", False, id="unknown_adapter_option"),
    pytest.param(["trainer.learnig_rate=1e-4"], "Could not override 'trainer.learnig_rate': not a setting; "
                 "did you mean trainer.learning_rate?", False, id="misspelt_key"),
    # debug=fast (in FAST) chooses logger=none: no W&B section to set a key in
    pytest.param(["logger.wandb.project=x"], "Could not override 'logger.wandb.project': logger.wandb is null "
                 "here", False, id="key_under_a_null_section"),
    pytest.param(["trainer.max_steps=ten"], "Value 'ten' of type 'str' could not be converted to Integer\n"
                 "    full_key: trainer.max_steps", False, id="wrong_type"),
    # a choice outside its values (every choice key: tests/test_config.py)
    pytest.param(["model.source=s3"], "Invalid value 's3', expected one of [hub, gguf, tiny]\n"
                 "    full_key: model.source", False, id="unknown_model_source"),
    pytest.param(["trainer.precision=fp8"], "Invalid value 'fp8', expected one of [auto, fp32, bf16, fp16]\n"
                 "    full_key: trainer.precision", False, id="unknown_precision"),
])
def test_cli_exits_1_with_the_error_and_no_traceback(overrides, message, folder, files, tmp_path):
    run_dir = tmp_path / "run"
    done = cli(*[o.format(d=files) for o in overrides], f"hydra.run.dir={run_dir}")
    assert done.returncode == 1
    assert message.format(d=files) in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    if folder:
        info = read_json(run_dir / "run.json")
        assert info["status"] == "failed" and message.format(d=files).split("\n")[0][len("error: "):] in info["error"]
    else:
        assert not run_dir.exists()


def test_cli_unwritable_run_folder_is_one_line(files):
    done = cli(f"hydra.run.dir={files / 'a_file' / 'run'}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"error: hydra.run.dir='{files / 'a_file' / 'run'}': cannot create the run "
                                   f"folder ({files / 'a_file'} is a file, not a folder); choose a writable "
                                   "folder with hydra.run.dir=... or paths.output_dir=...")
