"""Argument checks shared by the verbs, the engine and the callback: one wording for every message.

Plain ``TypeError``/``ValueError`` naming the argument and the value, so torch users need not import Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["check_bool", "check_choice", "check_engine_arguments", "check_float", "check_patterns", "check_positive_int"]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``; ``high`` may be ``inf``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
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
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"Expected `{name}` to be {kind}, but got {type(value).__name__}: {value!r}.")
    if value < 1:
        raise ValueError(f"Expected `{name}` to be >= 1{' or None' if optional else ''}, but got {value!r}.")
    return value


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


def check_engine_arguments(
    *,
    decor_lr: Any,
    kappa: Any,
    sample_fraction: Any,
    max_rows: Any,
    include: Any,
    exclude: Any,
    max_features: Any,
    block_size: Any,
    max_overhead: Any,
    update_every: Any,
    use_cuda_stream: Any,
    normalize: Any,
) -> dict[str, Any]:
    """The arguments ``Decorrelator`` and ``DecorrelationCallback`` share, checked, by name."""
    return dict(
        decor_lr=check_float("decor_lr", decor_lr, 0.0, math.inf, low_open=True),
        kappa=check_float("kappa", kappa, 0.0, 1.0),
        normalize=check_choice("normalize", normalize, NORMALIZE),
        sample_fraction=check_float("sample_fraction", sample_fraction, 0.0, 1.0, low_open=True),
        max_rows=check_positive_int("max_rows", max_rows),
        include=check_patterns("include", include),
        exclude=check_patterns("exclude", exclude),
        max_features=check_positive_int("max_features", max_features),
        block_size=check_positive_int("block_size", block_size),
        max_overhead=None
        if max_overhead is None
        else check_float("max_overhead", max_overhead, 0.0, math.inf, low_open=True),
        update_every=check_positive_int("update_every", update_every, optional=False),
        use_cuda_stream=check_bool("use_cuda_stream", use_cuda_stream),
    )
