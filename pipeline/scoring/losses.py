"""Loss and perplexity on the completion tokens of an evaluation set: token-weighted over the
whole set, whatever the batching; only positions that predict a completion token go through the
output layer, and the tokens every example starts with are computed once
(:mod:`pipeline.scoring.prefix`)."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

from pipeline.runs.progress import Progress
from pipeline.scoring.prefix import SharedPrefix, forward_parameters, shared_length


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


def evaluate_loss(model: Any, dataset: Optional[Any], collate: Callable, batch_size: int,
                  name: str, label: str = "", bf16: bool = False) -> Dict[str, float]:
    """Token-weighted mean loss and perplexity on the completion tokens of ``dataset``.

    Computed here rather than by ``Trainer.evaluate``, whose loss is a mean of per-batch means
    and so changes with the batch size; this one is exp(total NLL / total completion tokens)
    whatever the batching. That also lets the batches group examples of similar length (the
    sum does not depend on the order), so a batch pads little, or nothing with the packing
    collator. The tokens every example starts with are computed once (:mod:`pipeline.scoring.prefix`).
    ``bf16``: under bf16 autocast (``evaluation.loss_precision``); the cross-entropy itself is
    taken in fp32.
    """
    import torch  # lazy: start-up must not pay for torch
    import torch.nn.functional as F

    if dataset is None:
        return {}
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    ids, labels_all = dataset["input_ids"], dataset["labels"]
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
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = _loss_batch(chunk, ids, labels_all, collate, prefix, model.device)
                targets = batch.pop("labels")[:, 1:]  # position p predicts token p + 1
                if keep:
                    # Only positions that predict a completion token go through the output
                    # layer (vocabulary-sized: a fifth of a small model's forward, and most
                    # positions of a short-answer task are prompt): the same numbers, cheaper.
                    positions = (targets != -100).any(0).nonzero().flatten()
                    batch.setdefault("use_cache", False)
                    logits = model(**batch, logits_to_keep=positions).logits
                    targets = targets[:, positions]
                else:
                    logits = model(**batch, use_cache=False).logits[:, :-1]
                nll += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=-100, reduction="sum").item()
                tokens += int((targets != -100).sum())
                progress.update(len(chunk))
    finally:
        model.train(was_training)
    loss = nll / max(tokens, 1)
    return {f"{name}/loss": loss, f"{name}/perplexity": math.exp(min(loss, 50.0))}
