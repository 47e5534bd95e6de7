"""The per-layer cost plan: for each decorrelated layer, the cheapest form of ``R`` that fits a time budget.

Pure Python on shapes and two machine constants; no Lightning, no modules. A layer can carry its ``R`` in one of
these forms (each computes ``y = W (R x)`` exactly; see :mod:`lightning_decor.layers`):

- ``"fused"``: one ordinary layer call with ``A = W @ R``; costs ``4 C_out d b`` flops per forward (forming ``A``
  and the weight gradient through it), whatever the batch;
- ``"input"``: ``R`` applied to the input rows, ``z = x R^T``, then the plain layer; costs ``4 M D b`` flops for
  ``M`` rows of ``D`` features, so it wins when a layer sees fewer rows per step than it has outputs
  (``M < C_out``: late layers on small images, Linear layers with small batches);
- ``b < d``: a block-diagonal ``R`` of blocks of ``b`` features (whole input channels for convolutions), which
  divides every cost above by ``d / b`` and removes only correlations within a block; a grouped or depthwise
  convolution always has one ``R`` (or one run of blocks) per group;
- ``"plain"``: no ``R`` at all.

The update of ``R`` adds, per step, ``6 n b D + 2 n^2 D`` flops (``n < b``, through the rows) or
``4 n b D + 2 b^2 D`` (``n >= b``) for ``n`` statistics rows, plus a number of small operations. Costs are turned
into seconds with two constants measured on the device (:func:`lightning_decor.probe.measure_costs`): matrix-product
throughput and the time of one small operation (which dominates small layers on a GPU and on busy CPUs).

:func:`make_plan` starts from the strongest form of every layer (its largest allowed block, each in its cheaper
form) and, while the estimated total exceeds the budget, gives up the decorrelation that is cheapest to give up:
it halves the block of (or finally leaves plain) the layer whose step down saves the most time per unit of
decorrelation lost. Every layer counts the same, and blocks of ``b`` of its ``d`` features count as
``log(1 + b) / log(1 + d)`` of it: concave, because the strongest correlations of patch rows are within a channel
(neighbouring pixels), which even the smallest block (one channel's patch) removes, while dense ``R`` adds the
weaker ones between channels at a cost that grows with ``b``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_decor.memory import fit_memory, kept_share, memory_bytes, r_bytes

__all__ = [
    "Costs",
    "LayerPlan",
    "LayerShape",
    "Plan",
    "analytic_costs",
    "analytic_step_seconds",
    "block_ladder",
    "candidate_costs",
    "input_side_seconds",
    "make_plan",
]

# Small operations per part, counted in layers.py / functional.py / engine.py (launches, not flops).
_OPS_FUSE = 3  # forming A (matmul or bmm with reshapes) and its weight-gradient product, per forward
_OPS_FUSE_BLOCKS = 6
_OPS_INPUT_LINEAR = 2  # z = x R^T and its input gradient, per forward
_OPS_INPUT_BLOCKS = 6
_OPS_INPUT_CONV = 10  # unfold, two matrix products, reshapes and their gradients, per forward
_OPS_SAMPLE_CONV = 12  # drawing patch rows, per forward
_OPS_SAMPLE_LINEAR = 3
_OPS_LAYER_UPDATE = 4  # moving the layer's rows into its group's buffer, its loss and skip flags
_OPS_GROUP_UPDATE = 40  # one batched update of a group of equal block sizes
_MIN_BLOCK = 16  # smaller blocks than this decorrelate too little to be worth their launches


@dataclass(frozen=True)
class Costs:
    """Two constants of the device: seconds per flop of a mid-sized matrix product, and seconds per small op."""

    seconds_per_flop: float
    seconds_per_op: float

    def __call__(self, flops: float, ops: float) -> float:
        return flops * self.seconds_per_flop + ops * self.seconds_per_op


@dataclass(frozen=True)
class LayerShape:
    """What the planner knows of one layer: what it is, and what one training step showed (``rows``, ``forwards``
    and ``stat_rows`` stay 0 before the planner sees a step).

    Attributes:
        name: Qualified module name.
        d: Input features per group (``in_features``, or ``C_in / groups * prod(kernel_size)``).
        unit: Features per input channel (``prod(kernel_size)``, 1 for Linear): blocks hold whole channels.
        c_out: Output features.
        groups: Convolution groups (1 for Linear).
        rows: Rows the layer multiplies per optimizer step (``N * L`` summed over its forwards).
        forwards: Training forwards per optimizer step.
        stat_rows: Statistics rows per update ``n``.
        input_side: Whether the input-side form is available (Linear, Conv1d/2d with ``groups == 1``).
        conv: Whether the layer is a convolution (its rows are patches, drawn and unfolded at a higher op count).
        max_block: Largest block allowed (``block_size``/``max_features``), ``None`` for ``d``.
    """

    name: str
    d: int
    unit: int
    c_out: int
    groups: int
    rows: int = 0
    forwards: int = 0
    stat_rows: int = 0
    input_side: bool = False
    conv: bool = False
    max_block: int | None = None


@dataclass(frozen=True)
class LayerPlan:
    """The planned form of one layer: ``form`` in ``("fused", "input", "plain")`` with blocks of ``block``
    features (``block == d``: a dense ``R`` per group; 0 when plain), and its estimated seconds per step."""

    name: str
    form: str
    block: int
    d: int
    rows: int
    c_out: int
    groups: int
    cost: float
    note: str = ""
    memory: int = 0  # bytes of R (float32; 0 when plain)


SOURCES = ("measured", "cache", "pinned", "analytic", "static")
"""Where a plan's costs come from: timed in this run, kept from an earlier run (the plan cache), a plan file or
``Plan`` the user pinned, the flop model with nominal device constants (nothing timed), or no budget at all."""

_SOURCE_TEXT = {
    "measured": "costs measured in this run",
    "cache": "costs measured by an earlier run on this machine (plan cache)",
    "pinned": "pinned by the user",
    "analytic": "analytic costs (flop model, nothing timed)",
    "static": "no budget (max_overhead=None): every layer at its largest allowed block",
}


@dataclass
class Plan:
    """The forms of all layers, with what they were planned from; ``state_dict`` round-trips through checkpoints
    and :meth:`save` / :meth:`load` through a human-readable file (JSON, or YAML when PyYAML is installed)."""

    layers: dict[str, LayerPlan]
    step_seconds: float | None = None  # the plain step the budget refers to
    max_overhead: float | None = None
    costs: Costs | None = None
    estimate: float = 0.0  # estimated seconds of all DBP parts per step
    scale: float = 1.0  # every cost was multiplied by this (measured / estimated, from a check of the real step)
    source: str = "static"  # one of SOURCES
    measured_overhead: float | None = None  # DBP's share of the step, measured with this plan (None: not yet)
    max_memory: int | None = None  # bytes R and the update's workspace may take (None: no limit)

    @property
    def memory(self) -> int:
        """Bytes of every ``R`` and the update's workspace (:func:`memory_bytes`)."""
        return memory_bytes([(p.block, p.memory) for p in self.layers.values() if p.form != "plain"])

    def layouts(self) -> dict[str, tuple[str, int]]:
        """``{layer: (form, block)}``: what the plan gives each layer."""
        return {name: (p.form, p.block) for name, p in self.layers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": {name: asdict(p) for name, p in self.layers.items()},
            "step_seconds": self.step_seconds,
            "max_overhead": self.max_overhead,
            "costs": None if self.costs is None else asdict(self.costs),
            "estimate": self.estimate,
            "scale": self.scale,
            "source": self.source,
            "measured_overhead": self.measured_overhead,
            "max_memory": self.max_memory,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Plan:
        costs = state.get("costs")
        source = state.get("source", "static")
        if source not in SOURCES:
            raise ValueError(f"Expected a plan `source` in {SOURCES}, but got {source!r}.")
        overhead = state.get("measured_overhead")
        return cls(
            layers={name: LayerPlan(**p) for name, p in state["layers"].items()},
            step_seconds=state.get("step_seconds"),
            max_overhead=state.get("max_overhead"),
            costs=None if costs is None else Costs(**costs),
            estimate=float(state.get("estimate", 0.0)),
            scale=float(state.get("scale", 1.0)),
            source=source,
            measured_overhead=None if overhead is None else float(overhead),
            max_memory=state.get("max_memory"),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan to ``path``: YAML for ``.yaml``/``.yml`` (needs PyYAML), JSON otherwise. Pass the file as
        ``plan=path`` to pin it: a pinned plan gives every run, on any machine, these layouts."""
        state = self.state_dict()
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            text = _yaml().safe_dump(state, sort_keys=False)
        else:
            text = json.dumps(state, indent=1) + "\n"
        path.write_text(text)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by :meth:`save` (or by hand: ``layers`` maps each layer to at least ``form``,
        ``block``, ``d``, ``rows``, ``c_out``, ``groups`` and ``cost``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Expected `plan` to be 'auto', a Plan or a plan file, but {str(path)!r} is no file."
            )
        text = path.read_text()
        try:
            state = _yaml().safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
            return cls.from_state_dict(state)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"Expected a plan file written by Plan.save, but {str(path)!r} is not one: {err}") from err

    @classmethod
    def pinned(cls, plan: Any) -> Plan | None:
        """A front-end's ``plan=`` argument as a plan to pin: a copy of a :class:`Plan` (the engine gives it its
        layers' order), the plan file at a path, or ``None`` for ``"auto"``."""
        if isinstance(plan, Plan):
            return cls.from_state_dict(plan.state_dict())
        if isinstance(plan, (str, os.PathLike)):
            return None if str(plan) == "auto" else cls.load(plan)
        raise TypeError(
            f"Expected `plan` to be 'auto', a Plan or the path of a plan file, but got {type(plan).__name__}: {plan!r}."
        )

    def check_fits(self, layers: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless this (pinned) plan names exactly ``layers`` (patched layers by name), each
        entry with their ``(d, C_out, groups)`` and a layout that fits (``decor_check_layout``)."""
        unknown = sorted(set(self.layers) - set(layers))
        missing = [n for n in layers if n not in self.layers]
        if unknown or missing:
            raise ValueError(
                f"Expected `plan` to name exactly the decorrelated layers, but it names {unknown} that are not "
                f"decorrelated and lacks {missing}."
            )
        for name, p in self.layers.items():
            layer = layers[name]
            shape = (layer.decor_group_features, layer.decor_out_features, layer.decor_groups)
            if (p.d, p.c_out, p.groups) != shape:
                raise ValueError(
                    f"Expected `plan`'s entry for {name!r} to fit the layer (d, C_out, groups) = {shape}, but got "
                    f"{(p.d, p.c_out, p.groups)}."
                )
            if p.form != "plain":
                try:
                    layer.decor_check_layout(p.block, p.form)
                except ValueError as err:
                    raise ValueError(f"Expected `plan`'s entry for {name!r} to fit the layer: {err}") from None

    def table(self, left_plain: Mapping[str, str] | None = None) -> str:
        """The plan as a text table: layer, ``d``, rows per step, ``C_out``, groups, form, block, estimated share;
        its head names the source of the costs and, once measured, DBP's real share of the step. ``left_plain``
        (``Decorrelator.left_plain``): layers never decorrelated, listed after the plan with why."""
        step = self.step_seconds
        if step is not None and self.max_overhead is not None:
            head = (
                f"{_SOURCE_TEXT[self.source]}; budget {self.max_overhead:.0%} of a {step * 1e3:.1f} ms step; "
                f"estimated DBP cost {self.estimate * 1e3:.1f} ms = {self.estimate / step:.1%}"
            )
            if self.scale != 1.0:
                head += f"; costs x{self.scale:.2f} after checking the real step"
        else:
            head = _SOURCE_TEXT[self.source]
        if self.measured_overhead is not None:
            head += f"; measured DBP cost {self.measured_overhead:.1%} of the plain step"
        head += f"; R and the update's workspace {self.memory / 2**20:.1f} MiB"
        if self.max_memory is not None:
            head += f" of {self.max_memory / 2**20:.1f} MiB allowed"
        left_plain = dict(left_plain or {})
        width = max([len("layer"), *(len(n) for n in (*self.layers, *left_plain))])
        lines = [
            f"Decorrelation plan ({head}):",
            f"{'layer':<{width}} {'d':>6} {'rows':>8} {'C_out':>6} {'groups':>6} {'form':>6} {'block':>6} {'share':>7} "
            f"{'R MiB':>7}",
        ]
        for name, p in self.layers.items():
            share = f"{p.cost / step:.2%}" if step else "-"
            memory = f"{p.memory / 2**20:.2f}" if p.form != "plain" else "-"
            lines.append(
                f"{name:<{width}} {p.d:>6} {p.rows:>8} {p.c_out:>6} {p.groups:>6} {p.form:>6} "
                f"{p.block if p.block else '-':>6} {share:>7} {memory:>7}" + (f"  ({p.note})" if p.note else "")
            )
        for name, why in left_plain.items():
            lines.append(
                f"{name:<{width}} {'-':>6} {'-':>8} {'-':>6} {'-':>6} {'plain':>6} {'-':>6} {'-':>7} {'-':>7}  ({why})"
            )
        return "\n".join(lines)


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as err:  # Lightning brings PyYAML; plain-PyTorch users may not have it
        raise ImportError("A plan file ending in .yaml/.yml needs PyYAML (`pip install pyyaml`); use .json.") from err
    return yaml


def block_ladder(d: int, unit: int, max_block: int | None = None, min_block: int = _MIN_BLOCK) -> list[int]:
    """Block sizes a layer may use, largest first: sizes that divide ``d`` into equal blocks of whole channels
    (multiples of ``unit``). The first is the largest one of at most ``max_block``; each next one is at most half
    the one before and at least ``min(min_block, d)``. Empty when no size fits under ``max_block``, or when only
    blocks of one feature would (a Linear with a prime ``d``): such blocks would not decorrelate anything."""
    channels = d // unit
    top = d if max_block is None else min(d, max_block)
    sizes = [m * unit for m in range(channels, 0, -1) if channels % m == 0 and m * unit <= top]
    if not sizes or sizes[0] == 1 < d:
        return []
    ladder = [sizes[0]]
    for b in sizes[1:]:
        if min(min_block, d) <= b <= ladder[-1] // 2:
            ladder.append(b)
    return ladder


def input_side_seconds(s: LayerShape, b: int, costs: Costs) -> float:
    """Estimated seconds per step of the input-side form with blocks of ``b`` (``R`` on the layer's rows)."""
    blocked = b < s.d or s.groups > 1
    ops = _OPS_INPUT_CONV if s.conv else (_OPS_INPUT_BLOCKS if blocked else _OPS_INPUT_LINEAR)
    return costs(4.0 * s.rows * s.groups * s.d * b, ops * s.forwards)


def _form_costs(s: LayerShape, b: int, costs: Costs, update_every: int) -> tuple[str, float]:
    """``(form, seconds per step)`` of the cheaper form with blocks of ``b``, update included."""
    D, blocked = s.groups * s.d, b < s.d or s.groups > 1  # D: all input features
    fused = costs(4.0 * s.c_out * s.d * b * s.forwards, (_OPS_FUSE_BLOCKS if blocked else _OPS_FUSE) * s.forwards)
    best_form, best = "fused", fused
    if s.input_side:
        inp = input_side_seconds(s, b, costs)
        if inp < best:
            best_form, best = "input", inp
    n = s.stat_rows
    flops = (6.0 * n * b * D + 2.0 * n * n * D) if n < b else (4.0 * n * b * D + 2.0 * b * b * D)
    sample_ops = _OPS_SAMPLE_CONV if s.conv else _OPS_SAMPLE_LINEAR
    update = costs(flops, _OPS_LAYER_UPDATE) + costs(0.0, sample_ops * s.forwards)
    return best_form, best + update / update_every


def candidate_costs(s: LayerShape, costs: Costs, update_every: int = 1) -> list[tuple[str, float]]:
    """Estimated ``(form, seconds per step)`` of each block of the layer's ladder (:func:`block_ladder`), from
    flop and kernel counts: the cheaper of the fused and the input-side form, update and sampling included."""
    return [_form_costs(s, b, costs, update_every) for b in block_ladder(s.d, s.unit, s.max_block)]


def _total(choice: dict[str, int], ladders: dict[str, list[int]], table: dict[str, list[tuple[str, float]]],
           costs: Costs, update_every: int) -> float:  # fmt: skip
    total, blocks = 0.0, set()
    for name, k in choice.items():
        if k < len(ladders[name]):
            total += table[name][k][1]
            blocks.add(ladders[name][k])
    return total + len(blocks) * costs(0.0, _OPS_GROUP_UPDATE) / update_every


def make_plan(
    shapes: list[LayerShape],
    *,
    costs: Costs,
    step_seconds: float | None,
    max_overhead: float | None,
    update_every: int = 1,
    measured: dict[str, list[tuple[str, float]]] | None = None,
    source: str = "measured",
    max_memory: int | None = None,
) -> Plan:
    """The plan for ``shapes`` (see the module docstring).

    Args:
        shapes: The layers, in model order.
        costs: The device constants (:func:`lightning_decor.probe.measure_costs`).
        step_seconds: The measured plain training step the budget refers to (``None`` with ``max_overhead=None``).
        max_overhead: The budget: estimated seconds of all DBP parts as a fraction of ``step_seconds``; ``None``
            keeps every layer at its largest allowed block.
        update_every: ``R`` moves every this many steps (divides the update's cost).
        measured: Per layer, measured ``(form, seconds per step)`` of each block of its ladder, in ladder order
            (:func:`lightning_decor.probe.measure_candidates`); they replace the flop estimates of those layers.
        source: Where ``costs`` and ``step_seconds`` come from (:data:`SOURCES`), for the table.
        max_memory: Bytes every ``R`` and the update's workspace may take (:func:`fit_memory`, after the time
            budget); ``None``: no limit.
    """
    ladders = {s.name: block_ladder(s.d, s.unit, s.max_block) for s in shapes}
    table = {s.name: candidate_costs(s, costs, update_every) for s in shapes}
    for name, entries in (measured or {}).items():
        if name in table:
            if len(entries) != len(table[name]):
                raise ValueError(f"Expected {len(table[name])} measured candidates for {name!r}, got {len(entries)}.")
            table[name] = list(entries)
    choice = {s.name: 0 for s in shapes}  # index into the ladder; len(ladder) means plain
    if max_overhead is not None and step_seconds is not None:
        budget = max_overhead * step_seconds
        group = costs(0.0, _OPS_GROUP_UPDATE) / update_every  # per distinct block size in use
        users = Counter(ladders[s.name][0] for s in shapes if ladders[s.name])  # layers per block size

        def seconds(name: str, k: int) -> float:  # of ladder entry k (plain: 0)
            return table[name][k][1] if k < len(ladders[name]) else 0.0

        def change(name: str, k: int, j: int) -> float:  # the total's change when a layer moves from k to j
            ladder = ladders[name]
            delta = seconds(name, j) - seconds(name, k)
            old, new = (ladder[k] if k < len(ladder) else None), (ladder[j] if j < len(ladder) else None)
            if old != new:
                delta -= group if old is not None and users[old] == 1 else 0.0
                delta += group if new is not None and users[new] == 0 else 0.0
            return delta

        total = _total(choice, ladders, table, costs, update_every)
        while total > budget:
            best: tuple[float, str, int, float] | None = None
            for s in shapes:
                k, ladder = choice[s.name], ladders[s.name]
                for j in range(k + 1, len(ladder) + 1):  # any smaller block, or plain (measured costs need not
                    saving = -change(s.name, k, j)  # fall with the block: tiny blocks can cost more than larger)
                    lost = kept_share(ladder[k], s.d) - (kept_share(ladder[j], s.d) if j < len(ladder) else 0.0)
                    if saving > 0 and (best is None or saving / lost > best[0]):
                        best = (saving / lost, s.name, j, saving)
            if best is None:
                break
            name, j = best[1], best[2]
            ladder, k = ladders[name], choice[name]
            users[ladder[k]] -= 1
            if j < len(ladder):
                users[ladder[j]] += 1
            choice[name] = j
            total -= best[3]
    timed = dict(choice)
    if max_memory is not None:
        choice = fit_memory(choice, ladders, {s.name: (s.d, s.groups) for s in shapes}, max_memory)
    layers = {}
    for s in shapes:
        k, ladder = choice[s.name], ladders[s.name]
        common = dict(name=s.name, d=s.d, rows=s.rows, c_out=s.c_out, groups=s.groups)
        if k >= len(ladder):
            note = "no allowed block size" if not ladder else "over budget"
            note = "over the memory budget" if timed[s.name] < len(ladder) else note
            layers[s.name] = LayerPlan(form="plain", block=0, cost=0.0, note=note, **common)  # type: ignore[arg-type]
        else:
            form, cost = table[s.name][k]
            memory = r_bytes(s.d, s.groups, ladder[k])
            layers[s.name] = LayerPlan(form=form, block=ladder[k], cost=cost, memory=memory, **common)  # type: ignore[arg-type]
    estimate = _total(choice, ladders, table, costs, update_every)
    return Plan(layers, step_seconds=step_seconds, max_overhead=max_overhead, costs=costs, estimate=estimate,
                source=source, max_memory=max_memory)  # fmt: skip


# Nominal device constants of the analytic model (nothing timed): a mid-sized matrix product's throughput and one
# small operation's launch, round figures of what probe.measure_costs gives on a 2-core CPU and on an H100.
_ANALYTIC_COSTS = {
    "cpu": Costs(seconds_per_flop=1.0 / 50e9, seconds_per_op=5e-6),
    "cuda": Costs(seconds_per_flop=1.0 / 50e12, seconds_per_op=1e-5),
}
_OPS_PLAIN_LAYER = 6  # the plain layer's forward and backward kernels, per forward


def analytic_costs(device_type: str) -> Costs:
    """The analytic model's nominal constants for a device type (those of ``"cuda"`` for any accelerator)."""
    return _ANALYTIC_COSTS.get(device_type, _ANALYTIC_COSTS["cuda"])


def analytic_step_seconds(shapes: list[LayerShape], costs: Costs) -> float:
    """The plain training step the analytic model assumes: the forward and backward of the planned layers alone
    (``6 rows C_out d`` flops each, a few kernels per forward). The rest of the model is not counted, so this
    understates the step and the plan it gives spends less than its budget."""
    return sum(costs(6.0 * s.rows * s.c_out * s.d, _OPS_PLAIN_LAYER * s.forwards) for s in shapes)
