"""How configurations compare, example by example: paired bootstrap differences to a baseline
and retention on the sets the runs do not train on (the Pareto front of quality vs cost is
:mod:`pipeline.comparison.pareto`).

Paired bootstrap (Koehn 2004). It asks whether configuration B beats configuration A on *these*
prompts by more than the luck of which prompts were drawn. Each replicate resamples example
indices with replacement, the same indices for both configurations, and scores each
configuration on them as the mean over its seeds. sacrebleu's own ``significance`` module does
the same resampling, but for one output per system and for corpus metrics only; here a
configuration has several seeds and sentence-level metrics (ROUGE, exact match, F1, accuracy)
are resampled too, as means of their per-example scores. Corpus-level metrics (BLEU, chrF) are
recomputed on each resample from sacrebleu's per-sentence sufficient statistics: summing them
over a resample and scoring the sum is exactly the corpus score of that resample (the route
``sacrebleu.significance`` takes), without re-tokenising the text a thousand times. Losses are
recomputed the same way: each example's mean token loss weighted by its token count, summed over
a resample, is the token-weighted loss of that resample, as ``metrics.json`` reports a set's loss
(and the perplexity its exponential).

A metric on which every run scores each example the same cannot tell the configurations apart:
its difference is 0 with an interval of width 0, which reads as a measured tie. That happens
when the metric is constant (BLEU 0 throughout, when a tiny model's outputs share no word with
the references) or when the runs compared are one model (the base model of runs that share it).
Such a comparison is marked (:attr:`Difference.identical`, :attr:`Difference.constant`), for the
report to say so instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from pipeline.comparison.grouping import Configured, mean_std
from pipeline.runs.progress import Progress
from pipeline.scoring.losses import MAX_LOG_PERPLEXITY
from pipeline.scoring.metrics import reference_streams

# The same settings as pipeline.scoring.metrics.corpus_bleu / corpus_chrf (sacrebleu's defaults).
CORPUS_METRICS = {"bleu": BLEU, "chrf": CHRF}
# Token-weighted over a resample, from each example's ``loss`` and ``loss_tokens``.
LOSS_METRICS = ("loss", "perplexity")
SIDES = ("base", "tuned", "delta")
RUN_SPLITS = ("eval", "test")  # a run's own splits; any other evaluation set is an extra dataset
LOWER_IS_BETTER = ("loss", "perplexity", "unparsable_rate")
Rows = List[Dict[str, Any]]  # one run's rows of eval/predictions.jsonl


class Measured(Configured, Protocol):
    """A run with its final metrics (``metrics.json``)."""

    metrics: Dict[str, float]


@dataclass(frozen=True)
class MetricRef:
    """A metric name such as ``tuned/test/bleu`` split into side, evaluation set and metric."""

    side: str
    split: str
    name: str

    @classmethod
    def parse(cls, metric: str) -> Optional["MetricRef"]:
        """The parts of ``<base|tuned|delta>/<set>/<metric>``, or None for any other name."""
        parts = metric.split("/", 2)
        if len(parts) != 3 or parts[0] not in SIDES:
            return None
        return cls(*parts)


def metric_suffix(metric: str) -> str:
    """``test/bleu`` of ``tuned/test/bleu`` (of any side); other names unchanged."""
    return metric.split("/", 1)[1] if MetricRef.parse(metric) else metric


@dataclass(frozen=True)
class Difference:
    """A configuration's difference to the baseline, with its paired bootstrap interval.

    Attributes:
        difference: the configuration's score minus the baseline's, on every shared example.
        low: the 2.5th percentile of the difference over the resamples.
        high: the 97.5th percentile.
        examples: how many examples every run shares.
        replicates: how many resamples.
        identical: every run compared, of every configuration, scores each example the same,
            alone and all together, and every configuration scores each resample the same:
            there is no difference to test (difference, low and high are then 0 and say nothing).
        constant: when the runs are identical and that score is one value on every example,
            the value; None otherwise.
    """

    difference: float
    low: float
    high: float
    examples: int
    replicates: int
    identical: bool = False
    constant: Optional[float] = None

    @property
    def significant(self) -> bool:
        """Whether the 95% interval excludes 0."""
        return self.low > 0 or self.high < 0


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


def shared_scores(aligned: Mapping[str, Sequence[Rows]], metric: MetricRef) -> Optional[np.ndarray]:
    """Each aligned example's score alone, then all of them together, when every run gives
    exactly these; None when two runs score an example differently."""
    n = len(next(iter(aligned.values()))[0])
    probes = (np.arange(n)[:, None], np.arange(n)[None, :])  # each example alone; all together
    per_run = [np.concatenate([run_scores(rows, metric, probe) for probe in probes])
               for runs in aligned.values() for rows in runs]
    return per_run[0] if all(np.array_equal(per_run[0], other) for other in per_run[1:]) else None


def paired_bootstrap(configs: Mapping[str, Sequence[Rows]], baseline: str, metric: MetricRef,
                     replicates: int = 1000, seed: int = 0) -> Dict[str, Difference]:
    """Each configuration's difference to ``baseline`` with a paired bootstrap 95% interval.

    Replicate ``b`` scores every configuration on the examples
    ``np.random.default_rng(seed).integers(0, n, size=(replicates, n))[b]``: the same resample
    for all, so the interval reflects the difference, not each score's own spread.

    Args:
        configs: Per configuration label, the prediction rows of each of its runs (seeds).
        baseline: The label every other configuration is compared with.
        metric: The metric compared (its evaluation set selects the rows).
        replicates: Number of bootstrap resamples.
        seed: Seed of the resampling RNG; fixed so that a report is reproducible.

    Returns:
        Per configuration other than the baseline, its :class:`Difference` (each marked
        ``identical`` when every run scores each example the same, and ``constant`` when that
        is one value on every example).

    Raises:
        ValueError: When the runs share no example or hold no per-example score for the metric.
    """
    aligned = align(configs, metric)
    n = len(aligned[baseline][0])
    indices = np.random.default_rng(seed).integers(0, n, size=(replicates, n))
    everything = np.arange(n)[None, :]
    base_resampled = config_scores(aligned[baseline], metric, indices)
    base_score = config_scores(aligned[baseline], metric, everything)[0]
    shared = shared_scores(aligned, metric)
    differences = {}
    with Progress(len(aligned) - 1, f"report: paired bootstrap of {metric.side}/{metric.split}/{metric.name} ({replicates} resamples "
                  f"of {n} examples)", "configurations") as shown:
        for label, runs in aligned.items():
            if label == baseline:
                continue
            scored = config_scores(runs, metric, indices)
            # A corpus metric could still differ on a resample; a mean over seeds may round apart.
            if shared is not None and not np.allclose(scored, base_resampled, rtol=1e-12, atol=0):
                shared = None
            low, high = np.percentile(scored - base_resampled, [2.5, 97.5])
            point = config_scores(runs, metric, everything)[0] - base_score
            differences[label] = Difference(float(point), float(low), float(high), n, replicates)
            shown.update()
    constant = float(shared[0]) if shared is not None and np.all(shared == shared[0]) else None
    return {label: replace(d, identical=shared is not None, constant=constant) for label, d in differences.items()}


# --------------------------------------------------------------------------- retention


def extra_sets(keys: Iterable[str]) -> List[str]:
    """The evaluation sets among metric names that are not the run's own splits: those of
    ``evaluation.extra_datasets``, which the runs do not train on."""
    refs = (MetricRef.parse(k) for k in keys)
    return sorted({r.split for r in refs if r is not None and r.split not in RUN_SPLITS})


@dataclass(frozen=True)
class Retention:
    """One metric of a configuration on a set it does not train on, before and after tuning.

    Each figure is the mean and standard deviation over the configuration's runs (seeds);
    ``change`` is tuned minus base per run, so the base model's own spread cancels.
    """

    split: str
    name: str
    runs: int
    base: Tuple[float, float]
    tuned: Tuple[float, float]
    change: Tuple[float, float]

    @property
    def worse(self) -> bool:
        """Whether the mean change goes the bad way (a higher loss: the model forgot)."""
        return self.change[0] < 0 if higher_is_better(self.name) else self.change[0] > 0


def _retention(runs: Sequence[Measured], split: str, name: str) -> Optional[Retention]:
    base, tuned = f"base/{split}/{name}", f"tuned/{split}/{name}"
    pairs = [(float(r.metrics[base]), float(r.metrics[tuned])) for r in runs
             if base in r.metrics and tuned in r.metrics]
    if not pairs:
        return None
    return Retention(split, name, len(pairs), mean_std([b for b, _ in pairs]),
                     mean_std([t for _, t in pairs]), mean_std([t - b for b, t in pairs]))


def retention(groups: Mapping[str, Sequence[Measured]], names: Sequence[str]) -> Dict[str, List[Retention]]:
    """Per configuration, ``names`` (``loss``, ``bleu`` ...) on every extra set of its runs.

    Args:
        groups: Per configuration label, its runs.
        names: The metrics to show; one a set lacks is left out for that set.

    Returns:
        Per label, one :class:`Retention` per extra set and metric measured (empty lists
        when no run has an extra set).
    """
    sets = extra_sets(k for runs in groups.values() for r in runs for k in r.metrics)
    return {label: [item for split in sets for name in names if (item := _retention(runs, split, name))]
            for label, runs in groups.items()}


def higher_is_better(metric: str) -> bool:
    """False for losses, perplexities and the unparsable rate; True for quality scores."""
    return not metric.rsplit("/", 1)[-1].startswith(LOWER_IS_BETTER)
