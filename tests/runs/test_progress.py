"""Progress: bars on a terminal (a real pseudo-terminal), sparse log lines elsewhere."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from pipeline.runs import progress
from tests.conftest import ROOT


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]


def test_long_work_logs_an_estimate_then_at_most_every_10_percent_or_30_s(caplog) -> None:
    caplog.set_level(logging.INFO, "pipeline.progress")
    clock = FakeClock()
    with progress.Progress(1000, "base test loss", "examples", bar=False, clock=clock) as shown:
        for _ in range(1000):  # 0.2 s per example: 200 s in all
            clock.now += 0.2
            shown.update(1)
    lines = _lines(caplog)
    assert lines[0] == "base test loss: 1000 examples, about 3 min 20 s in all"
    assert lines[-1] == "base test loss: 1000 examples in 3 min 20 s"
    periodic = lines[1:-1]
    assert 6 <= len(periodic) <= 16  # 10% steps and 30 s both bound it: no line per update
    assert re.fullmatch(r"base test loss: \d+/1000 examples \(\d+%\), .* elapsed, ETA .*", periodic[0])


def test_work_under_10_s_is_silent(caplog) -> None:
    caplog.set_level(logging.INFO, "pipeline.progress")
    clock = FakeClock()
    with progress.Progress(8, "tuned eval loss", "examples", bar=False, clock=clock) as shown:
        for _ in range(8):
            clock.now += 0.1
            shown.update(1)
    assert _lines(caplog) == []


def test_a_failure_logs_no_completion(caplog) -> None:
    caplog.set_level(logging.INFO, "pipeline.progress")
    clock = FakeClock()
    with pytest.raises(RuntimeError):
        with progress.Progress(100, "training", "steps", bar=False, clock=clock) as shown:
            clock.now += 20
            shown.update(1)
            raise RuntimeError("boom")
    assert not any(" in " in line and "steps in" in line for line in _lines(caplog))


def _run_in(tmp_path, *, terminal: bool) -> str:
    command = [sys.executable, "-m", "pipeline.train", "model=tiny_llama", "debug=fast",
               f"hydra.run.dir={tmp_path / 'run'}", f"paths.base_cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "COLUMNS": "120"}
    if not terminal:
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns
    proc = subprocess.Popen(command, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=600) == 0
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_a_terminal_shows_bars_and_a_log_shows_none(tmp_path) -> None:
    shown = _run_in(tmp_path / "tty", terminal=True)
    # tqdm bars: carriage returns (not line ends) redraw "n/total [elapsed<eta" in place.
    assert re.search(r"\r(?!\n)", shown)
    assert re.search(r"4/4 \[\d\d:\d\d<\d\d:\d\d", shown), shown[-2000:]  # the 4 training steps
    # The evaluation's own bars (cleared when done, so the last frame drawn may be any count).
    assert re.search(r"tuned test generation:\s+\d+%\|.*\| \d/8 \[", shown), shown[-2000:]
    assert re.search(r"tuned test loss:\s+\d+%\|.*\| \d/8 \[", shown), shown[-2000:]
    logged = _run_in(tmp_path / "log", terminal=False)
    assert "\r" not in logged  # no bar redraws in a log file
    assert "first training step" in logged and "base vs tuned" in logged
    assert len(re.findall(r"pipeline.progress", logged)) <= 12  # seconds of work: (almost) silent


def test_training_progress_logs_steps_where_no_bar_shows(monkeypatch, caplog) -> None:
    from types import SimpleNamespace

    from pipeline.trainer import callbacks

    caplog.set_level(logging.INFO, "pipeline.progress")
    monkeypatch.setattr(progress, "interactive", lambda: False)
    monkeypatch.setattr(progress, "QUIET_BELOW_S", 0.0)
    callback = callbacks.progress_callback()
    state = SimpleNamespace(is_world_process_zero=True, max_steps=50, global_step=10)  # resumed at 10
    callback.on_train_begin(None, state, None)
    for _ in range(40):
        callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)
    lines = _lines(caplog)
    assert lines[0].startswith("training: 40 steps, about ")
    assert any(re.fullmatch(r"training: \d+/40 steps \(\d+%\), .*", line) for line in lines)
    assert re.fullmatch(r"training: 40 steps in \d+ s", lines[-1])
    assert len(lines) <= 12
