"""The plan's life cycle (lightning_decor.planner) on a fake clock and a fake probe, without a model: the fixed
timeline, the check that remakes a plan, the cache that lets a later run replay every decision, deterministic mode,
pinned plans, resuming, and agreeing with the leader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lightning_decor.plan import Costs, LayerPlan, LayerShape, Plan
from lightning_decor.planner import (
    CALIBRATION_STEPS,
    CHECK_WINDOWS,
    MAX_CORRECTION,
    PlanCache,
    Planner,
    plain_steps,
)

LAYERS = [
    LayerShape("a", d=32, unit=1, c_out=64, groups=1, input_side=True, conv=False, max_block=32),
    LayerShape("b", d=64, unit=1, c_out=64, groups=1, input_side=True, conv=False, max_block=64),
    LayerShape("c", d=64, unit=1, c_out=2, groups=1, input_side=True, conv=False, max_block=64),
]
FREE = Costs(seconds_per_flop=0.0, seconds_per_op=0.0)  # device constants: only the probe's figures count


class Probe:
    """Measures every candidate of every layer at ``seconds``, and counts its calls."""

    def __init__(self, seconds: float = 0.03) -> None:
        self.seconds, self.calls = seconds, 0

    def __call__(self, shapes: Any, inputs: Any, estimates: dict[str, list[tuple[str, float]]], **kw: Any) -> Any:
        self.calls += 1
        assert kw["budget"] == pytest.approx(0.1) and kw["time_limit"] == pytest.approx(3.0)  # 10 %, 3 plain steps
        return {name: [("fused", self.seconds)] * len(entries) for name, entries in estimates.items()}


class Never:
    """A probe or constant that must not be called (nothing may be timed)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("timed although it must not be")


def planner(cache: PlanCache | None = None, probe: Any = None, **kw: Any) -> tuple[Planner, dict[str, float]]:
    clock = {"now": 0.0}
    options: dict[str, Any] = dict(
        max_overhead=0.1, cache=cache, environment={"device": "test"}, probe=probe or Probe(),
        device_costs=lambda: FREE, clock=lambda: clock["now"], deterministic=lambda: False,
    )  # fmt: skip
    return Planner(LAYERS, **{**options, **kw}), clock


def run(p: Planner, clock: dict[str, float], per_layer: float, calls: int = 30) -> list[Plan]:
    """``calls`` steps of 1 s plain, each decorrelated layer of the current plan adding ``per_layer`` seconds (the
    plan's true cost, which the probe does not see); returns the plans in the order they were made."""
    plans = []
    for _ in range(calls):
        if p.observing:
            for info in LAYERS:
                p.observe(info.name, rows=16, stat_rows=2, input_shape=(16, info.d), dtype="torch.float32")
        kept = 0 if p.plan is None else sum(lp.form != "plain" for lp in p.plan.layers.values())
        clock["now"] += 1.0 + per_layer * kept
        out = p.step()
        if out.plan is not None:
            plans.append(out.plan)
    return plans


def kept(plan: Plan) -> int:
    return sum(lp.form != "plain" for lp in plan.layers.values())


def test_the_timeline_is_fixed_and_dry_updates_fall_at_the_start_of_each_check_window() -> None:
    p, clock = planner()
    actions = []
    for call in range(1, plain_steps() + 1):  # the planner's calls; the engine takes over after
        if p.observing:
            for info in LAYERS:
                p.observe(info.name, rows=16, stat_rows=2, input_shape=(16, info.d), dtype="torch.float32")
        clock["now"] += 1.0
        actions.append((call, p.step(), p.collects_next()))
    made = [call for call, out, _ in actions if out.plan is not None]
    dry = [call for call, out, _ in actions if out.dry]
    collect = [call + 1 for call, _, nxt in actions if nxt]  # the steps that sample rows
    assert made == [CALIBRATION_STEPS]  # the check kept it: the plan costs nothing on this clock
    assert dry == list(range(CALIBRATION_STEPS + 1, CALIBRATION_STEPS + 1 + CHECK_WINDOWS))
    assert collect == list(range(CALIBRATION_STEPS + 1, plain_steps() + 2))  # every step from the plan on
    p2, clock2 = planner(update_every=2)  # with update_every=2 only the steps of (dry) updates sample rows
    collect2 = []
    for call in range(1, plain_steps(2) + 1):
        clock2["now"] += 1.0
        p2.step()
        if p2.collects_next():
            collect2.append(call + 1)
    first_dry = CALIBRATION_STEPS + 1
    assert collect2 == [*range(first_dry, first_dry + 2 * CHECK_WINDOWS, 2), plain_steps(2) + 1]
    assert p.first_moving_call == plain_steps() + 1 == 18 and p.done
    assert p.overhead == 0.0 and p.plan is not None and p.plan.measured_overhead == 0.0


def test_a_plan_whose_real_cost_exceeds_the_budget_is_made_again() -> None:
    # Plain steps take 1 s. Every candidate is measured at 30 ms, so the first plan keeps all three layers (90 ms of
    # a 100 ms budget); but each decorrelated layer really adds 80 ms, and 240 ms is more than the 120 ms the check
    # tolerates (1.2 x the budget): the costs are scaled by 240 / 90 (under the cap of 3), and the plan is made
    # again. It keeps one layer (80 ms corrected), whose real 80 ms the next check accepts.
    p, clock = planner()
    first, *later = run(p, clock, per_layer=0.08)
    assert first.step_seconds == 1.0 and first.scale == 1.0 and first.estimate == pytest.approx(0.09)
    assert kept(first) == 3 and first.source == "measured"
    assert first.measured_overhead == pytest.approx(0.24)
    (second,) = later  # made once: the second plan is within its budget
    assert second.scale == pytest.approx(0.24 / 0.09) and second.estimate <= 0.1 and kept(second) == 1
    assert second.measured_overhead == pytest.approx(0.08) == p.overhead
    assert f"costs x{second.scale:.2f} after checking the real step" in second.table().splitlines()[0]
    assert "measured DBP cost 8.0% of the plain step" in second.table().splitlines()[0]


def test_one_check_corrects_the_costs_by_at_most_three_and_plans_are_made_at_most_twice_more() -> None:
    # Each layer really adds 500 ms against 30 ms measured: 16 times the estimate. The first check scales the costs
    # by 3 (the cap: a gap this large is more likely a busy machine than a wrong measurement), keeping one layer
    # (90 ms corrected); its real 500 ms fail the second check too, which scales by 3 again (270 ms a layer: none
    # fits the 100 ms budget). Then the checks stop.
    p, clock = planner()
    plans = run(p, clock, per_layer=0.5)
    assert [plan.scale for plan in plans] == [1.0, MAX_CORRECTION, MAX_CORRECTION**2]
    assert [kept(plan) for plan in plans] == [3, 1, 0]


def test_a_later_run_with_the_same_key_replays_every_decision_without_timing(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    p, clock = planner(cache)
    measured = run(p, clock, per_layer=0.08)
    (entry,) = [json.loads(f.read_text()) for f in tmp_path.glob("plan-*.json")]
    assert entry["complete"] and entry["outcomes"] == [pytest.approx(0.24 / 0.09), None]
    # The same key on a machine whose clock now says otherwise (everything free: a timed check would keep the first
    # plan), with a probe that must not run: the same plans, from the cache, at the same calls.
    again, clock2 = planner(PlanCache(tmp_path), probe=Never(), device_costs=Never())  # type: ignore[arg-type]
    replayed = run(again, clock2, per_layer=0.0)
    assert [plan.layouts() for plan in replayed] == [plan.layouts() for plan in measured]
    assert [plan.scale for plan in replayed] == [plan.scale for plan in measured]
    assert all(plan.source == "cache" for plan in replayed) and replayed[0].step_seconds == 1.0
    assert again.overhead == 0.0  # what this run measured, reported, deciding nothing


def test_another_key_measures_anew(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    run(*planner(cache), per_layer=0.0)
    probe = Probe()
    other, clock = planner(cache, probe=probe)
    other.environment["threads"] = 1  # e.g. another number of threads
    run(other, clock, per_layer=0.0)
    assert probe.calls == 1 and len(list(tmp_path.glob("plan-*.json"))) == 2


def test_costs_kept_by_a_run_stopped_before_its_check_are_used_and_the_check_completes_them(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    p, clock = planner(cache)
    run(p, clock, per_layer=0.08, calls=CALIBRATION_STEPS + 2)  # stopped during the check
    (path,) = tmp_path.glob("plan-*.json")
    assert not json.loads(path.read_text())["complete"]
    later, clock2 = planner(cache, probe=Never(), device_costs=Never())  # type: ignore[arg-type]
    plans = run(later, clock2, per_layer=0.08)
    assert [kept(plan) for plan in plans] == [3, 1]  # the costs from the cache, the check timed now
    assert json.loads(path.read_text())["complete"]


def test_under_deterministic_mode_nothing_timed_decides(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    det, clock = planner(cache, probe=Never(), device_costs=Never(), deterministic=lambda: True)  # type: ignore[arg-type]
    plans = run(det, clock, per_layer=5.0)  # far over budget: a timed check would remake it
    assert len(plans) == 1 and plans[0].source == "analytic" and plans[0].scale == 1.0
    assert not list(tmp_path.glob("*.json"))  # nothing kept either
    assert "analytic costs (flop model, nothing timed)" in plans[0].table().splitlines()[0]
    # the same clock, another run: the same analytic plan
    det2, clock2 = planner(cache, probe=Never(), device_costs=Never(), deterministic=lambda: True)  # type: ignore[arg-type]
    assert [p.layouts() for p in run(det2, clock2, per_layer=0.0)] == [plans[0].layouts()]
    # with complete costs kept by an earlier run, deterministic mode replays them
    measured = run(*planner(cache), per_layer=0.08)
    det3, clock3 = planner(cache, probe=Never(), device_costs=Never(), deterministic=lambda: True)  # type: ignore[arg-type]
    assert [p.layouts() for p in run(det3, clock3, per_layer=5.0)] == [p.layouts() for p in measured]


def test_a_pinned_plan_is_applied_as_it_is_and_never_remade() -> None:
    pinned = Plan(
        {info.name: LayerPlan(info.name, "fused", info.d // 2, info.d, 16, info.c_out, 1, 0.5) for info in LAYERS},
        step_seconds=1.0, max_overhead=0.1, source="measured",
    )  # fmt: skip
    p, clock = planner(probe=Never(), device_costs=Never(), pinned=pinned)  # type: ignore[arg-type]
    plans = run(p, clock, per_layer=1.0)
    assert len(plans) == 1 and plans[0].layouts() == pinned.layouts() and plans[0].source == "pinned"
    assert p.overhead == pytest.approx(3.0)  # measured and reported all the same


def test_no_two_timed_calls_give_the_analytic_plan() -> None:
    p, clock = planner(probe=Never(), device_costs=Never())  # type: ignore[arg-type]
    for _ in range(CALIBRATION_STEPS - 1):
        clock["now"] += 1.0
        p.step()
    p.restart()  # resumed in another process just before the last calibration step: one timed call left
    clock["now"] += 1.0
    out = p.step()
    assert out.plan is not None and out.plan.source == "analytic"


def test_state_dict_round_trip_mid_check_remakes_the_plan_from_the_saved_costs() -> None:
    reference = run(*planner(), per_layer=0.08)
    p, clock = planner()  # no cache: the resumed run must remake the plan from what the state holds
    run(p, clock, per_layer=0.08, calls=CALIBRATION_STEPS + 3)
    state = json.loads(json.dumps(p.state_dict()))  # plain data: a checkpoint holds it
    resumed, clock2 = planner(probe=Never(), device_costs=Never())  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    clock2["now"] = 100.0  # another process: its own clock; the windows before the resume are not counted
    later = run(resumed, clock2, per_layer=0.08, calls=30 - CALIBRATION_STEPS - 3)
    assert [plan.layouts() for plan in later] == [plan.layouts() for plan in reference[1:]]
    assert [plan.scale for plan in later] == pytest.approx([plan.scale for plan in reference[1:]])  # timed again
    assert resumed.calls == 30 and resumed.done


def test_every_process_takes_the_leaders_decision() -> None:
    leader, clock = planner()
    decisions: list[Any] = []

    def record(decision: Any) -> Any:
        decisions.append(decision)
        return decision

    leader.agree = record
    plans = run(leader, clock, per_layer=0.08)
    box = iter(decisions)
    follower, clock2 = planner(probe=Never(), device_costs=Never(), agree=lambda _: next(box), leader=False)  # type: ignore[arg-type]
    followed = run(follower, clock2, per_layer=0.0)
    assert [p.layouts() for p in followed] == [p.layouts() for p in plans]
    assert follower.overhead == leader.overhead  # the leader's measurement too


def test_plan_cache_location_and_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_DECOR_CACHE", str(tmp_path / "here"))
    assert PlanCache.default().directory == tmp_path / "here"  # type: ignore[union-attr]
    for off in ("off", "0", "", "false"):
        monkeypatch.setenv("LIGHTNING_DECOR_CACHE", off)
        assert PlanCache.default() is None
    monkeypatch.delenv("LIGHTNING_DECOR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert PlanCache.default().directory == tmp_path / "xdg" / "lightning_decor"  # type: ignore[union-attr]
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert PlanCache.default().directory == tmp_path / "home" / ".cache" / "lightning_decor"  # type: ignore[union-attr]


def test_an_unwritable_cache_warns_once_and_planning_goes_on(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    p, clock = planner(PlanCache(blocker / "cache"))
    with pytest.warns(UserWarning, match=r"the plan cache .* cannot be written .*; measured costs are not kept"):
        plans = run(p, clock, per_layer=0.08)
    assert [kept(plan) for plan in plans] == [3, 1]


def test_planner_needs_a_budget_or_a_pinned_plan() -> None:
    with pytest.raises(ValueError, match=r"Expected `max_overhead` or a pinned plan"):
        Planner(LAYERS, max_overhead=None)
