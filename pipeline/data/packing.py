"""Collating tokenized examples into batches: padded, or padding-free packed rows (several
examples per row, position ids restarting per example, so attention never crosses examples).
"""

from __future__ import annotations

from typing import Any, Dict, List

IGNORE_INDEX = -100  # labels that carry no loss


# What one token of row width adds to the cost of each token of a packed row, relative to the
# rest of that token's cost: packed rows attend densely under a block-diagonal mask (sdpa, eager),
# so a row twice as wide pays twice the attention per token for what packing saves in padding.
# From the default model's profile on CPU (attention 26% of a step over rows of 176 tokens):
# 0.26 / 0.74 / 176, about 1/500. With it, a file of long, similar examples packs one to a row
# (packing rows of 512 there computed 4% fewer tokens at 2.4x the attention), and the embedded
# default's short ones two or three to a row rather than seven.
ATTENTION_PER_WIDTH = 1 / 500


def _rows_within(lengths: List[int], order: List[int], capacity: int) -> List[List[int]]:
    """First-fit decreasing rows of at most ``capacity`` tokens, then balanced over those rows."""
    rows: List[List[int]] = []
    free: List[int] = []
    for i in order:
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


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def pack_rows(lengths: List[int], capacity: int) -> List[List[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` tokens, as wide as
    computes least.

    For a row budget (from the longest example up to ``capacity``), first-fit decreasing
    (longest first, each into the first row with room) sets the number of rows; the examples are
    then dealt, longest first, to the least-filled of those rows, so that the longest row, which
    sets the batch's width, is as short as it can easily be (FFD alone fills its first rows and
    leaves the last nearly empty, all padding); when dealing cannot fit every example, the FFD
    rows are kept. Of the budgets tried, the one whose ``rows x width`` tokens cost least counts,
    each token's cost growing with the width (:data:`ATTENTION_PER_WIDTH`): wider rows pad less
    but attend more.

    Raises:
        ValueError: when one length alone exceeds ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not order:
        return []
    longest = lengths[order[0]]
    if longest > capacity:
        raise ValueError(f"an example of {longest} tokens does not fit in data.pack_length="
                         f"{capacity}; raise data.pack_length to at least data.max_length")
    budgets = sorted({min(capacity, max(longest, _round8(int(longest * f)))) for f in (1, 1.5, 2, 3, 4)}
                     | {capacity})
    best, best_cost = [], float("inf")
    for budget in budgets:
        rows = _rows_within(lengths, order, budget)
        width = min(capacity, _round8(max(sum(lengths[i] for i in row) for row in rows)))
        cost = len(rows) * width * (1 + width * ATTENTION_PER_WIDTH)
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


class PackingCollator:
    """Padding-free batches of rows of at most ``pack_length`` tokens.

    The examples of a batch are bin-packed (:func:`pack_rows`) into rows, as wide as computes least; each row is
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


def boundary_problem(model: Any) -> str:
    """Why packed rows would let an example attend to the one before it in ``model`` ('' when
    they do not): the logits of a short segment packed behind another (position ids restarting,
    no attention mask) against the same segment alone.

    transformers derives the block-diagonal mask from the position ids in its own attention
    masks (sdpa, eager, flash, flex); a model with attention of its own (remote code, older
    architectures) may attend across the boundary, and its loss would then differ from the
    padded batch's. A forward of six tokens tells, whatever the architecture.
    """
    import torch  # lazy: start-up must not pay for torch

    device = next(model.parameters()).device
    first, second = [5, 6, 7], [8, 9, 10]
    was_training = model.training
    model.eval()  # no dropout: the two computations must be comparable
    try:
        with torch.no_grad():
            packed = model(input_ids=torch.tensor([first + second], device=device),
                           position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]], device=device), use_cache=False)
            alone = model(input_ids=torch.tensor([second], device=device),
                          position_ids=torch.tensor([[0, 1, 2]], device=device), use_cache=False)
    except Exception as err:  # noqa: BLE001 (any failure means: do not pack this model)
        return f"a packed forward failed ({type(err).__name__}: {err})"
    finally:
        model.train(was_training)
    got, want = packed.logits[0, 3:].float(), alone.logits[0].float()
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
        return (f"{type(model).__name__} with attn_implementation="
                f"{getattr(model.config, '_attn_implementation', '?')} lets packed examples attend to each other")
    return ""


def collator(tokenizer: Any, packing: bool, pack_length: int = 512) -> Any:
    """Padding collator, or a padding-free one (:class:`PackingCollator`, rows of at most
    ``pack_length`` tokens, position ids restarting per example)."""
    from transformers import DataCollatorForSeq2Seq  # lazy: transformers loads torch

    if packing:
        return PackingCollator(tokenizer.pad_token_id, pack_length)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=8)
