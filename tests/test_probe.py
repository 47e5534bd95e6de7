"""Measured costs for the plan (lightning_decor.probe); the check of a plan against the real step is in
test_planner.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lightning_decor.probe as probe_module
from lightning_decor import decorrelate
from lightning_decor.patching import decorrelated_layers
from lightning_decor.plan import Costs, LayerShape, block_ladder, candidate_costs, make_plan
from lightning_decor.probe import measure_candidates

from conftest import collect_rows

COSTS = Costs(seconds_per_flop=1e-9, seconds_per_op=1e-5)


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)
    )


def shapes_of(model: nn.Module, batch: int) -> tuple[list[LayerShape], dict[str, tuple[int, ...]]]:
    """The planner's view of the three layers, written out by hand for an input of (batch, 4, 8, 8)."""
    shapes = [
        LayerShape("0", d=36, unit=9, c_out=16, groups=1, rows=batch * 36, forwards=1, stat_rows=16,
                   input_side=True, conv=True, max_block=36),
        LayerShape("2", d=36, unit=9, c_out=16, groups=4, rows=batch * 16, forwards=1, stat_rows=16,
                   input_side=False, conv=True, max_block=36),
        LayerShape("4", d=256, unit=1, c_out=10, groups=1, rows=batch, forwards=1, stat_rows=batch,
                   input_side=True, max_block=256),
    ]  # fmt: skip
    inputs = {"0": (batch, 4, 8, 8), "2": (batch, 16, 6, 6), "4": (batch, 256)}
    return shapes, inputs


def test_measured_candidates_follow_the_ladder_and_leave_model_and_rngs_untouched() -> None:
    model = conv_net()
    decorrelate(model)
    layers = decorrelated_layers(model)
    buffers = collect_rows(*layers.values(), max_rows=16, generator=torch.Generator().manual_seed(5))
    sampling = buffers[0].sampling
    shapes, inputs = shapes_of(model, batch=8)
    estimates = {s.name: candidate_costs(s, COSTS) for s in shapes}
    before = copy.deepcopy(model.state_dict())
    Rs = {n: layer.decor_R.clone() for n, layer in layers.items()}
    forms = {n: layer.decor_form for n, layer in layers.items()}
    rng, gen = torch.get_rng_state(), sampling.generator.get_state()

    measured = measure_candidates(layers, shapes, inputs, estimates, budget=10.0, time_limit=10.0, sampling=sampling)

    for s in shapes:
        entries = measured[s.name]
        assert len(entries) == len(block_ladder(s.d, s.unit, s.max_block)) == len(estimates[s.name])
        for form, seconds in entries:
            assert form in (("fused", "input") if s.input_side else ("fused",)), (s.name, form)
            assert math.isfinite(seconds) and seconds > 0, (s.name, seconds)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    assert all(torch.equal(layers[n].decor_R, R) for n, R in Rs.items())
    assert {n: layer.decor_form for n, layer in layers.items()} == forms
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # data order and dropout are not shifted
    assert torch.equal(sampling.generator.get_state(), gen)  # the training's sampling state is not moved
    assert all(buffer.seen_count == 0 for buffer in buffers)  # the probe's draws are not kept


@pytest.mark.parametrize("limits", [dict(budget=0.0, time_limit=10.0), dict(budget=10.0, time_limit=0.0)])
def test_candidates_not_measured_keep_their_estimate(limits: dict[str, float]) -> None:
    # Nothing fits a zero budget, and nothing is measured with no time: with no measured ratio the estimates stand.
    model = conv_net()
    decorrelate(model)
    shapes, inputs = shapes_of(model, batch=8)
    estimates = {s.name: candidate_costs(s, COSTS) for s in shapes}
    assert measure_candidates(decorrelated_layers(model), shapes, inputs, estimates, **limits) == estimates


def test_the_input_side_form_is_timed_only_where_its_flop_estimate_beats_the_measured_fused_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = conv_net()
    decorrelate(model)
    shapes, inputs = shapes_of(model, batch=8)
    estimates = {s.name: candidate_costs(s, COSTS) for s in shapes}
    timed = []
    real = probe_module.input_seconds
    monkeypatch.setattr(
        probe_module,
        "input_seconds",
        lambda layer, shape, b, gen, fmt: timed.append(b) or real(layer, shape, b, gen, fmt),
    )
    layers = decorrelated_layers(model)
    kw = dict(budget=10.0, time_limit=10.0)
    # One second per flop: the input form's estimate exceeds any measured fused time, so it is never timed.
    slow = measure_candidates(layers, shapes, inputs, estimates, costs=Costs(1.0, 1.0), **kw)  # type: ignore[arg-type]
    assert timed == [] and all(form == "fused" for entries in slow.values() for form, _ in entries)
    # Free flops: it is timed for every candidate of the two layers that have it (with the plain layer once each).
    measure_candidates(layers, shapes, inputs, estimates, costs=Costs(0.0, 0.0), **kw)  # type: ignore[arg-type]
    ladders = {s.name: block_ladder(s.d, s.unit, s.max_block) for s in shapes if s.input_side}
    assert sorted(b for b in timed if b is not None) == sorted(b for ladder in ladders.values() for b in ladder)
    assert timed.count(None) == len(ladders)


def test_unmeasured_candidates_take_the_ratio_of_their_layers_nearest_measured_one() -> None:
    estimates = [("fused", 4.0), ("fused", 1.0), ("input", 0.6), ("fused", 0.25), ("fused", 0.2)]
    measured = [None, ("fused", 2.0), None, ("input", 1.0), None]  # ratios 2 (ladder entry 1) and 4 (entry 3)
    out = probe_module.extrapolated(measured, estimates, median=10.0)
    assert out == [("fused", 8.0), ("fused", 2.0), ("input", 1.2), ("input", 1.0), ("fused", 0.8)]
    # a layer with nothing measured takes the median ratio over all layers
    assert probe_module.extrapolated([None, None], estimates[:2], median=10.0) == [("fused", 40.0), ("fused", 10.0)]


def test_measured_costs_replace_the_estimates_and_a_layer_can_drop_straight_to_plain() -> None:
    layer = LayerShape("conv", d=72, unit=9, c_out=64, groups=1, rows=4096, forwards=1, stat_rows=8,
                       input_side=True, conv=True)  # fmt: skip
    assert block_ladder(72, 9) == [72, 36, 18]
    measured = {"conv": [("fused", 0.2), ("fused", 0.3), ("input", 0.4)]}  # smaller blocks measured dearer
    group = COSTS(0.0, 40)  # the batched update's launches, per block size in use
    kept = make_plan([layer], costs=COSTS, step_seconds=1.0, max_overhead=0.25, measured=measured)
    assert (kept.layers["conv"].form, kept.layers["conv"].block) == ("fused", 72)
    assert kept.estimate == pytest.approx(0.2 + group)
    # Over budget: stepping down the ladder would cost more, so the plan leaves the layer plain in one move.
    plain = make_plan([layer], costs=COSTS, step_seconds=1.0, max_overhead=0.15, measured=measured)
    assert plain.layers["conv"].form == "plain" and plain.estimate == 0.0
    with pytest.raises(ValueError, match=r"Expected 3 measured candidates for 'conv', got 1\."):
        make_plan([layer], costs=COSTS, step_seconds=1.0, max_overhead=0.1, measured={"conv": [("fused", 0.1)]})


def test_layers_are_timed_in_the_dtype_autocast_and_memory_format_training_ran_them(monkeypatch) -> None:
    """bf16-mixed with channels-last input: the probe's convolutions see bfloat16 channels-last inputs under bfloat16
    autocast, as the training step's did (not float32 NCHW)."""
    model = conv_net()
    decorrelate(model)
    layers = decorrelated_layers(model)
    shapes, inputs = shapes_of(model, batch=4)
    seen: list[tuple[torch.dtype, bool, bool]] = []
    conv2d = torch.nn.functional.conv2d

    def spy(x, *args, **kwargs):
        seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu")))
        return conv2d(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    estimates = {s.name: candidate_costs(s, COSTS) for s in shapes}
    formats = {"0": ("torch.bfloat16", "torch.bfloat16", True)}
    measure_candidates(layers, shapes[:1], {"0": inputs["0"]}, {"0": estimates["0"]}, budget=10.0, time_limit=10.0,
                       formats=formats)  # fmt: skip
    assert seen and set(seen) == {(torch.bfloat16, True, True)}


def test_the_planner_records_how_each_layer_ran() -> None:
    """The engine's observer notes each layer's input dtype, the autocast dtype and channels-last: part of the plan
    cache's key and what the probe times."""
    from lightning_decor import Decorrelator

    model = conv_net()
    dec = Decorrelator(model, max_overhead=0.1, use_cuda_stream=False)
    x = torch.randn(4, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert dec.planner is not None
    first, last = dec.planner.seen("0"), dec.planner.seen("4")
    assert first is not None and first.format() == ("torch.float32", "torch.bfloat16", True)
    assert last is not None and last.format()[1:] == ("torch.bfloat16", False)
