"""What the rest of the suite does not exercise still points to the right modules: the console
scripts, the Hydra callback in conf/hydra/, the sweeper plugin, the Dockerfile's build step and
every benchmark (``--help``). The commands the READMEs show: tests/test_docs.py."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_class

from tests.conftest import ROOT, compose_train, python_path

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
