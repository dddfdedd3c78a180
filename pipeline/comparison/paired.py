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

from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np

from pipeline.comparison.grouping import Configured, mean_std
from pipeline.runs.progress import Progress
from pipeline.scoring.resampling import (  # noqa: F401  (the report's names for them)
    CORPUS_METRICS, LOSS_METRICS, SIDES, Interval, MetricRef, Rows, align, change_interval, config_scores,
    higher_is_better, metric_suffix, read_predictions, run_scores)

RUN_SPLITS = ("eval", "test")  # a run's own splits; any other evaluation set is an extra dataset
BENCHMARK_SETS = "benchmark/"  # lm-eval tasks: pipeline.scoring.benchmarks


class Measured(Configured, Protocol):
    """A run with its final metrics (``metrics.json``)."""

    metrics: Dict[str, float]


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
    ``evaluation.extra_datasets``, which the runs do not train on (benchmarks have their own
    section: :func:`benchmark_changes`)."""
    refs = (MetricRef.parse(k) for k in keys)
    return sorted({r.split for r in refs if r is not None and r.split not in RUN_SPLITS
                   and not r.split.startswith(BENCHMARK_SETS)})


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


@dataclass(frozen=True)
class BenchmarkChange:
    """One benchmark metric of a configuration before and after tuning.

    ``base`` and ``tuned`` are mean and standard deviation over the configuration's runs (from
    ``metrics.json``); ``interval`` is the paired bootstrap of tuned minus base over the task's
    examples (lm-eval's per-example results), the runs' mean on each resample; None with
    ``why`` when the runs' examples are not available (a report read from W&B).
    """

    split: str  # benchmark/<task>
    name: str
    runs: int
    base: Tuple[float, float]
    tuned: Tuple[float, float]
    interval: Optional[Interval]
    why: Optional[str] = None

    @property
    def task(self) -> str:
        return self.split[len(BENCHMARK_SETS):]

    @property
    def worse(self) -> bool:
        """Whether the interval lies wholly on the bad side of no change."""
        if self.interval is None:
            return False
        return self.interval.high < 0 if higher_is_better(self.name) else self.interval.low > 0


def benchmark_changes(groups: Mapping[str, Sequence[Measured]], rows: Mapping[str, Optional[Sequence[Rows]]],
                      replicates: int = 1000) -> Dict[str, List[BenchmarkChange]]:
    """Per configuration, every benchmark metric its runs report, with the paired interval.

    Args:
        groups: Per configuration label, its runs.
        rows: Per label, each run's prediction rows, or None when they cannot be read.
        replicates: Bootstrap resamples.
    """
    changes: Dict[str, List[BenchmarkChange]] = {}
    for label, runs in groups.items():
        names = sorted({k[len("tuned/"):] for r in runs for k in r.metrics
                        if k.startswith("tuned/" + BENCHMARK_SETS) and not k.endswith("_stderr")})
        items = []
        for full in names:
            ref = MetricRef.parse(f"tuned/{full}")
            pairs = [(float(r.metrics[f"base/{full}"]), float(r.metrics[f"tuned/{full}"])) for r in runs
                     if f"base/{full}" in r.metrics and f"tuned/{full}" in r.metrics]
            if ref is None or not pairs:
                continue
            interval, why = None, None
            if rows.get(label) is None:
                why = "the runs' eval/predictions.jsonl are not available"
            else:
                try:
                    interval = change_interval(rows[label], ref, replicates)
                except ValueError as err:
                    why = str(err)
            items.append(BenchmarkChange(ref.split, ref.name, len(pairs), mean_std([b for b, _ in pairs]),
                                         mean_std([t for _, t in pairs]), interval, why))
        changes[label] = items
    return changes


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


