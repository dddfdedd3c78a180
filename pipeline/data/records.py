"""Reading a data source: files, folders (their files assigned to splits by name, as
``datasets`` does) or a hub dataset into records, and records into chat messages
(``prompt_completion``, ``instruction``, ``messages`` and ShareGPT formats).

Every error names the file and line (or the record) and the fix; the format is detected from
the first record's fields unless ``data.format`` says otherwise.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from pipeline.config.errors import PipelineError
from pipeline.config.schema import DataConfig

log = logging.getLogger("pipeline.data")

SPLITS = ("train", "validation", "test")
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_FIELDS = {  # format -> the config keys naming its required fields (auto tries this order)
    "messages": ("messages_field",),
    "sharegpt": ("conversations_field",),
    "instruction": ("instruction_field", "output_field"),
    "prompt_completion": ("prompt_field", "completion_field"),
}


class DataError(PipelineError, ValueError):
    """Bad input data; the message names the file and line (or record) and the fix."""


@dataclass(frozen=True)
class Origin:
    """Where one split's records come from.

    Attributes:
        key: the setting that names the source (``data.path``, ``data.test_path``,
            ``data.splits.test``), for errors and the log.
        path: the file, folder or hub dataset id, as set.
        split: a hub dataset's split, or the split a folder's file names give; None for a file
            or a folder read whole.
        files: the local files read, in order; empty for a hub dataset.
    """

    key: str
    path: str
    split: Optional[str] = None
    files: Tuple[Path, ...] = ()

    def names(self) -> List[str]:
        """What is read, for the log and ``run.json``: the files, or a hub dataset's ``id[split]``."""
        return [str(f) for f in self.files] or [f"{self.path}[{self.split}]"]

    def described(self) -> str:
        """The setting and, for a folder's split, the split: how errors name the source."""
        return f"{self.key}={self.path!r}" + (f" (split {self.split})" if self.split and self.files else "")


@dataclass(frozen=True)
class FolderLayout:
    """A local folder's data files by split (:func:`folder_layout`).

    Attributes:
        splits: split name -> its files. A folder whose names give no split has one, ``train``,
            holding every data file.
        named: whether file or sub-folder names gave the splits.
        files: every data file in the folder, split-named or not.
    """

    splits: Dict[str, Tuple[Path, ...]]
    named: bool
    files: Tuple[Path, ...]

    def unread(self, read: Iterable[Path]) -> List[Path]:
        """The data files not among ``read``."""
        return sorted(set(self.files) - set(read))


def data_files(folder: Path) -> List[Path]:
    """Every data file in a folder and its sub-folders, as ``datasets`` lists them (hidden files
    and folders left out), sorted."""
    from datasets.data_files import resolve_pattern  # lazy: datasets pulls in pyarrow and pandas (seconds)

    try:
        found = resolve_pattern("**", str(folder), allowed_extensions=list(LOADERS))
    except FileNotFoundError:
        return []
    # allowed_extensions admits any chain of suffixes holding one of ours (train.jsonl.gz); the
    # loaders here are chosen by the last suffix, so a compressed file is not a data file.
    return sorted(Path(f) for f in found if Path(f).suffix in LOADERS)


def inside(path: Path, folder: Path) -> Path:
    """``path`` relative to ``folder``, whether either is given absolute or relative (``datasets``
    lists a folder's files with absolute paths)."""
    return Path(os.path.relpath(path, folder))


def folder_layout(folder: Path, key: str) -> FolderLayout:
    """A folder's data files assigned to splits by their names, as ``datasets.load_dataset(folder)``
    assigns them: ``train``/``training``, ``validation``/``valid``/``val``/``dev`` and
    ``test``/``testing``/``eval``/``evaluation`` as a word of a file or sub-folder name
    (``train.jsonl``, ``my_dev-2.csv``, ``test/part1.jsonl``), or shards such as
    ``data/train-00000-of-00002.jsonl`` (whose split may have any name).

    Raises:
        DataError: the folder holds no data file, or a file's name gives it two splits.
    """
    from datasets import data_files as hf_files  # lazy: datasets pulls in pyarrow and pandas (seconds)

    where = f"{key}={str(folder)!r}"
    files = tuple(data_files(folder))
    if not files:
        raise DataError(f"{where}: the folder holds no {', '.join(LOADERS)} files")
    # datasets' own search (the one behind its public get_data_patterns), given a resolver that
    # sees only the files we read: get_data_patterns looks at every file, so `images/train/*.png`
    # or a `*.eval` log beside train.jsonl and test.jsonl would decide the layout alone and leave
    # the data files out of every split.
    resolve = functools.partial(hf_files.resolve_pattern, base_path=str(folder), allowed_extensions=list(LOADERS))
    try:
        patterns = hf_files._get_data_files_patterns(resolve)
    except ValueError as err:  # a shard's split name datasets refuses (data/my split-00000-of-00001.csv)
        raise DataError(f"{where}: {err}; rename the shards <split>-00000-of-00001.<ext>") from err
    resolved = hf_files.DataFilesDict.from_patterns(patterns, base_path=str(folder),
                                                    allowed_extensions=list(LOADERS))
    splits = {str(name): tuple(sorted(Path(f) for f in found if Path(f).suffix in LOADERS))
              for name, found in resolved.items()}
    splits = {name: found for name, found in splits.items() if found}
    if patterns == hf_files.DEFAULT_PATTERNS_ALL or not splits:
        # No split name, or the names were only on compressed files: one pool, as datasets reads it.
        return FolderLayout({"train": files}, named=False, files=files)
    claimed: Dict[Path, List[str]] = {}
    for name, found in splits.items():
        for f in found:
            claimed.setdefault(f, []).append(name)
    twice = {f: names for f, names in claimed.items() if len(names) > 1}
    if twice:
        f, names = next(iter(twice.items()))
        raise DataError(f"{where}: {inside(f, folder)} has the names of {len(names)} splits "
                        f"({', '.join(names)}) in its path, so it would be read into each; rename it "
                        "so that one split name remains")
    return FolderLayout(splits, named=True, files=files)


def locate(path: str, key: str, split: str) -> Origin:
    """Where a source's records are: a local file, every data file of a local folder (read whole,
    split names or not), or ``split`` of a hub dataset.

    Raises:
        DataError: a path that looks local but does not exist, or a folder without data files.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return Origin(key, path, None, folder_layout(local, key).files)
    if local.exists():
        return Origin(key, path, None, (local,))
    if local.suffix in LOADERS or path.startswith(("/", ".", "~")):
        raise DataError(f"{key}={path!r} does not exist")
    return Origin(key, path, split)


def _first_bad_utf8_line(path: Path) -> Optional[str]:
    """The first line that is not UTF-8, as ``file:line: why``, or None."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"{path}:{n}: not valid UTF-8 (byte {raw[err.start]:#x} at column {err.start + 1})"
    return None


def _record_lines(path: Path) -> Optional[List[int]]:
    """Checks a JSON Lines (or JSON) file line by line, before ``datasets`` reads it: on bad JSON,
    datasets logs pyarrow's error (its rows counted from 0, blank lines not counted) before
    raising one that names no line.

    Returns:
        The line number of each record, or None for a ``.json`` file that is one document.

    Raises:
        DataError: naming ``file:line`` (1-based) and what is wrong there.
    """
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as err:
            as_document = f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
        # datasets reads JSON Lines from a .json file too: it is taken as such when its first
        # line is a JSON value of its own, and otherwise reported as one document.
        first = next((line for line in text.splitlines() if line.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:
            raise DataError(as_document) from None
    lines = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno}); "
                                "each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(record).__name__}")
            lines.append(n)
    return lines


def _checked(origin: Origin) -> Tuple[str, Optional[List[Tuple[Path, int]]]]:
    """``(suffix, (file, line) of each record or None)`` of a local origin, its files checked
    before any loader reads them.

    Raises:
        DataError: mixed or unsupported file types, no records, text that is not UTF-8 or JSON.
    """
    where = origin.described()
    suffixes = sorted({f.suffix for f in origin.files})
    if len(suffixes) > 1:
        raise DataError(f"{where}: its files mix {', '.join(suffixes)} "
                        f"({', '.join(str(f) for f in origin.files)}); one set's files share one "
                        "format: convert them to one, or move the others out")
    suffix = suffixes[0]
    if suffix not in LOADERS:
        raise DataError(f"{where}: unsupported file type; use one of {', '.join(LOADERS)}")
    if all(not f.read_bytes().strip() for f in origin.files):  # the loaders' own error says nothing
        raise DataError(f"{where} holds no records (empty file)")
    if suffix == ".parquet":
        return suffix, None
    bad = next((b for f in origin.files for b in [_first_bad_utf8_line(f)] if b), None)
    if bad:
        raise DataError(bad)
    if suffix == ".csv":
        return suffix, None
    located: List[Tuple[Path, int]] = []
    for f in origin.files:
        lines = _record_lines(f)
        if lines is None:  # a JSON document: its records have no line of their own
            return suffix, None
        located += [(f, n) for n in lines]
    return suffix, located


def _json_fields(path: Path) -> Set[str]:
    """The fields of a (checked) JSON or JSON Lines file's records."""
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text)
        rows = document if isinstance(document, list) else [document]
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {key for row in rows if isinstance(row, dict) for key in row}


def _unreadable(origin: Origin, suffix: str, err: Exception) -> str:
    """Why the loader could not read checked files: JSON files whose fields differ, or the
    library's own reason (its outer error says only that generating the dataset failed)."""
    where = origin.described()
    if suffix in (".jsonl", ".json") and len(origin.files) > 1:
        first = _json_fields(origin.files[0])
        for f in origin.files[1:]:
            extra = _json_fields(f) - first
            if extra:
                # datasets takes the first file's columns as the set's and refuses a file with more.
                return (f"{where}: {f} has fields {sorted(extra)} that {origin.files[0]} has not; the files "
                        "of one set are read with the first file's fields: give every file the same fields "
                        "(null where a record has no value)")
    cause = err.__cause__ or err
    return f"{where}: cannot be read as {suffix}: {type(cause).__name__}: {cause}"


def load_records(cfg: DataConfig, origin: Origin) -> Tuple[Any, Callable[[int], str]]:
    """Loads one origin's records as a ``datasets.Dataset`` plus a function naming each record's
    location (``file:line`` for JSON Lines, ``record N`` otherwise).

    Raises:
        DataError: for unreadable or malformed files (naming ``file:line``) or an unreachable hub
            dataset.
    """
    import datasets  # lazy: datasets pulls in pyarrow and pandas (seconds)

    if not origin.files:
        try:
            ds = datasets.load_dataset(origin.path, name=cfg.subset, split=origin.split, revision=cfg.revision)
        except Exception as err:
            raise DataError(f"{origin.key}={origin.path!r} is not a local file and could not be loaded "
                            f"from the hub (split {origin.split!r}): {err}") from err
        return ds, lambda i: f"{origin.path}[{origin.split}] record {i}"
    suffix, located = _checked(origin)
    try:
        ds = datasets.load_dataset(LOADERS[suffix], data_files=[str(f) for f in origin.files], split="train")
    except Exception as err:  # datasets/pyarrow errors name neither file nor line
        raise DataError(_unreadable(origin, suffix, err)) from err
    if located is not None and len(located) == len(ds):  # the loader keeps the files' order
        return ds, lambda i: f"{located[i][0]}:{located[i][1]}"
    label = origin.files[0] if len(origin.files) == 1 else origin.path
    return ds, lambda i: f"{label} record {i}"


def source_files(path: Path) -> List[Path]:
    """The files a local source can read: a file itself, or every data file of a folder."""
    return data_files(path) if path.is_dir() else [path]


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


def _present(record: Dict[str, Any]) -> List[str]:
    """The fields a record has. ``datasets`` gives every record each column of its file, None
    where the record has none, so a None counts as absent (JSON's null as well: after loading
    the two are one)."""
    return sorted(k for k, v in record.items() if v is not None)


def _text(record: Dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: field {key!r} must be a string, but it is {got}; "
                        f"fields present: {_present(record)}")
    return value


def _messages(record: Dict[str, Any], key: str, where: str) -> List[Dict[str, str]]:
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of "
                        f"{{role, content}} messages; fields present: {_present(record)}")
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
                        f"fields present: {_present(record)}")
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
