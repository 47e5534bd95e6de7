"""The per-layer cost plan (lightning_decor.plan): block ladders, forms, the budget, the table and its state."""

from __future__ import annotations

import pytest

from lightning_decor import DecorrelationCallback, Decorrelator
from lightning_decor.plan import Costs, LayerShape, Plan, block_ladder, make_plan

# One flop per nanosecond... and 10 microseconds per small op: round numbers for hand-checkable costs.
COSTS = Costs(seconds_per_flop=1e-9, seconds_per_op=1e-5)


def shape(name: str, d: int, c_out: int, rows: int, **kwargs: object) -> LayerShape:
    defaults: dict[str, object] = dict(unit=1, groups=1, forwards=1, stat_rows=8, input_side=True)
    return LayerShape(name=name, d=d, c_out=c_out, rows=rows, **{**defaults, **kwargs})  # type: ignore[arg-type]


def test_block_ladder_halves_within_whole_channels() -> None:
    assert block_ladder(4608, 9) == [4608, 2304, 1152, 576, 288, 144, 72, 36, 18]  # 512 channels of 3x3 taps
    assert block_ladder(4608, 9, max_block=1000) == [576, 288, 144, 72, 36, 18]
    assert block_ladder(784, 1) == [784, 392, 196, 98, 49, 16]  # equal splits of 784 = 16 * 49 only
    assert block_ladder(9, 9) == [9]  # a depthwise 3x3 kernel: one channel, one block
    assert block_ladder(10, 1, max_block=4) == [2]  # an explicit cap below the usual minimum is honoured
    assert block_ladder(17, 1, max_block=8) == []  # a prime d: only blocks of one feature, which decorrelate nothing


def test_without_a_budget_every_layer_keeps_its_largest_block_in_the_cheaper_form() -> None:
    plan = make_plan(
        [shape("wide_fc", 512, 512, rows=32), shape("head", 512, 10, rows=32)],
        costs=COSTS, step_seconds=None, max_overhead=None,
    )  # fmt: skip
    assert [(p.form, p.block) for p in plan.layers.values()] == [("input", 512), ("fused", 512)]


def test_forms_follow_the_flop_counts() -> None:
    # Fusing costs 4 C_out d b flops, applying R to the rows 4 M d b: the smaller of C_out and M wins.
    wide = shape("a", 256, c_out=512, rows=64)
    (p,) = make_plan([wide], costs=COSTS, step_seconds=None, max_overhead=None).layers.values()
    assert p.form == "input"
    many_rows = shape("b", 256, c_out=64, rows=4096)
    (p,) = make_plan([many_rows], costs=COSTS, step_seconds=None, max_overhead=None).layers.values()
    assert p.form == "fused"
    grouped = shape("c", 9, c_out=64, rows=8, unit=9, groups=64, input_side=False, conv=True)
    (p,) = make_plan([grouped], costs=COSTS, step_seconds=None, max_overhead=None).layers.values()
    assert (p.form, p.block) == ("fused", 9)


def test_the_budget_is_kept_and_gives_up_the_expensive_decorrelation_first() -> None:
    cheap = shape("cheap", 72, c_out=64, rows=4096, unit=9, conv=True)  # an early 3x3 conv: a dense R is cheap
    costly = shape("costly", 4608, c_out=512, rows=32, unit=9, conv=True)  # late ResNet layer on a tiny map
    free = make_plan([cheap, costly], costs=COSTS, step_seconds=None, max_overhead=None)
    for overhead in (1.0, 0.1, 0.01):
        plan = make_plan([cheap, costly], costs=COSTS, step_seconds=1.0, max_overhead=overhead)
        assert plan.estimate <= overhead * 1.0  # within the budget: seconds per step of all DBP parts
        assert plan.layers["cheap"].block == 72 and plan.layers["cheap"].form != "plain"
        assert plan.layers["costly"].block < free.layers["costly"].block  # blocked (or plain: block 0)
    tiny = make_plan([cheap, costly], costs=COSTS, step_seconds=1.0, max_overhead=1e-6)
    assert all(p.form == "plain" and p.block == 0 for p in tiny.layers.values()) and tiny.estimate == 0.0


def test_a_smaller_budget_never_gives_a_larger_block() -> None:
    shapes = [
        shape(f"l{i}", d, c_out=c, rows=r, unit=9, conv=True)
        for i, (d, c, r) in enumerate([(27, 64, 8192), (576, 64, 2048), (1152, 128, 512), (2304, 256, 128)])
    ]
    blocks = [
        [p.block for p in make_plan(shapes, costs=COSTS, step_seconds=1.0, max_overhead=o).layers.values()]
        for o in (0.3, 0.1, 0.03, 0.01)
    ]
    for larger, smaller in zip(blocks, blocks[1:]):
        assert all(s <= g for s, g in zip(smaller, larger)), (larger, smaller)


def test_table_and_state_round_trip() -> None:
    plan = make_plan(
        [shape("features.0", 27, 16, 4096, unit=9, conv=True), shape("fc", 512, 10, 32)],
        costs=COSTS, step_seconds=0.2, max_overhead=0.1,
    )  # fmt: skip
    lines = plan.table().splitlines()
    assert lines[0].startswith(
        "Decorrelation plan (costs measured in this run; budget 10% of a 200.0 ms step; estimated DBP cost"
    )
    assert lines[1].split() == ["layer", "d", "rows", "C_out", "groups", "form", "block", "share", "R", "MiB"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["features.0"][1:7] == ["27", "4096", "16", "1", plan.layers["features.0"].form, "27"]
    assert rows["fc"][6] == str(plan.layers["fc"].block) and rows["fc"][7].endswith("%")
    b = plan.layers["fc"].block
    assert plan.layers["fc"].memory == 4 * 512 * b and rows["fc"][8] == f"{4 * 512 * b / 2**20:.2f}"  # float32 R
    assert plan.layers["features.0"].memory == 4 * 27 * 27
    again = Plan.from_state_dict(plan.state_dict())
    assert again.layers == plan.layers and again.table() == plan.table()


@pytest.mark.parametrize(
    "value, error, match",
    [
        (0.0, ValueError, r"Expected `max_overhead` to be a finite number > 0, but got 0.0"),
        (-0.1, ValueError, r"Expected `max_overhead` to be a finite number > 0, but got -0.1"),
        (float("nan"), ValueError, r"Expected `max_overhead` to be a finite number > 0, but got nan"),
        (float("inf"), ValueError, r"Expected `max_overhead` to be a finite number > 0, but got inf"),
        ("0.1", TypeError, r"Expected `max_overhead` to be a float, but got str: '0.1'"),
    ],
)
def test_max_overhead_errors(value: object, error: type, match: str) -> None:
    import torch

    with pytest.raises(error, match=match):
        DecorrelationCallback(max_overhead=value)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        Decorrelator(torch.nn.Linear(2, 2), max_overhead=value)  # type: ignore[arg-type]


def test_the_plan_fits_its_memory_budget_giving_up_the_most_bytes_per_decorrelation_lost() -> None:
    shapes = [shape("wide", 4096, 64, 64), shape("narrow", 256, 64, 64), shape("mid", 1024, 64, 64)]
    free = dict(costs=COSTS, step_seconds=None, max_overhead=None)  # no time budget: only memory decides
    dense = make_plan(shapes, **free)
    r = {name: 4 * p.d * p.d for name, p in dense.layers.items()}  # float32 dense R, written out
    assert {n: p.memory for n, p in dense.layers.items()} == r
    assert dense.memory == sum(r.values()) + 2 * r["wide"]  # the largest stack's moments and new R once more
    budget = 40 * 2**20  # the dense plan takes 64 + 0.25 + 4 + 2 * 64 = 196.25 MiB
    plan = make_plan(shapes, **free, max_memory=budget)
    assert plan.memory <= budget and plan.max_memory == budget
    assert plan.layers["wide"].block < 4096 and plan.layers["narrow"].block == 256  # the widest R gives way first
    assert "of 40.0 MiB allowed" in plan.table().splitlines()[0]
    tiny = make_plan(shapes, **free, max_memory=1)  # nothing fits: every layer plain, and said why
    assert all(p.form == "plain" and p.note == "over the memory budget" for p in tiny.layers.values())
    assert tiny.memory == 0
