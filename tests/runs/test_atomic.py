"""The one write path (pipeline/runs/atomic.py): whole or nothing, synced to disk, and used by all."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pipeline.runs import atomic
from tests.conftest import ROOT


@pytest.fixture
def synced(monkeypatch):
    """The file descriptors os.fsync was called with, as the paths they point at."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    return calls


def test_a_file_is_synced_before_its_rename_and_its_folder_after(tmp_path, synced):
    path = tmp_path / "run.json"
    path.write_text("old")
    atomic.write_text(path, "new")
    assert path.read_text() == "new"
    # The data first (through the temporary file, since renamed), then the folder's entry.
    assert len(synced) == 2 and Path(synced[0]).name.startswith(".run.json.") and synced[1] == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("complete")
    with pytest.raises(RuntimeError):
        with atomic.open_atomic(path) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "complete" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_files_get_the_umask_permissions_not_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_bytes(tmp_path / "report.png", b"\x89PNG")
    finally:
        os.umask(old)
    assert (tmp_path / "report.png").stat().st_mode & 0o777 == 0o644


def test_a_folder_is_replaced_only_once_the_new_one_is_complete(tmp_path, synced):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("v1")

    def broken(tmp):
        (tmp / "weights").write_text("v2, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.replace_folder(target, broken)
    assert (target / "weights").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    atomic.replace_folder(target, lambda tmp: (tmp / "weights").write_text("v2"))
    assert (target / "weights").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert any(Path(p).name == "weights" for p in synced)  # the file's data reached the disk first


def test_no_module_renames_files_into_place_by_itself():
    # Every writer goes through pipeline/runs/atomic.py; a new os.replace/rename elsewhere is a second,
    # probably unsynced, write path. (extract_data.py builds the shipped data at packaging time.)
    pattern = re.compile(r"os\.replace\(|os\.rename\(|\.rename\(|\.replace\((tmp|new|old)")
    offenders = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "hydra_plugins").rglob("*.py")):
        if path.name in ("atomic.py", "extract_data.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
