"""The allowed range of every numeric setting, declared where the setting is.

A schema field that holds a number is declared with :func:`bounded` (its range, and special
values outside it such as ``-1``) or :func:`unbounded` (with the reason no range applies), and
:func:`range_problems` checks a typed config against those declarations before anything runs:
``trainer.max_steps=-5 must be >= 1, or -1 (train trainer.num_train_epochs instead)``.
``tests/config/test_ranges.py`` walks every schema and fails on a numeric field declared neither
way, so a new setting cannot arrive without its range.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

RANGE = "range"  # the dataclass field metadata key


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: an interval, optionally with an explicit list of
    values (``one_of``) or special values outside the interval (``also``, e.g. ``-1``)."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    one_of: Tuple[float, ...] = ()
    also: Tuple[float, ...] = ()  # special values allowed outside the interval
    meaning: str = ""  # what the special values mean, or why the range is what it is
    fix: str = ""  # what to do instead, after the message
    unbounded: bool = False  # deliberately any number (``why`` says why)
    why: str = ""

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is allowed (not a number, e.g. NaN, never is)."""
        if self.unbounded:
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if value in self.also:
            return True
        if self.one_of:
            return value in self.one_of
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self, nullable: bool = False) -> str:
        """The range in words: ``> 0``, ``in [0, 1)``, ``in 1..255``, ``4 or 8``, ``> 0, or -1
        (...)``; ``or null`` where the setting takes null."""
        if self.one_of:
            text = " or ".join(_number(v) for v in self.one_of)
        else:
            low = (self.ge, "[") if self.ge is not None else (self.gt, "(") if self.gt is not None else None
            high = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
            if low and high and low[1] + high[1] == "[]" and _integral(low[0]) and _integral(high[0]):
                text = f"in {_number(low[0])}..{_number(high[0])}"
            elif low and high:
                text = f"in {low[1]}{_number(low[0])}, {_number(high[0])}{high[1]}"
            elif low:
                text = f"{'>=' if low[1] == '[' else '>'} {_number(low[0])}"
            elif high:
                text = f"{'<=' if high[1] == ']' else '<'} {_number(high[0])}"
            else:
                text = "a number"
        if self.also:
            text += ", or " + " or ".join(_number(v) for v in self.also)
        if nullable:
            text += " or null"
        return text + (f" ({self.meaning})" if self.meaning else "") + (f"; {self.fix}" if self.fix else "")


def _integral(value: float) -> bool:
    return float(value).is_integer()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def bounded(default: Any = dataclasses.MISSING, *, ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, lt: Optional[float] = None, one_of: Tuple[float, ...] = (),
            also: Tuple[float, ...] = (), meaning: str = "", fix: str = "",
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A numeric dataclass field with its allowed range (``None`` is always allowed where the
    field is ``Optional``: it means the setting is off). For a map or list of numbers
    (``default_factory``), the range is each value's."""
    spec = Range(ge=ge, gt=gt, le=le, lt=lt, one_of=tuple(one_of), also=tuple(also), meaning=meaning, fix=fix)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RANGE: spec})


def unbounded(default: Any = dataclasses.MISSING, *, why: str) -> Any:
    """A numeric dataclass field that takes any number, and why (the walk in the tests asks)."""
    return dataclasses.field(default=default, metadata={RANGE: Range(unbounded=True, why=why)})


SEED = dict(ge=0, le=2**32 - 1)  # numpy's seed range, which transformers' set_seed passes on


def _optional(schema: type, name: str) -> bool:
    """Whether the schema's field ``name`` takes null (``Optional[...]``)."""
    hint = typing.get_type_hints(schema)[name]
    return type(None) in typing.get_args(hint)


def field_range(spec: dataclasses.Field) -> Optional[Range]:
    """The range a field declares, or None."""
    return spec.metadata.get(RANGE)


def range_problems(obj: Any, prefix: str = "") -> List[str]:
    """Every value of the typed config ``obj`` (a dataclass instance, walked into its nested
    dataclasses, lists and dicts) outside its field's declared range, each naming the key, the
    value and the allowed range."""
    problems: List[str] = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for spec in dataclasses.fields(obj):
            value = getattr(obj, spec.name)
            key = f"{prefix}{spec.name}"
            allowed = field_range(spec)
            if allowed is not None and isinstance(value, (dict, list, tuple)):
                items = value.items() if isinstance(value, dict) else enumerate(value)
                problems += [f"{key}.{name}={item!r} must be {allowed.describe()}" if isinstance(value, dict)
                             else f"{key}[{name}]={item!r} must be {allowed.describe()}"
                             for name, item in items if not allowed.contains(item)]
            elif allowed is not None and value is not None and not allowed.contains(value):
                nullable = _optional(type(obj), spec.name)
                problems.append(f"{key}={value!r} must be {allowed.describe(nullable)}")
            else:
                problems += range_problems(value, f"{key}.")
    elif isinstance(obj, dict):
        for name, value in obj.items():
            problems += range_problems(value, f"{prefix}{name}.")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            problems += range_problems(value, f"{prefix.rstrip('.')}[{i}].")
    return problems
