"""What the model will train on, before any compute (``python -m pipeline.data [train overrides]``,
:mod:`pipeline.data.__main__`), without loading model weights:

* which files made which split (or the share carved from the train files);
* the first ``--examples`` training examples as rendered, with the tokens that carry loss
  marked (green on a terminal, ``[[...]]`` otherwise);
* per split: examples, the token-length distribution, and what ``data.max_length`` drops or cuts;
* tokens (and loss tokens) per epoch of training;
* validation/test examples that also occur in train (the leakage check).
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List

from pipeline.config.schema import TrainConfig
from pipeline.data.packing import IGNORE_INDEX
from pipeline.data.splits import load_parts, overlap, render, sources_record, split_lines, tokenize

GREEN, RESET = "\x1b[32m", "\x1b[0m"


def marked(tokenizer: Any, ids: List[int], labels: List[int], colour: bool) -> str:
    """The example's text with the loss-carrying tokens marked."""
    out, inside = [], False
    opening, closing = (GREEN, RESET) if colour else ("[[", "]]")
    for token, label in zip(ids, labels):
        carries = label != IGNORE_INDEX
        if carries != inside:
            out.append(opening if carries else closing)
            inside = carries
        out.append(tokenizer.decode([token]))
    if inside:
        out.append(closing)
    return "".join(out)


def _percentile(values: List[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def split_summary(name: str, encoded: List[tuple], max_length: int, truncation: str) -> Dict[str, Any]:
    lengths = [len(ids) for ids, _ in encoded]
    over = [n for n in lengths if n > max_length]
    kept = [(ids, labels) for ids, labels in encoded if len(ids) <= max_length or truncation == "truncate"]
    return {"split": name, "examples": len(encoded), "kept": len(kept),
            "min": min(lengths, default=0), "median": int(statistics.median(lengths)) if lengths else 0,
            "p95": _percentile(lengths, 0.95) if lengths else 0, "max": max(lengths, default=0),
            "over_max_length": len(over),
            "tokens": sum(min(len(ids), max_length) for ids, _ in kept),
            "loss_tokens": sum(sum(t != IGNORE_INDEX for t in labels[:max_length]) for _, labels in kept)}


def preview(cfg: TrainConfig, tokenizer: Any, examples: int, colour: bool) -> str:
    """The preview as text (see the module docstring)."""
    loaded = load_parts(cfg.data)
    parts, sources = loaded.parts, sources_record(loaded)
    given = [f"{name} from {origin.path if origin.split is None else 'split ' + origin.split}"
             for name, origin in loaded.plan.origins.items() if name != "train"]
    lines = [f"data={cfg.data.name}: {cfg.data.path} ({loaded.records} records{', ' if given else ''}"
             f"{', '.join(given)}; format {loaded.format}, template "
             f"{cfg.data.template}, train_on={cfg.data.train_on}, tokenizer of model={cfg.model.name})",
             *(f"  {line}" for line in split_lines(sources, cfg.data)), ""]
    encoded = {}
    for name, part in parts.items():
        encoded[name] = []
        for ex in part:
            text, spans, _ = render(ex.messages, tokenizer, cfg.data.template, cfg.data.train_on)
            encoded[name].append(tokenize(text, spans, tokenizer, cfg.data.template))
    for i, (ids, labels) in enumerate(encoded["train"][:examples]):
        lines += [f"--- train example {i + 1} ({parts['train'][i].where}), {len(ids)} tokens, "
                  f"{sum(t != IGNORE_INDEX for t in labels)} carry loss:", marked(tokenizer, ids, labels, colour), ""]
    action = {"drop": "dropped", "truncate": "cut", "error": "an error"}[cfg.data.truncation]
    lines += [f"tokens per example (data.max_length={cfg.data.max_length}; longer ones are {action}, "
              f"data.truncation={cfg.data.truncation}):",
              "| split | examples | min | median | p95 | max | over max_length | tokens | loss tokens |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in encoded.items():
        s = split_summary(name, rows, cfg.data.max_length, cfg.data.truncation)
        lines.append(f"| {name} | {s['examples']} | {s['min']} | {s['median']} | {s['p95']} | {s['max']} | "
                     f"{s['over_max_length']} | {s['tokens']:,} | {s['loss_tokens']:,} |")
    train = split_summary("train", encoded["train"], cfg.data.max_length, cfg.data.truncation)
    batch = cfg.trainer.per_device_train_batch_size * cfg.trainer.gradient_accumulation_steps
    steps = -(-train["kept"] // batch) if batch else 0
    lines += ["", f"one epoch: {train['kept']} examples, {train['tokens']:,} tokens ({train['loss_tokens']:,} carry "
                  f"loss) in {steps} steps of {batch}; trainer.max_steps={cfg.trainer.max_steps}"]
    lines.append("examples per source: " + "; ".join(
        f"{source}: " + ", ".join(f"{split} {record[split]}" for split in ("train", "validation", "test")
                                  if split in record)
        for source, record in sources.items()))
    if sources["main"]["unread"]:
        lines.append(f"not read from {cfg.data.path}: " + ", ".join(sources["main"]["unread"]))
    found = overlap(parts)
    lines.append("held-out examples also in train (exact / same normalised prompt): " + ", ".join(
        f"{name} {found[name]['exact']} / {found[name]['normalized']} of {found[name]['examples']}"
        for name in ("validation", "test")))
    return "\n".join(lines) + "\n"
