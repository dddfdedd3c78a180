"""Start-up stays light: commands that never train import none of the heavy libraries; and a
finished command ends as an orderly exit would, without the interpreter's teardown."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEAVY = ("torch", "transformers", "peft", "wandb", "datasets")
# Runs `python -m pipeline.train <args>` and, as the process exits, names the heavy modules it
# imported (atexit handlers run on sys.exit too).
PROBE = f"""
import atexit, runpy, sys
atexit.register(lambda: print("IMPORTED=" + ",".join(m for m in {HEAVY!r} if m in sys.modules)))
sys.argv = ["pipeline.train", *sys.argv[1:]]
runpy.run_module("pipeline.train", run_name="__main__", alter_sys=True)
"""


def imported(args, tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, *args, f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    line = next(l for l in out.stdout.splitlines() if l.startswith("IMPORTED="))
    return out, [m for m in line.removeprefix("IMPORTED=").split(",") if m]


def test_a_config_error_is_reported_without_importing_torch(tmp_path):
    out, heavy = imported(["model=tiny_llama", "debug=fast", "trainer.learning_rate=-1",
                           "data.max_length=4"], tmp_path)
    assert out.returncode == 1
    assert "trainer.learning_rate=-1.0 must be > 0" in out.stderr
    assert "data.max_length=4 must be >= 8" in out.stderr
    assert heavy == []
    assert '"status": "failed"' in (tmp_path / "run.json").read_text()


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job", "data.packing=true"]])
def test_help_and_printing_the_config_import_no_heavy_library(args, tmp_path):
    out, heavy = imported(args, tmp_path)
    assert out.returncode == 0, out.stderr
    assert ("pipeline.train" in out.stdout or "train is powered by Hydra" in out.stdout
            if args == ["--help"] else "pack_length: 512" in out.stdout)
    assert heavy == []


END = """
import atexit, threading, time
from pipeline.commands import runner
atexit.register(lambda: print("exit handler ran"))
threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
print("work done", end="")  # still in stdout's buffer: the output is a pipe
runner.end_process()
print("not reached")
"""


def test_a_finished_command_waits_for_its_threads_runs_exit_handlers_and_flushes():
    out = subprocess.run([sys.executable, "-c", END], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "work donethread finished\nexit handler ran\n"
