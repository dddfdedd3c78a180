"""The tokens every evaluation example starts with go through the model once per measurement.

A chat template's system prompt and a fixed instruction open every prompt of a set: about half
of the tokens the loss evaluation and generation prefill of the embedded default and of a
classification file compute (28 of 52 and 26 of 55 tokens on average). Their keys and values are
the same in every example, so they are computed once for the set and each batch attends to a
copy of them, as vLLM's prefix caching does for serving.

Exact in fp32 (the same loss to 1e-7 relative, the same greedy outputs token for token); under
bf16 autocast a loss moves by up to 0.2% relative, as other batch shapes move it (bf16 rounds
differently with the matrix shapes). `benchmarks/shared_prefix.py` on SmolLM2-135M, 2 CPU cores:
losses 1.3-1.8x faster, greedy generation 1.2-1.3x, all 146 outputs identical.

Used only where it is the same computation: a transformers causal LM (optionally under a PEFT
adapter that is not prompt learning), whose cache after the prefix is a plain per-layer key/value
cache (no sliding window, no recurrent state); for generation also a forward that takes
``position_ids``, no cache kind asked for in the generation config, and no beam search.
Anything else evaluates as before.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

MIN_TOKENS = 4  # a shorter prefix saves less than copying its cache into every batch costs


def shared_length(sequences: Sequence[Sequence[int]], labels: Optional[Sequence[Sequence[int]]] = None
                  ) -> int:
    """How many leading tokens every sequence shares, leaving at least one token of each to the
    batch. With ``labels`` (-100 where no loss is taken), it also stops before the position that
    predicts the first target token, so every predicted position stays in the batch.
    """
    if not sequences:
        return 0
    first = sequences[0]
    limit = min(len(s) for s in sequences) - 1
    if labels is not None:
        targets = [next((i for i, t in enumerate(row) if t != -100), None) for row in labels]
        limit = min([limit] + [t - 1 for t in targets if t is not None])
    length = 0
    while length < limit and all(s[length] == first[length] for s in sequences):
        length += 1
    return max(length, 0)


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_parameters(model: Any) -> Any:
    """The parameters of the model's forward (under a PEFT wrapper, the wrapped model's), read
    from the class: accelerate replaces a trained model's bound ``forward`` with a wrapper whose
    signature says nothing."""
    return inspect.signature(type(_base(model)).forward).parameters


def _cache_argument(params: Any) -> Optional[str]:
    """The name a forward takes its key/value cache by (``cache`` in recent transformers,
    ``past_key_values`` before), or None when it takes none."""
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _supported(model: Any) -> bool:
    config = getattr(_base(model), "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    peft_configs = getattr(model, "peft_config", None) or {}
    # prompt learning puts its own virtual tokens in the cache
    return not any(getattr(c, "is_prompt_learning", False) for c in peft_configs.values())


class SharedPrefix:
    """The cached keys and values of ``tokens`` under ``model``, copied into each batch.

    Build it inside the context the batches run in (``no_grad``, autocast), so the prefix is
    computed as the rest is.
    """

    def __init__(self, tokens: Sequence[int], cache: Any, argument: str):
        self.tokens, self._cache, self.argument = list(tokens), cache, argument

    @classmethod
    def build(cls, model: Any, tokens: Sequence[int], generation: bool = False) -> Optional["SharedPrefix"]:
        """The prefix's cache, or None where reusing it would not be the same computation (see
        the module docstring) or the prefix is too short to pay.

        ``generation``: for ``generate``, whose inputs have the padding between the prefix and
        each row's rest; that needs the positions to follow the attention mask, which
        ``generate`` does for a forward that takes ``position_ids``.
        """
        import torch  # lazy: transformers loads torch
        from transformers.cache_utils import DynamicCache, DynamicLayer

        params = forward_parameters(model)
        argument = _cache_argument(params)
        if len(tokens) < MIN_TOKENS or argument is None or not _supported(model):
            return None
        if generation and ("position_ids" not in inspect.signature(_base(model).forward).parameters
                           or getattr(getattr(_base(model), "generation_config", None),
                                      "cache_implementation", None)):
            return None  # a model that asks generate for a cache of its own kind gets it
        ids = torch.tensor([list(tokens)], device=model.device)
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **last_only)
        cache = getattr(out, "cache", None)
        cache = getattr(out, "past_key_values", None) if cache is None else cache
        layers = getattr(cache, "layers", None)
        if type(cache) is not DynamicCache or not layers or any(type(layer) is not DynamicLayer
                                                                for layer in layers):
            log.debug("shared prefix not reused: the model's cache is %s", type(cache).__name__)
            return None
        return cls(tokens, cache, argument)

    def __len__(self) -> int:
        return len(self.tokens)

    def cache_for(self, batch_size: int) -> Any:
        """A fresh copy of the cache for a batch of ``batch_size`` rows (a forward appends to
        the cache it is given)."""
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(batch_size)
        return cache
