"""Generation: batched, left-padded, prompts sorted by length, the tokens every prompt starts
with computed once (:mod:`pipeline.scoring.prefix`); the same for the base and the tuned model."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from pipeline.config.schema import DecodingConfig
from pipeline.runs.progress import Progress
from pipeline.scoring.prefix import SharedPrefix, shared_length


def generation_kwargs(decoding: DecodingConfig, tokenizer: Any) -> Dict[str, Any]:
    """``model.generate`` arguments for greedy, sampling or beam search decoding."""
    kwargs: Dict[str, Any] = {"max_new_tokens": decoding.max_new_tokens, "use_cache": True,
                              "pad_token_id": tokenizer.pad_token_id,
                              "eos_token_id": tokenizer.eos_token_id}
    if decoding.strategy == "sample":
        kwargs.update(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p)
    elif decoding.strategy == "beam":
        kwargs.update(do_sample=False, num_beams=decoding.num_beams)
    else:
        kwargs.update(do_sample=False, num_beams=1)
    if decoding.stop_strings:
        kwargs.update(stop_strings=list(decoding.stop_strings), tokenizer=tokenizer)
    return kwargs


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut] if cut >= 0 else text).strip()


def _left_padded(rows: List[List[int]], pad_id: int, prefix: Optional[Any], device: Any) -> Dict[str, Any]:
    """Generation inputs for token rows: left-padded; with a shared prefix, the prefix first, then
    the padding, then each row's rest (positions follow the attention mask, so the rest of every
    row continues right after the prefix), and the prefix's cache."""
    import torch  # lazy: start-up must not pay for torch

    skip = len(prefix) if prefix is not None else 0
    rest = [row[skip:] for row in rows]
    width = max(len(r) for r in rest)
    head = list(prefix.tokens) if prefix is not None else []
    inputs = {
        "input_ids": torch.tensor([head + [pad_id] * (width - len(r)) + r for r in rest], device=device),
        "attention_mask": torch.tensor([[1] * skip + [0] * (width - len(r)) + [1] * len(r) for r in rest],
                                       device=device),
    }
    if prefix is not None:
        inputs[prefix.argument] = prefix.cache_for(len(rows))
    return inputs


def generate(model: Any, tokenizer: Any, prompts: List[str], decoding: DecodingConfig,
             batch_size: int, add_special_tokens: bool = False, what: str = "generation") -> List[str]:
    """Generates one completion per prompt, batched; returns them in the prompts' order.

    Prompts are sorted by length so that a batch pads little; the RNG is seeded from
    ``decoding.seed`` so the base and the tuned model sample alike. The tokens every prompt starts
    with are computed once (:mod:`pipeline.scoring.prefix`; not for beam search, which reorders
    the cache).
    """
    import torch  # lazy: start-up must not pay for torch

    kwargs = generation_kwargs(decoding, tokenizer)
    rows = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: List[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    torch.manual_seed(decoding.seed)
    try:
        with Progress(len(prompts), what, "prompts") as progress, torch.no_grad():
            shared = shared_length(rows) if rows and decoding.strategy != "beam" else 0
            prefix = SharedPrefix.build(model, rows[0][:shared], generation=True) if shared else None
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                inputs = _left_padded([rows[i] for i in batch], pad_id, prefix, model.device)
                generated = model.generate(**inputs, **kwargs)
                texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:],
                                               skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    outputs[i] = cut_at_stop(text, decoding.stop_strings)
                progress.update(len(batch))
    finally:
        model.train(was_training)
    return outputs
