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
from typing import Any, Dict, List, Optional, Tuple

from pipeline.config.options import load_option
from pipeline.config.schema import DataConfig
from pipeline.data import cache
from pipeline.data.packing import IGNORE_INDEX
from pipeline.data.records import DataError, detect_format, load_records, to_messages

log = logging.getLogger(__name__)


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
            warn_overlap(stats["overlap"])
            return Splits(train=parts["train"], validation=parts["validation"], test=parts["test"], stats=stats)
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
        cache.store(cache_dir, key, {name: getattr(splits, name) for name in cache.SPLITS}, stats)
    return splits
