"""The shared prefix of evaluation sets is computed once: the losses and the generations must be
those of the whole examples, for every architecture and adapter it is used with, and it must not
be used where it would change them."""

from __future__ import annotations

import functools

import pytest

from pipeline.config.options import load_option
from pipeline.config.schema import DecodingConfig
from pipeline.data.packing import collator
from pipeline.data.splits import build_datasets
from pipeline.model import loading
from pipeline.scoring import prefix
from pipeline.scoring.generation import generate
from pipeline.scoring.losses import evaluate_loss
from tests.data.test_data import data_cfg
from tests.conftest import write_jsonl

REVIEWS = ["great food", "the room was awful and the staff were rude to us", "fine",
           "a lovely stay overall, we would come back", "boring", "quite a good view from the top floor"]


def test_shared_length_leaves_a_token_to_every_row_and_stops_before_the_first_target():
    assert prefix.shared_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9]]) == 2
    assert prefix.shared_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter row keeps its last token
    assert prefix.shared_length([[7, 8], [9, 8]]) == 0
    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]
    # token 3 is a target: position 2 predicts it, so the batch starts there at the latest
    assert prefix.shared_length(rows, [[-100, -100, -100, 4, 5], [-100, -100, -100, -100, 6]]) == 2
    assert prefix.shared_length(rows, [[-100] * 5, [-100] * 5]) == 4  # no targets: only the length limits
    assert prefix.shared_length([]) == 0


def _model(folder, seed=0):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(seed)
    with torch.no_grad():  # larger than the 0.02-std initialisation, so outputs differ per prompt
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    return model


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def folder(request):
    import os

    cfg = load_option("model", request.param)
    return loading.resolve_folder(cfg, os.environ.get("PIPELINE_CACHE_DIR", "~/.cache/pipeline"), seed=42)


def _spy_batches(model, monkeypatch):
    """Records, for every forward over more than one token (a loss batch, a generation's
    prefill, the prefix itself), whether it went behind cached tokens."""
    seen = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    real = base.forward

    @functools.wraps(real)  # generate reads the forward's signature
    def spy(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if kwargs["input_ids"].shape[1] > 1:
            seen.append(cache is not None and cache.get_seq_length() > 0)
        return real(*args, **kwargs)

    monkeypatch.setattr(base, "forward", spy)
    return seen


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_loss_behind_the_shared_prefix_equals_the_whole_examples(folder, adapter, tmp_path, monkeypatch):
    from transformers import AutoTokenizer


    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = _model(folder)
    model = _lora(model) if adapter else model
    records = [{"prompt": f"Review: {r}\nIs this review positive or negative?",
                "completion": "positive" if i % 2 else "negative, clearly"} for i, r in enumerate(REVIEWS)]
    rows = build_datasets(data_cfg(write_jsonl(tmp_path / "d.jsonl", records)), tokenizer).train
    assert prefix.shared_length(rows["input_ids"], rows["labels"]) >= prefix.MIN_TOKENS
    seen = _spy_batches(model, monkeypatch)
    shared = evaluate_loss(model, rows, collator(tokenizer, False), 4, "test")
    assert seen.count(True) == 2  # both batches ran behind the prefix
    seen.clear()
    monkeypatch.setattr(prefix.SharedPrefix, "build", classmethod(lambda cls, *args, **kwargs: None))
    whole = evaluate_loss(model, rows, collator(tokenizer, False), 4, "test")
    assert seen and not any(seen)
    assert shared["test/loss"] == pytest.approx(whole["test/loss"], rel=1e-5)


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_generation_behind_the_shared_prefix_equals_the_whole_prompts(folder, strategy, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = _lora(_model(folder))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Review: {r}"}], tokenize=False,
                                             add_generation_prompt=True) if tokenizer.chat_template
               else f"Review: {r}\nLabel:" for r in REVIEWS]
    decoding = DecodingConfig(strategy=strategy, max_new_tokens=5, seed=3)
    seen = _spy_batches(model, monkeypatch)
    shared = generate(model, tokenizer, prompts, decoding, batch_size=4)
    assert seen == [False, True, True]  # the prefix, then both batches' prefill behind it
    seen.clear()
    monkeypatch.setattr(prefix.SharedPrefix, "build", classmethod(lambda cls, *args, **kwargs: None))
    whole = generate(model, tokenizer, prompts, decoding, batch_size=4)
    assert seen == [False, False]
    assert shared == whole and len(set(whole)) > 1


def test_not_used_where_it_would_change_the_result(tiny_folder, tokenizer, monkeypatch):
    """Beam search reorders the cache; prompt learning puts virtual tokens in it."""
    from peft import PromptTuningConfig, get_peft_model

    model = _model(tiny_folder)
    prompts = [f"Review: {r}\nLabel:" for r in REVIEWS[:3]]
    seen = _spy_batches(model, monkeypatch)
    generate(model, tokenizer, prompts, DecodingConfig(strategy="beam", num_beams=2,
                                                                 max_new_tokens=3, seed=0), batch_size=3)
    assert seen and not any(seen)
    tuned = get_peft_model(_model(tiny_folder), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert prefix.SharedPrefix.build(tuned, tokenizer("Review: the same opening")["input_ids"]) is None
    assert prefix.SharedPrefix.build(model, [1, 2]) is None  # too short to pay
    opening = tokenizer("Review: the same opening")["input_ids"]
    assert prefix.SharedPrefix.build(model, opening, generation=True) is not None
    model.generation_config.cache_implementation = "static"  # generate builds a cache of that kind
    assert prefix.SharedPrefix.build(model, opening, generation=True) is None
