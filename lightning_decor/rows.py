"""The rows ``R`` acts on: a convolution's im2col patch geometry, drawing rows (uniformly, with a private generator per
device), and the state of sampling kept off the layers: one :class:`Sampling` shared by an engine's layers (whether
training forwards keep rows now, how many, with which generators) and one :class:`RowBuffer` per layer (the rows
waiting for its next update, a uniform sample of them once too many wait). The patched layers
(:mod:`lightning_decor.layers`) say which rows they take (``decor_rows``) and how many (``decor_drawn_count``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "INDEX_TABLES",
    "PENDING_FORWARDS",
    "Generators",
    "RowBuffer",
    "RowSource",
    "Sampling",
    "conv_output_positions",
    "conv_output_sizes",
    "conv_patch_index",
    "conv_patch_rows",
    "generator_for",
    "kept_count",
    "new_generator",
    "sample_conv_patch_rows",
    "uniform_sample_update",
]


def kept_count(fraction: float, n: int) -> int:
    """How many of ``n`` rows or samples a fraction keeps: ``ceil(fraction * n)``, at least one."""
    return max(1, math.ceil(fraction * n))


def uniform_sample_update(kept: Tensor, seen: int, new: Tensor, generator: torch.Generator | None) -> Tensor:
    """Reservoir sampling (Vitter's algorithm R) of rows, vectorised: ``kept`` (k, d) is a uniform sample without
    replacement of the ``seen`` rows so far; returns one of the ``seen + len(new)`` rows. Row ``t`` (0-based, in
    arrival order) draws ``j`` uniform in ``[0, t]`` and takes slot ``j`` when ``j < k``, the later row winning a slot
    drawn twice, as in the sequential algorithm. Fixed shapes and no host read: no device synchronisation."""
    k, q, dev = kept.shape[0], new.shape[0], kept.device
    t = seen + torch.arange(q, device=dev, dtype=torch.float64)  # float64: exact for any realistic count
    slot = (torch.rand(q, device=dev, dtype=torch.float64, generator=generator) * (t + 1)).long().clamp_(max=k)
    owner = torch.full((k + 1,), -1, dtype=torch.long, device=dev)  # slot k collects the rows that stay out
    owner.scatter_reduce_(0, slot, torch.arange(q, device=dev), reduce="amax")
    owner = owner[:k]
    return torch.where((owner >= 0)[:, None], new[owner.clamp(min=0)].to(kept.dtype), kept)


# Rows of at most this many forwards' worth (of the largest one) wait per layer for an update: an accumulation window
# of up to 64 micro-batches keeps every row; beyond (steps that never reach the callback) a uniform sample is kept.
PENDING_FORWARDS = 64


def new_generator(device: torch.device) -> torch.Generator:
    """A new random generator on ``device`` (the one place generators for row sampling are made)."""
    return torch.Generator(device=device)


class Generators:
    """The private random generators of row sampling, one per device, each made on first use and seeded with the same
    ``seed``: a model moved after its engine was made samples on its new device with a generator of that device (a
    CUDA draw refuses a CPU generator). Sampling rows never touches the global RNG (and so the data order).

    A saved state (:meth:`state_dict`) waits for the first generator of its device type: a checkpoint of a GPU run,
    restored while the model is still on the CPU (as Lightning restores callbacks), reaches the CUDA generator made
    when the model samples on the GPU.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._made: dict[torch.device, torch.Generator] = {}
        self._pending: dict[str, Tensor] = {}  # saved states by device type, for the first generator of that type

    def __call__(self, device: torch.device) -> torch.Generator:
        """The generator of ``device``."""
        generator = self._made.get(device)
        if generator is None:
            generator = self._made[device] = new_generator(device)
            generator.manual_seed(self.seed)
            state = self._pending.pop(device.type, None)
            if state is not None:
                try:
                    generator.set_state(state)
                except RuntimeError:  # a state of another generator kind: rows are sampled afresh
                    warnings.warn(
                        f"Decorrelator: the saved row-sampling state does not fit the {device.type} generator; rows "
                        "are sampled afresh.",
                        stacklevel=2,
                    )
        return generator

    def state_dict(self) -> dict[str, Any]:
        """The seed and the state of each device type's generator (states still waiting to be applied included)."""
        states = dict(self._pending)
        states.update({device.type: generator.get_state() for device, generator in self._made.items()})
        return {"seed": self.seed, "states": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: each state waits for the first generator of its device type (generators made
        before are dropped)."""
        self.seed = int(state["seed"])
        self._made = {}
        self._pending = dict(state["states"])


def generator_for(generator: torch.Generator | Generators | None, device: torch.device) -> torch.Generator | None:
    """The generator to draw with on ``device``."""
    return generator(device) if isinstance(generator, Generators) else generator


class RowSource(Protocol):
    """What a layer kind says of its rows (:class:`lightning_decor.layers.DecorrelatedLayer` and its kinds)."""

    def decor_rows(self, input: Any, sampling: Sampling) -> Tensor: ...  # noqa: A002 (torch's name)


INDEX_TABLES = 256  # per-shape index tables a Sampling keeps (a few KiB each), dropped all at once beyond


class Sampling:
    """How the patched layers of one engine draw rows, shared by all of them (one object, read by every forward).

    Attributes:
        fraction: Fraction of a forward's samples (images; for the last-dimension kinds, rows over all leading
            dimensions) whose rows are kept, in ``(0, 1]``.
        max_rows: At most this many rows per forward (a uniform draw), ``None`` for all.
        generator: A :class:`Generators` (one per device), a ``torch.Generator`` on the input's device, or ``None``
            (torch's global one).
        collect: Whether training forwards keep rows now (the engine switches it per step; a compiled model
            recompiles when it flips, so it flips only where the plan's cadence says).
    """

    def __init__(
        self,
        fraction: float = 1.0,
        max_rows: int | None = None,
        generator: torch.Generator | Generators | None = None,
        *,
        collect: bool = False,
    ) -> None:
        self.fraction, self.max_rows, self.generator, self.collect = fraction, max_rows, generator, collect
        self.inputs: Any = None  # while set (lightning_decor.sharing.SharedInputs), training forwards note inputs there
        self._tables: dict[Any, Any] = {}

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """The generator to draw with on ``device``."""
        return generator_for(self.generator, device)

    def index_tables(self, key: Any, make: Callable[[], Any]) -> Any:
        """Index tables of one input geometry (``key``), made by ``make()`` once and kept (see
        :func:`conv_patch_index`)."""
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) >= INDEX_TABLES:  # many input shapes (variable resolution): start afresh
                self._tables.clear()
            tables = self._tables[key] = make()
        return tables

    @property
    def tables_kept(self) -> int:
        """How many input geometries' index tables are kept now (at most :data:`INDEX_TABLES`)."""
        return len(self._tables)

    def rows(self, layer: RowSource, input: Any) -> Tensor:  # noqa: A002 (torch's name)
        """The raw input rows ``layer`` keeps from one training forward of ``input`` (detached, ``(n, D)``)."""
        rows = layer.decor_rows(input, self)
        # Rows that are a view of the input (every row of a Linear's input) are copied: the input may be an output of
        # a CUDA graph (`torch.compile(mode="reduce-overhead")`), overwritten by the graph's next replay before the
        # update reads it.
        return rows.clone() if rows._base is not None else rows


class RowBuffer:
    """The rows one patched layer keeps for its next update: every row of up to :data:`PENDING_FORWARDS` forwards'
    worth (of the largest forward), then a uniform sample of that many of all rows (an optimizer that steps outside
    the engine's sight, or never).

    Attributes:
        sampling: The engine's shared :class:`Sampling`.
        observer: Called as ``observer(layer, input)`` by every training forward while set (the planner's
            :class:`lightning_decor.probe.Observer` while the plain step is measured).
    """

    def __init__(self, sampling: Sampling, observer: Callable[[Any, Any], None] | None = None) -> None:
        self.sampling, self.observer = sampling, observer
        self.keeps = True  # False for a layer whose R is another's (it reads the same input): its rows are that one's
        self._rows: list[Tensor] = []
        self._seen = 0  # rows captured since the last update (more than are kept once sampling began)
        self._largest = 0  # the largest capture since the last update

    @property
    def wanted(self) -> bool:
        """Whether training forwards report to this buffer now (read inside the forward: a compiled model guards it)."""
        return self.sampling.collect or self.observer is not None

    def capture(self, layer: RowSource, input: Any) -> None:  # noqa: A002 (torch's name)
        """One training forward of ``layer`` on ``input``: tell the observer, keep its rows while collecting."""
        if self.observer is not None:
            self.observer(layer, input)
        if self.sampling.inputs is not None and isinstance(input, Tensor):
            self.sampling.inputs.note(self, input)
        if self.sampling.collect and self.keeps:
            self.store(self.sampling.rows(layer, input))

    def store(self, rows: Tensor) -> None:
        """Keep ``rows`` ``(n, D)`` for the next update (past the limit: the uniform sample, see the class)."""
        n = rows.shape[0]
        if n == 0:  # e.g. sequences of length 0: nothing to keep (an update needs at least one row)
            return
        self._largest = max(self._largest, n)
        limit = PENDING_FORWARDS * self._largest
        seen, pending = self._seen, self.pending_count  # seen > pending once only a sample is kept
        if seen == pending and seen + n <= limit:
            self._rows.append(rows)  # the usual case: every row waits for the update
        elif seen == pending:  # the first overflow: `limit` rows drawn from all so far
            every = torch.cat([r.to(rows.dtype) for r in (*self._rows, rows)])
            generator = self.sampling.generator_on(every.device)
            drawn = torch.randperm(every.shape[0], device=every.device, generator=generator)[:limit]
            self._rows = [every[drawn]]
        else:  # a uniform sample already (seen > kept): reservoir sampling keeps it one
            (kept,) = self._rows
            self._rows = [uniform_sample_update(kept, seen, rows, self.sampling.generator_on(rows.device))]
        self._seen = seen + n

    @property
    def pending_count(self) -> int:
        """Rows kept for the next update (at most :data:`PENDING_FORWARDS` forwards' worth)."""
        return sum(r.shape[0] for r in self._rows)

    @property
    def seen_count(self) -> int:
        """Rows captured since the last update; more than :attr:`pending_count` once only a sample is kept."""
        return self._seen

    def take(self) -> Tensor | None:
        """Remove and return the kept rows as one ``(n, D)`` tensor, or ``None`` when there are none."""
        rows, self._rows = self._rows, []
        self._seen = self._largest = 0
        if not rows:
            return None
        return rows[0] if len(rows) == 1 else torch.cat([r.to(rows[0].dtype) for r in rows])


# ---------------------------------------------------------------------------------------------- convolution patches
def _pads(
    kernel_size: tuple[int, ...], dilation: tuple[int, ...], padding: tuple[int, ...] | str
) -> list[tuple[int, int]]:
    """Padding (before, after) per spatial dimension, as ``nn.Conv*d`` applies it."""
    if padding == "valid":
        return [(0, 0)] * len(kernel_size)
    if padding == "same":  # total dilation * (k - 1), the extra pixel at the end
        totals = [dil * (k - 1) for k, dil in zip(kernel_size, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    if isinstance(padding, str):
        raise ValueError(f"Expected `padding` to be a tuple of ints, 'valid' or 'same', but got {padding!r}.")
    return [(p, p) for p in padding]


def conv_patch_rows(
    x: Tensor,
    kernel_size: tuple[int, ...],
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    padding_mode: str = "zeros",
) -> Tensor:
    """The im2col patch rows a ``Conv1d``/``Conv2d``/``Conv3d`` (``groups == 1``) multiplies with its weight.

    Args:
        x: Input of shape ``(N, C_in, *spatial)`` with 1, 2 or 3 spatial dimensions.
        kernel_size, stride, dilation: As in ``nn.Conv*d`` (one entry per spatial dimension).
        padding: A tuple of ints, or ``"valid"`` / ``"same"``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        Rows of shape ``(N * L_out, C_in * prod(kernel_size))``, ordered like ``weight.reshape(C_out, -1)``,
        output positions in row-major order.
    """
    pads = _pads(kernel_size, dilation, padding)
    if x.dim() == 3:  # Conv1d as a Conv2d of height 1
        return conv_patch_rows(
            x.unsqueeze(2),
            (1, *kernel_size),
            stride=(1, *stride),
            padding=padding if isinstance(padding, str) else (0, *padding),
            dilation=(1, *dilation),
            padding_mode=padding_mode,
        )
    if x.dim() == 4:
        if any(before != after for before, after in pads) or (padding_mode != "zeros" and any(sum(p) for p in pads)):
            flat = [v for before_after in reversed(pads) for v in before_after]  # F.pad order: last dim first
            x = F.pad(x, flat, mode="constant" if padding_mode == "zeros" else padding_mode)
            pads = [(0, 0)] * 2
        cols = F.unfold(x, kernel_size, dilation=dilation, padding=[p[0] for p in pads], stride=stride)  # (N, d, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N * L, d)
    # Conv3d: gather every output position (F.unfold is 2-D only).
    sizes = _out_sizes(x, kernel_size, stride, dilation, pads)
    grid = torch.meshgrid(*[torch.arange(s, device=x.device) for s in (x.shape[0], *sizes)], indexing="ij")
    pos = torch.stack([g.reshape(-1) for g in grid], dim=1)  # (N * L, 1 + S): image, then output coordinates
    return _gather_rows(x, pos, kernel_size, stride, dilation, pads, padding_mode)


def _out_sizes(
    x: Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
    pads: list[tuple[int, int]],
) -> list[int]:  # fmt: skip
    return [
        (size + before + after - dil * (k - 1) - 1) // st + 1
        for size, k, st, dil, (before, after) in zip(x.shape[2:], kernel_size, stride, dilation, pads)
    ]


def conv_output_positions(
    x: Tensor,
    kernel_size: tuple[int, ...],
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    padding_mode: str = "zeros",
) -> int:
    """Output positions per sample of a convolution on ``x`` ``(N, C, *spatial)``: each gives one patch row."""
    return math.prod(conv_output_sizes(x, kernel_size, stride=stride, padding=padding, dilation=dilation))


def conv_output_sizes(
    x: Tensor,
    kernel_size: tuple[int, ...],
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
) -> list[int]:
    """The output's spatial sizes of a convolution on ``x`` ``(N, C, *spatial)``, as ``nn.Conv*d`` computes them."""
    return _out_sizes(x, kernel_size, stride, dilation, _pads(kernel_size, dilation, padding))


def _gather_rows(
    x: Tensor, pos: Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
    pads: list[tuple[int, int]], padding_mode: str,
) -> Tensor:  # fmt: skip
    """Rows at output positions ``pos`` (n, 1 + S) = (image, coordinates...), gathered from the unpadded ``x``."""
    dev = x.device
    feats = torch.meshgrid(
        torch.arange(x.shape[1], device=dev), *[torch.arange(k, device=dev) for k in kernel_size], indexing="ij"
    )
    feats = [f.reshape(1, -1) for f in feats]  # (1, d) each: channel, then kernel offsets, ordered like the weight
    index: list[Tensor] = [pos[:, :1], feats[0]]
    valid: Tensor | None = None
    for i, (st, dil, (before, _)) in enumerate(zip(stride, dilation, pads)):
        coord = pos[:, i + 1 : i + 2] * st - before + feats[i + 1] * dil  # (n, d), in the padded frame
        src, ok = _source_index(coord, x.shape[i + 2], padding_mode)
        index.append(src)
        if ok is not None:
            valid = ok if valid is None else valid & ok
    rows = x[tuple(index)]  # (n, d)
    return rows if valid is None else rows * valid


def _source_index(pos: Tensor, size: int, padding_mode: str) -> tuple[Tensor, Tensor | None]:
    """Map coordinates in the padded input to the unpadded one; returns the index and, for zeros, a validity mask."""
    if padding_mode == "zeros":
        valid = (pos >= 0) & (pos < size)
        return pos.clamp(0, size - 1), valid
    if padding_mode == "replicate":
        return pos.clamp(0, size - 1), None
    if padding_mode == "circular":
        return pos.remainder(size), None
    if padding_mode == "reflect":
        period = 2 * (size - 1) if size > 1 else 1
        pos = pos.remainder(period)
        return torch.where(pos >= size, period - pos, pos), None
    raise ValueError(
        f"Expected `padding_mode` in ('zeros', 'reflect', 'replicate', 'circular'), but got {padding_mode!r}."
    )


def conv_patch_index(
    shape: tuple[int, ...],
    kernel_size: tuple[int, ...],
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    device: torch.device | None = None,
) -> tuple[list[tuple[int, int]], Tensor, Tensor, int]:
    """Flat-index tables for gathering patch rows from the padded input, computed once per input shape.

    Args:
        shape: The input's shape ``(N, C_in, *spatial)``.
        kernel_size, stride, padding, dilation: As in ``nn.Conv*d``.
        device: Where the tables live.

    Returns:
        ``(pads, start, offsets, image)``: the padding (before, after) per spatial dimension; ``start`` ``(L,)``, the
        flat offset of each output position's first patch element within one padded image; ``offsets`` ``(d,)``,
        each patch feature's offset from there (channel, then kernel offsets, ordered like the weight); ``image``,
        the size of one padded image. Patch row ``(i, l)`` is ``padded.flatten()[i * image + start[l] + offsets]``.
    """
    pads = _pads(kernel_size, dilation, padding)
    spatial = [size + before + after for size, (before, after) in zip(shape[2:], pads)]
    strides = [math.prod(spatial[i + 1 :]) for i in range(len(spatial))]  # row-major strides of a padded image
    outs = [(size - dil * (k - 1) - 1) // st + 1 for size, k, st, dil in zip(spatial, kernel_size, stride, dilation)]
    grid = torch.meshgrid(*[torch.arange(o, device=device) * st * sd for o, st, sd in zip(outs, stride, strides)],
                          indexing="ij")  # fmt: skip
    start = sum(g.reshape(-1) for g in grid)  # (L,)
    feats = torch.meshgrid(
        torch.arange(shape[1], device=device) * math.prod(spatial),
        *[torch.arange(k, device=device) * dil * sd for k, dil, sd in zip(kernel_size, dilation, strides)],
        indexing="ij",
    )
    offsets = sum(f.reshape(-1) for f in feats)  # (d,)
    return pads, start, offsets, shape[1] * math.prod(spatial)  # type: ignore[return-value]


def sample_conv_patch_rows(
    x: Tensor,
    n: int,
    kernel_size: tuple[int, ...],
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    padding_mode: str = "zeros",
    generator: torch.Generator | None = None,
    index: tuple[list[tuple[int, int]], Tensor, Tensor, int] | None = None,
) -> Tensor:
    """``n`` patch rows drawn uniformly (with replacement) from all rows of :func:`conv_patch_rows`, without
    unfolding: one flat gather from the padded input, ``O(n d)`` work instead of ``O(N L d)``, in a handful of
    kernels.

    Args:
        x: Input of shape ``(N, C_in, *spatial)`` with 1, 2 or 3 spatial dimensions.
        n: Number of rows to draw.
        kernel_size, stride, padding, dilation, padding_mode: As in ``nn.Conv*d`` (``groups == 1``).
        generator: Random generator on ``x``'s device (``None``: torch's global one).
        index: :func:`conv_patch_index` of ``x``'s shape, when the caller keeps it (computed here otherwise).

    Returns:
        Rows of shape ``(n, C_in * prod(kernel_size))``.
    """
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        _source_index(x, 1, padding_mode)  # raises the error naming the mode
    if index is None:
        index = conv_patch_index(
            tuple(x.shape), kernel_size, stride=stride, padding=padding, dilation=dilation, device=x.device
        )
    pads, start, offsets, image = index
    flat = [v for before_after in reversed(pads) for v in before_after]  # F.pad order: last dimension first
    if any(flat):
        x = F.pad(x, flat, mode="constant" if padding_mode == "zeros" else padding_mode)
    positions = start.numel()
    pos = torch.randint(x.shape[0] * positions, (n,), device=x.device, generator=generator)  # (image, position)
    first = torch.div(pos, positions, rounding_mode="floor") * image + start[pos % positions]  # (n,)
    return x.reshape(-1)[first[:, None] + offsets[None, :]]  # (n, d)
