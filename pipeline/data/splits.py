"""Data stage: load -> conversations -> split -> tokenize with a loss mask (-> collate).

Reading sources and their formats is :mod:`pipeline.data.records`; batching is
:mod:`pipeline.data.packing`; tokenized splits are reused across runs through
:mod:`pipeline.data.cache`.

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
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pipeline.config.options import load_option
from pipeline.config.schema import DataConfig
from pipeline.data import cache
from pipeline.data.packing import IGNORE_INDEX
from pipeline.data.records import (SPLITS, DataError, FolderLayout, Origin, detect_format, folder_layout, inside,
                                   load_records, locate, to_messages)

log = logging.getLogger(__name__)

HELD_OUT = ("validation", "test")
# How to name a folder's files so that they are read as splits (datasets' own rules).
NAMING = ("train.jsonl, validation.jsonl, test.jsonl (valid, val, dev, testing and eval count too, and so do "
          "shards such as train-00000-of-00002.jsonl and sub-folders train/, validation/, test/)")


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

    ``given``: held-out sets the user brought (``data.validation_path``/``test_path``, a hub
    dataset's ``data.splits`` or the split-named files of a ``data.path`` folder): used as they
    are, nothing is carved from ``examples`` for them; a count ``data.<set>_size >= 1`` takes
    that many of them (a seeded sample), a fraction keeps them all.
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


@dataclass(frozen=True)
class SplitPlan:
    """Where the main source's splits come from (:func:`split_plan`).

    Attributes:
        origins: ``train``, and each held-out set the user brought (a file or folder, a hub
            dataset's split, a split of ``data.path``'s folder); a held-out set absent from it
            is carved from train.
        unread: the data files in ``data.path``'s folder that no split reads.
    """

    origins: Dict[str, Origin]
    unread: Tuple[Path, ...] = ()


@dataclass
class Loaded:
    """The examples of each split before tokenization, and where they came from (:func:`load_parts`).

    Attributes:
        format: the main source's data format.
        records: the main source's training records, before any were carved out.
        parts: ``{train, validation, test: examples}``; ``data.mix`` sources are in train.
        plan: where the main source's splits come from.
        mixed: ``data.mix`` source name -> the training split its examples were drawn from.
    """

    format: str
    records: int
    parts: Dict[str, List[Example]]
    plan: SplitPlan
    mixed: Dict[str, Origin] = field(default_factory=dict)


def _listed(names: Sequence[Any], most: int = 3) -> str:
    """Up to ``most`` names, then how many more."""
    shown = ", ".join(str(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def split_plan(cfg: DataConfig) -> SplitPlan:
    """Where train and the held-out sets come from. A held-out set is, first to last:
    ``data.<set>_path``; ``data.splits.<set>`` (a hub dataset's split, or a split of a folder
    whose file names give splits); the files of ``data.path``'s folder named for the set (when
    ``data.splits`` is not set); otherwise carved from train.

    Raises:
        DataError: settings that contradict each other or the folder, naming the key and the fix.
    """
    chosen = dict(cfg.splits or {})
    train = chosen.get("train", cfg.source_split)
    for name in HELD_OUT:
        path = getattr(cfg, f"{name}_path")
        if path and name in chosen:
            raise DataError(f"data.{name}_path={path!r} and data.splits.{name}={chosen[name]!r} both name "
                            f"the {name} set; keep one of them")
        if chosen.get(name) == train:
            raise DataError(f"data.splits.{name}={train!r} is the training split as well, so every {name} "
                            f"example would be trained on; name another split, or leave {name} out of "
                            "data.splits to carve it from train")
    folder = Path(cfg.path).expanduser()
    if folder.is_dir():
        return _folder_plan(cfg, folder, chosen, train)
    if chosen and folder.exists():
        raise DataError(f"data.splits={chosen} names splits, but data.path={cfg.path!r} is one file; bring "
                        "the held-out sets with data.validation_path / data.test_path, or make data.path a "
                        f"folder whose files are named for their split: {NAMING}")
    origins = {"train": locate(cfg.path, "data.path", train)}
    for name in HELD_OUT:
        path = getattr(cfg, f"{name}_path")
        if path:
            origins[name] = locate(path, f"data.{name}_path", cfg.source_split)
        elif name in chosen:
            origins[name] = Origin(f"data.splits.{name}", cfg.path, chosen[name])
    return SplitPlan(origins)


def _folder_plan(cfg: DataConfig, folder: Path, chosen: Dict[str, str], train: str) -> SplitPlan:
    """:func:`split_plan` for a ``data.path`` folder: its files by the split names in their
    paths (``datasets``' own rules, :func:`~pipeline.data.records.folder_layout`), or pooled
    when they have none."""
    layout = folder_layout(folder, "data.path")
    names = [inside(f, folder) for f in layout.files]
    if not layout.named:
        if chosen:
            raise DataError(f"data.splits={chosen} names splits, but no file in data.path={cfg.path!r} has a "
                            f"split name ({_listed(names)}); bring the held-out sets with data.validation_path / "
                            f"data.test_path, or name the files for their split: {NAMING}")
        log.info("data.path=%r: no file has a split name (%s): pooled and split by data.validation_size / "
                 "data.test_size; to have them read as splits, name them for their split: %s",
                 cfg.path, _listed(names), NAMING)
        origins = {"train": Origin("data.path", cfg.path, None, layout.files)}
    else:
        def split_of(name: str, key: str) -> Origin:
            if name not in layout.splits:
                found = "; ".join(f"{split}: {_listed([inside(f, folder) for f in files])}"
                                  for split, files in layout.splits.items())
                raise DataError(f"{key}={name!r}: no file in data.path={cfg.path!r} is named for that split "
                                f"(its files give {found}); set data.splits to splits there are, or name the "
                                f"files for their split: {NAMING}")
            return Origin("data.path", cfg.path, name, layout.splits[name])

        origins = {"train": split_of(train, "data.splits.train" if "train" in chosen else "data.source_split")}
        for name in HELD_OUT:
            if name in chosen:
                origins[name] = split_of(chosen[name], f"data.splits.{name}")
            elif cfg.splits is None and name != train and name in layout.splits:
                origins[name] = split_of(name, "data.path")
    for name in HELD_OUT:  # an explicit file or folder wins over the folder's own split
        path = getattr(cfg, f"{name}_path")
        if path:
            origins[name] = locate(path, f"data.{name}_path", cfg.source_split)
    unread = layout.unread(f for origin in origins.values() for f in origin.files)
    if unread:
        log.warning("data.path=%r: %d data file(s) not read: %s", cfg.path, len(unread),
                    _unread_reasons(cfg, folder, layout, unread))
    return SplitPlan(origins, tuple(unread))


def _unread_reasons(cfg: DataConfig, folder: Path, layout: FolderLayout, unread: List[Path]) -> str:
    """Why each unread file of a split-named folder is not read, files grouped by reason, and how
    to have a file without a split name read."""
    split_of = {f: name for name, files in layout.splits.items() for f in files}
    reasons: Dict[str, List[Path]] = {}
    for f in unread:
        split = split_of.get(f)
        if split is None:
            why = "no split name in its path"
        elif split in HELD_OUT and getattr(cfg, f"{split}_path"):
            why = f"split {split}: data.{split}_path is read instead"
        elif cfg.splits is not None:
            why = f"split {split}: data.splits does not name it"
        else:
            why = f"split {split}: not one this run reads; data.splits can name it"
        reasons.setdefault(why, []).append(inside(f, folder))
    hint = f"; to read one, name it for its split: {NAMING}" if "no split name in its path" in reasons else ""
    return "; ".join(f"{_listed(files)} ({why})" for why, files in reasons.items()) + hint


def mixed_in(cfg: DataConfig, train: int) -> Dict[str, Tuple[Origin, List[Example]]]:
    """``{source name: (its training split's origin, examples)}`` that ``data.mix`` adds to a
    training split of ``train`` examples: a seeded sample of each source's own training split."""
    added = {}
    for i, source in enumerate(cfg.mix):
        source_cfg = load_option("data", source.data, seed=cfg.seed, **dict(source.overrides))
        if source_cfg.mix:
            raise DataError(f"data.mix[{i}] ({source.data}) has a mix of its own; mixes do not nest")
        loaded = load_parts(source_cfg)
        pool = loaded.parts["train"]
        wanted = source.examples if source.examples is not None else int(round(source.fraction * train))
        if wanted > len(pool):
            log.warning("data.mix[%d] (%s): %d examples asked for, its training split has %d; taking all",
                        i, source.data, wanted, len(pool))
            wanted = len(pool)
        picked = sorted(random.Random(cfg.seed + i).sample(range(len(pool)), wanted))
        added[f"{i}:{source.data}"] = (loaded.plan.origins["train"], [pool[j] for j in picked])
    return added


def _read_examples(cfg: DataConfig, origin: Origin) -> Tuple[str, List[Example]]:
    """``(format, examples)`` of one origin, every record converted to messages."""
    records, where = load_records(cfg, origin)
    if len(records) == 0:
        raise DataError(f"{origin.described()} holds no records")
    fmt = detect_format(cfg, list(records.column_names))
    return fmt, [Example(to_messages(r, fmt, cfg, where(i)), where(i)) for i, r in enumerate(records)]


def load_parts(cfg: DataConfig) -> Loaded:
    """The source converted and split (:func:`split_plan`): held-out sets the user brought are
    kept as they are, the others carved from train; ``data.mix`` sources join train."""
    plan = split_plan(cfg)
    fmt, examples = _read_examples(cfg, plan.origins["train"])
    given = {name: _read_examples(cfg, origin)[1] for name, origin in plan.origins.items() if name != "train"}
    parts = split_examples(examples, cfg, given)
    mixed = {}
    for source, (origin, added) in mixed_in(cfg, len(parts["train"])).items():
        for ex in added:
            ex.source = source
        parts["train"] = parts["train"] + added
        mixed[source] = origin
    return Loaded(fmt, len(examples), parts, plan, mixed)


def source_counts(parts: Dict[str, List[Example]]) -> Dict[str, Dict[str, int]]:
    """Examples per source per split (``main`` is ``data.path``), before tokenization."""
    counts: Dict[str, Dict[str, int]] = {}
    for name, examples in parts.items():
        for ex in examples:
            counts.setdefault(ex.source, {}).setdefault(name, 0)
            counts[ex.source][name] += 1
    return counts


def sources_record(loaded: Loaded) -> Dict[str, Dict[str, Any]]:
    """``stats["sources"]`` (``run.json``'s ``data_sources``): per source (``main`` is
    ``data.path``, a mixed one ``<index>:<option>``), its examples per split as
    :func:`source_counts` counts them, and ``files``: ``{split: the files read for it}`` (a hub
    dataset's ``id[split]``). The main source also has ``carved``, the held-out splits carved
    from its train files, and ``unread``, the data files of its folder no split reads."""
    counts = source_counts(loaded.parts)
    origins = loaded.plan.origins
    train = origins["train"].names()
    record: Dict[str, Dict[str, Any]] = {"main": {
        **counts.get("main", {}),
        "files": {name: origins[name].names() if name in origins else train for name in SPLITS},
        "carved": [name for name in HELD_OUT if name not in origins],
        "unread": [str(f) for f in loaded.plan.unread]}}
    for source, origin in loaded.mixed.items():
        record[source] = {**counts.get(source, {}), "files": {"train": origin.names()}}
    return record


def split_lines(sources: Dict[str, Dict[str, Any]], cfg: DataConfig) -> List[str]:
    """One line per split of the main source (:func:`sources_record`): its examples and the
    files they came from, or the share carved from the train files."""
    main = sources["main"]
    lines = []
    for name in SPLITS:
        examples, files = main.get(name, 0), _listed(main["files"][name])
        if name not in main["carved"]:
            lines.append(f"{name}: {examples} examples from {files}")
            continue
        size = getattr(cfg, f"{name}_size")
        share = f"{size * 100:g}% " if size < 1 else ""  # a count is the examples themselves
        lines.append(f"{name}: {examples} examples, {share}carved from {files}" if size
                     else f"{name}: none (data.{name}_size=0)")
    return lines


# --------------------------------------------------------------------------- leakage


def _normalized(text: str) -> str:
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
    settings and the tokenizer (:mod:`pipeline.data.cache`); ``stats["tokenization"]`` says
    ``tokenized`` or ``cached``.

    Raises:
        DataError: for malformed records (naming file:line), empty splits or bad settings.
    """
    import datasets  # lazy: datasets pulls in pyarrow and pandas (seconds); configs compose without it

    key = None
    if cache_dir:
        key = cache.fingerprint(cfg, tokenizer)
        cached = cache.load(cache_dir, key)
        if cached is not None:
            log.info("data: tokenized splits reused from the cache (fingerprint %s)", key[:12])
            parts, stats = cached
            stats["tokenization"] = "cached"
            for line in split_lines(stats["sources"], cfg):
                log.info("data: %s", line)
            warn_overlap(stats["overlap"])
            return Splits(train=parts["train"], validation=parts["validation"], test=parts["test"], stats=stats)
    loaded = load_parts(cfg)
    parts = loaded.parts
    stats: Dict[str, Any] = {"format": loaded.format, "records": loaded.records, "overlap": overlap(parts),
                             "held_out": sorted(set(loaded.plan.origins) - {"train"}), "tokenization": "tokenized"}
    warn_overlap(stats["overlap"])
    if cfg.dedup and stats["overlap"]["train_examples"]:
        parts["train"], removed = without_overlap(parts)
        stats["overlap"]["removed_from_train"] = removed
        log.info("data.dedup: removed %d train examples that also occur in validation/test", removed)
    stats["sources"] = sources_record(loaded)  # after dedup: the examples that go on to tokenization
    for line in split_lines(stats["sources"], cfg):
        log.info("data: %s", line)
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
        cache.store(cache_dir, key, {name: getattr(splits, name) for name in SPLITS}, stats)
    return splits
