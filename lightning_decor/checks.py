"""Argument checks shared by the verbs, the engine and the callback: one wording for every message.

Plain ``TypeError``/``ValueError`` naming the argument and the value, so torch users need not import Lightning.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEFAULTS",
    "EngineArguments",
    "check_bool",
    "check_choice",
    "check_engine_arguments",
    "check_float",
    "check_patterns",
    "check_positive_int",
]


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


# lightning_decor.functional.NORMALIZE (checks imports nothing of ours)
NORMALIZE = ("none", "trace", "spectral", "layer")


def check_patterns(name: str, patterns: Sequence[str] | None) -> list[str] | None:
    """Glob patterns on module names: a list of str, or ``None``."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"Expected `{name}` to be a list of name patterns (str), but got {patterns!r}.")
    return list(patterns)


DEFAULTS: dict[str, Any] = {
    "decor_lr": 3e-2,
    "kappa": 0.5,
    "normalize": "spectral",
    "sample_fraction": 0.1,
    "max_rows": 64,
    "include": None,
    "exclude": None,
    "max_features": 8192,
    "block_size": None,
    "max_overhead": 0.1,
    "update_every": 1,
    "use_cuda_stream": True,
    "plan_cache": True,
}
"""The arguments ``Decorrelator`` and ``DecorrelationCallback`` share, with their defaults: declared here once."""


def _check_overhead(value: Any) -> float | None:
    return None if value is None else check_float("max_overhead", value, 0.0, math.inf, low_open=True)


_CHECKS: dict[str, Any] = {
    "decor_lr": lambda v: check_float("decor_lr", v, 0.0, math.inf, low_open=True),
    "kappa": lambda v: check_float("kappa", v, 0.0, 1.0),
    "normalize": lambda v: check_choice("normalize", v, NORMALIZE),
    "sample_fraction": lambda v: check_float("sample_fraction", v, 0.0, 1.0, low_open=True),
    "max_rows": lambda v: check_positive_int("max_rows", v),
    "include": lambda v: check_patterns("include", v),
    "exclude": lambda v: check_patterns("exclude", v),
    "max_features": lambda v: check_positive_int("max_features", v),
    "block_size": lambda v: check_positive_int("block_size", v),
    "max_overhead": _check_overhead,
    "update_every": lambda v: check_positive_int("update_every", v, optional=False),
    "use_cuda_stream": lambda v: check_bool("use_cuda_stream", v),
    "plan_cache": lambda v: check_bool("plan_cache", v),
}


def check_engine_arguments(**values: Any) -> dict[str, Any]:
    """The shared arguments (:data:`DEFAULTS`), checked, by name; every one must be given."""
    if set(values) != set(DEFAULTS):
        raise TypeError(f"Expected the arguments {sorted(DEFAULTS)}, but got {sorted(values)}.")
    return {name: _CHECKS[name](values[name]) for name in DEFAULTS}


class EngineArguments:
    """The shared arguments as attributes, checked in one place, for both front-ends."""

    decor_lr: float
    kappa: float
    normalize: str
    sample_fraction: float
    max_rows: int | None
    include: list[str] | None
    exclude: list[str] | None
    max_features: int | None
    block_size: int | None
    max_overhead: float | None
    update_every: int
    use_cuda_stream: bool
    plan_cache: bool

    def _set_engine_arguments(self, given: dict[str, Any]) -> None:
        """Check the shared arguments among ``given`` (a front-end's ``locals()``) and keep them as attributes."""
        for name, value in check_engine_arguments(**{n: given[n] for n in DEFAULTS}).items():
            setattr(self, name, value)

    def engine_arguments(self) -> dict[str, Any]:
        """The shared arguments by name, as checked."""
        return {name: getattr(self, name) for name in DEFAULTS}
