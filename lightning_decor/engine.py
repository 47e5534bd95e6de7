"""``Decorrelator``: the Lightning-free engine of decorrelated backpropagation.

It owns the patched layers of one model and their plan, takes their sampled input rows, pools them across
processes (``torch.distributed``, when initialised), moves every ``R`` (on a side CUDA stream on GPU), and keeps the
losses, skip counts and a ``state_dict``. Plain PyTorch::

    dec = Decorrelator(model)               # patches the model in place
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        dec.step()                          # once per optimizer step, after its backward
        optimizer.step()
    dec.fold()                              # a plain model again, no inference overhead

``DecorrelationCallback`` is the Lightning front-end of the same engine: it decides when ``step`` runs and where
the losses are logged.

**The plan.** With ``max_overhead`` set (the default), the first five calls of :meth:`Decorrelator.step` measure
the plain training step (every layer computes its plain function: ``R`` is the identity; the shortest of four
intervals counts) and the shapes each layer sees; the fifth times each layer's candidate forms
(:mod:`lightning_decor.probe`) and makes the per-layer plan (:mod:`lightning_decor.plan`) within ``max_overhead`` of
the measured step, and ``R`` starts moving from the sixth step. Steps 6 to 11 check the plan against the real
step; a plan whose extra time exceeds 1.2 times its budget is made again with its costs scaled by measured /
estimated (at most three times). ``max_overhead=None`` skips all this:
every layer keeps its largest allowed block, fused into the weight, and ``R`` moves from the first step.

**The update.** Layers whose blocks have the same size share one stacked tensor (each layer's ``decor_R`` is a view
into it) and move together in one batched step (:func:`lightning_decor.functional.block_decorrelation_step`): a
few kernels per block size instead of a few dozen per layer.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_decor.attention import restore_containers, route_containers
from lightning_decor.checks import check_engine_arguments
from lightning_decor.distributed import all_gather_rows, count_group, destroy_count_group
from lightning_decor.functional import block_decorrelation_step, reset_null_space
from lightning_decor.layers import DecorrelatedLayer, decorrelate, decorrelated_layers, fold_layer
from lightning_decor.plan import Costs, LayerPlan, LayerShape, Plan, candidate_costs, make_plan, measure_costs
from lightning_decor.probe import measure_candidates

__all__ = ["Decorrelator"]

_TOLERANCE = 1.2  # a plan is remade when its measured extra time exceeds this many times the budget (the parts
# timed alone run ~1.5-2.5x slower inside a real step). It was 1.5 while the plain step was the shorter of two
# intervals, a noisy figure (1.3 then remade plans on noise alone); at 1.5, plans ran at 1.17x (ResNet-18 @ 96) and
# 1.22x (ConvNeXt) a BP step, measured with the steps interleaved, for a budget of 10 %.
_REPLANS = 2  # at most this many times
_CHECK_WINDOWS = 5  # steps (of update_every each) timed to check a plan; the fastest one counts
_MAX_CORRECTION = 3.0  # one check scales the costs by at most this: the candidates are measured, so a larger
# discrepancy is timing noise (a busy machine) rather than a wrong estimate
_PROBE_STEPS = 3.0  # the measuring of the candidate forms may take this many plain steps (once per fit)


def _grad_mark(param: Tensor) -> tuple[weakref.ref[Tensor] | None, int]:
    """Which ``.grad`` tensor ``param`` holds (weakly: a stale gradient may still be freed) and its version."""
    grad = param.grad
    return (None, 0) if grad is None else (weakref.ref(grad), grad._version)


def _got_grad(param: Tensor, mark: tuple[weakref.ref[Tensor] | None, int]) -> bool:
    """Whether a backward reached ``param`` since ``mark``: a new ``.grad`` tensor, or the old one accumulated into."""
    grad, (old, version) = param.grad, mark
    return grad is not None and (old is None or old() is not grad or grad._version != version)


CALIBRATION_STEPS = 5
"""Calls of :meth:`Decorrelator.step` that measure the plain step before the plan is made: four intervals, the
shortest counts. (With two, a slow spell of a shared machine during them made the plain step, and so the budget,
half again as large as it was: measured on ResNet-18 at 32x32, a plan made against 168 ms for a 110 ms step.)"""

NULL_RESET_EVERY = 20
"""Every this many updates, each block's ``R`` on its input's null space is put back to the identity's
(:func:`lightning_decor.functional.reset_null_space`): between two resets it grows at most ``(1 + lr * kappa)^20``
(x2.7 at ``lr * kappa = 0.05``)."""


@dataclass
class _Group:
    """Layers whose ``R`` blocks have the same size, dtype and device: one stacked tensor, one batched update."""

    names: list[str]
    index: list[int]  # position of each layer in the engine's layer order
    offsets: list[int]  # first block of each layer in the stack
    blocks: list[int]  # blocks of each layer
    R: Tensor  # (G, b, b): every layer's decor_R is a view into it
    segment: Tensor  # (G,) layer of each block, 0..len(names) - 1
    sizes: Tensor  # (layers,) blocks of each layer, in R's dtype
    counts: dict[tuple[int, ...], Tensor] = field(default_factory=dict)  # per-block row counts, cached by rows

    @property
    def block(self) -> int:
        return self.R.shape[-1]


class Decorrelator:
    """Decorrelated backpropagation (Dalm et al., https://arxiv.org/abs/2405.02385) for a plain ``nn.Module``.

    Patches ``model`` in place (see :func:`lightning_decor.decorrelate`): every ``nn.Linear`` and
    ``nn.Conv1d/2d/3d`` (exact types; grouped and depthwise convolutions get one ``R`` per group) computes with
    ``W @ R``. Call :meth:`step` once per optimizer step, after its backward; :meth:`fold` at the end.

    Args:
        model: The model to decorrelate, patched in place.
        decor_lr: Learning rate of the decorrelation rule (> 0).
        kappa: Weight of the unit-variance term, in ``[0, 1]``.
        normalize: Scaling of each step: ``"none"`` (the authors' rule), ``"trace"``, ``"spectral"`` or ``"layer"`` (see
            :func:`lightning_decor.functional.block_decorrelation_step`).
        sample_fraction: Fraction of each batch's samples whose input rows feed the statistics, in ``(0, 1]``.
        max_rows: At most this many rows per layer and forward, drawn at random (``None``: all).
        include: Glob patterns of layers to patch (``None``: all eligible).
        exclude: Patterns of layers to leave plain.
        max_features: Layers with more input features get blocks of at most this many (or stay plain when none
            fits); ``None`` for no limit.
        block_size: The largest block of any ``R`` (``None``: dense ``R`` allowed).
        max_overhead: The plan's budget: estimated cost of all DBP parts as a fraction of the measured plain
            training step (``None``: no plan, every layer at its largest allowed block, fused).
        update_every: ``R`` moves on every k-th call of :meth:`step` (rows are sampled only for those steps).
        use_cuda_stream: Run the update on a side CUDA stream when the model is on a GPU.

    Attributes:
        plan: The per-layer plan (:class:`lightning_decor.plan.Plan`), ``None`` until it is made.
        updates: Number of updates of ``R`` so far.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decor_lr: float = 3e-2,
        kappa: float = 0.5,
        normalize: str = "spectral",
        sample_fraction: float = 0.1,
        max_rows: int | None = 64,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        max_features: int | None = 8192,
        block_size: int | None = None,
        max_overhead: float | None = 0.1,
        update_every: int = 1,
        use_cuda_stream: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
        checked = check_engine_arguments(
            decor_lr=decor_lr, kappa=kappa, sample_fraction=sample_fraction, max_rows=max_rows, include=include,
            exclude=exclude, max_features=max_features, block_size=block_size, max_overhead=max_overhead,
            update_every=update_every, use_cuda_stream=use_cuda_stream, normalize=normalize,
        )  # fmt: skip
        self.decor_lr: float = checked["decor_lr"]
        self.kappa: float = checked["kappa"]
        self.normalize: str = checked["normalize"]
        self.sample_fraction: float = checked["sample_fraction"]
        self.max_rows: int | None = checked["max_rows"]
        self.include: list[str] | None = checked["include"]
        self.exclude: list[str] | None = checked["exclude"]
        self.max_features: int | None = checked["max_features"]
        self.block_size: int | None = checked["block_size"]
        self.max_overhead: float | None = checked["max_overhead"]
        self.update_every: int = checked["update_every"]
        self.use_cuda_stream: bool = checked["use_cuda_stream"]
        self.model = model
        new = decorrelate(model, include=include, exclude=exclude, max_features=max_features, block_size=block_size)
        self.layers: dict[str, DecorrelatedLayer] = decorrelated_layers(model)
        # DDP broadcasts rank 0's buffers before every forward; R is kept equal on all ranks by pooling rows instead.
        ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        model._ddp_params_and_buffers_to_ignore = sorted(ignored | {f"{n}.decor_R" for n in self.layers})  # type: ignore[assignment]
        # Layers patched before this engine (a model handed back patched) keep their R and form: only fresh ones,
        # whose R is still the identity, run plain while the step is measured and are planned.
        self._fresh = set(new)
        self.plan: Plan | None = None
        self.updates = 0
        self.last_losses: Tensor | None = None  # per layer, at the last update (NaN: no rows)
        self.skipped: Tensor | None = None  # per layer, updates skipped for non-finite statistics
        self._calls = 0  # step() calls since the plan was made (or since start without a plan)
        self._calibration: list[float] = []  # times of the calibration calls
        self._shapes: dict[str, tuple[int, int, int]] = {}  # per layer: rows, forwards, statistics rows per step
        self._input_shapes: dict[str, tuple[int, ...] | None] = {}  # per layer: its last measured input's shape
        self._checking: list[float] | None = None  # times of the calls that check a fresh plan's real cost
        self._replans = 0
        self._planning: tuple[list[LayerShape], Costs, dict[str, list[tuple[str, float]]]] | None = None
        self._groups: list[_Group] = []
        self._position = torch.zeros(0, dtype=torch.long)  # each layer's place in the concatenated group results
        self._stream: torch.cuda.Stream | None = None
        self._generator: torch.Generator | None = None
        self._pending_generator_state: Tensor | None = None
        self._pool = False
        self._counts_group: Any = None
        self._weight_marks: dict[str, tuple[weakref.ref[Tensor] | None, int]] | None = None
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if self.max_overhead is None or not self._fresh:
            self._set_plan(self._static_plan())
        else:
            for name in self._fresh:
                self.layers[name].decor_form = "identity"  # R = I: the plain function, at the plain cost
        self.start(self._device)

    # ------------------------------------------------------------------ life cycle
    def start(self, device: torch.device | None = None) -> None:
        """(Re)start on ``device`` (default: the model's): side stream, row-sampling generator, process group for
        pooling rows when ``torch.distributed`` is initialised with several processes, and row collection."""
        self._device = device if device is not None else next(
            (p.device for p in self.model.parameters()), torch.device("cpu")
        )
        self._stream = None
        if self.use_cuda_stream and self._device.type == "cuda":
            self._stream = torch.cuda.Stream(device=self._device)
        if self._generator is None or self._generator.device != self._device:
            # A private generator: sampling rows must not shift the global RNG (and so the data order).
            self._generator = torch.Generator(device=self._device)
            self._generator.manual_seed(torch.initial_seed() % 2**63)
        if self._pending_generator_state is not None:
            try:
                self._generator.set_state(self._pending_generator_state)
            except RuntimeError:  # a state from another device type: rows are sampled afresh
                warnings.warn("Decorrelator: the saved row-sampling state does not fit this device.", stacklevel=2)
            self._pending_generator_state = None
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._pool = world > 1
        if self._pool and self.layers and self._counts_group is None:
            self._counts_group = count_group()  # collective: every rank has the same layers
        self.skipped = torch.zeros(len(self.layers), dtype=torch.long, device=self._device)
        for layer in self.layers.values():
            layer.decor_sample_fraction = self.sample_fraction
            layer.decor_max_rows = self.max_rows
            layer.decor_generator = self._generator
        self._set_collection()
        # Which gradient each weight holds now, to tell at the first step which layers got one without a forward.
        self._weight_marks = {name: _grad_mark(layer.weight) for name, layer in self.layers.items()}
        self._calibration = []  # the plain step is measured within one run, never across a pause between two
        if self._checking is not None:
            self._checking = []

    def check_direct_weight_reads(self) -> None:
        """Once after :meth:`start` (at the first :meth:`step`, or earlier, right after the first backward): warn
        about layers whose weight got a gradient while their forward was not called, i.e. code read ``.weight``
        directly (``F.linear(x, layer.weight)``) and so computed with the raw ``W`` instead of ``W @ R``, and ``R``
        cannot move."""
        marks, self._weight_marks = self._weight_marks, None
        if not marks:
            return
        bypassed = [
            name
            for name, layer in self.layers.items()
            if name in marks
            and (layer.decor_collect or layer.decor_record)  # its forwards note themselves in this step
            and layer.decor_rows_seen() == 0
            and layer.decor_seen_forwards == 0
            and _got_grad(layer.weight, marks[name])
        ]
        if bypassed and (not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0):
            warnings.warn(
                f"Decorrelator: the weights of {bypassed} received a gradient in the first training batch, but their "
                "forward was not called: code that reads `.weight` directly (e.g. `F.linear(x, layer.weight)`) "
                "computes with the raw W instead of W @ R, and R does not move. Call the layer instead, or leave it "
                "out with `exclude`. (A penalty on the weights of a layer that this batch did not use gives such a "
                "gradient too; then there is nothing to fix.)",
                stacklevel=3,
            )

    def stop(self) -> None:
        """Stop collecting rows and drop the pending ones (the model stays patched), and release the process group
        made for pooling."""
        self.wait()
        for layer in self.layers.values():
            layer.decor_collect = layer.decor_record = False
            layer.decor_take_rows()
        destroy_count_group(self._counts_group)  # one group per fit otherwise, never freed
        self._counts_group = None

    def fold(self) -> list[str]:
        """Stop, and turn every patched layer back into its plain class with weight ``W @ R``."""
        self.stop()
        names = []
        for name, layer in self.layers.items():
            if isinstance(layer, DecorrelatedLayer):  # the user may have folded it already
                fold_layer(layer)
                names.append(name)
        restore_containers(self.model)  # transformer layers around the folded ones get their fast paths back
        self.layers, self._groups = {}, []
        return names

    def wait(self) -> None:
        """Make the current CUDA stream wait for the update (device-side, no host sync); a no-op on CPU."""
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)

    @property
    def calibrating(self) -> bool:
        """Whether the plain step is still being measured (``R`` does not move yet)."""
        return self.plan is None

    # ------------------------------------------------------------------ the step
    def step(self) -> None:
        """Once per optimizer step, after its backward: measure and plan (first calls), or move every ``R`` from
        the rows collected since the last update (every ``update_every``-th call)."""
        if not self.layers:
            return
        device = next(iter(self.layers.values())).weight.device
        if device != self._device:  # the model moved after the engine was made (e.g. by Fabric's setup)
            self.start(device)
        self.check_direct_weight_reads()
        if self.plan is None:
            self._calibrate()
            return
        self._calls += 1
        if self._checking is not None and self._check_plan():
            self._calls = 1  # a new plan: its first update is now
        if (self._calls - 1) % self.update_every == 0:
            self.update_()
        self._set_collection()

    def _set_collection(self) -> None:
        """Collect rows in the coming step only when it updates ``R``; record shapes while calibrating."""
        due = self.plan is not None and self._calls % self.update_every == 0
        for layer in self.layers.values():
            layer.decor_collect = due
            layer.decor_record = self.plan is None

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _calibrate(self) -> None:
        self._sync()
        self._calibration.append(time.perf_counter())
        self._shapes = {}
        self._input_shapes = {}
        for name, layer in self.layers.items():
            self._shapes[name] = (layer.decor_seen_rows, layer.decor_seen_forwards, layer.decor_seen_stat_rows)
            self._input_shapes[name] = layer.decor_seen_input_shape
            layer.decor_seen_rows = layer.decor_seen_forwards = layer.decor_seen_stat_rows = 0
        if len(self._calibration) < CALIBRATION_STEPS:
            return
        times = self._calibration
        step = min(b - a for a, b in zip(times, times[1:]))
        shapes = self._layer_shapes()
        costs = measure_costs(self._device)
        assert self.max_overhead is not None  # calibrating means planning
        measured = measure_candidates(
            self.layers,
            shapes,
            {n: s for n, s in self._input_shapes.items() if s is not None},
            {s.name: candidate_costs(s, costs, self.update_every) for s in shapes},
            budget=self.max_overhead * step,
            time_limit=_PROBE_STEPS * step,
            update_every=self.update_every,
            normalize=self.normalize,
            costs=costs,
        )
        self._planning = (shapes, costs, measured)
        plan = self._agreed(self._new_plan(step, 1.0))
        assert plan is not None
        self._set_plan(plan)
        self._checking, self._replans = [], 0
        self._calibration = []
        self._set_collection()
        if not self.layers:
            warnings.warn(
                f"Decorrelator: the plan leaves every layer plain: decorrelating any of them would cost more than "
                f"`max_overhead`={self.max_overhead} of the measured {step * 1e3:.1f} ms step. Training continues as "
                "plain backpropagation; raise `max_overhead`, or set it to None for a dense R everywhere.",
                stacklevel=2,
            )

    def _new_plan(self, step: float, scale: float) -> Plan:
        """The plan from the measured candidates, every cost multiplied by ``scale``."""
        assert self._planning is not None
        shapes, costs, measured = self._planning
        plan = make_plan(
            shapes,
            costs=Costs(costs.seconds_per_flop * scale, costs.seconds_per_op * scale),
            step_seconds=step,
            max_overhead=self.max_overhead,
            update_every=self.update_every,
            measured={name: [(f, c * scale) for f, c in entries] for name, entries in measured.items()},
        )
        plan.layers = {**self._static_plan().layers, **plan.layers}  # layers patched before keep their form
        plan.scale = scale
        return plan

    def _agreed(self, plan: Plan | None) -> Plan | None:
        """Rank 0's plan (or decision, ``None``) on every rank: all ranks must apply the same plan."""
        if not self._pool:
            return plan
        box = [None if plan is None else plan.state_dict()]
        dist.broadcast_object_list(box, src=0, group=self._counts_group)
        return None if box[0] is None else Plan.from_state_dict(box[0])

    def _check_plan(self) -> bool:
        """Check a fresh plan against the real step: after :data:`_CHECK_WINDOWS` steps with it (of
        ``update_every`` steps each), if the fastest one's extra time over the plain step exceeds the budget by more
        than the timing noise, make the plan again with every cost scaled by measured / estimated (at most
        :data:`_MAX_CORRECTION` per check, :data:`_REPLANS` times). Returns whether a new plan was applied."""
        assert self._checking is not None and self.plan is not None and self.max_overhead is not None
        self._sync()
        self._checking.append(time.perf_counter())
        k = self.update_every
        if len(self._checking) < _CHECK_WINDOWS * k + 1:
            return False
        times, self._checking = self._checking, None
        windows = [(times[i + k] - times[i]) / k for i in range(0, _CHECK_WINDOWS * k, k)]  # update included
        plain, estimate = self.plan.step_seconds, self.plan.estimate
        plan = None
        if plain and estimate > 0:
            extra = min(windows) - plain
            if extra > _TOLERANCE * self.max_overhead * plain:
                correction = min(max(extra / estimate, 1.0), _MAX_CORRECTION)
                plan = self._new_plan(plain, self.plan.scale * correction)
        plan = self._agreed(plan)
        if plan is None:
            return False
        self._set_plan(plan)
        self._replans += 1
        self._checking = [] if self._replans < _REPLANS else None
        return True

    def _layer_shapes(self) -> list[LayerShape]:
        shapes = []
        for name, layer in self.layers.items():
            if name not in self._fresh:
                continue
            rows, forwards, stat_rows = self._shapes.get(name, (0, 0, 0))
            shapes.append(
                LayerShape(
                    name=name,
                    d=layer.decor_group_features,
                    unit=layer.decor_unit,
                    c_out=layer.weight.shape[0],
                    groups=layer.decor_groups,
                    rows=rows,
                    forwards=forwards,
                    stat_rows=stat_rows,
                    input_side=layer.decor_input_side,
                    conv=layer.weight.dim() > 2,
                    max_block=layer.decor_block,  # decorrelate() gave it its largest allowed block
                )
            )
        return shapes

    def _static_plan(self) -> Plan:
        """Without a budget: every layer as it is now (as :func:`decorrelate` made it: largest allowed block,
        fused, unless it was patched and planned before this engine)."""
        layers = {}
        for name, layer in self.layers.items():
            rows = self._shapes.get(name, (0, 0, 0))[0]
            layers[name] = LayerPlan(
                name=name, form="fused" if layer.decor_form == "identity" else layer.decor_form,
                block=layer.decor_block, d=layer.decor_group_features, rows=rows, c_out=layer.weight.shape[0],
                groups=layer.decor_groups, cost=0.0,
            )  # fmt: skip
        return Plan(layers)

    def _set_plan(self, plan: Plan) -> None:
        """Give every layer its planned form (``R`` back to the identity in the planned layout); fold the plain ones."""
        self.wait()
        for name, p in plan.layers.items():
            layer = self.layers.get(name)
            if layer is None:
                continue
            if p.form == "plain":
                layer.decor_take_rows()
                fold_layer(layer)
                del self.layers[name]
            elif (p.block, p.form) != (layer.decor_block, layer.decor_form):
                layer.decor_set_layout_(p.block, p.form)  # R = I in the new layout (R has not moved yet)
        for layer in self.layers.values():
            if layer.decor_form == "identity":  # not in the plan (a restored plan from fewer layers): fused
                layer.decor_form = "fused"
        route_containers(self.model)  # an attention whose in-projection is plain now and out_proj is not
        restore_containers(self.model)  # containers left without a patched layer
        self.plan = plan
        self._calls = 0
        self.skipped = torch.zeros(len(self.layers), dtype=torch.long, device=self._device)
        self._build_groups()

    def _build_groups(self) -> None:
        """Stack the ``R`` of layers with equal block size, dtype and device; each layer's ``decor_R`` becomes a
        view into its group's stack (the values are kept)."""
        by_key: dict[tuple[int, torch.dtype, torch.device], list[tuple[int, str]]] = {}
        for i, (name, layer) in enumerate(self.layers.items()):
            R = layer.decor_R
            by_key.setdefault((R.shape[-1], R.dtype, R.device), []).append((i, name))
        groups = []
        for members in by_key.values():
            layers = [self.layers[name] for _, name in members]
            blocks = [layer.decor_blocks for layer in layers]
            stack = torch.cat([layer.decor_R.reshape(-1, layer.decor_block, layer.decor_block) for layer in layers])
            offsets = [sum(blocks[:k]) for k in range(len(blocks))]
            for layer, o, g in zip(layers, offsets, blocks, strict=True):
                layer.decor_R = stack[o] if layer.decor_R.dim() == 2 else stack[o : o + g]
            segment = torch.repeat_interleave(torch.arange(len(layers), device=stack.device), torch.tensor(blocks))
            sizes = torch.tensor(blocks, dtype=stack.dtype, device=stack.device)
            groups.append(
                _Group([n for _, n in members], [i for i, _ in members], offsets, blocks, stack, segment, sizes)
            )
        self._groups = groups
        order = [i for group in groups for i in group.index]  # layer order from group order
        position = torch.empty(len(order), dtype=torch.long)
        position[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        self._position = position.to(groups[0].R.device) if groups else position

    def _groups_intact(self) -> bool:
        """Whether every layer's ``R`` is still a view into its group's stack (a device move or a new layout
        replaces the buffer)."""
        for group in self._groups:
            for name, o in zip(group.names, group.offsets, strict=True):
                R = self.layers[name].decor_R
                if R.device != group.R.device or R.data_ptr() != group.R[o].data_ptr():
                    return False
        return True

    @torch.no_grad()
    def update_(self) -> None:
        """Move every ``R`` by one step from the rows collected since the last update (a layer without rows keeps
        its ``R``); no host synchronisation."""
        layers = list(self.layers.values())
        if not layers:
            return
        if not self._groups_intact():
            self._build_groups()
        taken = [layer.decor_take_rows() for layer in layers]  # on the main stream, where the rows were written
        stream = self._stream
        context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(stream.device))  # rows written on the main stream
            context = torch.cuda.stream(stream)
        with context, torch.autocast(self._device.type, enabled=False):
            if stream is not None:
                for rows in taken:
                    if rows is not None:
                        rows.record_stream(stream)  # freed only after the side stream is done with it
            if self._pool:  # every rank updates from the rows of all ranks, so R stays equal
                taken = all_gather_rows(
                    taken,
                    [layer.decor_features for layer in layers],
                    dtype=functools.reduce(torch.promote_types, [layer.decor_R.dtype for layer in layers]),
                    device=layers[0].decor_R.device,
                    counts_group=self._counts_group,
                )
            losses: list[Tensor] = []
            bad: list[Tensor] = []
            for group in self._groups:
                group_losses, group_bad = self._update_group(group, [taken[i] for i in group.index])
                losses.append(group_losses)
                bad.append(group_bad)
            device = self._position.device
            self.last_losses = torch.cat([v.to(device).float() for v in losses])[self._position]
            skipped = torch.cat([v.to(device) for v in bad])[self._position].long()
            if self.skipped is None or self.skipped.shape != skipped.shape:
                self.skipped = torch.zeros_like(skipped)
            self.skipped += skipped.to(self.skipped.device)
        self.updates += 1

    def _update_group(self, group: _Group, rows: list[Tensor | None]) -> tuple[Tensor, Tensor]:
        """One batched step of a group; returns per layer (loss, skipped) tensors."""
        b, R = group.block, group.R
        counts = tuple(0 if r is None else r.shape[0] for r in rows)
        n = max(counts)
        if n == 0:
            nan = torch.full((len(rows),), math.nan, device=R.device)
            return nan, torch.zeros(len(rows), dtype=torch.bool, device=R.device)
        x = torch.empty(R.shape[0], n, b, dtype=R.dtype, device=R.device)
        for r, o, g in zip(rows, group.offsets, group.blocks, strict=True):
            k = 0 if r is None else r.shape[0]
            if k:  # (n_i, g * b) -> (g, n_i, b): each block's own features
                x[o : o + g, :k].copy_(r.reshape(k, g, b).transpose(0, 1))
            if k < n:  # zero rows pad the shorter layers (only the padding is written twice)
                x[o : o + g, k:].zero_()
        per_block = group.counts.get(counts)
        if per_block is None:
            per_block = torch.tensor(
                [c for c, g in zip(counts, group.blocks, strict=True) for _ in range(g)], device=R.device
            )
            group.counts = {counts: per_block}  # the counts of the last step: usually the next step's too
        if self.updates % NULL_RESET_EVERY == NULL_RESET_EVERY - 1 and n >= b:
            R.copy_(reset_null_space(R, x, per_block))  # bounds R's part on a rank-deficient input's null space
        new, loss, ok = block_decorrelation_step(
            R, x, per_block, lr=self.decor_lr, kappa=self.kappa, normalize=self.normalize,
            segment=group.segment, layers=len(rows),
        )  # fmt: skip
        R.copy_(new)
        layer_loss = torch.zeros(len(rows), dtype=loss.dtype, device=R.device).index_add_(0, group.segment, loss)
        layer_bad = torch.zeros(len(rows), dtype=loss.dtype, device=R.device).index_add_(
            0, group.segment, (~ok).to(loss.dtype)
        )
        return layer_loss / group.sizes, layer_bad > 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``R`` and the raw weight of every layer (checkpoints of the module hold ``W @ R``), the plan, the
        sampling generator and counters: enough to continue exactly."""
        self.wait()
        return {
            "version": 2,
            "plan": None if self.plan is None else self.plan.state_dict(),
            "R": {name: layer.decor_R.detach().cpu().clone() for name, layer in self.layers.items()},
            "raw_weight": {name: layer.weight.detach().cpu().clone() for name, layer in self.layers.items()},
            "generator": self._generator.get_state() if self._generator is not None else None,
            "updates": self.updates,
            "calls": self._calls,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. The saved plan is applied first (its layouts and forms), then
        every layer whose saved ``R`` fits its layout gets its ``R`` and raw weight; a layer that does not fit (a
        layer patched now but not then, or another layout) keeps its state and is named in a warning. Nothing is
        written before everything is checked, so a failed restore leaves the model as it was."""
        version = state.get("version")
        if version not in (1, 2):
            warnings.warn("Decorrelator: unknown saved state; training continues with R = I.", stacklevel=2)
            return
        plan = Plan.from_state_dict(state["plan"]) if state.get("plan") is not None else None
        if version == 1:  # before plans: every layer fused, in the layout its saved R has
            plan = self._plan_from_shapes(state["R"])
        skipped = []
        restorable = {}
        for name, layer in self.layers.items():
            R, raw = state["R"].get(name), state["raw_weight"].get(name)
            entry = None if plan is None else plan.layers.get(name)
            if entry is not None and entry.form == "plain":
                continue
            if R is None or raw is None or raw.shape != layer.weight.shape or not self._fits(layer, R, entry):
                skipped.append(name)
                continue
            restorable[name] = (R, raw)
        if skipped:
            warnings.warn(
                f"Decorrelator: the saved state has no R of matching layout for {skipped}; these layers keep their "
                "current R and weights (the model's checkpoint already holds their trained function).",
                stacklevel=2,
            )
        if plan is not None:
            for name in skipped:  # keep their current layout out of the saved plan
                plan.layers.pop(name, None)
            self._set_plan(plan)
        for name, (R, raw) in restorable.items():
            layer = self.layers[name]
            layer.decor_R.copy_(R.reshape(layer.decor_R.shape))
            layer.weight.copy_(raw)
        self._pending_generator_state = state.get("generator")
        self.updates = int(state.get("updates", 0))
        self._calls = int(state.get("calls", 0))
        self._checking = None  # a restored plan is kept as it is
        self.start(self._device)

    @staticmethod
    def _fits(layer: DecorrelatedLayer, R: Tensor, entry: Any) -> bool:
        if entry is not None:
            blocks = layer.decor_groups * (layer.decor_group_features // entry.block)
            shape = (entry.block, entry.block) if blocks == 1 else (blocks, entry.block, entry.block)
            return tuple(R.shape) == shape
        return tuple(R.shape) == tuple(layer.decor_R.shape)

    def _plan_from_shapes(self, saved: dict[str, Tensor]) -> Plan:
        plan = self._static_plan()
        for name, R in saved.items():
            if name in plan.layers:
                p = plan.layers[name]
                plan.layers[name] = type(p)(**{**p.__dict__, "block": R.shape[-1], "form": "fused"})
        return plan

