"""Data stage: load -> conversations -> split -> tokenize with a loss mask -> collate.

Every record becomes a list of chat messages (``prompt_completion``, ``instruction`` and
``messages`` formats all map onto it), so one renderer and one masking rule serve them all:
the loss covers the assistant turns (the completion) and the end-of-turn marker, nothing else.
Masks come from character offsets of the rendered text, which works for any fast tokenizer and
any chat template whose rendering of a conversation prefix is a prefix of the whole.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from pipeline.config import DataConfig, PipelineError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_FIELDS = {  # format -> the config keys naming its required fields (auto tries this order)
    "messages": ("messages_field",),
    "sharegpt": ("conversations_field",),
    "instruction": ("instruction_field", "output_field"),
    "prompt_completion": ("prompt_field", "completion_field"),
}


class DataError(PipelineError, ValueError):
    """Bad input data; the message names the file and line (or record) and the fix."""


@dataclass
class Example:
    """One conversation and where it came from (``file:line`` or ``record N``)."""

    messages: List[Dict[str, str]]
    where: str
    source: str = "main"  # data.mix's "<index>:<option>" for a mixed-in example


@dataclass
class Splits:
    """Tokenized splits (``input_ids``, ``labels``, ``prompt``, ``reference`` columns)."""

    train: Any
    validation: Optional[Any]
    test: Optional[Any]
    stats: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- loading


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
    import datasets

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


# --------------------------------------------------------------------------- records -> messages


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


# --------------------------------------------------------------------------- rendering + masking


def render(messages: List[Dict[str, str]], tokenizer: Any, template: str, train_on: str = "all"
           ) -> Tuple[str, List[Tuple[int, int]], str]:
    """Renders a conversation to text.

    Returns:
        ``(text, spans, prompt)``: the full text, the character spans the loss covers (each
        assistant turn with its end-of-turn marker, or only the last with ``train_on="last"``),
        and the text up to the last assistant turn's generation prompt (what a model is given
        at evaluation).
    """
    if template == "plain":
        prompt = "\n\n".join(m["content"] for m in messages[:-1]) + "\n"
        text = prompt + messages[-1]["content"] + (tokenizer.eos_token or "")
        return text, [(len(prompt), len(text))], prompt

    def chat(turns: List[Dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = chat(messages, False)
    spans, prompt = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = chat(messages[:i], True)
        upto = chat(messages[: i + 1], False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise DataError("the tokenizer's chat template does not render a conversation's "
                            "prefix as a prefix of the whole, so assistant turns cannot be "
                            "located; use data.template=plain")
        spans.append((len(prompt), len(upto)))
    return text, spans[-1:] if train_on == "last" else spans, prompt


def tokenize(text: str, spans: List[Tuple[int, int]], tokenizer: Any, template: str
             ) -> Tuple[List[int], List[int]]:
    """Token ids and labels: tokens starting inside a span keep their id, others are ignored."""
    encoded = tokenizer(text, add_special_tokens=template == "plain", return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = any(s <= start < e for s, e in spans) and end > start
        labels.append(token if inside else IGNORE_INDEX)
    return list(encoded["input_ids"]), labels


# --------------------------------------------------------------------------- split


def _split_size(size: float, n: int, cap: Optional[int], key: str) -> int:
    """A count as is; a fraction of ``n``, capped at ``cap`` examples (logged when it bites)."""
    if size >= 1:
        return int(size)
    count = int(round(size * n))
    if cap is not None and count > cap:
        log.info("data.%s=%g of %d examples is %d: capped at %d by data.max_%s_examples (the rest "
                 "trains; set it to null for no cap)", key, size, n, count, cap,
                 key.split("_")[0])
        return cap
    return count


def split_examples(examples: List[Example], cfg: DataConfig,
                   given: Optional[Dict[str, List[Example]]] = None) -> Dict[str, List[Example]]:
    """Deterministic train/validation/test split: a seeded shuffle, then test, validation, train.

    ``given``: held-out sets the user brought (``data.validation_path``/``test_path`` or a hub
    dataset's ``data.splits``): used as they are, nothing is carved from ``examples`` for them;
    a count ``data.<set>_size >= 1`` takes that many of them (a seeded sample), a fraction
    keeps them all.
    """
    given = given or {}
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    n_test = 0 if "test" in given else _split_size(cfg.test_size, len(order), cfg.max_test_examples, "test_size")
    n_val = 0 if "validation" in given else _split_size(cfg.validation_size, len(order),
                                                        cfg.max_validation_examples, "validation_size")
    if n_test + n_val >= len(order):
        raise DataError(f"data: {len(order)} examples cannot hold data.test_size={cfg.test_size} "
                        f"and data.validation_size={cfg.validation_size} and still train; "
                        "make them smaller or add data")
    picked = [examples[i] for i in order]
    parts = {"test": picked[:n_test], "validation": picked[n_test:n_test + n_val],
             "train": picked[n_test + n_val:]}
    for name, held_out in given.items():
        size = cfg.test_size if name == "test" else cfg.validation_size
        if size >= 1 and int(size) < len(held_out):
            keep = sorted(random.Random(cfg.seed).sample(range(len(held_out)), int(size)))
            log.info("data.%s_size=%d: %d of the %d given %s examples", name, size, len(keep), len(held_out), name)
            held_out = [held_out[i] for i in keep]
        parts[name] = held_out
    return parts


def held_out_sources(cfg: DataConfig) -> Dict[str, Tuple[str, Optional[str], str]]:
    """Held-out sets the user brought: ``{split: (path, hub split, config key)}``."""
    sources = {}
    for name in ("validation", "test"):
        if getattr(cfg, f"{name}_path"):
            sources[name] = (getattr(cfg, f"{name}_path"), None, f"data.{name}_path")
        elif name in (cfg.splits or {}):
            sources[name] = (cfg.path, cfg.splits[name], f"data.splits.{name}")
    return sources


def mixed_in(cfg: DataConfig, train: int) -> Dict[str, List[Example]]:
    """``{source name: examples}`` that ``data.mix`` adds to a training split of ``train``
    examples: a seeded sample of each source's own training split."""
    from pipeline.config import load_option

    added = {}
    for i, source in enumerate(cfg.mix):
        source_cfg = load_option("data", source.data, seed=cfg.seed, **dict(source.overrides))
        if source_cfg.mix:
            raise DataError(f"data.mix[{i}] ({source.data}) has a mix of its own; mixes do not nest")
        _, _, parts = load_parts(source_cfg)
        pool = parts["train"]
        wanted = source.examples if source.examples is not None else int(round(source.fraction * train))
        if wanted > len(pool):
            log.warning("data.mix[%d] (%s): %d examples asked for, its training split has %d; taking all",
                        i, source.data, wanted, len(pool))
            wanted = len(pool)
        picked = sorted(random.Random(cfg.seed + i).sample(range(len(pool)), wanted))
        added[f"{i}:{source.data}"] = [pool[j] for j in picked]
    return added


def _read_examples(cfg: DataConfig, path: Optional[str] = None, split: Optional[str] = None,
                   key: str = "data.path") -> Tuple[str, List[Example]]:
    """``(format, examples)`` of one source (:func:`load_records`' arguments), every record
    converted to messages."""
    records, where = load_records(cfg, path, split, key)
    if len(records) == 0:
        raise DataError(f"{key}={path or cfg.path!r} holds no records")
    fmt = detect_format(cfg, list(records.column_names))
    return fmt, [Example(to_messages(r, fmt, cfg, where(i)), where(i)) for i, r in enumerate(records)]


def load_parts(cfg: DataConfig) -> Tuple[str, int, Dict[str, List[Example]]]:
    """``(format, records, {train, validation, test: examples})``: the source converted and split,
    or kept as split when the user brought held-out sets; ``data.mix`` sources join train."""
    fmt, examples = _read_examples(cfg, split=(cfg.splits or {}).get("train"))
    given = {name: _read_examples(cfg, path, split, key)[1]
             for name, (path, split, key) in held_out_sources(cfg).items()}
    parts = split_examples(examples, cfg, given)
    for source, added in mixed_in(cfg, len(parts["train"])).items():
        for ex in added:
            ex.source = source
        parts["train"] = parts["train"] + added
    return fmt, len(examples), parts


def source_counts(parts: Dict[str, List[Example]]) -> Dict[str, Dict[str, int]]:
    """Examples per source per split (``main`` is ``data.path``), before tokenization."""
    counts: Dict[str, Dict[str, int]] = {}
    for name, examples in parts.items():
        for ex in examples:
            counts.setdefault(ex.source, {}).setdefault(name, 0)
            counts[ex.source][name] += 1
    return counts


# --------------------------------------------------------------------------- leakage


def _normalized(text: str) -> str:
    import re
    import unicodedata

    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _keys(example: Example) -> Tuple[str, str]:
    """(exact: the whole conversation, normalised: its prompt, the turns before the last answer
    without the system prompt)."""
    exact = json.dumps(example.messages, ensure_ascii=False)
    prompt = " ".join(m["content"] for m in example.messages[:-1] if m["role"] != "system")
    return exact, _normalized(prompt)


def overlap(parts: Dict[str, List[Example]]) -> Dict[str, Any]:
    """How many validation/test examples also occur in train: the same conversation (exact) or
    the same prompt once case, whitespace and punctuation are ignored (normalised, which
    includes exact), and how many train examples are involved."""
    exact_train, prompt_train = {}, {}
    for i, ex in enumerate(parts["train"]):
        exact, prompt = _keys(ex)
        exact_train.setdefault(exact, []).append(i)
        prompt_train.setdefault(prompt, []).append(i)
    found: Dict[str, Any] = {}
    involved = set()
    for name in ("validation", "test"):
        keys = [_keys(ex) for ex in parts[name]]
        found[name] = {"exact": sum(k[0] in exact_train for k in keys),
                       "normalized": sum(k[1] in prompt_train for k in keys), "examples": len(keys)}
        involved.update(i for k in keys for i in prompt_train.get(k[1], []))
    found["train_examples"] = len(involved)
    return found


def warn_overlap(found: Dict[str, Any]) -> None:
    """Logs the held-out sets' overlap with train (:func:`overlap`), when there is any."""
    for name in ("validation", "test"):
        if found[name]["normalized"]:
            log.warning("data: %d of %d %s examples also occur in train (%d exactly, the others with "
                        "the same prompt up to case, spaces and punctuation); their metrics measure "
                        "recall, not generalisation: data.dedup=true removes the %d train examples",
                        found[name]["normalized"], found[name]["examples"], name, found[name]["exact"],
                        found["train_examples"])


def without_overlap(parts: Dict[str, List[Example]]) -> Tuple[List[Example], int]:
    """Train without the examples whose prompt (normalised) occurs in validation or test."""
    held_out = {_keys(ex)[1] for name in ("validation", "test") for ex in parts[name]}
    kept = [ex for ex in parts["train"] if _keys(ex)[1] not in held_out]
    return kept, len(parts["train"]) - len(kept)


def _encode_split(examples: List[Example], tokenizer: Any, cfg: DataConfig, name: str
                  ) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    rows, counts = [], {"dropped_too_long": 0, "truncated": 0}
    for ex in examples:
        text, spans, prompt = render(ex.messages, tokenizer, cfg.template, cfg.train_on)
        input_ids, labels = tokenize(text, spans, tokenizer, cfg.template)
        if len(input_ids) > cfg.max_length:
            if cfg.truncation == "error":
                raise DataError(f"{ex.where}: {len(input_ids)} tokens exceed data.max_length="
                                f"{cfg.max_length}; raise it, or set data.truncation=drop|truncate")
            if cfg.truncation == "drop" or all(t == IGNORE_INDEX for t in labels[: cfg.max_length]):
                counts["dropped_too_long"] += 1
                continue
            input_ids, labels = input_ids[: cfg.max_length], labels[: cfg.max_length]
            counts["truncated"] += 1
        rows.append({"input_ids": input_ids, "labels": labels, "prompt": prompt,
                     "reference": ex.messages[-1]["content"]})
    if examples and not rows:
        raise DataError(f"data: every one of the {len(examples)} {name} examples is longer than "
                        f"data.max_length={cfg.max_length} tokens; raise data.max_length")
    return rows, counts


def build_datasets(cfg: DataConfig, tokenizer: Any, cache_dir: Optional[str] = None) -> Splits:
    """Loads, converts, splits and tokenizes the data described by ``cfg``.

    ``cache_dir``: reuse (and keep) the tokenized splits under a fingerprint of the data, its
    settings and the tokenizer (:mod:`pipeline.data_cache`); ``stats["tokenization"]`` says
    ``tokenized`` or ``cached``.

    Raises:
        DataError: for malformed records (naming file:line), empty splits or bad settings.
    """
    import datasets

    key = None
    if cache_dir:
        from pipeline import data_cache

        key = data_cache.fingerprint(cfg, tokenizer)
        cached = data_cache.load(cache_dir, key)
        if cached is not None:
            log.info("data: tokenized splits reused from the cache (fingerprint %s)", key[:12])
            cached.stats["tokenization"] = "cached"
            warn_overlap(cached.stats["overlap"])
            return cached
    fmt, records, parts = load_parts(cfg)
    stats: Dict[str, Any] = {"format": fmt, "records": records, "overlap": overlap(parts),
                             "held_out": sorted(held_out_sources(cfg)), "tokenization": "tokenized"}
    warn_overlap(stats["overlap"])
    if cfg.dedup and stats["overlap"]["train_examples"]:
        parts["train"], removed = without_overlap(parts)
        stats["overlap"]["removed_from_train"] = removed
        log.info("data.dedup: removed %d train examples that also occur in validation/test", removed)
    stats["sources"] = source_counts(parts)  # after dedup: the examples that go on to tokenization
    out = {}
    for name, part in parts.items():
        rows, counts = _encode_split(part, tokenizer, cfg, name)
        stats[name] = {"examples": len(rows), **counts,
                       "label_tokens": sum(sum(t != IGNORE_INDEX for t in r["labels"]) for r in rows),
                       "tokens": sum(len(r["input_ids"]) for r in rows)}
        out[name] = datasets.Dataset.from_list(rows) if rows else None
    if out["train"] is None:
        raise DataError("data: the train split is empty")
    splits = Splits(train=out["train"], validation=out["validation"], test=out["test"], stats=stats)
    if key:
        data_cache.store(cache_dir, key, splits)
    return splits


def pack_rows(lengths: List[int], capacity: int) -> List[List[int]]:
    """Indices of ``lengths`` grouped into as few rows of at most ``capacity`` tokens as
    first-fit decreasing finds, balanced across those rows.

    First-fit decreasing (longest first, each into the first row with room) sets the number of
    rows; the examples are then dealt, longest first, to the least-filled of those rows, so that
    the longest row, which sets the batch's width, is as short as it can easily be (FFD alone
    fills its first rows and leaves the last nearly empty, all padding). When dealing cannot fit
    every example under ``capacity``, the FFD rows are kept.

    Raises:
        ValueError: when one length alone exceeds ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: List[List[int]] = []
    free: List[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"an example of {lengths[i]} tokens does not fit in data.pack_length="
                             f"{capacity}; raise data.pack_length to at least data.max_length")
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    balanced: List[List[int]] = [[] for _ in rows]
    fill = [0] * len(rows)
    for i in order:
        row = min(range(len(rows)), key=fill.__getitem__)
        if fill[row] + lengths[i] > capacity:
            return rows
        balanced[row].append(i)
        fill[row] += lengths[i]
    return balanced


class PackingCollator:
    """Padding-free batches of rows of at most ``pack_length`` tokens.

    The examples of a batch are bin-packed (:func:`pack_rows`) into rows; each row is
    transformers' ``DataCollatorWithFlattening`` of its examples (position ids restarting per
    example, the first label of each example ignored so that no example predicts the next one's
    first token), and the rows' tails are a padding segment of its own (pad ids, labels ignored,
    positions from 0), so that the rows stack to ``[rows, width]`` with ``width`` the longest
    row rounded up to a multiple of 8 (at most ``pack_length``). No attention mask: transformers
    then derives a block-diagonal causal mask from ``position_ids`` (sdpa, eager; flash
    attention reads the boundaries from them directly), provided the model runs with
    ``use_cache=False`` (with a mask or a cache, packed examples would attend to each other).

    ``DataCollatorWithFlattening`` alone puts the whole batch into a single row, whose attention
    cost grows with the square of the batch's total length; it cannot split a batch into rows
    of a token budget, nor pad rows to a common width.
    """

    def __init__(self, pad_token_id: int, pack_length: int):
        from transformers import DataCollatorWithFlattening

        self.pad_token_id = pad_token_id
        self.pack_length = pack_length
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        import torch

        features = [{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in features]
        rows = pack_rows([len(f["input_ids"]) for f in features], self.pack_length)
        fills = [sum(len(features[i]["input_ids"]) for i in row) for row in rows]
        width = min(self.pack_length, -(-max(fills) // 8) * 8)
        parts = []
        for row, fill in zip(rows, fills):
            segments = [features[i] for i in row]
            if width > fill:
                segments.append({"input_ids": [self.pad_token_id] * (width - fill),
                                 "labels": [IGNORE_INDEX] * (width - fill)})
            parts.append(self.flatten(segments, return_tensors="pt"))
        return {key: torch.cat([p[key] for p in parts]) for key in ("input_ids", "labels", "position_ids")}


def real_tokens(batch: Dict[str, Any]) -> int:
    """Tokens of real examples in a batch: those under the attention mask of a padded batch; in
    a packed batch, all but each row's trailing padding segment (the last segment, when all its
    labels are ignored and all its ids are the padding id of its first token)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    total = 0
    for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        start = int((positions == 0).nonzero()[-1])
        tail = ids[start:]
        padding = bool((labels[start:] == IGNORE_INDEX).all() and (tail == tail[0]).all()) and start > 0
        total += start if padding else len(ids)
    return total


def collator(tokenizer: Any, packing: bool, pack_length: int = 512) -> Any:
    """Padding collator, or a padding-free one (:class:`PackingCollator`, rows of at most
    ``pack_length`` tokens, position ids restarting per example)."""
    from transformers import DataCollatorForSeq2Seq

    if packing:
        return PackingCollator(tokenizer.pad_token_id, pack_length)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=8)


if __name__ == "__main__":  # python -m pipeline.data [overrides]: the preview (pipeline/data_preview.py)
    import sys

    from pipeline.data_preview import main

    sys.exit(main(sys.argv[1:]))
