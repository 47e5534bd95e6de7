"""Pooling the sampled rows of every patched layer across processes (DDP), so that every rank applies the same update.

No Lightning here: plain ``torch.distributed`` on the default (or a given) process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Pool",
    "agree",
    "all_gather_rows",
    "any_rank",
    "cheaper_exchange",
    "count_group",
    "destroy_count_group",
    "gather_counts",
]


def count_group() -> dist.ProcessGroup | None:
    """A process group for the row counts that needs no device synchronisation: the default group when it is
    gloo (CPU), otherwise a new gloo group (counts are host integers, so NCCL would need a device round trip).

    Collective: every rank must call it, in the same order. ``None`` stands for the default group.
    """
    if dist.get_backend() == "gloo" or not dist.is_gloo_available():
        return None
    group = dist.new_group(backend="gloo")  # every rank is a member
    return group if isinstance(group, dist.ProcessGroup) else None


def agree(decision: Any, group: dist.ProcessGroup | None) -> Any:
    """Rank 0's ``decision`` (any picklable object) on every rank of ``group``. Collective."""
    box = [decision]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def any_rank(flags: list[bool], group: dist.ProcessGroup | None) -> list[bool]:
    """Each flag true where it is true on any rank of ``group`` (a small CPU all-reduce: ``group`` is gloo).
    Collective."""
    both = torch.tensor(flags, dtype=torch.uint8)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in both.tolist()]


def destroy_count_group(group: dist.ProcessGroup | None) -> None:
    """Destroy a group made by :func:`count_group` (``None``, the default group, is left alone), so that repeated
    fits do not accumulate gloo groups and their sockets. Local: ranks need not call it together."""
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group(group)


class Pool:
    """The processes an engine pools its rows over: every process of the default group while ``torch.distributed``
    runs several (:attr:`active`), with a CPU group for the row counts (:attr:`group`, from :func:`count_group`).

    Every method but :meth:`stop` is collective while active: every rank calls it, in the same order.
    """

    def __init__(self) -> None:
        self.active = False
        self.group: dist.ProcessGroup | None = None  # None: the default group

    def start(self, needed: bool) -> None:
        """Whether several processes run now; make the counts' group once when ``needed`` (the model has layers to
        pool)."""
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.active and needed and self.group is None:
            self.group = count_group()

    def agree(self, decision: Any) -> Any:
        """Rank 0's ``decision`` on every rank (:func:`agree`); the decision itself on one process."""
        return agree(decision, self.group) if self.active else decision

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """Each flag true where it is true on any rank (:func:`any_rank`); the flags themselves on one process."""
        return any_rank(flags, self.group) if self.active else flags

    def stop(self) -> None:
        """Free the counts' group (:func:`destroy_count_group`): one per fit otherwise, never freed. Local."""
        destroy_count_group(self.group)
        self.group = None


def gather_counts(
    rows: Sequence[Tensor | None], *, device: torch.device, counts_group: dist.ProcessGroup | None = None
) -> list[list[int]]:
    """Every rank's row count of every layer, ``(world, layers)`` host ints, from the rows' shapes (no device sync
    when ``counts_group`` is a CPU group). Collective."""
    world = dist.get_world_size()
    counts = torch.tensor([0 if r is None else r.shape[0] for r in rows], dtype=torch.long)  # host ints
    counts_device = device if counts_group is None and dist.get_backend() != "gloo" else torch.device("cpu")
    gathered_counts = [torch.empty_like(counts, device=counts_device) for _ in range(world)]
    dist.all_gather(gathered_counts, counts.to(counts_device), group=counts_group)
    return [c.tolist() for c in gathered_counts]  # a host read of a CPU tensor, or one per update


def cheaper_exchange(per_rank: list[list[int]], widths: Sequence[int], blocks: Sequence[tuple[int, int]]) -> str:
    """``"rows"`` or ``"moments"``: which exchange moves fewer numbers per process. Gathering rows brings every
    rank's ``n_i x d_i`` rows of every layer (``sum over ranks of n_i d_i``); all-reducing each block's ``x^T x``
    (``G x b x b`` per stack, ``blocks``: ``(G, b)``) moves about twice its size with a ring, whatever the rows
    (K-FAC exchanges its factors so). Every rank decides alike from the same counts."""
    rows = sum(n * d for ns in per_rank for n, d in zip(ns, widths, strict=True))
    moments = 2 * sum(g * b * b for g, b in blocks)
    return "moments" if moments < rows else "rows"


def all_gather_rows(
    rows: Sequence[Tensor | None],
    widths: Sequence[int],
    *,
    dtype: torch.dtype,
    device: torch.device,
    counts_group: dist.ProcessGroup | None = None,
    per_rank: list[list[int]] | None = None,
) -> list[Tensor | None]:
    """Every layer's rows from every rank, concatenated in rank order, identical on every rank.

    All layers travel in one flat buffer and one ``all_gather`` (padded to the largest rank's buffer), after a small
    ``all_gather`` of the per-layer row counts over ``counts_group``. Row counts come from tensor shapes, so no
    device synchronisation is needed for them when ``counts_group`` is a CPU (gloo) group. Every rank must call this
    with the same layers in the same order.

    Args:
        rows: Per layer, its ``(n_i, d_i)`` rows on this rank (``n_i`` may differ between ranks), or ``None``.
        widths: Per layer, ``d_i``.
        dtype: The buffer's dtype (the statistics dtype, the same on every rank).
        device: The buffer's device (where the backend of the default group communicates).
        counts_group: Group for the counts (see :func:`count_group`); ``None``: the default group.
        per_rank: The counts of every rank, when :func:`gather_counts` got them already.

    Returns:
        Per layer, the ``(sum of n_i over ranks, d_i)`` pooled rows, or ``None`` when no rank has any.
    """
    world = dist.get_world_size()
    if per_rank is None:
        per_rank = gather_counts(rows, device=device, counts_group=counts_group)
    sizes = [sum(n * d for n, d in zip(ns, widths, strict=True)) for ns in per_rank]
    longest = max(sizes)
    if longest == 0:
        return [None] * len(rows)
    flat = torch.zeros(longest, dtype=dtype, device=device)  # padded to the largest rank
    local = [r.reshape(-1).to(device=device, dtype=dtype) for r in rows if r is not None and r.shape[0] > 0]
    if local:
        flat[: sizes[dist.get_rank()]].copy_(torch.cat(local))
    buckets = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(buckets, flat)
    pooled: list[list[Tensor]] = [[] for _ in rows]
    for bucket, ns in zip(buckets, per_rank, strict=True):
        offset = 0
        for i, (n, d) in enumerate(zip(ns, widths, strict=True)):
            if n:
                pooled[i].append(bucket[offset : offset + n * d].view(n, d))
            offset += n * d
    return [torch.cat(parts) if parts else None for parts in pooled]
