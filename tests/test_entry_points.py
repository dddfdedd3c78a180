"""What the rest of the suite does not exercise still points to the right modules: the console
scripts, the Hydra callback in conf/hydra/, the sweeper plugin, the Dockerfile's build step, every
benchmark (``--help``) and every ``python -m pipeline.*`` command the README shows (``--cfg
job`` for the Hydra apps, composed or ``--help`` for the others)."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import List, Tuple

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class

from tests.conftest import ROOT, compose_train, python_path

HYDRA_APPS = {"pipeline.train", "pipeline.evaluate", "pipeline.serve", "pipeline.export"}
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python <args>`` on this checkout (a script's own folder comes first on its path)."""
    env = {**os.environ, "PYTHONPATH": python_path()}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_name_existing_functions(script):
    module, _, function = SCRIPTS[script].partition(":")
    assert callable(getattr(importlib.import_module(module), function)), SCRIPTS[script]


def test_the_hydra_callback_and_the_sweeper_plugin_resolve():
    hydra_defaults = yaml.safe_load((ROOT / "conf" / "hydra" / "default.yaml").read_text())
    targets = [c["_target_"] for c in hydra_defaults["callbacks"].values()]
    assert targets and all(isinstance(get_class(t), type) for t in targets)
    from hydra_plugins.pipeline_sweeper.pipeline_sweeper import PipelineOptunaSweeperConf

    sweeper = get_class(PipelineOptunaSweeperConf._target_)
    assert sweeper.__name__ == "PipelineOptunaSweeper" and callable(sweeper.sweep)
    cfg = compose_train(["sweep=lora_rank_alpha_lr"], ROOT / "outputs" / "unused")
    assert cfg.adapter.method == "lora"  # the sweep files select the plugin: it composes


def test_the_dockerfile_builds_the_model_cache_with_existing_modules():
    """The image's build step (``python -c ...`` after installing the wheel), run here against the
    cache the other tests fill (the default model's conversion happens once there)."""
    dockerfile = (ROOT / "pipeline" / "deploy" / "Dockerfile").read_text()
    code = re.search(r'python -c "([^"]+)"', dockerfile).group(1)
    assert code.endswith("'/opt/cache')")
    cache = os.environ.get("PIPELINE_CACHE_DIR", "~/.cache/pipeline")
    *imports, call = code.replace("'/opt/cache'", repr(cache)).split(";")
    done = _run("-c", ";".join([*imports, f"print({call.strip()})"]), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert (folder / "config.json").exists() and list(folder.glob("*.safetensors"))


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_every_benchmark_answers_help(script):
    done = _run(f"benchmarks/{script}", "--help")
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr[-2000:]


def readme_commands() -> List[Tuple[str, List[str]]]:
    """(module, arguments) of every ``python -m pipeline.*`` line in the README's code blocks
    (continuations joined, comments and shell prefixes dropped)."""
    code, inside = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            code.append(line)
    found = []
    for line in "\n".join(code).replace("\\\n", " ").splitlines():
        if "-m pipeline." not in line or "$(" in line:
            continue
        words = shlex.split(line.split("  #")[0].split(" # ")[0])
        start = words.index("-m", words.index(next(w for w in words if w.endswith("python") or w == "torchrun")))
        found.append((words[start + 1], words[start + 2:]))
    return found


COMMANDS = readme_commands()


def _as_composable(args: List[str]) -> List[str]:
    """Overrides that compose alone: ``-m`` dropped (``--cfg job`` prints one job's config),
    a sweep's comma list as its first value, a README placeholder as a plain word."""
    args = [re.sub(r"<[^>]+>|\.\.\.", "x", a) for a in args if a not in ("-m", "--multirun")]
    parsed = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    return [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line
            for o in parsed]


def test_the_readme_names_every_entry_point():
    assert {module for module, _ in COMMANDS} >= HYDRA_APPS | {"pipeline.data", "pipeline.report",
                                                                "pipeline.estimate", "pipeline.vllm_engine"}
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize("module, args", COMMANDS, ids=[f"{m} {' '.join(a)}"[:80] for m, a in COMMANDS])
def test_every_readme_command_composes(module, args, tmp_path):
    if module in HYDRA_APPS:
        done = _run("-m", module, *_as_composable(args), f"hydra.run.dir={tmp_path}", "--cfg", "job")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "task_name:" in done.stdout
    else:
        done = _run("-m", module, "--help")
        assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr[-2000:]
        if module in ("pipeline.data", "pipeline.estimate"):  # they take train's overrides
            cfg = compose_train(_as_composable(args), tmp_path)
            assert cfg.task_name == "train"
