"""A run's scores on resamples of its evaluation examples, from its prediction rows
(``eval/predictions.jsonl``, :func:`pipeline.scoring.measurement.write_predictions`).

Each resample draws example indices with replacement; a metric is scored on it the way
``metrics.json`` scores the whole set. Sentence-level metrics (ROUGE, exact match, F1, accuracy,
a benchmark's per-example scores) are means of per-example scores; corpus-level metrics (BLEU,
chrF) are recomputed from sacrebleu's per-sentence sufficient statistics, whose sum over a
resample is exactly the corpus score of that resample (the route ``sacrebleu.significance``
takes, without re-tokenising the text a thousand times); losses are each example's mean token
loss weighted by its token count. The report's paired comparisons
(:mod:`pipeline.comparison.paired`) and a sweep's constraints (:mod:`pipeline.study.trial`)
both resample through here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from pipeline.scoring.benchmarks import PREFIX as BENCHMARK
from pipeline.scoring.losses import MAX_LOG_PERPLEXITY
from pipeline.scoring.metrics import reference_streams

# The same settings as pipeline.scoring.metrics.corpus_bleu / corpus_chrf (sacrebleu's defaults).
CORPUS_METRICS = {"bleu": BLEU, "chrf": CHRF}
# Token-weighted over a resample, from each example's ``loss`` and ``loss_tokens``.
LOSS_METRICS = ("loss", "perplexity")
SIDES = ("base", "tuned", "delta")
# Names (or their starts) of metrics where lower is better: ours, and lm-eval's perplexity kinds.
LOWER_IS_BETTER = ("loss", "perplexity", "unparsable_rate", "word_perplexity", "byte_perplexity", "bits_per_byte")
Rows = List[Dict[str, Any]]  # one run's rows of eval/predictions.jsonl


@dataclass(frozen=True)
class MetricRef:
    """A metric name such as ``tuned/test/bleu`` split into side, evaluation set and metric."""

    side: str
    split: str
    name: str

    @classmethod
    def parse(cls, metric: str) -> Optional["MetricRef"]:
        """The parts of ``<base|tuned|delta>/<set>/<metric>``, or None for any other name; a
        benchmark's set is ``benchmark/<task>`` (``tuned/benchmark/arc_easy/acc``)."""
        parts = metric.split("/", 2)
        if len(parts) != 3 or parts[0] not in SIDES:
            return None
        if parts[1] == BENCHMARK:
            task, _, name = parts[2].partition("/")
            return cls(parts[0], f"{BENCHMARK}/{task}", name) if task and name else None
        return cls(*parts)


def metric_suffix(metric: str) -> str:
    """``test/bleu`` of ``tuned/test/bleu`` (of any side); other names unchanged."""
    return metric.split("/", 1)[1] if MetricRef.parse(metric) else metric


def read_predictions(path: Path) -> Rows:
    """The rows of one run's ``eval/predictions.jsonl`` (see ``scoring.write_predictions``)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _example_key(row: Dict[str, Any]) -> Tuple[int, str]:
    # Index and prompt together: a different data split would reuse the indices for other prompts.
    return row["index"], row["prompt"]


def _sides(metric: MetricRef) -> Tuple[str, ...]:
    return ("base", "tuned") if metric.side == "delta" else (metric.side,)


def _needs(metric: MetricRef) -> Tuple[str, ...]:
    """The per-example scores a row must hold for ``metric`` (none for a corpus metric: it is
    recomputed from the outputs)."""
    if metric.name in CORPUS_METRICS:
        return ()
    return ("loss", "loss_tokens") if metric.name in LOSS_METRICS else (metric.name,)


def can_score(row: Dict[str, Any], metric: MetricRef) -> bool:
    """Whether a prediction row can score ``metric``: a corpus metric needs the row's outputs
    (an example measured only by its loss has none), any other metric its per-example score."""
    if metric.name in CORPUS_METRICS:
        return all(row[side] is not None for side in _sides(metric))
    return all(name in row[f"{side}_scores"] for side in _sides(metric) for name in _needs(metric))


def _unscored(label: str, rows: Rows, metric: MetricRef) -> str:
    """Why the rows of one run of ``label`` cannot score ``metric`` on its set."""
    where = f"eval/predictions.jsonl of a run of {label!r}"
    if not rows:
        return f"{where} has no row of set {metric.split!r}"
    if metric.name in CORPUS_METRICS:
        return f"{where} has no output on set {metric.split!r} to score {metric.name!r} on"
    side, name = next((side, name) for side in _sides(metric) for name in _needs(metric)
                      if name not in rows[0][f"{side}_scores"])
    had = sorted(rows[0][f"{side}_scores"])
    why = " (it was measured before per-example losses were recorded)" if metric.name in LOSS_METRICS else ""
    return (f"{where} has no per-example {name!r} score of the {side} model on set "
            f"{metric.split!r}{why}; it has: {', '.join(had) or 'none'}")


def align(configs: Mapping[str, Sequence[Rows]], metric: MetricRef) -> Dict[str, List[Rows]]:
    """Every run's rows of ``metric``'s evaluation set that can score it (:func:`can_score`),
    restricted to the examples all runs share and put in one order, so that index ``i`` is the
    same prompt in every run.

    Args:
        configs: Per configuration label, the prediction rows of each of its runs (seeds).
        metric: The metric compared; its set is ``test``, ``eval`` or an extra dataset's name.

    Returns:
        The same structure with aligned rows.

    Raises:
        ValueError: When a run has no row that scores the metric (naming what its rows hold
            instead), or no example is shared by every run.
    """
    by_key = []
    for label, runs in configs.items():
        keyed = []
        for rows in runs:
            in_set = [r for r in rows if r["set"] == metric.split]
            scored = {_example_key(r): r for r in in_set if can_score(r, metric)}
            if not scored:
                raise ValueError(_unscored(label, in_set, metric))
            keyed.append(scored)
        by_key.append(keyed)
    shared = set.intersection(*(set(run) for runs in by_key for run in runs))
    if not shared:
        raise ValueError(f"no example of set {metric.split!r} is in the predictions of every run")
    order = sorted(shared)
    return {label: [[run[k] for k in order] for run in runs] for label, runs in zip(configs, by_key)}


def _sentence_scores(rows: Rows, side: str, name: str, indices: np.ndarray) -> np.ndarray:
    values = np.array([float(r[f"{side}_scores"][name]) for r in rows])
    return values[indices].mean(axis=1)


def _corpus_scores(rows: Rows, side: str, name: str, indices: np.ndarray) -> np.ndarray:
    metric = CORPUS_METRICS[name]()
    references = [r["reference"] if isinstance(r["reference"], list) else [r["reference"]] for r in rows]
    # Private sacrebleu API, used the way sacrebleu.significance uses it (see the module docstring).
    stats = np.asarray(metric._extract_corpus_statistics([r[side] for r in rows],
                                                         reference_streams(references)), dtype=float)
    sums = stats[indices].sum(axis=1)
    return np.array([metric._compute_score_from_stats(s.tolist()).score for s in sums])


def _loss_scores(rows: Rows, side: str, name: str, indices: np.ndarray) -> np.ndarray:
    scored = [r[f"{side}_scores"] for r in rows]
    tokens = np.array([float(s["loss_tokens"]) for s in scored])
    nll = np.array([float(s["loss"]) for s in scored]) * tokens
    loss = nll[indices].sum(axis=1) / np.maximum(tokens[indices].sum(axis=1), 1.0)
    return loss if name == "loss" else np.exp(np.minimum(loss, MAX_LOG_PERPLEXITY))


def run_scores(rows: Rows, metric: MetricRef, indices: np.ndarray) -> np.ndarray:
    """One run's ``metric`` on each resample.

    Args:
        rows: The run's aligned prediction rows (each can score the metric: :func:`align`).
        metric: What to score; ``delta`` is tuned minus base on the same resample.
        indices: One row of example indices per resample.

    Returns:
        One score per row of ``indices``.
    """
    if metric.side == "delta":
        return (run_scores(rows, MetricRef("tuned", metric.split, metric.name), indices)
                - run_scores(rows, MetricRef("base", metric.split, metric.name), indices))
    if metric.name in CORPUS_METRICS:
        return _corpus_scores(rows, metric.side, metric.name, indices)
    if metric.name in LOSS_METRICS:
        return _loss_scores(rows, metric.side, metric.name, indices)
    return _sentence_scores(rows, metric.side, metric.name, indices)


def config_scores(runs: Sequence[Rows], metric: MetricRef, indices: np.ndarray) -> np.ndarray:
    """A configuration's score on each resample: the mean over its runs (seeds)."""
    return np.mean([run_scores(rows, metric, indices) for rows in runs], axis=0)


def higher_is_better(metric: str) -> bool:
    """False for losses, perplexities and the unparsable rate; True for quality scores."""
    return not metric.rsplit("/", 1)[-1].startswith(LOWER_IS_BETTER)


@dataclass(frozen=True)
class Interval:
    """A change and its paired bootstrap 95% interval over the examples."""

    change: float
    low: float
    high: float
    examples: int


def change_interval(runs: Sequence[Rows], metric: MetricRef, replicates: int = 1000, seed: int = 0) -> Interval:
    """Tuned minus base on ``metric``'s set, with its paired bootstrap 95% interval: each
    resample scores the base and the tuned model on the same examples (the runs' mean, for
    several seeds of one configuration), so the interval is the change's, not the sum of two
    scores' spreads.

    Args:
        runs: each run's prediction rows.
        metric: the metric (its side is ignored: the change is tuned minus base).
        replicates: bootstrap resamples.
        seed: the resampling seed (fixed, so a figure is reproducible).

    Raises:
        ValueError: when a run has no row that scores the metric on both models.
    """
    delta = MetricRef("delta", metric.split, metric.name)
    aligned = align({"runs": runs}, delta)["runs"]
    n = len(aligned[0])
    indices = np.random.default_rng(seed).integers(0, n, size=(replicates, n))
    resampled = config_scores(aligned, delta, indices)
    low, high = np.percentile(resampled, [2.5, 97.5])
    point = config_scores(aligned, delta, np.arange(n)[None, :])[0]
    return Interval(float(point), float(low), float(high), n)
