"""One ``R`` per input: layers whose forwards read the very same tensor (the q, k and v projections of an attention
block, the gate and up projections of a gated MLP) see the same rows, compute the same statistics and would converge
to the same ``R``. :class:`InputSharing` finds them from the first training step's forwards
(:class:`SharedInputs`: by the tensor's identity, never by shape), gives each group one ``R``
(the first layer's; the others' ``decor_R`` is that very tensor), one row sample and one update, and says so in the
plan table. Every later step checks the group again: a layer called without the others (an auxiliary head used on
some batches), or on another tensor, leaves its group with a copy of the ``R`` reached so far and moves on its own
rows from then on (under DDP when any process saw it, so ``R`` stays equal on all). Folding is exact: each layer
folds its own ``W`` with the shared ``R``.

Only layers that take their rows from the last dimension (``nn.Linear``, Hugging Face's ``Conv1D``) with equal
widths and blocks share; a plan that gives two of them different blocks separates them (each gets its own ``R``,
still the identity then: plans are applied only before ``R`` moves).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_decor.functional import decorrelate_rows
from lightning_decor.layers import DecorrelatedLayer, LastDimRows
from lightning_decor.memory import r_bytes
from lightning_decor.plan import Plan
from lightning_decor.rows import RowBuffer, Sampling
from lightning_decor.update import device_runs

__all__ = ["InputSharing", "SharedInputs"]


class SharedInputs:
    """Which row buffers' layers read the very same input tensor in the training forwards noted since the last
    :meth:`reset` (the q, k and v projections of an attention block, the gate and up projections of a gated MLP):
    such layers see the same rows, so one ``R`` serves them all. Told by the tensor's identity (the same object,
    unchanged in place), never by shapes or values: two layers on different tensors of equal shape are never grouped.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the forwards noted so far."""
        self._open: dict[int, tuple[weakref.ref[Tensor], int, list[RowBuffer]]] = {}
        self._reads: list[list[RowBuffer]] = []  # the buffers that read one tensor, per tensor read

    def note(self, buffer: RowBuffer, x: Tensor) -> None:
        """A training forward of ``buffer``'s layer read ``x``."""
        entry = self._open.get(id(x))
        if entry is None or entry[0]() is not x or entry[1] != x._version:  # another tensor (an id reused)
            entry = (weakref.ref(x), x._version, [])
            self._open[id(x)] = entry
            self._reads.append(entry[2])
        entry[2].append(buffer)

    @property
    def noted(self) -> bool:
        """Whether any forward was noted."""
        return bool(self._reads)

    def _companions(self) -> tuple[dict[int, set[frozenset[int]]], dict[int, RowBuffer]]:
        seen: dict[int, set[frozenset[int]]] = {}  # per buffer, the sets of buffers it read a tensor with
        order: dict[int, RowBuffer] = {}
        for readers in self._reads:
            ids = frozenset(id(b) for b in readers)
            for b in readers:
                seen.setdefault(id(b), set()).add(ids)
                order.setdefault(id(b), b)
        return seen, order

    def groups(self) -> list[list[RowBuffer]]:
        """Groups of two or more buffers whose layers, in every forward noted, read a tensor that all of them and
        no other layer read (first-noted order)."""
        seen, order = self._companions()
        groups, done = [], set()
        for key in order:
            reads = seen[key]
            if len(reads) != 1 or key in done:  # read with different companions: no group
                continue
            ids = next(iter(reads))
            if len(ids) > 1 and all(seen[i] == reads for i in ids):
                groups.append([order[i] for i in order if i in ids])
                done |= ids
        return groups

    def together(self, a: RowBuffer, b: RowBuffer) -> bool:
        """Whether the layers of ``a`` and ``b`` read only tensors they both read, in the forwards noted (or neither
        was called)."""
        seen, _ = self._companions()
        reads_a, reads_b = seen.get(id(a), set()), seen.get(id(b), set())
        return reads_a == reads_b and all(id(a) in ids and id(b) in ids for ids in reads_a)


class RowsOnce:
    """The input form's ``z = x R^T`` computed once for the layers of one group (they read the same ``x`` and ``R``):
    the first layer's forward computes it, the next ones reuse it while ``x`` and ``R`` are unchanged (same objects,
    same versions). Kept by weak references: it never holds an activation alive (in a forward without autograd
    every layer computes its own again)."""

    def __init__(self) -> None:
        self._key: tuple[int, int, int, int] | None = None
        self._x: weakref.ref[Tensor] | None = None
        self._z: weakref.ref[Tensor] | None = None

    @torch.compiler.disable  # weak references and a host-side cache: eager, as the row capture
    def __call__(self, x: Tensor, R: Tensor) -> Tensor:
        key = (id(x), x._version, id(R), R._version)
        if key == self._key and self._x is not None and self._x() is x and self._z is not None:
            z = self._z()
            if z is not None:
                return z
        z = decorrelate_rows(x, R)
        self._key, self._x, self._z = key, weakref.ref(x), weakref.ref(z)
        return z


class InputSharing:
    """The groups of layers that share one ``R``, as ``followers`` (``{layer: the layer whose R it reads}``).

    Args:
        sampling: The engine's :class:`lightning_decor.rows.Sampling`: while groups may form or stand, every
            training forward's input is noted there for :meth:`resolve`.
        shareable: The layers that may share (their ``R`` is still the identity); fewer than two: no groups.
    """

    def __init__(self, sampling: Sampling, shareable: set[str]) -> None:
        self.followers: dict[str, str] = {}
        self._sampling = sampling
        self._shareable = shareable
        self._formed = len(shareable) < 2  # groups are formed once, at the first step (R is still the identity then)
        sampling.inputs = None if self._formed else SharedInputs()
        self._expand: Tensor | None = None  # per layer, the position of the layer whose results are its own

    def resolve(
        self,
        layers: dict[str, DecorrelatedLayer],
        buffers: dict[str, RowBuffer],
        agree: Callable[[Any], Any],
        any_rank: Callable[[list[bool]], list[bool]],
        pooled: bool = False,
    ) -> bool:
        """Before each update takes rows, from the forwards noted since the last call: at the first, form the groups
        (``agree``: rank 0's on every rank); then check every group (``any_rank``: a layer leaves its group when any
        process saw it called apart, or when one of the two trains and the other is frozen). Returns whether a group
        was formed or left. ``pooled``: every process calls it at the same points, noted forwards or not (the
        collectives)."""
        detector = self._sampling.inputs
        if detector is None or (not detector.noted and not pooled):
            return False
        changed = False
        if not self._formed:
            self._formed = True
            names = {id(buffer): name for name, buffer in buffers.items()}
            groups = agree([[names[id(b)] for b in group if id(b) in names] for group in detector.groups()])
            for members in groups:
                members = [name for name in members if name in self._shareable]
                for name in members[1:]:
                    if _can_share(layers[name], layers[members[0]]):
                        self.followers[name] = members[0]
                        buffers[name].keeps = False
                        buffers[name].take()  # the leader's rows are the same rows
                        changed = True
        apart = [
            not detector.together(buffers[name], buffers[leader])
            or layers[name].weight.requires_grad != layers[leader].weight.requires_grad  # one frozen: its own R
            for name, leader in self.followers.items()
        ]
        for name, leaves in zip(list(self.followers), any_rank(apart) if self.followers else [], strict=True):
            if leaves:
                self._leave(name, layers, buffers)
                changed = True
        detector.reset()
        if not self.followers:  # nothing shared, nothing to check: forwards stop noting their inputs
            self._sampling.inputs = None
        return changed

    def _leave(self, name: str, layers: dict[str, DecorrelatedLayer], buffers: dict[str, RowBuffer]) -> None:
        """``name`` leaves its group with its own copy of the shared ``R`` (the values reached so far)."""
        layer, source = layers.get(name), layers.get(self.followers.pop(name))
        if layer is not None and source is not None and layer.decor_R is source.decor_R:
            layer.decor_R = source.decor_R.clone()
        if name in buffers:  # not a layer the plan folded
            buffers[name].keeps = True

    def tie(
        self, layers: dict[str, DecorrelatedLayer], buffers: dict[str, RowBuffer], plan: Plan | None
    ) -> list[tuple[DecorrelatedLayer, DecorrelatedLayer]]:
        """The ties for :attr:`lightning_decor.update.BatchedUpdate.ties` after the layers' layouts may have changed
        (a plan): a layer whose block now differs from its leader's, or whose leader is gone, leaves its group (with
        its own ``R``); the plan's entries of the others say whose ``R`` they read."""
        ties = []
        for layer in layers.values():
            layer.decor_rows_once = None
        for name, p in (plan.layers if plan is not None else {}).items():  # a layer that left: its own R again
            if p.note.startswith("shares the R of") and name not in self.followers:
                plan.layers[name] = dataclasses.replace(p, memory=r_bytes(p.d, p.groups, p.block), note="")
        for name, leader in list(self.followers.items()):
            layer, source = layers.get(name), layers.get(leader)
            if layer is None or source is None or layer.decor_R.shape != source.decor_R.shape:
                self._leave(name, layers, buffers)
                continue
            ties.append((layer, source))
            if source.decor_rows_once is None:
                source.decor_rows_once = RowsOnce()
            layer.decor_rows_once = source.decor_rows_once  # one z for the group's input-form layers
            if plan is not None and name in plan.layers:
                plan.layers[name] = dataclasses.replace(plan.layers[name], memory=0, note=f"shares the R of {leader}")
        self._expand = None
        return ties

    def updated(self, layers: dict[str, DecorrelatedLayer]) -> dict[str, DecorrelatedLayer]:
        """The layers the update moves (every layer but the followers), in order."""
        return {name: layer for name, layer in layers.items() if name not in self.followers}

    def expand(self, values: Tensor, layers: dict[str, DecorrelatedLayer]) -> Tensor:
        """Per-layer results of the updated layers (:meth:`updated`), for every layer: a follower gets its leader's."""
        if not self.followers:
            return values
        if self._expand is None or self._expand.device != values.device:
            order = {name: i for i, name in enumerate(self.updated(layers))}
            index = [order[self.followers.get(name, name)] for name in layers]
            self._expand = device_runs(index, range(len(index)), [1] * len(index), torch.long, values.device)
        return values.index_select(0, self._expand)

    def state_dict(self) -> dict[str, Any]:
        return {"followers": dict(self.followers), "formed": self._formed}

    def load_state_dict(self, state: dict[str, Any], buffers: dict[str, RowBuffer]) -> None:
        """Restore the groups of a saved state (before the saved ``R`` are written)."""
        self.followers = {n: leader for n, leader in state["followers"].items() if n in buffers and leader in buffers}
        for name, buffer in buffers.items():
            buffer.keeps = name not in self.followers
        self._formed = bool(state.get("formed", True))
        if self._formed and not self.followers:
            self._sampling.inputs = None  # nothing to check
        elif self._sampling.inputs is None:
            self._sampling.inputs = SharedInputs()
        self._expand = None


def _can_share(layer: DecorrelatedLayer, leader: DecorrelatedLayer) -> bool:
    """Whether ``layer`` can read ``leader``'s ``R``: both take last-dimension rows of equal width, in one group, with
    ``R`` of the same layout, dtype and device, and train (or not) alike."""
    return (
        isinstance(layer, LastDimRows)
        and isinstance(leader, LastDimRows)
        and layer.decor_groups == leader.decor_groups == 1
        and layer.decor_R.shape == leader.decor_R.shape
        and layer.decor_R.dtype == leader.decor_R.dtype
        and layer.decor_R.device == leader.decor_R.device
        and layer.weight.requires_grad == leader.weight.requires_grad
    )
