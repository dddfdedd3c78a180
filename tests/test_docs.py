"""The docs are true: every command in a fenced block of README.md, sweeps/README.md and
benchmarks/README.md is ours and composes with every check that needs no weights (an entry point
without a Hydra config answers ``--help``), and a named short list of them runs end to end on the
tiny model, each ending with the line that says where its results are."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from pipeline import export as export_entry
from pipeline import merge as merge_entry
from pipeline.commands import store
from pipeline.commands.compose import checked_train, typed_config
from pipeline.config.errors import ConfigError, PipelineError
from pipeline.server import plan
from tests.conftest import CONF, ROOT, python_path

DOCS = ["README.md", "sweeps/README.md", "benchmarks/README.md"]
HYDRA_APPS = {"pipeline.train": "train", "pipeline.evaluate": "evaluate", "pipeline.serve": "serve",
              "pipeline.export": "export", "pipeline.merge": "merge"}
TRAIN_OVERRIDES = {"pipeline.estimate", "pipeline.data"}  # tools taking train's overrides
# Fenced lines that run someone else's program: installing, building, the test runner itself.
NOT_OURS = re.compile(r"^(python3 -m venv|pip install|docker (build|run)|python -m pytest)\b")


class Command(NamedTuple):
    doc: str
    line: str
    module: str  # pipeline.train, ... or benchmarks/<script>.py
    args: List[str]


def doc_commands() -> List[Command]:
    """Every command line in the three READMEs' fenced blocks (continuations joined, comments
    and shell prefixes such as ``srun`` dropped)."""
    found = []
    for doc in DOCS:
        code, inside = [], False
        for line in (ROOT / doc).read_text().splitlines():
            if line.startswith("```"):
                inside = not inside
            elif inside:
                code.append(line)
        for line in "\n".join(code).replace("\\\n", " ").splitlines():
            line = line.strip()
            for part in line.split("&&"):
                command = _parse(doc, part.strip())
                if command:
                    found.append(command)
    return found


def _parse(doc: str, text: str) -> Optional[Command]:
    text = re.split(r"\s+#", text)[0].strip()
    if not re.search(r"(^|\s)(python|torchrun)\s", text) or NOT_OURS.match(text) or text.startswith("#"):
        return None
    words = shlex.split(re.sub(r"\$\([^)]*\)|\$\{[^}]*\}", "<value>", text))
    start = next(i for i, w in enumerate(words) if w in ("python", "torchrun"))
    words = words[start + 1:]
    if "-m" in words:
        at = words.index("-m")
        return Command(doc, text, words[at + 1], words[at + 2:])
    return Command(doc, text, words[0], words[1:])


COMMANDS = doc_commands()
PLACEHOLDER = "placeholder_x"


def _overrides(args: List[str]) -> List[str]:
    """Overrides that compose alone: ``-m``/``--cfg job`` dropped, a multirun's comma list as its
    first value, a placeholder (``<date>``, ``...``; ``$(...)`` and ``${...}`` became ``<value>``)
    as one word."""
    args = [re.sub(r"<[^>]+>|\.\.\.", PLACEHOLDER, a) for a in args]
    args = [a for a in args if "=" in a and not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(args)
    return [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line
            for o in parsed]


def _placeholders(overrides: List[str]) -> List[str]:
    """The values a reader substitutes: paths, hub ids, placeholders (a problem naming one is
    about the reader's own files, not about the command)."""
    values = [v.strip(" '\"") for o in overrides for v in o.partition("=")[2].strip("[]").split(",")]
    return [v for v in values if PLACEHOLDER in v or "/" in v or Path(v).suffix in (".jsonl", ".json", ".csv")]


def _check(module: str, overrides: List[str]) -> List[str]:
    """Every problem the entry point's own checks find before loading weights."""
    GlobalHydra.instance().clear()
    entry = HYDRA_APPS.get(module, "train")
    if entry in ("serve", "export"):
        store.forget_sweeps()  # as these entry points do: their `sweep` is a key
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose(entry, overrides=["paths.run_dir=.", *overrides], return_hydra_config=True)
    finally:
        store.register_configs()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        if entry == "train":
            checked_train(cfg)
        else:
            typed_config(cfg, {"serve": plan.problems, "export": export_entry.problems,
                               "merge": merge_entry.problems}.get(entry, lambda t: []))
    except ConfigError as err:
        return err.problems
    except PipelineError as err:
        return [str(err)]
    return []


def test_every_fenced_command_is_found_and_is_ours():
    modules = {c.module for c in COMMANDS}
    assert set(HYDRA_APPS) | TRAIN_OVERRIDES | {"pipeline.report", "pipeline.vllm_engine"} <= modules
    assert {c.doc for c in COMMANDS} == set(DOCS)
    assert len(COMMANDS) >= 70
    strangers = [c.line for c in COMMANDS if not (c.module.startswith("pipeline.") or c.module.startswith("benchmarks/"))]
    assert not strangers


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.doc}: {c.line}"[:100] for c in COMMANDS])
def test_every_fenced_command_composes_and_passes_its_checks(command):
    if command.module in HYDRA_APPS or command.module in TRAIN_OVERRIDES:
        overrides = _overrides(command.args)
        problems = _check(command.module, overrides)
        theirs = _placeholders(overrides)
        ours = [p for p in problems if not any(v in p for v in theirs)]
        assert not ours, f"{command.line}:\n" + "\n".join(ours)
    if command.module not in HYDRA_APPS:
        script = ["-m", command.module] if command.module.startswith("pipeline.") else [command.module]
        done = subprocess.run([sys.executable, *script, "--help"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": python_path()}, timeout=120)
        assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr[-2000:]


# --------------------------------------------------------------------------- end to end

TINY = ["model=tiny_llama", "debug=fast"]


def _line(text: str) -> Command:
    """The documented command whose line is ``text`` (it must still be in the docs)."""
    matches = [c for c in COMMANDS if c.line.startswith(text)]
    assert matches, f"no longer documented: {text}"
    return matches[0]


def _run(module: str, args: List[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": python_path()}, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _results(done: subprocess.CompletedProcess, what: str) -> Path:
    """The folder the command's last line names (``<what>: <folder>``)."""
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{what}: "), done.stdout[-2000:]
    folder = Path(last[len(what) + 2:])
    assert folder.exists()
    return folder


@pytest.mark.slow
def test_a_short_list_of_documented_commands_runs_end_to_end(tmp_path):
    """In a scratch folder, as a reader would: the smoke run, its evaluation, merged export and
    report, a multirun, the data preview and both memory estimates."""
    out = [f"paths.output_dir={tmp_path / 'outputs'}"]
    smoke = _line("python -m pipeline.train model=tiny_llama debug=fast")
    done = _run(smoke.module, smoke.args + out, tmp_path)
    run = _results(done, "results")
    assert "result: tuned/eval/loss = " in done.stderr + done.stdout
    assert (run / "metrics.json").exists()

    evaluate = _line("python -m pipeline.evaluate run=outputs/runs/<date>/<time>_lora")
    _results(_run(evaluate.module, [a.replace("outputs/runs/<date>/<time>_lora", str(run)) for a in evaluate.args] + out,
                  tmp_path), "results")

    merged = _line("python -m pipeline.export run=outputs/runs/<date>/<time>_lora export.merge=true")
    done = _run(merged.module, [a.replace("outputs/runs/<date>/<time>_lora", str(run)) for a in merged.args], tmp_path)
    folder = _results(done, "export")
    assert f"model.path={folder} base_name=tuned" in done.stdout and (folder / "config.json").exists()

    multirun = _line("python -m pipeline.train -m adapter.r=4,8,16 seed=1,2")
    assert multirun.args == ["-m", "adapter.r=4,8,16", "seed=1,2"]
    args = ["-m", "adapter.r=4,8", "seed=1"]  # two of its six jobs
    done = _run(multirun.module, args + TINY + out, tmp_path, timeout=600)
    folder = _results(done, "multirun results")
    assert len([p for p in folder.iterdir() if (p / "metrics.json").exists()]) == 2

    report = _line("python -m pipeline.report outputs/multirun/<date>/<time>")
    assert report.args == ["outputs/multirun/<date>/<time>"]
    report_folder = _results(_run(report.module, [str(folder)], tmp_path), "report")
    assert (report_folder / "report.md").exists()

    preview = _line("python -m pipeline.data")
    assert preview.args == []
    assert "train" in _run(preview.module, TINY, tmp_path).stdout

    for text in ("python -m pipeline.estimate adapter=full", "python -m pipeline.estimate adapter=qlora"):
        estimate = _line(text)
        done = _run(estimate.module, estimate.args, tmp_path)
        assert "total per device" in done.stdout, done.stdout
