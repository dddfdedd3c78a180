"""Classification by generation: each output is parsed into one of the labels (:func:`parse_label`),
then scored: accuracy, macro and per-label F1, and the unparsable rate, on the 0-100 scale of
:mod:`pipeline.scoring.metrics` (which registers them as ``accuracy`` and ``macro_f1``).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

# Corpus values, then one dict of per-example values per example (as pipeline.scoring.metrics.Scores).
Scores = Tuple[Dict[str, float], List[Dict[str, float]]]


def _fold(text: str) -> str:
    # Case-insensitive comparison form: casefold (handles e.g. German sharp s), single spaces.
    return " ".join(text.split()).casefold()


def _validate_labels(labels: Sequence[str]) -> None:
    if isinstance(labels, str) or len(labels) == 0:
        raise ValueError("labels must be a non-empty list of label strings")
    folded = [_fold(label) for label in labels]
    if "" in folded:
        raise ValueError("labels must not be empty strings")
    if len(set(folded)) != len(folded):
        raise ValueError(f"labels must be distinct ignoring case: {list(labels)}")


def parse_label(output: str, labels: Sequence[str]) -> Optional[str]:
    """Map a free-form generation to one of ``labels``, or ``None`` when it is unparsable.

    The rule, case-insensitive after stripping surrounding whitespace:

    1. the whole output equal to a label wins;
    2. otherwise the label whose first whole-word occurrence comes earliest in the output;
    3. no label found, or two labels starting at the same position -> ``None``.

    Args:
        output: The model's generation.
        labels: The configured label set.

    Returns:
        The matching label as spelled in ``labels``, or ``None``.
    """
    _validate_labels(labels)
    text = _fold(output)
    for label in labels:
        if text == _fold(label):
            return label
    starts = {}
    for label in labels:
        # Lookarounds instead of \b so labels that start/end with punctuation still work.
        pattern = r"(?<!\w)" + re.escape(_fold(label)) + r"(?!\w)"
        found = re.search(pattern, text)
        if found:
            starts[label] = found.start()
    if not starts:
        return None
    first = min(starts.values())
    winners = [label for label, start in starts.items() if start == first]
    return winners[0] if len(winners) == 1 else None


def _gold_label(refs: Sequence[str], labels: Sequence[str], index: int) -> str:
    if len(refs) != 1:
        raise ValueError(f"classification needs exactly one reference label per example; "
                         f"example {index} has {len(refs)}")
    by_folded = {_fold(label): label for label in labels}
    gold = by_folded.get(_fold(refs[0]))
    if gold is None:
        raise ValueError(f"reference label {refs[0]!r} of example {index} is not one of the "
                         f"configured labels {list(labels)}")
    return gold


def classification_scores(gold: Sequence[str], predicted: Sequence[Optional[str]],
                          labels: Sequence[str]) -> Dict[str, float]:
    """Accuracy, macro F1, per-label F1 and unparsable rate, all 0-100.

    ``None`` in ``predicted`` is an unparsable output: it is wrong for accuracy, a false
    negative for its true label and never a true or false positive for any label. Macro F1 is
    the unweighted mean over ``labels``; a label that is neither gold nor predicted anywhere
    has F1 0 (scikit-learn's default ``zero_division``).

    Args:
        gold: The true label per example.
        predicted: The parsed label per example, ``None`` when unparsable.
        labels: The configured label set.

    Returns:
        ``accuracy``, ``macro_f1``, ``f1/<label>`` for each label and ``unparsable_rate``.
    """
    # The few lines of F1 arithmetic are written out to avoid a scikit-learn dependency.
    n = len(gold)
    scores = {"accuracy": 100.0 * sum(g == p for g, p in zip(gold, predicted)) / n}
    per_label = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        # F1 = 2TP / (2TP + FP + FN); same as 2PR/(P+R) but defined when P or R is 0/0.
        denominator = 2 * tp + fp + fn
        per_label[label] = 100.0 * 2 * tp / denominator if denominator else 0.0
    scores["macro_f1"] = sum(per_label.values()) / len(labels)
    scores.update({f"f1/{label}": value for label, value in per_label.items()})
    scores["unparsable_rate"] = 100.0 * sum(p is None for p in predicted) / n
    return scores


def score_classification(names: Sequence[str], predictions: Sequence[str],
                          references: Sequence[Sequence[str]],
                          labels: Optional[Sequence[str]]) -> Scores:
    _validate_labels(labels)
    gold = [_gold_label(refs, labels, i) for i, refs in enumerate(references)]
    predicted = [parse_label(pred, labels) for pred in predictions]
    everything = classification_scores(gold, predicted, labels)
    # accuracy -> accuracy; macro_f1 -> macro_f1 and its per-label parts; always the
    # unparsable rate, without which neither number can be read.
    corpus = {}
    if "accuracy" in names:
        corpus["accuracy"] = everything["accuracy"]
    if "macro_f1" in names:
        corpus["macro_f1"] = everything["macro_f1"]
        corpus.update({k: v for k, v in everything.items() if k.startswith("f1/")})
    corpus["unparsable_rate"] = everything["unparsable_rate"]
    per_example = [{"accuracy": 100.0 * (g == p), "unparsable": 100.0 * (p is None)}
                   for g, p in zip(gold, predicted)]
    return corpus, per_example
