"""The training loss where it counts: the output layer and the cross-entropy only at the positions
whose next token carries a label.

transformers' causal-LM loss runs the output layer (vocabulary x hidden: 49k x 576 on the default
model, about a fifth of its forward) and the softmax over the vocabulary at every position, prompt
and padding included, then ignores all but the completion tokens; of a long prompt with a one-word
answer that is nearly all of them. Liger Kernel avoids the full logits with fused Triton kernels,
GPU only; this is the plain PyTorch way, on any device: the hidden states that predict a labelled
token are picked just before the model's own output layer (a forward pre-hook on it), so the layer
and whatever the model applies after it (soft-capping, scaling) run on those rows alone. The
cross-entropy is transformers' ``ForCausalLMLoss``'s: in fp32, summed and divided by the Trainer's
``num_items_in_batch`` (gradient accumulation, packing), or the mean over the labelled tokens
without it; so the loss and every gradient are the full computation's, up to round-off.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from pipeline.data.packing import IGNORE_INDEX
from pipeline.trainer.opening import opening_cache, remainder


def output_layer(model: Any) -> Optional[Any]:
    """The module that turns hidden states into logits (through PEFT's wrappers), or None."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def unsupported(model: Any) -> str:
    """Why the loss cannot be computed at the labelled positions alone for ``model`` ('' when it can)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model's labels are not the input shifted by one"
    if output_layer(model) is None:
        return f"{type(model).__name__} names no output layer (get_output_embeddings)"
    return ""


def labelled_loss(model: Any, inputs: Dict[str, Any], num_items_in_batch: Optional[Any],
                  head: Optional[Any] = None, opening: int = 0) -> Any:
    """The causal-LM loss of ``inputs`` (with ``labels``), the output layer run only at the
    positions that predict a labelled token.

    Args:
        model: a causal LM (under PEFT's or accelerate's wrappers).
        inputs: the batch, ``labels`` included (``-100`` where no loss is taken).
        num_items_in_batch: the labelled tokens of the whole accumulated batch (the sum is divided
            by it), or None for the mean over this batch's labelled tokens.
        head: the model's output layer; None: ``model``'s own (give it for a model under a
            DDP or DeepSpeed wrapper, which does not name it).
        opening: leading tokens that every row shares, computed once for the batch
            (:mod:`pipeline.trainer.opening`; :func:`pipeline.trainer.opening.shared_length`);
            0: every row whole.

    Raises:
        RuntimeError: when the output layer is not called once on ``[batch, length, hidden]``
            hidden states (a model this cannot serve): set ``trainer.labelled_logits=false``.
    """
    import torch  # lazy: start-up must not pay for torch
    import torch.nn.functional as F

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    targets = labels[:, 1:]
    wanted = torch.nn.functional.pad(targets != IGNORE_INDEX, (0, 1), value=False)  # position p predicts p + 1
    head = head if head is not None else output_layer(model)
    if opening:
        inputs = remainder(inputs, opening, opening_cache(model, head, inputs, opening))
    keep = wanted[:, opening:]  # the opening predicts no labelled token (shared_length)
    calls = []

    def pick(module: Any, args: Any) -> Any:
        hidden = args[0]
        if calls or hidden.dim() != 3 or hidden.shape[:2] != keep.shape:
            raise RuntimeError(f"the output layer got hidden states of shape {tuple(hidden.shape)} for a "
                               f"batch of {tuple(keep.shape)}: this model cannot take its loss at the "
                               "labelled positions alone; set trainer.labelled_logits=false")
        calls.append(1)
        return (hidden[keep].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    logits = logits.reshape(-1, logits.shape[-1]).float()  # fp32, as transformers' loss upcasts
    picked = targets[wanted[:, :-1]]
    if num_items_in_batch is None:
        return F.cross_entropy(logits, picked, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(logits, picked, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
