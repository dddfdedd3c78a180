"""Loss and perplexity on the completion tokens of an evaluation set: token-weighted over the
whole set, whatever the batching, and each example's own mean token loss; only positions that
predict a completion token go through the output layer, and the tokens every example starts with
are computed once (:mod:`pipeline.scoring.prefix`)."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

from pipeline.data.packing import PackingCollator, pack_rows
from pipeline.runs.progress import Progress
from pipeline.scoring.prefix import SharedPrefix, forward_parameters, shared_length

MAX_LOG_PERPLEXITY = 50.0  # exp(50) is far beyond any model worth measuring; math.exp overflows past ~709


def perplexity(loss: float) -> float:
    """exp(``loss``), capped at exp(:data:`MAX_LOG_PERPLEXITY`) so that a diverged model's
    perplexity is a large number rather than an overflow."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


class SetLoss(Dict[str, float]):
    """What :func:`evaluate_loss` measured on one set: the metrics ``{name}/loss`` and
    ``{name}/perplexity`` (the mapping itself), and :attr:`examples`.

    Attributes:
        examples: per example, in the set's order, ``{"loss": ..., "loss_tokens": ...}``: the
            mean of the token cross-entropy over its completion tokens, and how many there are.
            The set's ``{name}/loss`` is not the mean of the per-example losses but the mean over
            all completion tokens of the set: each example weighs by its ``loss_tokens``, so
            ``sum(loss * loss_tokens) / sum(loss_tokens)`` over the examples gives it back.
    """

    def __init__(self, metrics: Dict[str, float], examples: List[Dict[str, float]]):
        super().__init__(metrics)
        self.examples = examples


def _keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do; a
    model with remote code may not)."""
    return "logits_to_keep" in forward_parameters(model)


def _loss_batch(rows: List[int], ids: Any, labels: Any, collate: Callable, prefix: Optional[Any],
                device: Any) -> Dict[str, Any]:
    """The model inputs and labels of ``rows``: through the run's collator, or, with a shared
    prefix, the rest of each example right-padded behind a copy of the prefix's cache."""
    import torch  # lazy: start-up must not pay for torch

    if prefix is None:
        batch = collate([{"input_ids": ids[i], "labels": labels[i]} for i in rows])
        return {k: v.to(device) for k, v in batch.items()}
    skip = len(prefix)
    width = max(len(ids[i]) for i in rows) - skip
    pad = [width - (len(ids[i]) - skip) for i in rows]
    as_tensor = lambda lists: torch.tensor(lists, device=device)  # noqa: E731
    return {
        "input_ids": as_tensor([list(ids[i][skip:]) + [0] * p for i, p in zip(rows, pad)]),
        "attention_mask": as_tensor([[1] * (skip + width - p) + [0] * p for p in pad]),
        "labels": as_tensor([list(labels[i][skip:]) + [-100] * p for i, p in zip(rows, pad)]),
        prefix.argument: prefix.cache_for(len(rows)), "use_cache": True,
    }


def _owners(batch: Dict[str, Any], rows: List[int], ids: Any, packed_by: Optional[PackingCollator]) -> Any:
    """The example (its index in the set) each input position of ``batch`` belongs to: one
    example per row, in ``rows``' order (its padding too, which predicts nothing); or, for a
    batch ``packed_by`` the packing collator, the examples of each row in
    :func:`pipeline.data.packing.pack_rows`' layout, each a segment whose position ids start
    again at 0 (the collator calls ``pack_rows`` the same way), and -1 for a row's padding.

    Raises:
        RuntimeError: when a packed row has fewer segments than the layout puts in it: the
            collator packs otherwise, and a loss would go to the wrong example.
    """
    import torch  # lazy: start-up must not pay for torch

    width = batch["input_ids"].shape[1]
    if packed_by is None:
        return torch.tensor(rows, device=batch["input_ids"].device)[:, None].expand(-1, width)
    owners = torch.full_like(batch["input_ids"], -1)
    layout = pack_rows([len(ids[i]) for i in rows], packed_by.pack_length)
    for r, members in enumerate(layout):
        starts = (batch["position_ids"][r] == 0).nonzero().flatten().tolist() + [width]
        if len(starts) - 1 < len(members):
            raise RuntimeError(f"a packed loss batch row has {len(starts) - 1} segments for "
                               f"{len(members)} examples: per-example losses cannot be attributed")
        for k, member in enumerate(members):
            owners[r, starts[k]:starts[k + 1]] = rows[member]
    return owners


def evaluate_loss(model: Any, dataset: Optional[Any], collate: Callable, batch_size: int,
                  name: str, label: str = "", bf16: bool = False) -> SetLoss:
    """Token-weighted mean loss and perplexity on the completion tokens of ``dataset``, and each
    example's mean token loss (:class:`SetLoss`).

    Computed here rather than by ``Trainer.evaluate``, whose loss is a mean of per-batch means
    and so changes with the batch size; this one is exp(total NLL / total completion tokens)
    whatever the batching. That also lets the batches group examples of similar length (the
    sum does not depend on the order), so a batch pads little, or nothing with the packing
    collator. The tokens every example starts with are computed once (:mod:`pipeline.scoring.prefix`).
    ``bf16``: under bf16 autocast (``evaluation.loss_precision``); the cross-entropy itself is
    taken in fp32.

    Each example's own loss is the mean over its completion tokens (every token of a short
    answer counts as much as the tokens of a long one in the set's loss; each example counts
    once in its own): what a paired comparison of two models resamples, example by example.
    """
    import torch  # lazy: start-up must not pay for torch
    import torch.nn.functional as F

    if dataset is None:
        return SetLoss({}, [])
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    ids, labels_all = dataset["input_ids"], dataset["labels"]
    example_nll = torch.zeros(len(ids), dtype=torch.float64)
    example_tokens = torch.zeros(len(ids), dtype=torch.int64)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    keep = _keeps_logits(model)
    try:
        # no_grad rather than inference_mode: the same model trains next, and a buffer a model
        # caches lazily during this forward (rotary tables, 4-bit quant state) would be an
        # inference tensor that autograd then refuses to save.
        with Progress(len(order), f"{label} {name} loss".strip(), "examples") as progress, \
                torch.no_grad(), torch.autocast(model.device.type, torch.bfloat16, enabled=bf16):
            shared = shared_length(ids, labels_all) if keep and len(ids) else 0
            prefix = SharedPrefix.build(model, ids[0][:shared]) if shared else None
            # Behind a prefix every example has a row of its own, whatever the collator.
            packed_by = collate if prefix is None and isinstance(collate, PackingCollator) else None
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = _loss_batch(chunk, ids, labels_all, collate, prefix, model.device)
                targets = batch.pop("labels")[:, 1:]  # position p predicts token p + 1
                owners = _owners(batch, chunk, ids, packed_by)[:, 1:]  # the example of token p + 1
                if keep:
                    # Only positions that predict a completion token go through the output
                    # layer (vocabulary-sized: a fifth of a small model's forward, and most
                    # positions of a short-answer task are prompt): the same numbers, cheaper.
                    positions = (targets != -100).any(0).nonzero().flatten()
                    batch.setdefault("use_cache", False)
                    logits = model(**batch, logits_to_keep=positions).logits
                    targets, owners = targets[:, positions], owners[:, positions]
                else:
                    logits = model(**batch, use_cache=False).logits[:, :-1]
                token_nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                            ignore_index=-100, reduction="none")  # 0 where ignored
                nll += token_nll.sum().item()
                counted = targets.flatten() != -100
                tokens += int(counted.sum())
                where = owners.flatten()[counted].cpu()
                example_nll.index_add_(0, where, token_nll[counted].double().cpu())
                example_tokens.index_add_(0, where, torch.ones_like(where))
                progress.update(len(chunk))
    finally:
        model.train(was_training)
    loss = nll / max(tokens, 1)
    # An example without completion tokens would read 0 over 0 tokens, as an empty set does
    # (build_datasets drops such examples: none reaches here).
    examples = [{"loss": n / max(t, 1), "loss_tokens": t}
                for n, t in zip(example_nll.tolist(), example_tokens.tolist())]
    return SetLoss({f"{name}/loss": loss, f"{name}/perplexity": perplexity(loss)}, examples)
