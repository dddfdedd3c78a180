"""Packed (padding-free) batches: bin packing, loss equal to padded batches, no attention across
examples, real-token counting, and the pack_length check."""

from __future__ import annotations

import pytest
import torch

from pipeline.commands import validation
from pipeline.data import packing
from pipeline.data.packing import IGNORE_INDEX, collator, pack_rows, real_tokens
from pipeline.data.splits import build_datasets
from tests.conftest import write_jsonl
from tests.data.test_data import data_cfg


def test_first_fit_decreasing_fills_rows_within_the_budget():
    lengths = [300, 200, 100, 50, 400, 30]
    rows = pack_rows(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert len(rows) == 3  # 1080 tokens: 3 rows is the fewest that can hold them
    # Balanced rows: first-fit decreasing alone would fill one row with 500 tokens and the
    # other with 40, and the batch would be 2 x 500 wide.
    assert sorted(sum([250, 250, 20, 20][i] for i in row) for row in pack_rows([250, 250, 20, 20], 512)) == [270, 270]
    with pytest.raises(ValueError, match="data.pack_length=100"):
        pack_rows([120], 100)


def test_rows_are_as_wide_as_computes_least():
    # Long examples of similar length: packing them two to a row would double each row's
    # attention to save little padding, so each keeps a row as wide as the longest.
    long = [170, 150, 160, 140, 165, 155, 145, 171]
    rows = pack_rows(long, 512)
    assert len(rows) == len(long) and all(len(row) == 1 for row in rows)
    # Many short examples beside one long one share rows no wider than the long one.
    short = [96, 30, 28, 40, 35, 25, 33, 45]
    rows = pack_rows(short, 512)
    fills = [sum(short[i] for i in row) for row in rows]
    assert len(rows) < len(short) and max(fills) <= 96 + 8
    assert sorted(i for row in rows for i in row) == list(range(len(short)))
    # Without a cost for width, the fewest rows win, as plain first-fit decreasing packs them.
    packing.ATTENTION_PER_WIDTH, saved = 0.0, packing.ATTENTION_PER_WIDTH
    try:
        assert len(pack_rows(short, 512)) == 1
    finally:
        packing.ATTENTION_PER_WIDTH = saved


@pytest.fixture(scope="module")
def features(tokenizer, tmp_path_factory):
    records = [{"prompt": "p" * n, "completion": "word " * (n + 2)} for n in (3, 9, 17, 30, 5)]
    path = write_jsonl(tmp_path_factory.mktemp("packing") / "d.jsonl", records)
    rows = build_datasets(data_cfg(path), tokenizer).train
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder, attn_implementation="sdpa").eval()
    model.config.use_cache = False  # as pipeline.model.loading.load_model sets it for training
    return model


def test_packed_rows_stack_with_a_padding_segment_and_count_real_tokens(tokenizer, features):
    lengths = [len(f["input_ids"]) for f in features]
    budget = max(lengths) + 8
    packed = collator(tokenizer, packing=True, pack_length=budget)(features)
    padded = collator(tokenizer, packing=False)(features)
    rows, width = packed["input_ids"].shape
    assert "attention_mask" not in packed and rows == len(pack_rows(lengths, budget)) > 1
    assert width <= budget and width % 8 == 0
    assert real_tokens(packed) == real_tokens(padded) == sum(lengths)
    # Every example keeps its own labels (but the first, never a target) and positions 0..n-1.
    label_tokens = (packed["labels"] != IGNORE_INDEX).sum()
    assert label_tokens == sum(sum(t != IGNORE_INDEX for t in f["labels"][1:]) for f in features)
    assert (packed["position_ids"][:, 0] == 0).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_packed_loss_equals_padded_loss(tokenizer, features, tiny_model, device):
    import copy

    model = copy.deepcopy(tiny_model).to(device)
    budget = max(len(f["input_ids"]) for f in features) + 8  # several rows, padded tails
    padded = collator(tokenizer, packing=False)(features)
    # CUDA's fp32 attention kernels sum in another order than the CPU's: 1e-5 still tells a
    # packed row that mixes its examples (an error of whole units of loss) from one that doesn't.
    with torch.no_grad():
        expected = model(**{k: v.to(device) for k, v in padded.items()}).loss
        for pack_length in (budget, 512):
            packed = collator(tokenizer, packing=True, pack_length=pack_length)(features)
            loss = model(**{k: v.to(device) for k, v in packed.items()}).loss
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_packed_examples_do_not_attend_to_each_other(tokenizer, features, tiny_model, monkeypatch):
    monkeypatch.setattr(packing, "ATTENTION_PER_WIDTH", 0.0)  # width costs nothing: one row is cheapest
    pack = collator(tokenizer, packing=True, pack_length=512)
    packed = pack(features)
    assert packed["input_ids"].shape[0] == 1  # all examples share one row
    changed = [dict(f) for f in features]
    first = changed[0]["input_ids"]
    changed[0]["input_ids"] = first[:2] + [(t + 7) % 1000 + 10 for t in first[2:]]  # same length
    perturbed = pack(changed)
    positions = packed["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
    with torch.no_grad():
        before = tiny_model(**packed).logits[0]
        after = tiny_model(**perturbed).logits[0]
    # Locate the perturbed example's segment: the only one whose ids differ.
    segments = list(zip(starts[:-1], starts[1:]))
    differs = [not torch.equal(packed["input_ids"][0, s:e], perturbed["input_ids"][0, s:e])
               for s, e in segments]
    assert differs.count(True) == 1
    for (s, e), own in zip(segments, differs):
        if own:
            assert not torch.allclose(before[s:e], after[s:e], atol=1e-4)  # the change is visible
        else:
            torch.testing.assert_close(before[s:e], after[s:e], rtol=0, atol=1e-5)


def test_pack_length_below_max_length_is_a_config_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    problems = validation._check_data(data_cfg(path, packing=True, pack_length=64, max_length=128))
    assert problems == ["data.pack_length=64 must be >= data.max_length=128 (every example must "
                        "fit in a packed row); raise it, or set data.packing=false"]
    assert validation._check_data(data_cfg(path, packing=False, pack_length=64, max_length=128)) == []
