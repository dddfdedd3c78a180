"""Reading a data source: files, folders or a hub dataset into records, and records into chat
messages (``prompt_completion``, ``instruction``, ``messages`` and ShareGPT formats).

Every error names the file and line (or the record) and the fix; the format is detected from
the first record's fields unless ``data.format`` says otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from pipeline.config.errors import PipelineError
from pipeline.config.schema import DataConfig

log = logging.getLogger("pipeline.data")

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_FIELDS = {  # format -> the config keys naming its required fields (auto tries this order)
    "messages": ("messages_field",),
    "sharegpt": ("conversations_field",),
    "instruction": ("instruction_field", "output_field"),
    "prompt_completion": ("prompt_field", "completion_field"),
}


class DataError(PipelineError, ValueError):
    """Bad input data; the message names the file and line (or record) and the fix."""


def _jsonl_line_numbers(path: Path) -> List[int]:
    """Line numbers of the non-blank lines, i.e. of each record, in a JSON Lines file."""
    with path.open(encoding="utf-8") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def _first_bad_utf8_line(path: Path) -> Optional[str]:
    """The first line that is not UTF-8, as ``file:line: why``, or None."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"{path}:{n}: not valid UTF-8 (byte {raw[err.start]:#x} at column {err.start + 1})"
    return None


def _first_bad_json_line(path: Path) -> Optional[str]:
    """Where a JSON (one document) or JSON Lines file stops parsing, as ``file:line: why``."""
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
            return None
        except json.JSONDecodeError as err:
            return f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})"
            if not isinstance(record, dict):
                return f"{path}:{n}: expected a JSON object per line, got {type(record).__name__}"
    return None


def load_records(cfg: DataConfig, path: Optional[str] = None, split: Optional[str] = None,
                 key: str = "data.path") -> Tuple[Any, Callable[[int], str]]:
    """Loads the source as a ``datasets.Dataset`` plus a function naming each record's location.

    ``path`` (default ``cfg.path``) and ``split`` (a hub dataset's split, default
    ``cfg.source_split``) read another source of the same kind; ``key`` names it in errors.

    Raises:
        DataError: for a missing file, an unsupported extension, unparsable content or an
            unreachable hub dataset.
    """
    import datasets  # lazy: datasets pulls in pyarrow and pandas (seconds)

    source = path or cfg.path
    named = split is not None  # a split the user named (data.splits): also a local folder's
    split = split or cfg.source_split
    where = f"{key}={source!r}"
    path = Path(source).expanduser()
    if named and path.is_dir():
        # A folder of train/validation/test files: datasets assigns files to splits by their names.
        try:
            ds = datasets.load_dataset(str(path), split=split)
        except Exception as err:
            bad = next((b for f in sorted(path.iterdir()) if f.suffix in (".jsonl", ".json")
                        for b in [_first_bad_utf8_line(f) or _first_bad_json_line(f)] if b), None)
            raise DataError(bad or f"{where}: no split {split!r} in the folder (files are assigned to "
                                   f"splits by name, e.g. {split}.jsonl): {err}") from err
        return ds, lambda i: f"{source}[{split}] record {i}"
    if path.exists():
        files = source_files(path)
        if not files:
            raise DataError(f"{where}: the folder holds no {', '.join(LOADERS)} files")
        if files[0].suffix not in LOADERS:
            raise DataError(f"{where}: unsupported file type; use one of {', '.join(LOADERS)}")
        if all(not f.read_bytes().strip() for f in files):  # the loaders' own error says nothing
            raise DataError(f"{where} holds no records (empty file)")
        bad = next((b for f in files if f.suffix != ".parquet" for b in [_first_bad_utf8_line(f)] if b), None)
        if bad:
            raise DataError(bad)
        suffix = files[0].suffix
        try:
            ds = datasets.load_dataset(LOADERS[suffix], data_files=[str(f) for f in files],
                                       split="train")
        except Exception as err:  # datasets/pyarrow errors name neither file nor line
            bad = next((b for f in files if f.suffix in (".jsonl", ".json")
                        for b in [_first_bad_json_line(f)] if b), None)
            raise DataError(bad or f"{where}: cannot be read as {suffix}: {err}") from err
        if suffix == ".jsonl" and len(files) == 1:
            lines = _jsonl_line_numbers(files[0])
            return ds, lambda i: f"{files[0]}:{lines[i]}"
        return ds, lambda i: f"{source} record {i}"
    if path.suffix in LOADERS or source.startswith(("/", ".", "~")):
        raise DataError(f"{where} does not exist")
    try:
        ds = datasets.load_dataset(source, name=cfg.subset, split=split, revision=cfg.revision)
    except Exception as err:
        raise DataError(f"{where} is not a local file and could not be loaded from the hub "
                        f"(split {split!r}): {err}") from err
    return ds, lambda i: f"{source}[{split}] record {i}"


def source_files(path: Path) -> List[Path]:
    """The files a local source reads: a file itself, or a folder's data files (by suffix)."""
    return sorted(p for p in path.iterdir() if p.suffix in LOADERS) if path.is_dir() else [path]


def detect_format(cfg: DataConfig, columns: List[str]) -> str:
    """Returns ``cfg.format``, or for ``auto`` the format whose fields the columns have."""
    if cfg.format != "auto":
        return cfg.format
    for fmt, keys in FORMAT_FIELDS.items():
        if all(getattr(cfg, k) in columns for k in keys):
            return fmt
    raise DataError(f"data.path={cfg.path!r}: cannot tell the format from the columns {columns}; "
                    "expected prompt/completion, instruction/output (+input), messages or "
                    "conversations (ShareGPT), or set data.format and the data.*_field names")


def _text(record: Dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: field {key!r} must be a string, but it is {got}; "
                        f"fields present: {sorted(record)}")
    return value


def _messages(record: Dict[str, Any], key: str, where: str) -> List[Dict[str, str]]:
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of "
                        f"{{role, content}} messages; fields present: {sorted(record)}")
    messages = []
    for n, turn in enumerate(turns):
        if (not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant")
                or not isinstance(turn.get("content"), str)):
            raise DataError(f"{where}: {key}[{n}] must be {{'role': system|user|assistant, "
                            f"'content': str}}, got {turn!r:.120}")
        messages.append({"role": turn["role"], "content": turn["content"]})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (it is trained on)")
    return messages


def _sharegpt(record: Dict[str, Any], cfg: DataConfig, where: str) -> List[Dict[str, str]]:
    """ShareGPT turns (``{"from": "human", "value": ...}``) as chat messages."""
    key, roles = cfg.conversations_field, dict(cfg.sharegpt_roles)
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of {{from, value}} turns; "
                        f"fields present: {sorted(record)}")
    converted = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in roles:
            raise DataError(f"{where}: {key}[{n}] must be {{'from': {'|'.join(roles)}, 'value': str}}, "
                            f"got {turn!r:.120}; map another speaker with +data.sharegpt_roles.<speaker>=user|assistant|system")
        converted.append({"role": roles[turn["from"]], "content": turn["value"]})
    return _messages({key: converted}, key, where)


def to_messages(record: Dict[str, Any], fmt: str, cfg: DataConfig, where: str) -> List[Dict[str, str]]:
    """Maps one record of format ``fmt`` onto chat messages, validating its fields."""
    if fmt == "messages":
        messages = _messages(record, cfg.messages_field, where)
    elif fmt == "sharegpt":
        messages = _sharegpt(record, cfg, where)
    else:
        if fmt == "instruction":
            prompt = _text(record, cfg.instruction_field, where)
            extra = _text(record, cfg.input_field, where, required=False)
            prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
            answer = _text(record, cfg.output_field, where)
        else:
            prompt = _text(record, cfg.prompt_field, where)
            answer = _text(record, cfg.completion_field, where)
        if not answer.strip():
            raise DataError(f"{where}: the completion is empty; there is nothing to train on")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}] + messages
    return messages
