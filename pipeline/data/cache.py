"""Tokenized splits reused across runs: the trials of a sweep and the seeds of a multirun
tokenize their data once.

The key is a fingerprint of everything the splits depend on: the data settings (``data``, its
mix sources with their own settings), the content of every local file they read (a hub
dataset by id, revision and split), the tokenizer (its vocabulary, special tokens and chat
template) and the versions of ``datasets``/``transformers``. An entry is a folder written
atomically (:mod:`pipeline.runs.atomic`) under ``paths.data_cache_dir``; one that cannot be read is
ignored with a warning and written again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pipeline.config.options import load_option, plain
from pipeline.config.schema import DataConfig
from pipeline.data.records import SPLITS, inside, source_files
from pipeline.runs import atomic

log = logging.getLogger(__name__)

# Bump when the tokenized rows or the stats change meaning. 2: a folder's split-named files are
# read as its splits (they were pooled), and stats["sources"] says which files made which split.
FORMAT = 2


def _files(path: str) -> List[Path]:
    local = Path(path).expanduser()
    return source_files(local) if local.exists() else []


def _content(path: Optional[str]) -> Any:
    """Digests of a local source's files, or None for a hub dataset (its settings key it)."""
    if not path:
        return None
    files = _files(path)
    if not files:
        return None
    root = Path(path).expanduser()
    digests = {}
    for file in files:
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        # By the path inside the folder: train/part1.jsonl and test/part1.jsonl are two files,
        # and a file moved between split folders changes the splits.
        digests[inside(file, root).as_posix() if root.is_dir() else file.name] = h.hexdigest()
    return digests


def _tokenizer(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    h.update(json.dumps({"template": getattr(tokenizer, "chat_template", None), "eos": tokenizer.eos_token,
                         "bos": tokenizer.bos_token, "pad": tokenizer.pad_token,
                         "special": tokenizer.all_special_tokens}, sort_keys=True, default=str).encode())
    return h.hexdigest()



def fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    """The cache key of the tokenized splits of data settings ``cfg``."""
    settings = plain(cfg)
    sources = [{"settings": settings, "files": {key: _content(getattr(cfg, key))
                                                for key in ("path", "validation_path", "test_path")}}]
    for source in cfg.mix:
        mixed = load_option("data", source.data, seed=cfg.seed, **dict(source.overrides))
        sources.append({"settings": plain(mixed), "files": {"path": _content(mixed.path)}})
    payload = {"format": FORMAT, "sources": sources, "tokenizer": _tokenizer(tokenizer),
               "packages": {p: version(p) for p in ("datasets", "transformers", "tokenizers")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def load(cache_dir: str, key: str) -> Optional[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """The cached ``({split: dataset or None}, stats)``, or None (absent, or unreadable: warned)."""
    import datasets  # lazy: datasets pulls in pyarrow and pandas (seconds); configs compose without it

    folder = Path(cache_dir).expanduser() / key
    if not folder.exists():
        return None
    try:
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        parts = {name: datasets.load_from_disk(str(folder / name)) if (folder / name).exists() else None
                 for name in SPLITS}
    except Exception as err:  # a partial or corrupt entry is never trusted
        log.warning("tokenized data cache entry %s is unreadable (%s: %s); tokenizing again",
                    folder, type(err).__name__, err)
        return None
    return parts, stats


def store(cache_dir: str, key: str, parts: Dict[str, Any], stats: Dict[str, Any]) -> None:
    """Writes the entry (``{split: dataset or None}`` and the stats) as one folder, atomically
    (readers see all of it or none)."""
    def write(tmp: Path) -> None:
        for name in SPLITS:
            part = parts.get(name)
            if part is not None:
                part.save_to_disk(str(tmp / name))
        (tmp / "stats.json").write_text(json.dumps(stats, sort_keys=True, default=str), encoding="utf-8")

    target = Path(cache_dir).expanduser() / key
    if target.exists():
        return
    try:
        atomic.write_folder(target, write, accept_existing=lambda t: (t / "stats.json").exists())
    except OSError as err:  # a cache is a convenience: the run goes on without it
        log.warning("could not store tokenized data in %s: %s", target, err)
