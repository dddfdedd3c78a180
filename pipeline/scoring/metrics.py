"""Text-generation evaluation metrics, computed offline with the field's reference implementations.

BLEU and chrF come from sacrebleu, ROUGE from Google's ``rouge_score``, exact match and token F1
follow the official SQuAD evaluation script, and classification-by-generation maps each output to
a label with :func:`pipeline.scoring.labels.parse_label` before scoring. Nothing here needs the
network; metrics that only exist on the Hugging Face hub are reachable through :func:`hub_metric`
(``evaluate:<name>`` in :func:`compute`).

Scale: every value :func:`compute` returns, corpus-level and per-example, is on a 0-100 scale so
that one results table reads consistently. BLEU and chrF are reported as sacrebleu reports them
(already 0-100); ROUGE F-measure, exact match, token F1, accuracy, macro/per-label F1 and the
unparsable rate are fractions multiplied by 100. The standalone helpers :func:`exact_match` and
:func:`token_f1` keep SQuAD's own 0-1 scale.

Inputs: ``predictions`` is one string per example and ``references`` one *list* of strings per
example; examples may have different numbers of references, but each needs at least one.

Known limitations of the reference implementations (kept on purpose, so numbers stay comparable
with published ones):

* sacrebleu's default ``13a`` tokenizer does not segment Chinese/Japanese, so BLEU on CJK text is
  close to meaningless (an unsegmented sentence is a single token); chrF works on characters.
* ``rouge_score``'s default tokenizer keeps only ``[a-z0-9]``: accented letters are dropped and
  CJK text produces no tokens at all (ROUGE 0).
* SQuAD normalisation removes ASCII punctuation only (French guillemets survive) and splits on
  whitespace.

This module imports no torch; ``rouge_score`` (nltk: 0.35 s) and ``evaluate`` (slow to import) are
imported only where they score.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from sacrebleu.metrics import BLEU, CHRF

from pipeline.scoring.labels import score_classification

# Corpus values, then one dict of per-example values per example.
Scores = Tuple[Dict[str, float], List[Dict[str, float]]]
# scorer(names, predictions, references, labels) for the requested names sharing that scorer.
Scorer = Callable[
    [Sequence[str], Sequence[str], Sequence[Sequence[str]], Optional[Sequence[str]]], Scores
]

HUB_PREFIX = "evaluate:"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# --------------------------------------------------------------------------- SQuAD EM / F1


def normalize_answer(text: str) -> str:
    """Normalise an answer exactly as the official SQuAD v1.1 evaluation script does.

    Lower-cases, removes ASCII punctuation (``string.punctuation``), removes the articles
    a/an/the as whole words, and collapses whitespace.

    Args:
        text: A prediction or reference answer.

    Returns:
        The normalised answer.
    """
    # Same order as the official script: lower -> punctuation -> articles -> whitespace.
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def _check_references(references: Sequence[str]) -> None:
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    if len(references) == 0:
        raise ValueError("at least one reference is needed (use [''] for 'no answer')")


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """SQuAD exact match: 1.0 if the normalised prediction equals any normalised reference.

    Args:
        prediction: The generated answer.
        references: One or more acceptable answers.

    Returns:
        1.0 or 0.0 (max over references).

    Raises:
        ValueError: If ``references`` is empty.
    """
    _check_references(references)
    pred = normalize_answer(prediction)
    return max(float(pred == normalize_answer(ref)) for ref in references)


def _f1_single(prediction: str, reference: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    # SQuAD v2 rule: an empty answer matches only an empty answer. v1.1 would divide by zero.
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    num_same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token-level F1 on normalised tokens, max over references.

    Both sides empty after normalisation gives 1.0, exactly one side empty gives 0.0 (as the
    SQuAD v2 script does).

    Args:
        prediction: The generated answer.
        references: One or more acceptable answers.

    Returns:
        F1 in [0, 1].

    Raises:
        ValueError: If ``references`` is empty.
    """
    _check_references(references)
    return max(_f1_single(prediction, ref) for ref in references)


def _score_squad(names: Sequence[str], predictions: Sequence[str],
                 references: Sequence[Sequence[str]], labels: Optional[Sequence[str]]) -> Scores:
    functions = {"exact_match": exact_match, "f1": token_f1}
    per_example = [
        {name: 100.0 * functions[name](pred, refs) for name in names}
        for pred, refs in zip(predictions, references)
    ]
    return _means(names, per_example), per_example


# --------------------------------------------------------------------------- sacrebleu


def reference_streams(references: Sequence[Sequence[str]]) -> List[List[Optional[str]]]:
    """Transpose per-example references into sacrebleu's reference streams.

    sacrebleu wants ``streams[k][i]`` = k-th reference of example i, every stream as long as the
    hypotheses. With a varying number of references, the missing entries must be ``None``:
    sacrebleu drops ``None`` per segment, whereas ``''`` would count as a real (empty)
    reference and change BLEU's closest-reference length. Ragged streams must not be passed
    either: sacrebleu zips them, which silently drops the examples beyond the shortest stream.

    Args:
        references: One list of reference strings per example (each non-empty).

    Returns:
        ``max(len(refs))`` streams, each ``len(references)`` long, padded with ``None``.
    """
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU with sacrebleu's defaults (13a tokenizer, 'exp' smoothing), 0-100.

    Args:
        predictions: One generation per example.
        references: One list of references per example; the count may vary.

    Returns:
        The BLEU score as sacrebleu reports it.
    """
    return float(BLEU().corpus_score(list(predictions), reference_streams(references)).score)


def corpus_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF with sacrebleu's defaults (character 6-grams, beta 2, no word n-grams), 0-100.

    Args:
        predictions: One generation per example.
        references: One list of references per example; the count may vary.

    Returns:
        The chrF score as sacrebleu reports it.
    """
    return float(CHRF().corpus_score(list(predictions), reference_streams(references)).score)


def _score_bleu(names: Sequence[str], predictions: Sequence[str],
                references: Sequence[Sequence[str]], labels: Optional[Sequence[str]]) -> Scores:
    # Same settings as sacrebleu.sentence_bleu: 'exp' smoothing (NIST geometric) with effective
    # order, so a short output without 4-gram matches is not zeroed outright. One object is
    # reused instead of calling sentence_bleu per example, which would rebuild it each time.
    sentence = BLEU(effective_order=True)
    per_example = [
        {"bleu": float(sentence.sentence_score(pred, list(refs)).score)}
        for pred, refs in zip(predictions, references)
    ]
    return {"bleu": corpus_bleu(predictions, references)}, per_example


def _score_chrf(names: Sequence[str], predictions: Sequence[str],
                references: Sequence[Sequence[str]], labels: Optional[Sequence[str]]) -> Scores:
    sentence = CHRF()
    per_example = [
        {"chrf": float(sentence.sentence_score(pred, list(refs)).score)}
        for pred, refs in zip(predictions, references)
    ]
    return {"chrf": corpus_chrf(predictions, references)}, per_example


# --------------------------------------------------------------------------- ROUGE


def _score_rouge(names: Sequence[str], predictions: Sequence[str],
                 references: Sequence[Sequence[str]], labels: Optional[Sequence[str]]) -> Scores:
    from rouge_score import rouge_scorer  # lazy: it imports nltk (0.35 s), needed only to score ROUGE

    # One scorer for all requested types: the tokenisation is then shared between them.
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    per_example = []
    for pred, refs in zip(predictions, references):
        # score_multi keeps, per ROUGE type, the reference with the best F-measure.
        best = scorer.score_multi(list(refs), pred)
        per_example.append({name: 100.0 * float(best[name].fmeasure) for name in names})
    return _means(names, per_example), per_example


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class MetricSpec:
    """One offline metric.

    Attributes:
        name: The key in :data:`METRICS` and in the results.
        description: What it computes, for listings and error messages.
        scorer: Computes this metric (and the other requested metrics it shares work with, i.e.
            the same ``scorer``) as ``scorer(names, predictions, references, labels)``.
        needs_labels: Whether ``compute`` must be given ``labels``.
    """

    name: str
    description: str
    scorer: Scorer
    needs_labels: bool = False


METRICS: Dict[str, MetricSpec] = {
    spec.name: spec
    for spec in [
        MetricSpec("bleu", "sacrebleu corpus BLEU (13a); per example: sentence BLEU", _score_bleu),
        MetricSpec("chrf", "sacrebleu corpus chrF; per example: sentence chrF", _score_chrf),
        *[MetricSpec(t, f"rouge_score {t} F-measure (stemmed), best reference, mean",
                     _score_rouge) for t in ROUGE_TYPES],
        MetricSpec("exact_match", "SQuAD exact match, best reference, mean", _score_squad),
        MetricSpec("f1", "SQuAD token F1, best reference, mean", _score_squad),
        MetricSpec("accuracy", "classification by generation: accuracy (+ unparsable_rate)",
                   score_classification, needs_labels=True),
        MetricSpec("macro_f1", "classification by generation: macro F1 (+ f1/<label>, "
                   "unparsable_rate)", score_classification, needs_labels=True),
    ]
}


def _means(names: Sequence[str], per_example: Sequence[Dict[str, float]]) -> Dict[str, float]:
    return {name: sum(row[name] for row in per_example) / len(per_example) for name in names}


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if len(predictions) == 0:
        raise ValueError("nothing to score: predictions is empty")
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"prediction {i} is {type(pred).__name__}, expected str")
        # A bare string would be iterated character by character: a silent, wrong score.
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{i}] must be a list of strings; wrap a single "
                            f"reference as [ref]")
        if len(refs) == 0:
            raise ValueError(f"example {i} has no reference (use [''] for an empty answer)")


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown metric {name!r}; available: {', '.join(METRICS)}, "
                      f"or {HUB_PREFIX}<name_or_path> for a Hugging Face evaluate metric")


def compute(metric_names: Sequence[str], predictions: Sequence[str],
            references: Sequence[Sequence[str]],
            labels: Optional[Sequence[str]] = None) -> Scores:
    """Compute corpus-level and per-example scores, all on a 0-100 scale.

    For the mean-type metrics (ROUGE, exact_match, f1, accuracy) the corpus value is the mean
    of the per-example values. BLEU and chrF are corpus statistics, not means of the
    per-example sentence scores. ``evaluate:<name_or_path>`` entries add their numeric outputs
    as ``<name_or_path>/<key>`` and no per-example scores. Classification adds per example
    ``accuracy`` (100 if correct) and ``unparsable`` (100 if no label could be parsed).

    Args:
        metric_names: Names from :data:`METRICS` and/or ``evaluate:<name_or_path>``.
        predictions: One generation per example.
        references: One list of references per example (at least one each; counts may vary).
            For classification, exactly one: the gold label.
        labels: The label set, required by ``accuracy`` and ``macro_f1``.

    Returns:
        ``(corpus, per_example)``: a dict of corpus values and one dict per example.

    Raises:
        ValueError: For an unknown metric name (the message lists the available ones), a
            classification metric without ``labels``, or inconsistent inputs.
        TypeError: For a prediction that is not a string, or references given as a bare string
            instead of a list of strings.
        RuntimeError: When an ``evaluate:`` metric cannot be loaded.
    """
    names = list(dict.fromkeys(metric_names))  # de-duplicate, keep order
    for name in names:
        if not name.startswith(HUB_PREFIX) and name not in METRICS:
            raise _unknown(name)
    needing = [name for name in names if name in METRICS and METRICS[name].needs_labels]
    if needing and labels is None:
        raise ValueError(f"metrics {needing} score classification by generation and need "
                         f"labels=[...] (the label set the outputs are parsed into)")
    _check_inputs(predictions, references)
    corpus: Dict[str, float] = {}
    per_example: List[Dict[str, float]] = [{} for _ in predictions]
    # Metrics sharing a scorer are computed in one pass (e.g. all ROUGE types together).
    groups: Dict[Scorer, List[str]] = {}
    for name in names:
        if name.startswith(HUB_PREFIX):
            corpus.update(_hub_scores(name[len(HUB_PREFIX):], predictions, references))
        else:
            groups.setdefault(METRICS[name].scorer, []).append(name)
    for scorer, group in groups.items():
        group_corpus, group_rows = scorer(group, predictions, references, labels)
        corpus.update(group_corpus)
        for row, extra in zip(per_example, group_rows):
            row.update(extra)
    return corpus, per_example


# --------------------------------------------------------------------------- evaluate (hub)


def hub_metric(name_or_path: str) -> Any:
    """Load a metric with ``evaluate.load``, for setups that can reach the Hugging Face hub.

    Args:
        name_or_path: A hub metric id (e.g. ``"bleu"``, ``"org/metric"``) or a local path to a
            metric script or folder.

    Returns:
        The ``evaluate.EvaluationModule``.

    Raises:
        RuntimeError: When loading fails (typically offline); the message names the metric and
            lists the built-in offline metrics.
    """
    try:
        import evaluate  # lazy: it pulls in datasets (seconds); only for an evaluate:<name> metric

        return evaluate.load(name_or_path)
    except Exception as err:  # offline shows up as FileNotFoundError, ConnectionError, ...
        raise RuntimeError(
            f"could not load metric {name_or_path!r}: evaluate.load needs the Hugging Face hub "
            f"(network access) or a local metric script path ({type(err).__name__}: {err}). "
            f"Offline built-in metrics: {', '.join(METRICS)}."
        ) from err


def _flatten(prefix: str, value: Any, out: Dict[str, float]) -> None:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        value = value.tolist()
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}", item, out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _flatten(f"{prefix}/{index}", item, out)
    elif isinstance(value, Real) and not isinstance(value, bool):
        out[prefix] = float(value)
    # Anything else (strings, None, bools) is not a score and is left out.


def _hub_scores(name_or_path: str, predictions: Sequence[str],
                references: Sequence[Sequence[str]]) -> Dict[str, float]:
    # Most single-reference hub metrics (exact_match, accuracy, ...) expect a flat list; the
    # multi-reference ones (bleu, rouge, ...) also accept the nested form.
    if all(len(refs) == 1 for refs in references):
        refs_arg: List[Any] = [refs[0] for refs in references]
    else:
        refs_arg = [list(refs) for refs in references]
    result = hub_metric(name_or_path).compute(predictions=list(predictions), references=refs_arg)
    out: Dict[str, float] = {}
    for key, value in (result or {}).items():
        _flatten(f"{name_or_path}/{key}", value, out)
    return out
