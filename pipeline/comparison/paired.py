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
``sacrebleu.significance`` takes), without re-tokenising the text a thousand times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from pipeline.comparison.grouping import Configured, mean_std
from pipeline.runs.progress import Progress
from pipeline.scoring.metrics import reference_streams

# The same settings as pipeline.scoring.metrics.corpus_bleu / corpus_chrf (sacrebleu's defaults).
CORPUS_METRICS = {"bleu": BLEU, "chrf": CHRF}
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
    """A configuration's difference to the baseline, with its paired bootstrap interval."""

    difference: float
    low: float
    high: float
    examples: int
    replicates: int

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


def align(configs: Mapping[str, Sequence[Rows]], split: str) -> Dict[str, List[Rows]]:
    """Every run's rows of evaluation set ``split``, restricted to the examples all runs share
    and put in one order, so that index ``i`` is the same prompt in every run.

    Args:
        configs: Per configuration label, the prediction rows of each of its runs (seeds).
        split: The evaluation set (``test``, ``eval`` or an extra dataset's name).

    Returns:
        The same structure with aligned rows.

    Raises:
        ValueError: When no example is shared by every run.
    """
    by_key = [[{_example_key(r): r for r in rows if r["set"] == split} for rows in runs]
              for runs in configs.values()]
    shared = set.intersection(*(set(run) for runs in by_key for run in runs))
    if not shared:
        raise ValueError(f"no example of set {split!r} is in the predictions of every run")
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


def run_scores(rows: Rows, metric: MetricRef, indices: np.ndarray) -> np.ndarray:
    """One run's ``metric`` on each resample.

    Args:
        rows: The run's aligned prediction rows.
        metric: What to score; ``delta`` is tuned minus base on the same resample.
        indices: One row of example indices per resample.

    Returns:
        One score per row of ``indices``.

    Raises:
        ValueError: When the rows hold no per-example score for the metric.
    """
    if metric.side == "delta":
        return (run_scores(rows, MetricRef("tuned", metric.split, metric.name), indices)
                - run_scores(rows, MetricRef("base", metric.split, metric.name), indices))
    if metric.name in CORPUS_METRICS:
        return _corpus_scores(rows, metric.side, metric.name, indices)
    if metric.name not in rows[0][f"{metric.side}_scores"]:
        raise ValueError(f"eval/predictions.jsonl has no per-example {metric.name!r} score; "
                         f"it has: {', '.join(sorted(rows[0][f'{metric.side}_scores']))}")
    return _sentence_scores(rows, metric.side, metric.name, indices)


def config_scores(runs: Sequence[Rows], metric: MetricRef, indices: np.ndarray) -> np.ndarray:
    """A configuration's score on each resample: the mean over its runs (seeds)."""
    return np.mean([run_scores(rows, metric, indices) for rows in runs], axis=0)


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
        Per configuration other than the baseline, its :class:`Difference`.

    Raises:
        ValueError: When the runs share no example or hold no per-example score for the metric.
    """
    aligned = align(configs, metric.split)
    n = len(aligned[baseline][0])
    indices = np.random.default_rng(seed).integers(0, n, size=(replicates, n))
    everything = np.arange(n)[None, :]
    base_resampled = config_scores(aligned[baseline], metric, indices)
    base_score = config_scores(aligned[baseline], metric, everything)[0]
    differences = {}
    with Progress(len(aligned) - 1, f"report: paired bootstrap of {metric.side}/{metric.split}/{metric.name} ({replicates} resamples "
                  f"of {n} examples)", "configurations") as shown:
        for label, runs in aligned.items():
            if label == baseline:
                continue
            resampled = config_scores(runs, metric, indices) - base_resampled
            low, high = np.percentile(resampled, [2.5, 97.5])
            point = config_scores(runs, metric, everything)[0] - base_score
            differences[label] = Difference(float(point), float(low), float(high), n, replicates)
            shown.update()
    return differences


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
