"""The engine's reports as data (lightning_decor.reports): what patching left plain and why, patterns that match
nothing, a plan that leaves every layer plain, and weights a backward reached without their layer's forward."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_decor import Decorrelator, decorrelate
from lightning_decor import config as config_module
from lightning_decor.config import DecorConfig
from lightning_decor.patching import decorrelated_layers, eligible_layers
from lightning_decor.plan import Plan
from lightning_decor.reports import DirectReads, all_plain_warning, patch_report


def model() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2), nn.Linear(2, 2))
    net[4].weight.requires_grad_(False)  # frozen: expected to stay plain
    return net


def test_the_report_names_what_was_left_plain_and_the_patterns_that_matched_nothing() -> None:
    net = model()
    eligible = eligible_layers(net)
    patched = decorrelate(net, exclude=["2", "nothing*"])
    report = patch_report(eligible, patched, None, ["2", "nothing*"])
    assert patched == ["0", "5"]
    assert report.eligible == ["0", "2", "4", "5"]
    assert report.left_plain == {
        "2": "left out by `include` / `exclude`",
        "4": "frozen (weight.requires_grad is False)",
    }
    assert report.unexpected == {}  # left out on purpose, and frozen: nothing a user would not expect
    assert report.unmatched == {"exclude": ["nothing*"]}


def test_the_engine_reports_a_layer_a_user_may_expect_decorrelated() -> None:
    net = model()
    net.append(nn.LazyLinear(3))  # its shape is unknown until the first forward
    with pytest.warns(UserWarning, match="matches no eligible"), pytest.warns(UserWarning, match="leaves these"):
        dec = Decorrelator(net, include=["0", "6", "7"], max_overhead=None)
    assert list(dec.report.unexpected) == ["6"] and "uninitialised LazyLinear" in dec.report.unexpected["6"]
    assert dec.report.unmatched == {"include": ["7"]}
    assert set(dec.left_plain) == {"2", "4", "5", "6"}


def test_the_plain_front_end_warns_from_its_report_as_the_callback_does() -> None:
    """``Decorrelator(...)`` warns what the callback warns (a layer left plain where a user may expect ``R``, a pattern
    matching nothing, no layer at all); the callback's engine (``from_config``) leaves the warnings to the callback."""
    net = model()
    net.append(nn.LazyLinear(3))
    with pytest.warns(UserWarning) as caught:
        Decorrelator(net, include=["0", "6", "7"], max_overhead=None)
    texts = [str(w.message) for w in caught]
    assert len(texts) == 2
    assert texts[0].startswith("Decorrelator leaves these layers plain: {'6': 'an uninitialised LazyLinear")
    assert texts[1] == (
        "Decorrelator: `include` pattern '7' matches no eligible layer. Eligible layers: ['0', '2', '4', '5', '6']."
    )
    with pytest.warns(UserWarning, match=r"^Decorrelator found no layer to decorrelate \(exact nn.Linear"):
        Decorrelator(nn.Sequential(nn.ReLU()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Decorrelator(model(), max_overhead=None)  # the frozen layer stays plain as expected: nothing to say
        Decorrelator.from_config(model(), DecorConfig(include=("nothing",)))


def test_patterns_naming_layers_patched_before_match_and_a_plan_leaving_all_plain_says_so_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = model()
    decorrelate(net, include=["0"])  # patched by the user first (as before fully_shard), then handed to the engine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec = Decorrelator(net, include=["0", "5"], max_overhead=None)
    assert list(dec.layers) == ["0", "5"] and dec.report.decorrelated == ["0", "5"]
    # Patched, then left plain by the memory budget: the plan's warning, not "found no layer"
    monkeypatch.setattr(config_module, "MIN_MEMORY", 0)
    with pytest.warns(UserWarning) as caught:
        dec = Decorrelator(model(), max_overhead=None, max_memory=1e-9)
    assert dec.layers == {} and [str(w.message).split(":")[0] for w in caught] == [
        "Decorrelator"  # all_plain_warning's "Decorrelator: the plan leaves every layer plain..."
    ]
    assert "the plan leaves every layer plain" in str(caught[0].message)


def test_the_all_plain_warning_says_why_and_what_to_do() -> None:
    assert "(a pinned plan)" in all_plain_warning(Plan({}, source="pinned"))
    measured = all_plain_warning(Plan({}, step_seconds=0.0123, max_overhead=0.1, source="measured"))
    assert "cost more than `max_overhead`=0.1 of the measured 12.3 ms step (measured costs)" in measured
    assert "deterministic mode" not in measured
    assert "Under deterministic mode" in all_plain_warning(Plan({}, max_overhead=0.1, source="analytic"))


def test_direct_reads_names_weights_a_backward_reached_without_their_forward() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    decorrelate(net)
    layers = decorrelated_layers(net)
    net[2].weight.grad = torch.zeros(3, 3)  # a stale gradient, untouched below
    reads = DirectReads(layers)
    x = torch.randn(5, 3)
    loss = net[0](x).sum() + F.linear(x, net[1].weight).sum()  # layer "1" read directly
    loss.backward()
    called = {"0"}  # what the forwards noted (the engine asks its row buffers and the planner)
    assert reads.found(layers, noted=lambda name: name in called) == ["1"]
    net[2].weight.grad.add_(1.0)  # a gradient accumulated into the old tensor counts too
    assert reads.found(layers, noted=lambda name: name in called) == ["1", "2"]
    assert "['1', '2']" in DirectReads.message(["1", "2"]) and "F.linear(x, layer.weight)" in DirectReads.message([])
