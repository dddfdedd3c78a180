"""The one way files and folders are written into place.

A temporary sibling is written, flushed to disk (``fsync``), renamed over the target, and the
folder's entry synced: after a crash, a kill or a power loss a reader finds the old file or
the new one, never an empty or a partial one (a rename without the ``fsync`` before it can
reach the disk before the data does). Every writer of run folders, caches, reports and
exports goes through here; ``tests/test_atomic.py`` checks that none renames files itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Callable, Iterator


def _temporary(path: Path) -> Path:
    # Created with open(..., "x"): the umask applies (mkstemp would make every file 0600).
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def sync_folder(folder: Path) -> None:
    """Makes a folder's entries (a rename into it) durable; a no-op where folders cannot be
    opened for syncing."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(path: Path, mode: str = "w", encoding: str = "utf-8", newline: str = None) -> Iterator[IO]:
    """``with open_atomic(path) as f: f.write(...)``: ``path`` appears, whole, when the block
    ends without an error; on an error it is left as it was and no temporary file remains."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    binary = "b" in mode
    try:
        with open(tmp, mode.replace("w", "x"), encoding=None if binary else encoding,
                  newline=None if binary else newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def write_text(path: Path, text: str) -> None:
    with open_atomic(path) as f:
        f.write(text)


def write_bytes(path: Path, data: bytes) -> None:
    with open_atomic(path, "wb") as f:
        f.write(data)


def _sync_tree(folder: Path) -> None:
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        sync_folder(sub)
    sync_folder(folder)


def write_folder(target: Path, write: Callable[[Path], None],
                 accept_existing: Callable[[Path], bool] = lambda target: False) -> Path:
    """Writes a folder through ``write(tmp)`` into a temporary sibling, syncs every file in it,
    then renames it to ``target`` (which must not exist: see :func:`replace_folder`).

    ``accept_existing(target)``: when the rename fails because another process put a folder
    there first, whether that one will do (concurrent writers of one cache entry).
    """
    def move(tmp: Path, target: Path) -> Path:
        _sync_tree(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not accept_existing(target):
                raise
        sync_folder(target.parent)
        return target

    return _through_temporary(Path(target), write, move)


def _through_temporary(target: Path, write: Callable[[Path], None],
                       finish: Callable[[Path, Path], Path]) -> Path:
    """``write(tmp)`` into a fresh temporary sibling of ``target``, then ``finish(tmp, target)``;
    the temporary folder is gone afterwards, whatever happened."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(target)
    tmp.mkdir()
    try:
        write(tmp)
        return finish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_folder(tmp: Path, target: Path) -> Path:
    """Moves the complete folder ``tmp`` into place as ``target``, synced first. An old
    ``target`` is moved aside, not deleted, until the new one is in place: only the instant
    between two renames has no complete folder."""
    tmp, target = Path(tmp), Path(target)
    _sync_tree(tmp)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    sync_folder(target.parent)
    return target


def replace_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Writes ``target`` afresh through ``write(tmp)``; an old ``target`` is replaced only once
    the new one is complete (a failed write leaves the old one as it was)."""
    return _through_temporary(Path(target), write, commit_folder)
