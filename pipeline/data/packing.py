"""Collating tokenized examples into batches: padded, or padding-free packed rows (several
examples per row, position ids restarting per example, so attention never crosses examples).
"""

from __future__ import annotations

from typing import Any, Dict, List

IGNORE_INDEX = -100  # labels that carry no loss


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
        from transformers import DataCollatorWithFlattening  # lazy: transformers loads torch

        self.pad_token_id = pad_token_id
        self.pack_length = pack_length
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        import torch  # lazy: start-up must not pay for torch

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
    from transformers import DataCollatorForSeq2Seq  # lazy: transformers loads torch

    if packing:
        return PackingCollator(tokenizer.pad_token_id, pack_length)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=8)
