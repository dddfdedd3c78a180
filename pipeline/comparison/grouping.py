"""Which runs are one configuration: the settings (dotted keys of the resolved config) whose
values differ between the runs, except seeds, where a run writes and how it is tracked. A
setting that follows from the method (``adapter.r`` is absent for ``full``, a per-method learning
rate) does not split a method into more rows. Also the spread of a figure over a configuration's
seeds, and the pairs of configurations that spread does not separate.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

METHOD_KEYS = ("adapter.method", "adapter")  # from config.yaml; from the overrides
# Settings that differ between runs without making them different configurations: where a run
# writes, how it is logged and tracked, which sweep trial it is, whether it resumed.
NOT_A_SETTING = ("paths.", "hydra.", "logger.", "sweep.", "_")
NOT_A_SETTING_KEYS = ("seed", "resume", "task_name", "run_name")
ABSENT = "-"  # the value of a key a run's config does not have (e.g. adapter.r of full)


class Configured(Protocol):
    """What grouping needs of a run (``pipeline.comparison.collect.Run`` has it)."""

    method: str
    seed: Optional[int]
    status: str
    config: Dict[str, Any]


# --------------------------------------------------------------------------- configurations


def flatten(nested: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"adapter": {"r": 8}}`` as ``{"adapter.r": 8}``; lists stay values."""
    flat: Dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def config_from_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """``["adapter=lora", "adapter.r=8"]`` as ``{"adapter": "lora", "adapter.r": 8}``."""
    pairs = (o.lstrip("+~").partition("=") for o in overrides)
    return {key: _number(value) for key, sep, value in pairs if sep}


@dataclass
class Configurations:
    """Successful runs grouped by the settings that varied between them.

    Attributes:
        keys: The settings that tell the configurations apart (the label's keys).
        varied: Every setting that varied, also those that follow from the method (its
            learning rate in ``experiment=compare_methods``, ``adapter.r`` absent for full).
        groups: Per configuration label, its runs (seeds), in the order of the settings.
    """

    keys: List[str]
    varied: List[str]
    groups: Dict[str, List[Configured]]


def _value_key(run: Configured, key: str) -> str:
    return json.dumps(run.config.get(key, ABSENT), sort_keys=True, default=str)


def _is_setting(key: str, runs: Sequence[Configured], ignore: Sequence[str]) -> bool:
    if key in NOT_A_SETTING_KEYS or key.startswith(NOT_A_SETTING) or key.endswith("_dir"):
        return False
    if any(key == i or key.startswith(f"{i}.") for i in ignore):
        return False
    # evaluation.decoding.seed: ${seed} follows the run's seed; a user-set data.seed does not.
    return not (key.endswith("seed") and all(r.config.get(key) == r.seed for r in runs))


def varied_keys(runs: Sequence[Configured], ignore: Sequence[str] = ()) -> List[str]:
    """The settings whose value differs between ``runs``, except seeds and ``ignore`` keys
    (a key or a prefix: ``--ignore trainer`` ignores every ``trainer.*``)."""
    keys = sorted({k for r in runs for k in r.config})
    return [k for k in keys if _is_setting(k, runs, ignore)
            and len({_value_key(r, k) for r in runs}) > 1]


def _follows_method(key: str, runs: Sequence[Configured]) -> bool:
    values: Dict[str, set] = {}
    for run in runs:
        values.setdefault(run.method, set()).add(_value_key(run, key))
    return all(len(v) == 1 for v in values.values())


def label_keys(runs: Sequence[Configured], varied: Sequence[str]) -> List[str]:
    """The varied settings that name a configuration: the method first when it varies, then
    the settings that do not follow from the method (its defaults, a per-method rate)."""
    method = [k for k in METHOD_KEYS if k in varied][:1]
    if not method:
        return list(varied)
    return method + [k for k in varied if k not in METHOD_KEYS and not _follows_method(k, runs)]


def _order(value: Any) -> Tuple[int, Any]:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value) if numeric else (1, str(value))


def value_text(value: Any, exact: bool) -> str:
    if isinstance(value, float) and not exact:
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _labels(values: List[Tuple[Any, ...]], keys: Sequence[str], exact: bool = False) -> List[str]:
    """Labels ``k=v, ...`` (the method alone when it is the only key); floats are shortened
    unless two configurations would then read alike."""
    if len(keys) == 1 and keys[0] in METHOD_KEYS:
        return [str(v[0]) for v in values]
    labels = [", ".join(f"{k}={value_text(v, exact)}" for k, v in zip(keys, vs)) for vs in values]
    return labels if exact or len(set(labels)) == len(labels) else _labels(values, keys, exact=True)


def group_runs(runs: Sequence[Configured], ignore: Sequence[str] = ()) -> Configurations:
    """The successful runs grouped into configurations (see :class:`Configurations`).

    A single configuration is labelled with its method.
    """
    ok = [r for r in runs if r.status == "success"]
    varied = varied_keys(ok, ignore)
    keys = label_keys(ok, varied)
    groups: Dict[Tuple[str, ...], List[Configured]] = {}
    for run in ok:  # keyed by JSON text: a setting's value may be a list
        groups.setdefault(tuple(_value_key(run, k) for k in keys), []).append(run)
    ordered = sorted(groups.values(), key=lambda g: tuple(_order(g[0].config.get(k, ABSENT)) for k in keys))
    values = [tuple(g[0].config.get(k, ABSENT) for k in keys) for g in ordered]
    labels = _labels(values, keys) if keys else [" / ".join(sorted({r.method for r in ok}))]
    return Configurations(keys, varied, dict(zip(labels, ordered)))


# --------------------------------------------------------------------------- spread over seeds


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def overlaps(table: Dict[str, Dict[str, Any]], metric: str) -> List[str]:
    """Pairs of configurations whose difference in ``metric`` is smaller than their combined spread."""
    notes = []
    labels = sorted(table)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            (ma, sa), (mb, sb) = table[a].get(metric, (math.nan, 0)), table[b].get(metric, (math.nan, 0))
            spread = math.hypot(sa, sb)
            if spread > 0 and abs(ma - mb) < spread:
                notes.append(f"{a} vs {b}: the difference in {metric} ({abs(ma - mb):.3g}) is smaller "
                             f"than their spread over seeds ({spread:.3g}); not a reliable ranking")
    return notes
