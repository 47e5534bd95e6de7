"""The memory of ``R``: each layer's bytes, the update's workspace, and the moves that fit a plan into a budget
(:func:`fit_memory`, used by :func:`lightning_decor.plan.make_plan` and the plan of layers as they are)."""

from __future__ import annotations

import math
from collections import Counter

from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parameter import is_lazy

__all__ = ["R_ITEMSIZE", "fit_memory", "kept_share", "memory_bytes", "parameter_bytes", "r_bytes"]


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters in this process: its shards under FSDP2 (lazy ones count nothing yet)."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters() if not is_lazy(p)]
    return sum(p.numel() * p.element_size() for p in local)


def kept_share(b: int, d: int) -> float:
    """The share of a layer's decorrelation that blocks of ``b`` of its ``d`` features keep (1 for a dense ``R``):
    the cost plan's measure of what a move gives up. Concave: the strongest correlations of patch rows are within a
    channel (neighbouring pixels), and even the smallest block removes them."""
    return math.log1p(b) / math.log1p(d)


R_ITEMSIZE = 4  # R and the statistics are float32


def r_bytes(d: int, groups: int, block: int) -> int:
    """Bytes of a layer's ``R``: ``groups * d / b`` blocks of ``b x b`` (``groups * d * b`` floats)."""
    return R_ITEMSIZE * groups * d * block


def memory_bytes(layers: list[tuple[int, int]]) -> int:
    """Bytes of the ``R`` of ``layers`` (``(block, bytes of R)`` each) and the update's workspace: the update of the
    layers sharing a block size forms their second moments and their new ``R`` at once, two more stacks the size of
    theirs, so the largest such stack counts three times (the sampled rows are not counted)."""
    stacks: Counter[int] = Counter()
    for block, size in layers:
        stacks[block] += size
    return sum(stacks.values()) + 2 * max(stacks.values(), default=0)


def fit_memory(
    choice: dict[str, int],
    ladders: dict[str, list[int]],
    shapes: dict[str, tuple[int, int]],
    max_memory: int,
    fixed: frozenset[str] = frozenset(),
) -> dict[str, int]:
    """The ladder positions (``len(ladder)``: plain) of ``choice`` moved down until :func:`memory_bytes` fits
    ``max_memory``: each move takes the layer that saves the most bytes per unit of decorrelation it loses to its
    next smaller block (or plain). ``shapes``: each layer's ``(d, groups)``; ``fixed``: layers counted, not moved."""
    choice = dict(choice)

    def entry(name: str, k: int) -> tuple[int, int]:
        d, groups = shapes[name]
        return (ladders[name][k], r_bytes(d, groups, ladders[name][k])) if k < len(ladders[name]) else (0, 0)

    while memory_bytes([entry(n, k) for n, k in choice.items() if k < len(ladders[n])]) > max_memory:
        best: tuple[float, str] | None = None
        for name, k in choice.items():
            ladder, d = ladders[name], shapes[name][0]
            if k >= len(ladder) or name in fixed:
                continue
            saved = entry(name, k)[1] - entry(name, k + 1)[1]
            lost = kept_share(ladder[k], d) - (kept_share(ladder[k + 1], d) if k + 1 < len(ladder) else 0.0)
            if best is None or saved / max(lost, 1e-12) > best[0]:
                best = (saved / max(lost, 1e-12), name)
        if best is None:
            break
        choice[best[1]] += 1
    return choice
