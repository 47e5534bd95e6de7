"""The arguments ``Decorrelator`` and ``DecorrelationCallback`` share, as one frozen, keyword-only object validated
once: :class:`DecorConfig`. Both front-ends keep their flat keywords (LightningCLI, YAML) and build it by name; the
engine, the planner and the update read it."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from lightning_decor.checks import check_bool, check_choice, check_float, check_patterns, check_positive_int
from lightning_decor.functional import NORMALIZE

__all__ = ["DEFAULTS", "MIN_MEMORY", "PLAN_ARGUMENTS", "Configured", "DecorConfig"]

# The arguments that shape a plan: a checkpoint's plan is kept only when they are unchanged (check_resume).
PLAN_ARGUMENTS = (
    "max_overhead", "block_size", "max_features", "include", "exclude", "update_every", "sample_fraction", "max_rows",
    "max_memory",
)  # fmt: skip
MIN_MEMORY = 2**30  # bytes the memory budget always allows: small models keep a dense R


@dataclass(frozen=True, kw_only=True)
class DecorConfig:
    """What decorrelated backpropagation is asked to do: the keywords both front-ends share, each checked when the
    object is made (``TypeError``/``ValueError`` naming the argument and the value). The callback's docstring says
    more of each (it is LightningCLI's help)."""

    decor_lr: float = 3e-2
    """The rule's learning rate (> 0). With ``normalize="spectral"`` no step exceeds ``decor_lr / 10``."""
    kappa: float = 0.5
    """Weight of the unit-variance term, in ``[0, 1]``: 0 only decorrelates, 1 only normalises the variances."""
    normalize: str = "spectral"
    """The step's scaling, one of :data:`lightning_decor.functional.NORMALIZE` (``"none"``: the authors' rule; see
    :func:`lightning_decor.functional.block_decorrelation_step`)."""
    sample_fraction: float = 0.1
    """Fraction of each batch's samples whose input rows feed the statistics, in ``(0, 1]``."""
    max_rows: int | None = 64
    """At most this many rows per layer and forward, drawn at random (``None``: all)."""
    include: tuple[str, ...] | None = None
    """Glob patterns of the layers to patch (``None``: every eligible one)."""
    exclude: tuple[str, ...] | None = None
    """Patterns of layers to leave plain."""
    max_features: int | None = 8192
    """Wider layers get blocks of at most this many features, or stay plain (``None``: no limit)."""
    block_size: int | None = None
    """The largest block of any ``R`` (``None``: a dense ``R`` allowed)."""
    max_overhead: float | None = 0.1
    """The plan's budget: the estimated cost of all DBP parts as a fraction of the measured plain training step
    (``None``: no plan, every layer at its largest allowed block, fused, ``R`` moving from the first step)."""
    max_memory: float | None = 4.0
    """Every ``R`` and the update's workspace take at most this many times the bytes of the model's parameters in one
    process (its shard under FSDP2), at least :data:`MIN_MEMORY`; layers that do not fit get smaller blocks, or stay
    plain (``None``: no limit)."""
    update_every: int = 1
    """``R`` moves on every k-th step (rows are sampled only for those steps)."""
    use_cuda_stream: bool = True
    """On a GPU, compute an update queued by ``launch`` on a side CUDA stream (``R`` is written on the main one)."""
    plan_cache: bool = True
    """Keep measured costs on disk for later runs (:class:`lightning_decor.planner.PlanCache`)."""

    def __post_init__(self) -> None:
        for field in fields(self):
            object.__setattr__(self, field.name, _CHECKS[field.name](getattr(self, field.name)))

    def memory_budget(self, parameter_bytes: int) -> int | None:
        """Bytes every ``R`` and the update's workspace may take, for a model whose parameters take
        ``parameter_bytes`` in one process (its shard under FSDP2): ``max_memory`` times that, at least
        :data:`MIN_MEMORY`; ``None`` without a limit."""
        return None if self.max_memory is None else max(int(self.max_memory * parameter_bytes), MIN_MEMORY)

    def plan_arguments(self, pinned: dict[str, Any] | None) -> dict[str, Any]:
        """What shapes a plan, as a checkpoint keeps it: the fields of :data:`PLAN_ARGUMENTS` (patterns as lists) and
        the pinned plan's layouts (``pinned``; ``None``: ``"auto"``)."""
        shaped = {name: _saved(getattr(self, name)) for name in PLAN_ARGUMENTS}
        return {**shaped, "plan": "auto" if pinned is None else pinned}

    def check_resume(self, saved: dict[str, Any], pinned: dict[str, Any] | None) -> None:
        """Refuse (``ValueError`` naming the first that differs) a checkpoint whose plan was made with other
        :meth:`plan_arguments`."""
        for name, now in self.plan_arguments(pinned).items():
            if name not in saved and name != "plan":  # an argument newer than the checkpoint: its plan is applied
                continue
            then = saved.get(name)
            if name == "plan" and isinstance(now, dict):
                now = {n: list(v) for n, v in now.items()}
                then = then if then == "auto" else {n: list(v) for n, v in (then or {}).items()}
            if then != now:
                shown = "a pinned plan" if name == "plan" and now != "auto" else repr(now)
                was = "a pinned plan" if name == "plan" and then != "auto" else repr(then)
                raise ValueError(
                    f"Expected the arguments that shaped the checkpoint's plan, but `{name}` is {shown} here and was "
                    f"{was} in the checkpoint. Resume with {name}={was}, or start a new fit from the checkpoint's "
                    "weights (the module's state_dict holds W @ R) to plan anew."
                )


def _saved(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _patterns(name: str, value: Any) -> tuple[str, ...] | None:
    checked = check_patterns(name, value)
    return None if checked is None else tuple(checked)


def _overhead(value: Any) -> float | None:
    return None if value is None else check_float("max_overhead", value, 0.0, math.inf, low_open=True)


def _memory(value: Any) -> float | None:
    return None if value is None else check_float("max_memory", value, 0.0, math.inf, low_open=True)


_CHECKS: dict[str, Any] = {
    "decor_lr": lambda v: check_float("decor_lr", v, 0.0, math.inf, low_open=True),
    "kappa": lambda v: check_float("kappa", v, 0.0, 1.0),
    "normalize": lambda v: check_choice("normalize", v, NORMALIZE),
    "sample_fraction": lambda v: check_float("sample_fraction", v, 0.0, 1.0, low_open=True),
    "max_rows": lambda v: check_positive_int("max_rows", v),
    "include": lambda v: _patterns("include", v),
    "exclude": lambda v: _patterns("exclude", v),
    "max_features": lambda v: check_positive_int("max_features", v),
    "block_size": lambda v: check_positive_int("block_size", v),
    "max_overhead": _overhead,
    "max_memory": _memory,
    "update_every": lambda v: check_positive_int("update_every", v, optional=False),
    "use_cuda_stream": lambda v: check_bool("use_cuda_stream", v),
    "plan_cache": lambda v: check_bool("plan_cache", v),
}

DEFAULTS: dict[str, Any] = {field.name: field.default for field in fields(DecorConfig)}
"""The defaults of :class:`DecorConfig`, for the front-ends' signatures."""


class Configured:
    """The fields of a front-end's ``config`` as its read-only attributes (``callback.decor_lr``; patterns as
    lists)."""

    config: DecorConfig
    if TYPE_CHECKING:
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
        max_memory: float | None
        update_every: int
        use_cuda_stream: bool
        plan_cache: bool


def _reader(name: str) -> property:
    # patterns as the list a user gives (a copy: the configuration keeps its tuple)
    return property(lambda self: _saved(getattr(self.config, name)), doc=f"``config.{name}`` (read-only).")


for _field in fields(DecorConfig):
    setattr(Configured, _field.name, _reader(_field.name))
