"""The batched update of every ``R``: stacks of equal blocks, pooling across processes, padding, the null-space
cadence and the side CUDA stream. No Lightning, no plan: :class:`lightning_decor.Decorrelator` decides when it runs.

Layers whose ``R`` blocks have the same size, dtype and device share one stacked tensor (each layer's ``decor_R`` is a
view into it) and move together in one batched step (:func:`lightning_decor.functional.block_decorrelation_step`):
a few kernels per block size instead of a few dozen per layer. Nothing is read back to the host: index and count
tensors are made on the device by fills, per-layer sums by a fixed-order product.

**Two phases.** :meth:`BatchedUpdate.launch` computes the new ``R`` of every stack, each layer's loss and skip from
the rows; with ``side=True`` on a GPU it runs on a side stream, where it reads only ``R`` and the rows, beside the
optimizer step (which reads only ``W`` and its gradient). :meth:`BatchedUpdate.commit` writes the new ``R`` on the
main stream, after waiting for the side stream on the device: every reader of ``R`` on the main stream sees the old
``R`` before and the new one after, without waiting itself.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_decor.config import DecorConfig
from lightning_decor.distributed import Pool, all_gather_rows, cheaper_exchange, gather_counts
from lightning_decor.functional import block_decorrelation_step, float32_matmul, reset_null_space, segment_sum
from lightning_decor.layers import DecorrelatedLayer

__all__ = ["grad_scale", "NULL_RESET_EVERY", "BatchedUpdate", "Stack"]

NULL_RESET_EVERY = 20
"""Every this many updates, each block's ``R`` on its input's null space is put back to the identity's
(:func:`lightning_decor.functional.reset_null_space`): between two resets it grows at most ``(1 + lr * kappa)^20``
(x2.7 at ``lr * kappa = 0.05``)."""


def device_runs(
    values: Sequence[float], offsets: Sequence[int], lengths: Sequence[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A tensor on ``device`` holding ``values[i]`` at ``offsets[i] : offsets[i] + lengths[i]``, made by fills: a
    tensor from a host list would be a blocking copy to a GPU."""
    out = torch.empty(sum(lengths), dtype=dtype, device=device)
    for value, o, n in zip(values, offsets, lengths, strict=True):
        out[o : o + n].fill_(value)
    return out


@dataclass
class Stack:
    """The ``R`` blocks of the layers whose blocks have the same size, dtype and device: one tensor, one batched
    step."""

    names: list[str]
    index: list[int]  # position of each layer in the engine's layer order
    offsets: list[int]  # first block of each layer in the stack
    block_counts: list[int]  # blocks of each layer
    R: Tensor  # (G, b, b): every layer's decor_R is a view into it
    segment: Tensor  # (G,) layer of each block, 0..len(names) - 1
    sizes: Tensor  # (layers,) blocks of each layer, in R's dtype
    position: Tensor  # (layers,) each layer's place in the engine's layer order
    row_counts: dict[tuple[int, ...], Tensor] = field(default_factory=dict)  # per-block row counts, by rows

    @property
    def block_size(self) -> int:
        return self.R.shape[-1]

    def per_block(self, counts: tuple[int, ...]) -> Tensor:
        """``(G,)`` the row count of each block, for layers with ``counts`` rows: made on the device by one fill per
        layer (host ints as kernel arguments: no copy from the host, no sync) and kept while the counts stay."""
        cached = self.row_counts.get(counts)
        if cached is None:
            cached = device_runs(counts, self.offsets, self.block_counts, torch.long, self.R.device)
            self.row_counts = {counts: cached}  # the counts of the last step: usually the next step's too
        return cached


class BatchedUpdate:
    """The stacks of ``R`` blocks, the side stream and an update launched and not yet written."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")  # where the per-layer results live (the model's device)
        self.stacks: list[Stack] = []
        # (layer, the layer whose R it reads): layers on the same input share one R, not updated on their own
        self.ties: list[tuple[DecorrelatedLayer, DecorrelatedLayer]] = []
        # Across processes: exchange rows ("rows"), or each block's x^T x ("moments"), or the cheaper ("auto")
        self.exchange = "auto"
        self.exchanged: str | None = None  # what the last pooled update exchanged
        self.count = 0  # updates written: every NULL_RESET_EVERY-th starts from each block's null-space reset
        self.last_losses: Tensor | None = None  # per layer, at the last update (NaN: no rows)
        self.skipped: Tensor | None = None  # per layer, updates skipped for non-finite statistics
        self.stream: torch.cuda.Stream | None = None
        # A launched update: per stack the new R, per layer the losses and skips, and the event after which they are
        # complete (on the side stream).
        self._staged: list[Tensor] | None = None
        self._results: tuple[Tensor, Tensor] | None = None
        self._event: torch.cuda.Event | None = None
        self._event_device: torch.device | None = None

    def start(self, device: torch.device, use_cuda_stream: bool) -> None:
        """(Re)start on ``device``: a side CUDA stream there with ``use_cuda_stream`` on a GPU. The stacks stay."""
        self.drop()
        self.device = device
        self.stream = torch.cuda.Stream(device=device) if use_cuda_stream and device.type == "cuda" else None

    def set_exchange(self, value: str, normalize: str) -> None:
        """Set :attr:`exchange` (``"moments"`` only where the rule reads the rows through their moments alone)."""
        if value not in ("auto", "rows", "moments") or (value == "moments" and normalize == "layer"):
            raise ValueError(
                "Expected `exchange` in ('auto', 'rows', 'moments') ('rows' or 'auto' with normalize='layer'), "
                f"but got {value!r}."
            )
        self.exchange = value

    @property
    def launched(self) -> bool:
        """Whether an update was launched and not yet written."""
        return self._staged is not None

    def wait(self) -> None:
        """Make the current CUDA stream wait for an update launched on the side stream (on the device, no host
        sync); a no-op otherwise."""
        if self._event is not None:
            torch.cuda.current_stream(self._event_device).wait_event(self._event)

    def drop(self) -> None:
        """Forget a launched update (after waiting for the side stream, which may still read ``R``)."""
        self.wait()
        self._staged = self._results = None

    # ------------------------------------------------------------------ the stacks
    def build(self, layers: dict[str, DecorrelatedLayer]) -> None:
        """Stack the ``R`` of layers with equal block size, dtype and device; each layer's ``decor_R`` becomes a view
        into its stack (the values are kept). A launched update is dropped."""
        self.drop()
        by_key: dict[tuple[int, torch.dtype, torch.device], list[tuple[int, str]]] = {}
        for i, (name, layer) in enumerate(layers.items()):
            R = layer.decor_R
            by_key.setdefault((R.shape[-1], R.dtype, R.device), []).append((i, name))
        stacks = []
        for members in by_key.values():
            members_layers = [layers[name] for _, name in members]
            counts = [layer.decor_block_count for layer in members_layers]
            stack = torch.cat([layer.decor_R.reshape(-1, layer.decor_block_size, layer.decor_block_size)
                               for layer in members_layers])  # fmt: skip
            offsets = [sum(counts[:k]) for k in range(len(counts))]
            for layer, o, g in zip(members_layers, offsets, counts, strict=True):
                layer.decor_R = stack[o] if layer.decor_R.dim() == 2 else stack[o : o + g]
            # Small index tensors made on R's device by fills (a tensor from a host list would be a blocking copy).
            device, ones, n = stack.device, [1] * len(members), len(members)
            index = [i for i, _ in members]
            stacks.append(
                Stack(
                    names=[name for _, name in members],
                    index=index,
                    offsets=offsets,
                    block_counts=counts,
                    R=stack,
                    segment=device_runs(range(n), offsets, counts, torch.long, device),  # (G,) each block's layer
                    sizes=device_runs(counts, range(n), ones, stack.dtype, device),  # (layers,) blocks per layer
                    position=device_runs(index, range(n), ones, torch.long, device),  # (layers,) place in the order
                )
            )
        self.stacks = stacks
        for layer, source in self.ties:  # the very tensor: one memory, and its update is theirs
            layer.decor_R = source.decor_R

    def intact(self, layers: dict[str, DecorrelatedLayer]) -> bool:
        """Whether the stacks hold exactly ``layers`` and every layer's ``R`` is still a view into its stack (a device
        move or a new layout replaces it)."""
        stacked = [(name, stack) for stack in self.stacks for name in stack.names]
        return (
            len(stacked) == len(layers)
            and all(
                name in layers
                and layers[name].decor_R._base is stack.R
                and layers[name].decor_R.device == stack.R.device
                for name, stack in stacked
            )
            and all(layer.decor_R is source.decor_R for layer, source in self.ties)
        )

    # ------------------------------------------------------------------ the two phases
    @torch.no_grad()
    def launch(
        self,
        layers: dict[str, DecorrelatedLayer],
        rows: list[Tensor | None],
        config: DecorConfig,
        *,
        side: bool,
        pool: Pool | None = None,
    ) -> None:
        """Compute the update of ``config``'s rule from each layer's ``rows`` (``None``: none; pooled across the
        processes of an active ``pool``): the new ``R`` of every stack and each layer's loss and skip, kept for
        :meth:`commit`. With ``side``, on the side stream when there is one and every ``R`` lives on its device. Reads
        ``R`` and the rows; writes nothing the main stream reads. Every :data:`NULL_RESET_EVERY`-th update first
        resets each block on its input's null space."""
        if not layers:
            return
        null_reset = self.count % NULL_RESET_EVERY == NULL_RESET_EVERY - 1
        if not self.intact(layers):
            self.build(layers)
        stream = self.stream if side and all(s.R.device == self.device for s in self.stacks) else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(stream.device))  # after the rows and the backward
            for r in rows:
                if r is not None:
                    r.record_stream(stream)  # freed only after the side stream is done with it
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        try:
            with context, torch.autocast(self.device.type, enabled=False):
                totals: list[int] | None = None  # with moments: each layer's rows over all ranks
                # every rank updates from the rows (or their moments) of all ranks, so R stays equal
                if pool is not None and pool.active:
                    all_layers = list(layers.values())
                    widths = [layer.decor_features for layer in all_layers]
                    device = all_layers[0].decor_R.device
                    per_rank = gather_counts(rows, device=device, counts_group=pool.group)
                    exchange = self.exchange
                    if exchange == "auto":
                        blocks = [(s.R.shape[0], s.block_size) for s in self.stacks]
                        exchange = "rows" if config.normalize == "layer" else cheaper_exchange(per_rank, widths, blocks)
                    self.exchanged = exchange
                    if exchange == "moments":
                        totals = [sum(ns[i] for ns in per_rank) for i in range(len(rows))]
                    else:
                        dtype = functools.reduce(torch.promote_types, [layer.decor_R.dtype for layer in all_layers])
                        rows = all_gather_rows(rows, widths, dtype=dtype, device=device, counts_group=pool.group,
                                               per_rank=per_rank)  # fmt: skip
                staged = []
                last = torch.empty(len(layers), dtype=torch.float32, device=self.device)
                skipped = torch.zeros(len(layers), dtype=torch.long, device=self.device)
                for stack in self.stacks:
                    stack_rows = [rows[i] for i in stack.index]
                    stack_totals = None if totals is None else [totals[i] for i in stack.index]
                    new, losses, bad = self._step(stack, stack_rows, config, null_reset, stack_totals)
                    staged.append(new)
                    position = stack.position.to(self.device, non_blocking=True)  # stacks on other GPUs: async
                    last.index_copy_(0, position, losses.to(self.device, non_blocking=True).float())
                    skipped.index_copy_(0, position, bad.to(self.device, non_blocking=True).long())
        finally:
            if stream is not None:  # also after an error: commit() and wait() order the main stream after this work
                self._event, self._event_device = torch.cuda.Event(), stream.device
                self._event.record(stream)
        self._staged, self._results = staged, (last, skipped)

    @torch.no_grad()
    def commit(self, skip: Tensor | None = None, expand: Callable[[Tensor], Tensor] | None = None) -> None:
        """Write the launched update (if any) into every ``R`` on the main stream, after the side stream's work,
        unless ``skip`` (a boolean device tensor, never read on the host); publish each layer's loss
        (:attr:`last_losses`) and add its skip (:attr:`skipped`; a skipped step counts none). ``expand``: from the
        updated layers' results to every layer's (:meth:`lightning_decor.sharing.InputSharing.expand`)."""
        staged, results = self._staged, self._results
        self._staged = self._results = None
        if staged is None or results is None:
            return
        self.wait()
        self._event = None
        last, skipped = results
        keep = None if skip is None else skip.to(device=self.device, dtype=torch.bool).reshape(())
        for stack, new in zip(self.stacks, staged, strict=True):
            if new is not stack.R:  # a stack without rows keeps its R
                stack.R.copy_(new if keep is None else torch.where(keep.to(stack.R.device), stack.R, new))
        if keep is not None:  # its rows may come from an overflowing forward
            skipped = skipped * ~keep
        if expand is not None:
            last, skipped = expand(last), expand(skipped)
        if self.skipped is None or self.skipped.shape != skipped.shape:
            self.skipped = torch.zeros_like(skipped)
        self.skipped += skipped
        self.last_losses = last
        self.count += 1

    def reset_skipped(self, count: int) -> None:
        """Zero skip counts for ``count`` layers (a new set of layers: a plan, a restart)."""
        self.skipped = torch.zeros(count, dtype=torch.long, device=self.device)

    @staticmethod
    def _step(
        stack: Stack, rows: list[Tensor | None], config: DecorConfig, null_reset: bool, totals: list[int] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One batched step of a stack; returns the new blocks and per layer (loss, skipped) tensors. With
        ``totals`` (each layer's rows over all processes), from each block's ``x^T x`` summed over the processes
        (one all-reduce) instead of their rows."""
        b, R = stack.block_size, stack.R
        counts = tuple(0 if r is None else r.shape[0] for r in rows)
        n = max(counts)
        if n == 0 and totals is None:  # with moments every process takes part, with or without rows of its own
            nan = torch.full((len(rows),), math.nan, device=R.device)
            return R, nan, torch.zeros(len(rows), dtype=torch.bool, device=R.device)
        x = torch.empty(R.shape[0], max(n, 1), b, dtype=R.dtype, device=R.device)
        for r, o, g in zip(rows, stack.offsets, stack.block_counts, strict=True):
            k = 0 if r is None else r.shape[0]
            if r is not None and k:  # (n_i, g * b) -> (g, n_i, b): each block's own features
                x[o : o + g, :k].copy_(r.reshape(k, g, b).transpose(0, 1))
            if k < x.shape[1]:  # zero rows pad the shorter layers (only the padding is written twice)
                x[o : o + g, k:].zero_()
        moments = None
        if totals is not None:  # this process's x^T x of each block, summed over the processes: C needs no more
            with float32_matmul():
                moments = torch.bmm(x.transpose(1, 2), x)  # (G, b, b); zero rows add nothing
            dist.all_reduce(moments)
            x, n = None, max(totals)
        per_block = stack.per_block(counts if totals is None else tuple(totals))
        start = R
        if null_reset and n >= b:
            start = reset_null_space(R, x, per_block, moments=moments)  # bounds R's part on a null space of the input
        new, loss, ok = block_decorrelation_step(
            start, x, per_block, lr=config.decor_lr, kappa=config.kappa, normalize=config.normalize,
            segment=stack.segment, layers=len(rows), moments=moments,
        )  # fmt: skip
        # Per layer, summed over its blocks in a fixed order (index_add_ adds with atomics on a GPU); full float32.
        with float32_matmul():
            per_layer = segment_sum(torch.stack([loss, (~ok).to(loss.dtype)], 1), stack.segment, len(rows))
        return new, per_layer[:, 0] / stack.sizes, per_layer[:, 1] > 0


def grad_scale(scaler: Any) -> Tensor | None:
    """A copy of a ``torch.amp.GradScaler``'s scale, on its device (``GradScaler.get_scale()`` reads it back to the
    host), or ``None`` (no scaler, disabled, or before its first ``scale``). ``update()`` multiplies the scale by its
    ``backoff_factor < 1`` exactly when the step was skipped, so ``grad_scale(scaler) < before`` after
    ``scaler.update()`` tells a skipped step on the device: pass it as ``Decorrelator.step(skip=...)``."""
    scale = getattr(scaler, "_scale", None)  # the scaler's own scale tensor (no public one without a host read)
    return scale.clone() if isinstance(scale, Tensor) else None


class SkipWatch:
    """Whether a ``GradScaler`` skipped an optimizer step since the last :meth:`take`, as a device tensor (never read
    on the host): its scale falls exactly when a step is skipped. For ``Decorrelator.step(skip=...)``."""

    def __init__(self) -> None:
        self._scale: Tensor | None = None  # the scale before the last optimizer step noted
        self._dropped: Tensor | None = None  # whether it fell between two noted steps

    def note(self, scaler: Any) -> None:
        """Before each optimizer step (and in :meth:`take`): the scaler's scale, and whether it fell since the last."""
        scale = grad_scale(scaler)
        if scale is not None and self._scale is not None:
            dropped = scale < self._scale
            self._dropped = dropped if self._dropped is None else self._dropped | dropped
        self._scale = scale

    def take(self, scaler: Any) -> Tensor | None:
        """After the last optimizer step: whether one of the noted steps was skipped (``None`` without a scaler);
        starts anew."""
        self.note(scaler)
        dropped = self._dropped
        self._scale = self._dropped = None
        return dropped
