"""Offline evaluation metrics: pinned against sacrebleu / rouge_score and hand-computed values."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from pipeline.scoring import metrics
from pipeline.scoring.labels import classification_scores, parse_label
from pipeline.scoring.metrics import (
    METRICS,
    compute,
    exact_match,
    hub_metric,
    normalize_answer,
    reference_streams,
    token_f1,
)

PREDS = ["the cat sat on the mat", "a quick brown fox jumps", "hello world"]
# Varying reference counts: 2, 1, 3.
REFS = [
    ["the cat sat on the mat", "a cat was sitting on the mat"],
    ["the quick brown fox jumped over the dog"],
    ["hello there world", "hi world", "hello, world!"],
]


def corpus(names, preds, refs, **kwargs):
    return compute(names, preds, refs, **kwargs)[0]


# --------------------------------------------------------------------------- BLEU / chrF


def test_bleu_identical_is_100_and_disjoint_is_0():
    same = ["the quick brown fox jumps over the lazy dog"]
    assert corpus(["bleu"], same, [same])["bleu"] == pytest.approx(100.0)
    assert corpus(["bleu"], ["alpha beta gamma delta"], [["one two three four"]])["bleu"] == 0.0


def test_bleu_chrf_single_reference_match_sacrebleu():
    refs = [[r[0]] for r in REFS]
    got = corpus(["bleu", "chrf"], PREDS, refs)
    stream = [[r[0] for r in REFS]]
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, stream).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, stream).score)


def test_bleu_chrf_same_number_of_references_match_sacrebleu():
    refs = [["the cat sat on a mat", "cat on mat"], ["a fast brown fox jumps", "the fox"]]
    preds = ["the cat sat on the mat", "a quick brown fox jumps"]
    streams = [[r[0] for r in refs], [r[1] for r in refs]]
    got = corpus(["bleu", "chrf"], preds, refs)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)


def test_reference_streams_pad_with_none():
    assert reference_streams([["a", "b"], ["c"], ["d", "e", "f"]]) == [
        ["a", "c", "d"],
        ["b", None, "e"],
        [None, None, "f"],
    ]


def test_varying_reference_counts_match_sacrebleu_with_none_padding():
    streams = [
        [REFS[0][0], REFS[1][0], REFS[2][0]],
        [REFS[0][1], None, REFS[2][1]],
        [None, None, REFS[2][2]],
    ]
    got = corpus(["bleu", "chrf"], PREDS, REFS)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, streams).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, streams).score)


def test_varying_reference_counts_equal_padding_with_duplicates():
    # Independent of sacrebleu's None handling: repeating an example's own reference changes
    # neither clipped n-gram counts nor the closest reference length, nor chrF's best reference.
    width = max(len(r) for r in REFS)
    padded = [r + [r[0]] * (width - len(r)) for r in REFS]
    varying = corpus(["bleu", "chrf"], PREDS, REFS)
    assert varying == pytest.approx(corpus(["bleu", "chrf"], PREDS, padded))


def test_ragged_streams_would_silently_drop_examples():
    # Why reference_streams pads: sacrebleu zips the streams, so a short one truncates the corpus.
    preds = ["a b c d", "x y"]
    ragged = sacrebleu.corpus_bleu(preds, [["a b c d", "x y"], ["a b c d"]]).score
    assert ragged == pytest.approx(100.0)  # the second example was never scored
    assert corpus(["bleu"], preds, [["a b c d", "a b c d"], ["x y z w"]])["bleu"] < 100.0


def test_per_example_bleu_chrf_are_sacrebleu_sentence_scores():
    _, rows = compute(["bleu", "chrf"], PREDS, REFS)
    for pred, refs, row in zip(PREDS, REFS, rows):
        assert row["bleu"] == pytest.approx(sacrebleu.sentence_bleu(pred, refs).score)
        assert row["chrf"] == pytest.approx(sacrebleu.sentence_chrf(pred, refs).score)


# --------------------------------------------------------------------------- ROUGE


def test_rouge1_hand_computed():
    # 3 of 3 predicted unigrams match (P=1), 3 of 6 reference unigrams are covered (R=0.5).
    got = corpus(["rouge1"], ["the cat sat"], [["the cat sat on the mat"]])
    assert got["rouge1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)
    assert got["rouge1"] == pytest.approx(66.6667, abs=1e-3)


def test_rouge_single_reference_matches_rouge_score():
    types_ = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types_, use_stemmer=True)
    preds = ["the cats are sitting on mats", "dogs running\nin the park"]
    refs = [["a cat sat on the mat"], ["the dog runs\nin a park"]]
    got, rows = compute(types_, preds, refs)
    for t in types_:
        expected = [100 * scorer.score(r[0], p)[t].fmeasure for p, r in zip(preds, refs)]
        assert [row[t] for row in rows] == pytest.approx(expected)
        assert got[t] == pytest.approx(sum(expected) / len(expected))


def test_rouge_multi_reference_takes_best_reference_per_example():
    types_ = ["rouge1", "rouge2", "rougeL"]
    scorer = rouge_scorer.RougeScorer(types_, use_stemmer=True)
    got, rows = compute(types_, PREDS, REFS)
    for t in types_:
        expected = [max(100 * scorer.score(ref, p)[t].fmeasure for ref in refs)
                    for p, refs in zip(PREDS, REFS)]
        assert [row[t] for row in rows] == pytest.approx(expected)
        assert got[t] == pytest.approx(sum(expected) / len(expected))


# --------------------------------------------------------------------------- SQuAD


def test_normalize_answer_squad_rules():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    # string.punctuation is ASCII: the official script keeps French guillemets.
    assert normalize_answer("« Le Chat »") == "« le chat »"


def test_exact_match_and_f1_hand_computed():
    assert exact_match("The cat.", ["a cat"]) == 1.0
    assert exact_match("cat sat", ["cat"]) == 0.0
    assert exact_match("dog", ["cat", "The dog!"]) == 1.0  # max over references
    # pred tokens [cat, sat, on, mat], ref [cat, sat]: P=2/4, R=2/2 -> F1=2/3.
    assert token_f1("The cat sat on a mat", ["cat sat"]) == pytest.approx(2 / 3)
    # Best of 0 and (P=1, R=2/3 -> 0.8).
    assert token_f1("cat sat", ["dog", "cat sat down"]) == pytest.approx(0.8)
    assert token_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts clip


def test_f1_empty_answers_follow_squad_v2():
    assert token_f1("", [""]) == 1.0
    assert token_f1("the", [""]) == 1.0  # only an article: empty after normalisation
    assert token_f1("", ["cat"]) == 0.0
    assert token_f1("cat", [""]) == 0.0
    with pytest.raises(ValueError):
        token_f1("cat", [])


def test_compute_squad_means_on_0_100():
    got, rows = compute(["exact_match", "f1"], ["The cat.", "cat sat on mat"],
                        [["a cat"], ["dog", "cat sat"]])
    assert rows == [{"exact_match": 100.0, "f1": 100.0},
                    {"exact_match": 0.0, "f1": pytest.approx(100 * 2 / 3)}]
    assert got["exact_match"] == pytest.approx(50.0)
    assert got["f1"] == pytest.approx((100 + 100 * 2 / 3) / 2)


# --------------------------------------------------------------------------- edge cases

ALL_TEXT = ["bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match", "f1"]


def test_empty_prediction_scores_zero_without_crashing():
    got, rows = compute(ALL_TEXT, ["", "the cat sat"], [["the cat sat"], ["the cat sat"]])
    assert rows[0]["bleu"] == 0.0 and rows[0]["f1"] == 0.0 and rows[0]["rouge1"] == 0.0
    assert rows[1]["exact_match"] == 100.0
    only_empty = corpus(ALL_TEXT, [""], [["the cat sat"]])
    assert only_empty["bleu"] == 0.0 and only_empty["f1"] == 0.0 and only_empty["chrf"] == 0.0


def test_all_empty_corpus():
    got = corpus(ALL_TEXT, ["", ""], [[""], [""]])
    assert got["bleu"] == 0.0 and got["chrf"] == 0.0 and got["rouge1"] == 0.0
    # SQuAD v2: an empty answer matching an empty reference is a hit.
    assert got["exact_match"] == 100.0 and got["f1"] == 100.0


def test_zero_examples_and_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="empty"):
        compute(["bleu"], [], [])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        compute(["bleu"], ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no reference"):
        compute(["bleu"], ["a"], [[]])
    with pytest.raises(TypeError, match=r"wrap a single reference"):
        compute(["bleu"], ["a"], ["a"])


def test_unicode_accents_guillemets_cjk():
    french = "« Le café crème est très bon »"
    got = corpus(["bleu", "chrf", "rouge1", "exact_match", "f1"], [french], [[french]])
    assert got["bleu"] == pytest.approx(100.0)
    assert got["chrf"] == pytest.approx(100.0)
    assert got["exact_match"] == 100.0 and got["f1"] == 100.0
    assert got["rouge1"] == pytest.approx(100.0)
    assert exact_match("CAFÉ", ["café"]) == 1.0

    cjk_pred, cjk_refs = ["猫が座った", "我爱北京"], [["猫が座った"], ["我爱上海"]]
    got = corpus(["bleu", "chrf", "rouge1", "f1"], cjk_pred, cjk_refs)
    stream = [[r[0] for r in cjk_refs]]
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(cjk_pred, stream).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(cjk_pred, stream).score)
    assert 0 < got["chrf"] < 100
    # Documented limitation: rouge_score's tokenizer keeps only [a-z0-9], so CJK has no tokens.
    assert got["rouge1"] == 0.0
    assert got["f1"] == 50.0  # whitespace tokens: one exact, one different sentence


# --------------------------------------------------------------------------- classification

LABELS = ["positive", "negative", "neutral"]


def test_parse_label_rules():
    assert parse_label("Positive", LABELS) == "positive"
    assert parse_label("  NEGATIVE \n", LABELS) == "negative"
    assert parse_label("The sentiment is negative, not positive.", LABELS) == "negative"
    assert parse_label("Answer: neutral.", LABELS) == "neutral"
    assert parse_label("positively great", LABELS) is None  # not a whole word
    assert parse_label("no idea", LABELS) is None
    assert parse_label("", LABELS) is None
    assert parse_label("Positive", ["Positive", "Negative"]) == "Positive"  # configured spelling
    # Whole-output match beats the earlier-start rule; same start position is a tie -> None.
    multi = ["yes", "yes and no"]
    assert parse_label("Yes and no", multi) == "yes and no"
    assert parse_label("yes and no, probably", multi) is None
    assert parse_label("well, yes", multi) == "yes"


def test_parse_label_rejects_bad_label_sets():
    with pytest.raises(ValueError, match="distinct"):
        parse_label("x", ["Yes", "yes"])
    with pytest.raises(ValueError):
        parse_label("x", [])


def test_classification_hand_computed_with_unparsable():
    outputs = ["positive", "negative", "Negative.", "no idea", "positive", "neutral"]
    gold = [["positive"], ["positive"], ["negative"], ["Negative"], ["neutral"], ["neutral"]]
    got, rows = compute(["accuracy", "macro_f1"], outputs, gold, labels=LABELS)
    # positive: TP=1 FP=1 FN=1 -> 2/4; negative: TP=1 FP=1 FN=1 (the unparsable) -> 2/4;
    # neutral: TP=1 FP=0 FN=1 -> 2/3.
    assert got == pytest.approx({
        "accuracy": 50.0,
        "macro_f1": 100 * (0.5 + 0.5 + 2 / 3) / 3,
        "f1/positive": 50.0,
        "f1/negative": 50.0,
        "f1/neutral": 100 * 2 / 3,
        "unparsable_rate": 100 / 6,
    })
    assert [row["accuracy"] for row in rows] == [100.0, 0.0, 100.0, 0.0, 0.0, 100.0]
    assert [row["unparsable"] for row in rows] == [0.0, 0.0, 0.0, 100.0, 0.0, 0.0]


def test_classification_scores_unparsable_is_never_a_positive():
    # Two unparsable outputs for gold "a": FN for a, never TP/FP for anything.
    gold, predicted = ["a", "a", "b", "b"], [None, None, "b", "b"]
    got = classification_scores(gold, predicted, ["a", "b", "c"])
    assert got["f1/a"] == 0.0
    assert got["f1/b"] == 100.0  # TP=2, FP=0, FN=0
    assert got["f1/c"] == 0.0  # neither gold nor predicted: 0 (zero_division default)
    assert got["macro_f1"] == pytest.approx(100 / 3)
    assert got["accuracy"] == 50.0 and got["unparsable_rate"] == 50.0


def test_accuracy_alone_reports_unparsable_rate_only():
    got = corpus(["accuracy"], ["yes", "maybe"], [["yes"], ["no"]], labels=["yes", "no"])
    assert got == {"accuracy": 50.0, "unparsable_rate": 50.0}


def test_classification_needs_labels_and_known_gold():
    with pytest.raises(ValueError, match=r"labels=\["):
        compute(["macro_f1"], ["yes"], [["yes"]])
    with pytest.raises(ValueError, match="not one of the configured labels"):
        compute(["accuracy"], ["yes"], [["perhaps"]], labels=["yes", "no"])
    with pytest.raises(ValueError, match="exactly one reference"):
        compute(["accuracy"], ["yes"], [["yes", "no"]], labels=["yes", "no"])


# --------------------------------------------------------------------------- registry / hub


def test_unknown_metric_lists_available_names():
    with pytest.raises(ValueError) as info:
        compute(["meteor"], ["a"], [["a"]])
    message = str(info.value)
    assert "'meteor'" in message
    for name in METRICS:
        assert name in message
    assert "evaluate:" in message


def test_registry_names_and_per_example_shape():
    assert list(METRICS) == ["bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum",
                             "exact_match", "f1", "accuracy", "macro_f1"]
    got, rows = compute(ALL_TEXT, PREDS, REFS)
    assert list(got) == ALL_TEXT
    assert len(rows) == len(PREDS) and all(set(row) == set(ALL_TEXT) for row in rows)
    assert all(0.0 <= value <= 100.0 for value in got.values())


def _fake_evaluate(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "evaluate", types.SimpleNamespace(load=load))


def test_hub_metric_offline_raises_runtime_error_naming_metric(monkeypatch):
    def offline(name):
        raise FileNotFoundError(f"Couldn't find a module script at ./{name}/{name}.py")

    _fake_evaluate(monkeypatch, offline)
    with pytest.raises(RuntimeError) as info:
        hub_metric("bleu")
    message = str(info.value)
    assert "'bleu'" in message
    assert "evaluate.load needs the Hugging Face hub" in message
    assert "local metric script path" in message
    assert "rougeLsum" in message and "macro_f1" in message
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_compute_with_evaluate_metric_flattens_numeric_outputs(monkeypatch):
    calls = []

    class FakeMetric:
        def compute(self, predictions, references):
            calls.append(references)
            return {"score": 0.5, "precisions": [1.0, 0.25], "counts": {"n": 3},
                    "signature": "v1", "ok": True}

    _fake_evaluate(monkeypatch, lambda name: FakeMetric())
    got, rows = compute(["evaluate:fake", "exact_match"], ["a", "b"], [["a"], ["c"]])
    assert got == {"fake/score": 0.5, "fake/precisions/0": 1.0, "fake/precisions/1": 0.25,
                   "fake/counts/n": 3.0, "exact_match": 50.0}
    assert rows == [{"exact_match": 100.0}, {"exact_match": 0.0}]
    assert calls == [["a", "c"]]  # single references go flat
    compute(["evaluate:fake"], ["a", "b"], [["a", "x"], ["c"]])
    assert calls[-1] == [["a", "x"], ["c"]]


def test_module_does_not_import_torch():
    code = "import sys, pipeline.scoring.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    assert metrics.HUB_PREFIX == "evaluate:"
