"""The opening every example of a batch shares, computed once per batch.

Chat-formatted examples start alike: the template's system turn (on the default model about 30
tokens), often a fixed instruction after it. In a batch of one example per row, every row runs
those same tokens through every layer, forward and backward. Here the batch's common opening
runs once, as a batch of one, and its keys and values (the model's own cache, repeated over the
rows) stand in front of each row's remainder, which attends to them as it would to its own copy;
backward sums the rows' gradients into the one opening. Loss and gradients are the full
computation's up to round-off, with one difference under dropout: the opening's dropout masks
(LoRA dropout, for one) are drawn once for the batch instead of once per row, so each example
sees masks of the same distribution, shared with the rest of its batch on those positions.

Where it applies: batches whose rows hold one example each (padded batches, or packed rows of one
example; several examples to a row would attend to each other once a cache is in play, since
transformers reads packing boundaries from position ids only without one), whose first
:data:`MINIMUM` tokens or more are equal in every row and carry no label. A start-up check
(:func:`cache_problem`) compares the two computations on the model itself, so an architecture
whose cache cannot be shared this way trains as before; so do rotary scalings that depend on a
call's length (:func:`rope_problem`), gradient checkpointing, NEFTune and prompt learning
(pipeline/trainer/build.py says why in the log).
"""

from __future__ import annotations

from typing import Any, Dict

from pipeline.data.packing import IGNORE_INDEX

# Fewer shared tokens than this save less than a second forward call costs.
MINIMUM = 16


def shared_length(inputs: Dict[str, Any]) -> int:
    """How many leading tokens every row of ``inputs`` shares and computes once (0: none).

    The opening ends before the first position that predicts a labelled token (its logits are
    not computed), before any row's padding or second example, and leaves every row a remainder.
    """
    ids = inputs["input_ids"]
    if ids.dim() != 2 or ids.shape[0] < 2 or ids.shape[1] < 2:
        return 0
    length = int((ids == ids[:1]).all(dim=0).long().cumprod(0).sum())
    labelled = (inputs["labels"] != IGNORE_INDEX).any(dim=0).nonzero()
    if len(labelled):
        length = min(length, int(labelled[0]) - 1)  # position p predicts token p + 1
    length = min(length, ids.shape[1] - 1)
    mask = inputs.get("attention_mask")
    if mask is not None:
        length = min(length, int(mask.all(dim=0).long().cumprod(0).sum()))
        if bool((mask[:, 1:] > mask[:, :-1]).any()):  # left padding: rows do not line up
            return 0
    positions = inputs.get("position_ids")
    if positions is not None and _several_examples(positions, inputs["labels"]):
        return 0
    return length if length >= MINIMUM else 0


def _several_examples(positions: Any, labels: Any) -> bool:
    """Whether a packed row holds a second example with labels (a restart of the position ids
    followed by a labelled token); a trailing padding segment carries none."""
    restarts = positions[:, 1:] == 0
    after = restarts.long().cumsum(dim=1) > 0
    return bool((after & (labels[:, 1:] != IGNORE_INDEX)).any())


def opening_cache(model: Any, head: Any, inputs: Dict[str, Any], length: int) -> Any:
    """The model's cache after the first ``length`` tokens of the first row, repeated for
    every row; its keys and values keep their autograd history (backward reaches the opening)."""
    def no_logits(module: Any, args: Any) -> Any:
        return (args[0][:, :0], *args[1:])

    opening = {"input_ids": inputs["input_ids"][:1, :length]}
    for key in ("attention_mask", "position_ids"):
        if inputs.get(key) is not None:
            opening[key] = inputs[key][:1, :length]
    handle = head.register_forward_pre_hook(no_logits)
    try:
        cache = getattr(model(**opening, use_cache=True), _cache_key())
    finally:
        handle.remove()
    if cache is None or cache.get_seq_length() != length:
        # e.g. gradient checkpointing turned on inside the model, which drops the cache in training
        raise RuntimeError("the model returned no cache of the opening while training; set "
                           "trainer.shared_opening=false")
    cache.batch_repeat_interleave(inputs["input_ids"].shape[0])
    return cache


def remainder(inputs: Dict[str, Any], length: int, cache: Any) -> Dict[str, Any]:
    """The model inputs after the opening: ids and positions from ``length`` on, the attention
    mask whole (it spans the cache too), the cache in front."""
    rest = dict(inputs)
    rest["input_ids"] = inputs["input_ids"][:, length:]
    if inputs.get("position_ids") is not None:
        rest["position_ids"] = inputs["position_ids"][:, length:]
    return {**rest, _cache_key(): cache, "use_cache": True}


def _cache_key() -> str:
    """The name of the cache in a model's inputs and outputs: ``cache`` (transformers 5.25 on),
    ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast  # lazy: transformers loads torch

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rope_problem(model_config: Any) -> str:
    """Why rotary embeddings would differ between the opening's call and the remainder's ('' when
    they do not): ``dynamic`` and ``longrope`` scaling choose their frequencies from the longest
    position of each call, so a short opening would get other frequencies than its whole row."""
    parameters = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None) or {}
    found = [parameters] if "rope_type" in parameters or "type" in parameters else list(parameters.values())
    kinds = {str(p.get("rope_type", p.get("type", ""))) for p in found if isinstance(p, dict)}
    length_dependent = sorted(k for k in kinds if k == "longrope" or "dynamic" in k)
    if length_dependent:
        return (f"rotary scaling {', '.join(length_dependent)} picks its frequencies from each call's length, "
                "so the opening alone would be embedded unlike its whole row")
    return ""


def cache_problem(model: Any, head: Any) -> str:
    """Why this model cannot compute a shared opening once ('' when it can): the last
    position's logits of two rows with a common opening, computed whole and after the opening's
    shared cache, compared (no dropout, no gradients)."""
    import torch  # lazy: start-up must not pay for torch

    device = next(model.parameters()).device
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 11, 12]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            whole = model(input_ids=ids, use_cache=False).logits[:, -1]
            cache = opening_cache(model, head, {"input_ids": ids}, 4)
            shared = model(**remainder({"input_ids": ids}, 4, cache)).logits[:, -1]
    except Exception as err:  # noqa: BLE001 (any failure means: compute every row whole)
        return f"a forward after a shared cache failed ({type(err).__name__}: {err})"
    finally:
        model.train(was_training)
    whole, shared = whole.float(), shared.float()
    if shared.shape != whole.shape or \
            not torch.allclose(shared, whole, rtol=1e-3, atol=1e-3 * float(whole.abs().max())):
        return f"{type(model).__name__}'s logits after a shared cache differ from the whole rows'"
    return ""
