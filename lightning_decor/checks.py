"""Argument checks shared by the configuration, the verbs and the callback: one wording for every message.

Plain ``TypeError``/``ValueError`` naming the argument and the value, so torch users need not import Lightning.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["check_bool", "check_choice", "check_float", "check_patterns", "check_positive_int"]


def _real(value: Any) -> bool:
    """A real number of any kind (``float``, ``int``, NumPy scalars: ``numbers.Real``), not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(value: Any) -> float:
    return float(value) if _real(value) else math.nan


def check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``; ``high`` may be ``inf``); any
    real number is taken (``numpy.float32(0.01)``), not a ``bool``."""
    if not _real(value):
        raise TypeError(f"Expected `{name}` to be a float, but got {type(value).__name__}: {value!r}.")
    v = _number(value)
    inside = (low < v if low_open else low <= v) and v <= high and math.isfinite(v)  # NaN is never inside
    if not inside:
        if high == math.inf:
            expected = f"to be a finite number {'>' if low_open else '>='} {low:g}"
        else:
            expected = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"Expected `{name}` {expected}, but got {value!r}.")
    return v


def check_positive_int(name: str, value: Any, *, optional: bool = True) -> int | None:
    """``value`` as an int >= 1 (a count or an interval; ``None`` too when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"Expected `{name}` to be {kind}, but got {type(value).__name__}: {value!r}.")
    if value < 1:
        raise ValueError(f"Expected `{name}` to be >= 1{' or None' if optional else ''}, but got {value!r}.")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, but got {type(value).__name__}: {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value``, one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Expected `{name}` in {choices}, but got {value!r}.")
    return value


def check_patterns(name: str, patterns: Sequence[str] | None) -> list[str] | None:
    """Glob patterns on module names: a list of str, or ``None``."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"Expected `{name}` to be a list of name patterns (str), but got {patterns!r}.")
    return list(patterns)
