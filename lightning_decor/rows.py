"""The rows ``R`` acts on, and the state of sampling them, kept off the layers: drawing rows (uniformly, with a private
generator per device), one :class:`Sampling` shared by an engine's layers (whether training forwards keep rows now,
how many, with which generators), one :class:`RowBuffer` per layer (the rows waiting for its next update, a uniform
sample of them once too many wait) and the engine's :class:`RowBuffers` (all of them, switched on and off per step).
The patched layers (:mod:`lightning_decor.layers`) say which rows they take (``decor_rows``) and how many
(``decor_drawn_count``); a convolution's patch geometry is in :mod:`lightning_decor.im2col`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "INDEX_TABLES",
    "PENDING_FORWARDS",
    "Generators",
    "RowBuffer",
    "RowBuffers",
    "RowSource",
    "Sampling",
    "generator_for",
    "kept_count",
    "new_generator",
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

    def load_state_dict(self, state: dict[str, Any] | Tensor) -> None:
        """Restore :meth:`state_dict`: each state waits for the first generator of its device type (generators made
        before are dropped). A tensor is the one CPU generator's state, as saved before generators were per device."""
        if isinstance(state, Tensor):
            state = {"seed": self.seed, "states": {"cpu": state}}
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
        :func:`lightning_decor.im2col.conv_patch_index`)."""
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


class RowBuffers:
    """The :class:`RowBuffer` of each of an engine's layers, over one :class:`Sampling` with its own
    :class:`Generators`: what the engine switches on and off per step, drops, and asks about.

    Args:
        names: The layers, by qualified name.
        fraction: As :attr:`Sampling.fraction`.
        max_rows: As :attr:`Sampling.max_rows`.
        seed: The seed of every device's generator (:class:`Generators`).
    """

    def __init__(self, names: Iterable[str], fraction: float, max_rows: int | None, seed: int) -> None:
        self.generators = Generators(seed)
        self.sampling = Sampling(fraction, max_rows, self.generators)
        self.buffers = {name: RowBuffer(self.sampling) for name in names}
        self.suspended = False  # no rows at all until resumed (forwards outside training steps)

    def __getitem__(self, name: str) -> RowBuffer:
        return self.buffers[name]

    def collect(self, on: bool) -> None:
        """Whether training forwards keep rows from now on (never while suspended)."""
        self.sampling.collect = on and not self.suspended

    def suspend(self, suspended: bool, collect: bool = False) -> None:
        """Take no rows at all while ``suspended`` (forwards outside training steps); else ``collect`` as before."""
        self.suspended = suspended
        self.collect(collect)

    def noted(self, name: str) -> bool:
        """Whether the forwards of layer ``name`` were seen since its last update, or need not be: they do not report
        this step, or its rows are another layer's (it shares that one's ``R``)."""
        buffer = self.buffers[name]
        return not buffer.wanted or not buffer.keeps or buffer.seen_count > 0

    def drop(self) -> None:
        """Drop every kept row."""
        for buffer in self.buffers.values():
            buffer.take()

    def end_observing(self) -> None:
        """No observer any more (the plan is made)."""
        for buffer in self.buffers.values():
            buffer.observer = None

    def waiting(self) -> list[str]:
        """Layers whose rows of more than :data:`PENDING_FORWARDS` forwards' worth waited for an update (only a
        uniform sample of them is kept)."""
        return [name for name, buffer in self.buffers.items() if buffer.seen_count > buffer.pending_count]
