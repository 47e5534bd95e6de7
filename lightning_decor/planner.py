"""``Planner``: the life cycle of the cost plan, from the first measured step to the step ``R`` starts moving.

Calls of :meth:`Planner.step` are the engine's steps (one per optimizer step, after its backward); ``k`` is
``update_every``. The timeline is fixed, whatever the plan's source, so that runs which take their plan from
different sources (timed now, kept from an earlier run, pinned) follow the same trajectory:

1. **Calibration**, calls 1 to :data:`CALIBRATION_STEPS`: every layer computes its plain function (``R = I``,
   plain kernels) and reports what it sees (:meth:`Planner.observe`); the shortest interval between the calls is
   this run's plain step.
2. **The plan**, at call :data:`CALIBRATION_STEPS`, from the first of:

   - a plan the user pinned (``"pinned"``);
   - costs kept from an earlier run with the same key (:class:`PlanCache`, ``"cache"``);
   - under deterministic mode (``torch.are_deterministic_algorithms_enabled()``), or without two timed calls (a
     run resumed during calibration), the flop model with nominal device constants (``"analytic"``): nothing
     timed decides anything;
   - the candidate forms timed now by the probe (``"measured"``), which go to the cache.

3. **The check**: the plan's forms run with ``R = I`` (an identity ``R`` costs what any ``R`` costs) for
   :data:`CHECK_WINDOWS` windows of ``k`` steps, each with one dry update (the update's work, ``R`` left as it is).
   The fastest window's extra time over the plain step is DBP's measured share of the step (``overhead``). A plan
   from measured costs whose share exceeds :data:`TOLERANCE` times the budget is made again with every cost
   scaled by measured / estimated (at most :data:`MAX_CORRECTION` per check, :data:`REPLANS` times); the outcome
   of every check goes to the cache, and a run that took its costs from there replays it instead of timing.
4. ``R`` moves from call :func:`plain_steps` ``+ 1`` on: the model's function never jumps at a plan change.

The planner knows nothing of modules: layers are :class:`lightning_decor.plan.LayerShape` records (what they are;
the planner fills in what a step shows), the probe, the device constants, the clock and the agreement between
processes are callables, so its tests run on a fake clock and a fake probe.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lightning_decor.plan import (
    Costs,
    LayerShape,
    Plan,
    analytic_costs,
    analytic_step_seconds,
    candidate_costs,
    make_plan,
)

__all__ = [
    "CALIBRATION_STEPS",
    "CHECK_WINDOWS",
    "PlanCache",
    "Planner",
    "PlannerStep",
    "Seen",
    "plain_steps",
]

CALIBRATION_STEPS = 5
"""Steps that measure the plain step before the plan is made: four intervals, the shortest counts (why four:
docs/TUNING.md, "How the plan decides")."""

CHECK_WINDOWS = 5  # windows of update_every steps timed to check a plan; the fastest one counts
REPLANS = 2  # a plan is made again at most this many times
TOLERANCE = 1.2  # a plan is remade when its measured extra time exceeds this many times the budget (docs/TUNING.md)
MAX_CORRECTION = 3.0  # one check scales the costs by at most this: the candidates are measured, so a larger
# discrepancy is timing noise (a busy machine) rather than a wrong estimate
PROBE_STEPS = 3.0  # the probe may take this many plain steps
CACHE_FORMAT = 1  # part of every cache key: a new cost model makes new entries


def plain_steps(update_every: int = 1) -> int:
    """Steps before ``R`` first moves when a plan is made: calibration and room for every check (17 for
    ``update_every=1``). ``R`` moves from the next one on, whatever the plan's source and however many checks ran."""
    return CALIBRATION_STEPS + REPLANS * (CHECK_WINDOWS * update_every + 1)


@dataclass
class Seen:
    """What one layer saw in one step: rows multiplied, forwards, statistics rows, its last input's shape, dtype,
    autocast dtype (``""``: none) and memory format."""

    rows: int = 0
    forwards: int = 0
    stat_rows: int = 0
    input_shape: tuple[int, ...] | None = None
    dtype: str = ""
    autocast: str = ""
    channels_last: bool = False

    def format(self) -> tuple[str, str, bool]:
        """How the layer computes: ``(input dtype, autocast dtype or "", channels_last)``."""
        return self.dtype, self.autocast, self.channels_last


@dataclass
class PlannerStep:
    """What the engine does at one call: apply ``plan`` (if not ``None``; ``R`` is the identity), run a dry update
    (``dry``), and whether the check measured DBP's share of the step (``overhead``) at this call."""

    plan: Plan | None = None
    dry: bool = False
    overhead: float | None = None


class PlanCache:
    """Measured costs kept on disk, one JSON file per key, so that later runs with the same key plan identically
    without timing anything.

    The folder is ``$LIGHTNING_DECOR_CACHE`` when set (``""``, ``"0"``, ``"off"`` or ``"false"`` turn the cache
    off), else ``$XDG_CACHE_HOME/lightning_decor`` or ``~/.cache/lightning_decor``. Unreadable entries are
    ignored; a folder that cannot be written turns the cache off for the run, with a warning.
    """

    ENV = "LIGHTNING_DECOR_CACHE"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._writable = True

    @classmethod
    def default(cls) -> PlanCache | None:
        """The cache at the usual place, or ``None`` when the environment turns it off."""
        value = os.environ.get(cls.ENV)
        if value is not None:
            if value.strip().lower() in ("", "0", "off", "false", "no"):
                return None
            return cls(Path(value).expanduser())
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return cls(Path(base) / "lightning_decor")

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.directory / f"plan-{digest}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The entry stored under ``key``, or ``None`` (none, unreadable, or another key with the same digest)."""
        try:
            entry = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) and entry.get("key") == json.loads(json.dumps(key)) else None

    def put(self, key: dict[str, Any], entry: dict[str, Any]) -> None:
        """Store ``entry`` under ``key`` (atomically: a reader never sees half a file)."""
        if not self._writable:
            return
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**entry, "key": key}, indent=1))
            os.replace(tmp, path)
        except OSError as err:
            self._writable = False
            warnings.warn(f"Decorrelator: the plan cache {str(self.directory)!r} cannot be written ({err}); "
                          "measured costs are not kept for later runs.", stacklevel=3)  # fmt: skip


Probe = Callable[..., dict[str, list[tuple[str, float]]]]


class Planner:
    """The cost plan's life cycle (see the module docstring): calibration, plan, check, cache and ``state_dict``.

    Args:
        layers: The layers to plan, in model order.
        max_overhead: The budget as a fraction of the plain step (``None`` only with ``pinned``).
        max_memory: Bytes every ``R`` and the update's workspace may take (``None``: no limit).
        update_every: ``R`` moves every this many steps.
        pinned: A plan to apply instead of making one.
        cache: Where measured costs are kept (``None``: nowhere).
        environment: What else determines the costs (device name, torch version, threads, ...): part of the key.
        device_type: ``"cpu"`` or an accelerator's type, for the analytic model's constants.
        probe: ``probe(shapes, input_shapes, estimates, budget=, time_limit=, costs=, formats=)`` measures each
            candidate (:func:`lightning_decor.probe.measure_candidates` with the layers bound).
        device_costs: Measures the two device constants (:func:`lightning_decor.probe.measure_costs`).
        clock: Seconds, monotonic (default ``time.perf_counter``).
        sync: Waits for the device (CUDA) before the clock is read.
        deterministic: Whether nothing timed may decide (``torch.are_deterministic_algorithms_enabled``).
        agree: Makes every process take the leader's decision (a broadcast; the identity in one process).
        leader: Whether this process decides (rank 0).

    ``probe``, ``device_costs``, ``clock`` and ``agree`` stay attributes of those names: what the planner measures
    and how the processes agree can be replaced on a planner an engine made (its tests give it a fake clock).
    """

    def __init__(
        self,
        layers: Sequence[LayerShape],
        *,
        max_overhead: float | None,
        max_memory: int | None = None,
        update_every: int = 1,
        pinned: Plan | None = None,
        cache: PlanCache | None = None,
        environment: dict[str, Any] | None = None,
        device_type: str = "cpu",
        probe: Probe | None = None,
        device_costs: Callable[[], Costs] | None = None,
        clock: Callable[[], float] | None = None,
        sync: Callable[[], None] = lambda: None,
        deterministic: Callable[[], bool] = torch.are_deterministic_algorithms_enabled,
        agree: Callable[[Any], Any] = lambda decision: decision,
        leader: bool = True,
    ) -> None:
        if max_overhead is None and pinned is None:
            raise ValueError("Expected `max_overhead` or a pinned plan: without either there is nothing to plan.")
        self.layers = list(layers)
        self.max_overhead = max_overhead
        self.max_memory = max_memory
        self.update_every = update_every
        self.pinned = pinned
        self.cache = cache
        self.environment = dict(environment or {})
        self.device_type = device_type
        self.probe = probe
        self.device_costs = device_costs
        self.clock = clock if clock is not None else time.perf_counter  # looked up now: a patched clock counts
        self._sync, self._deterministic = sync, deterministic
        self.agree, self.leader = agree, leader
        self.calls = 0
        self.plan: Plan | None = None
        self.overhead: float | None = None  # DBP's share of the step, as last measured
        self.plain_seconds: float | None = None  # this run's plain step
        self._seen: dict[str, Seen] = {}
        self._last_seen: dict[str, Seen] = {}
        self._times: list[float] = []
        self._window: dict[int, float] = {}
        self._check_from: int | None = None  # the call the plan under check was applied at
        self._checks = 0
        self._planning: dict[str, Any] | None = None  # what plans are (re)made from: shapes, step, costs, measured
        self._outcomes: list[float | None] = []  # per check: the scale of the plan it made, or None (kept)
        self._complete = False  # every check of the kept costs has its outcome
        self._key: dict[str, Any] | None = None

    # ------------------------------------------------------------------ what the layers report
    @property
    def observing(self) -> bool:
        """Whether the coming step's forwards are observed (calibration)."""
        return self.calls < CALIBRATION_STEPS

    def observe(
        self,
        name: str,
        *,
        rows: int,
        stat_rows: int,
        input_shape: tuple[int, ...] | None,
        dtype: str,
        autocast: str = "",
        channels_last: bool = False,
    ) -> None:
        """One training forward of ``name``: rows multiplied, statistics rows, its input's shape and dtype, the
        autocast dtype it ran under (``""``: none) and whether its input was channels-last."""
        seen = self._seen.setdefault(name, Seen())
        seen.rows += rows
        seen.forwards += 1
        seen.stat_rows += stat_rows
        if input_shape is not None:
            seen.input_shape, seen.dtype = tuple(input_shape), dtype
            seen.autocast, seen.channels_last = autocast, channels_last

    def seen(self, name: str) -> Seen | None:
        """What the forwards of ``name`` showed in the current step (``None``: none observed)."""
        return self._seen.get(name)

    def forwards_seen(self, name: str) -> int:
        """Forwards of ``name`` observed in the current step."""
        seen = self._seen.get(name)
        return 0 if seen is None else seen.forwards

    # ------------------------------------------------------------------ the timeline
    @property
    def first_moving_call(self) -> int:
        """The call at which ``R`` first moves."""
        return plain_steps(self.update_every) + 1

    @property
    def done(self) -> bool:
        """Whether the planning steps are over (the next call may move ``R``)."""
        return self.calls >= plain_steps(self.update_every)

    def dry(self, call: int) -> bool:
        """Whether ``call`` runs a dry update: one at the start of each check window (the window's time includes
        it), so at the calls ``start + 1 + i k`` after the plan applied at call ``start``; rows are sampled in the
        step before it."""
        start, k = self._check_from, self.update_every
        return start is not None and start < call <= start + CHECK_WINDOWS * k and (call - start - 1) % k == 0

    def restart(self) -> None:
        """Forget this run's times (a new fit, a pause, a device move): no interval spans two runs."""
        self._times, self._window = [], {}

    def step(self) -> PlannerStep:
        """One call: record the time, and make, check or remake the plan where the timeline says so."""
        self.calls += 1
        call = self.calls
        self._sync()
        now = self.clock()
        out = PlannerStep(dry=self.dry(call))  # before a check that ends here closes its windows
        if call <= CALIBRATION_STEPS:
            self._times.append(now)
            self._last_seen, self._seen = self._seen, {}
            if call == CALIBRATION_STEPS:
                out.plan = self._first_plan()
                self._check_from = call if self._decorrelates(out.plan) else None
        elif self._check_from is not None:
            self._window[call] = now
            if call == self._check_from + CHECK_WINDOWS * self.update_every + 1:
                out.plan, out.overhead = self._check(call)
        return out

    @staticmethod
    def _decorrelates(plan: Plan) -> bool:
        return any(p.form != "plain" for p in plan.layers.values())

    def collects_next(self) -> bool:
        """Whether the coming step samples rows: for a dry update at the next call or the first move of ``R``, and
        with ``update_every=1`` on every step once the plan is made (as in the steps after: a compiled model sees
        the same flags from the plan on and compiles no more; the engine drops rows no update takes)."""
        nxt = self.calls + 1
        planned = self.plan is not None and self.update_every == 1
        return planned or self.dry(nxt) or nxt == self.first_moving_call

    # ------------------------------------------------------------------ the first plan
    def shapes(self) -> list[LayerShape]:
        """Each layer as the last calibration step saw it."""
        out = []
        for info in self.layers:
            seen = self._last_seen.get(info.name, Seen())
            out.append(replace(info, rows=seen.rows, forwards=seen.forwards, stat_rows=seen.stat_rows))
        return out

    def key(self) -> dict[str, Any]:
        """What the measured costs depend on: the environment, every layer's shapes, the budget."""
        inputs = {
            name: [list(seen.input_shape) if seen.input_shape is not None else None, *seen.format()]
            for name, seen in sorted(self._last_seen.items())
        }
        return {
            "format": CACHE_FORMAT,
            "environment": self.environment,
            "layers": [asdict(s) for s in self.shapes()],
            "inputs": inputs,
            "max_overhead": self.max_overhead,
            "max_memory": self.max_memory,
            "update_every": self.update_every,
        }

    def _first_plan(self) -> Plan:
        intervals = [b - a for a, b in zip(self._times, self._times[1:])]
        self.plain_seconds = min(intervals) if intervals else None
        decision = self.agree(self._decide_first() if self.leader else None)
        self._planning, self._outcomes = decision["planning"], decision["outcomes"]
        self._complete = decision["complete"]
        self._key = decision["key"]
        self.plan = Plan.from_state_dict(decision["plan"])
        return self.plan

    def _decide_first(self) -> dict[str, Any]:
        """The leader's first plan and what it was made from (a plain dict: it is broadcast and checkpointed)."""
        if self.pinned is not None:
            plan = replace(self.pinned, source="pinned", measured_overhead=None)
            return {"plan": plan.state_dict(), "planning": None, "outcomes": [], "complete": True, "key": None}
        shapes = self.shapes()
        key: dict[str, Any] | None = self.key()
        entry = self.cache.get(self.key()) if self.cache is not None else None  # key: None once it is not kept
        deterministic = self._deterministic()
        if entry is not None and (entry.get("complete") or not deterministic):
            planning, source = entry["planning"], "cache"
            outcomes, complete = list(entry.get("outcomes", [])), bool(entry.get("complete"))
        elif deterministic or self.plain_seconds is None or self.probe is None or self.device_costs is None:
            costs = analytic_costs(self.device_type)
            planning = {"step": analytic_step_seconds(shapes, costs), "costs": asdict(costs), "measured": None,
                        "shapes": [asdict(s) for s in shapes]}  # fmt: skip
            source, outcomes, complete, key = "analytic", [], True, None
        else:
            step = self.plain_seconds
            costs = self.device_costs()
            assert self.max_overhead is not None
            measured = self.probe(
                shapes,
                {n: s.input_shape for n, s in self._last_seen.items() if s.input_shape is not None},
                {s.name: candidate_costs(s, costs, self.update_every) for s in shapes},
                budget=self.max_overhead * step,
                time_limit=PROBE_STEPS * step,
                costs=costs,
                formats={n: s.format() for n, s in self._last_seen.items() if s.input_shape is not None},
            )
            planning = {"step": step, "costs": asdict(costs), "shapes": [asdict(s) for s in shapes],
                        "measured": {n: [list(e) for e in v] for n, v in measured.items()}}  # fmt: skip
            source, outcomes, complete = "measured", [], False
            if self.cache is not None and key is not None:
                self.cache.put(key, {"planning": planning, "outcomes": [], "complete": False})
        plan = self._make(planning, 1.0, source)
        return {"plan": plan.state_dict(), "planning": {**planning, "source": source}, "outcomes": outcomes,
                "complete": complete, "key": key}  # fmt: skip

    def _make(self, planning: dict[str, Any], scale: float, source: str) -> Plan:
        """The plan from ``planning`` with every cost multiplied by ``scale``."""
        costs = Costs(**planning["costs"])
        measured = planning.get("measured")
        plan = make_plan(
            [LayerShape(**s) for s in planning["shapes"]],
            costs=Costs(costs.seconds_per_flop * scale, costs.seconds_per_op * scale),
            step_seconds=planning["step"],
            max_overhead=self.max_overhead,
            max_memory=self.max_memory,
            update_every=self.update_every,
            measured=None if measured is None else {n: [(f, c * scale) for f, c in v] for n, v in measured.items()},
            source=source,
        )
        plan.scale = scale
        return plan

    # ------------------------------------------------------------------ the check
    def _check(self, call: int) -> tuple[Plan | None, float | None]:
        assert self.plan is not None and self._check_from is not None
        k, start = self.update_every, self._check_from
        ends = [(start + 1 + i * k, start + 1 + (i + 1) * k) for i in range(CHECK_WINDOWS)]
        windows = [(self._window[b] - self._window[a]) / k for a, b in ends if a in self._window and b in self._window]
        plain = self.plain_seconds if self.plain_seconds is not None else self.plan.step_seconds
        share = (min(windows) - plain) / plain if windows and plain else None
        decision = self.agree(self._decide_check(share) if self.leader else None)
        scale, share = decision["scale"], decision["share"]
        self._outcomes, self._complete = decision["outcomes"], decision["complete"]
        self._checks += 1
        self._check_from = None
        self._window = {}
        self.overhead = share
        self.plan.measured_overhead = share
        if scale is None:
            return None, share
        assert self._planning is not None
        self.plan = self._make(self._planning, scale, self._planning["source"])
        if self._checks < REPLANS and self._decorrelates(self.plan):
            self._check_from = call
        return self.plan, share

    def _decide_check(self, share: float | None) -> dict[str, Any]:
        """The leader's outcome of a check: the scale of a new plan or ``None`` (kept), replayed from the cache
        where the kept costs have it, decided by the measured ``share`` only for costs timed on this machine and
        never under deterministic mode."""
        assert self.plan is not None
        outcomes, complete = list(self._outcomes), self._complete
        scale: float | None = None
        if self._checks < len(outcomes):
            scale = outcomes[self._checks]
        elif self.plan.source in ("measured", "cache") and not complete and not self._deterministic():
            budget = self.max_overhead
            estimate = self.plan.estimate
            if share is not None and budget is not None and estimate > 0 and share > TOLERANCE * budget:
                plain = self.plain_seconds or self.plan.step_seconds or 0.0
                correction = min(max(share * plain / estimate, 1.0), MAX_CORRECTION)
                scale = self.plan.scale * correction
            outcomes.append(scale)
            assert self._planning is not None
            last = scale is None or len(outcomes) >= REPLANS  # no check follows: the outcomes are all there
            remade = None if scale is None else self._make(self._planning, scale, "measured")
            complete = last or (remade is not None and not self._decorrelates(remade))
            if self.cache is not None and self._key is not None and self._planning is not None:
                planning = {k: v for k, v in self._planning.items() if k != "source"}
                self.cache.put(self._key, {"planning": planning, "outcomes": outcomes, "complete": complete})
        return {"scale": scale, "share": share, "outcomes": outcomes, "complete": complete}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "plan": None if self.plan is None else self.plan.state_dict(),
            "planning": self._planning,
            "outcomes": list(self._outcomes),
            "complete": self._complete,
            "checks": self._checks,
            "check_from": self._check_from,
            "key": self._key,
            "overhead": self.overhead,
            "plain_seconds": self.plain_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.plan = None if state["plan"] is None else Plan.from_state_dict(state["plan"])
        self._planning = state["planning"]
        self._outcomes, self._complete = list(state["outcomes"]), bool(state["complete"])
        self._checks, self._check_from = int(state["checks"]), state["check_from"]
        self._key, self.overhead = state["key"], state["overhead"]
        self.plain_seconds = None  # timed in another run: this run measures its own, or takes the plan's
        self._seen, self._last_seen = {}, {}
        self.restart()
