"""The package installs as a wheel and runs from any folder: conf/ and sweeps/ ship inside it."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_json


def _run(cmd, cwd: Path, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, f"{cmd}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_environment_trains_from_another_folder(tmp_path):
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", tmp_path / "dist", ROOT], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("pipeline/conf/train.yaml", "pipeline/conf/adapter/lora.yaml",
                    "pipeline/sweeps/lora_rank_alpha_lr.yaml", "hydra_plugins/pipeline_sweeper/pipeline_sweeper.py"):
        assert shipped in names, shipped

    # A fresh environment with only the wheel installed; its dependencies (torch, transformers,
    # ...) are this environment's, reached through a path entry rather than installed again.
    fresh = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", fresh], cwd=tmp_path)
    python = fresh / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    Path(purelib.stdout.strip(), "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], cwd=tmp_path)

    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    located = _run([python, "-c", "from pipeline.config.options import CONF_DIR; print(CONF_DIR)"], cwd=elsewhere, env=env)
    assert Path(located.stdout.strip()).is_relative_to(fresh)  # the wheel's copy, not the checkout
    _run([fresh / "bin" / "pipeline-train", "model=tiny_llama", "debug=fast", "logger=none",
          "hydra.run.dir=outputs/run"], cwd=elsewhere, env=env)
    assert read_json(elsewhere / "outputs" / "run" / "run.json")["status"] == "success"
    sweeps = _run([python, "-m", "pipeline.train", "sweep=lora_rank_alpha_lr", "--cfg", "job"],
                  cwd=elsewhere, env=env)
    assert "lora_rank_alpha_lr" in sweeps.stdout
    estimate = _run([fresh / "bin" / "pipeline-estimate", "model=tiny_llama"], cwd=elsewhere, env=env)
    assert "trainable" in estimate.stdout
