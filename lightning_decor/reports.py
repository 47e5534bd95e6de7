"""What the engine reports as data, for its front-ends to warn and log from: what patching left plain and why
(:class:`PatchReport`), a plan that leaves every layer plain (:func:`all_plain_warning`), and layers whose weight a
backward reached without their forward (:class:`DirectReads`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from lightning_decor.config import DecorConfig
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.patching import (
    AVERAGED,
    FROZEN,
    LEFT_OUT,
    decorrelate,
    decorrelated_layers,
    eligible_layers,
    matches,
)
from lightning_decor.plan import Plan

__all__ = ["SHARDED_NO_PLAN", "DirectReads", "PatchReport", "all_plain_warning", "decorrelate_reported", "patch_report"]


@dataclass(frozen=True)
class PatchReport:
    """What patching a model left as it was, as data (``Decorrelator.report``; the callback warns from it).

    Attributes:
        eligible: Every layer of a known kind (or a subclass of one) that was plain before, by qualified name.
        left_plain: Those left plain, with why (``include`` / ``exclude`` too): the plan table lists them.
        unmatched: Per argument (``"include"``, ``"exclude"``), its patterns that match no layer, eligible or patched
            before.
        decorrelated: Every layer patched once patching was done: those patched before, then those patched now.
    """

    eligible: list[str]
    left_plain: dict[str, str]
    unmatched: dict[str, list[str]]
    decorrelated: list[str] = field(default_factory=list)

    @property
    def unexpected(self) -> dict[str, str]:
        """The layers left plain where a user may expect DBP: not frozen, not an average's copy, not left out."""
        return {n: why for n, why in self.left_plain.items() if not why.startswith((FROZEN, AVERAGED, LEFT_OUT))}

    def warnings(self, who: str) -> list[str]:
        """The warnings ``who`` (a front-end) gives for this report: layers left plain where a user may expect DBP,
        patterns that match no layer, and no layer patched at all (a plan may still leave patched layers plain: it
        says so itself)."""
        messages = [f"{who} leaves these layers plain: {self.unexpected}."] if self.unexpected else []
        messages += [
            f"{who}: `{arg}` pattern {pattern!r} matches no eligible layer. Eligible layers: {sorted(self.eligible)}."
            for arg, patterns in self.unmatched.items()
            for pattern in patterns
        ]
        if not self.decorrelated:
            messages.append(
                f"{who} found no layer to decorrelate (exact nn.Linear / nn.Conv1d/2d/3d, not frozen, matching "
                "`include`/`exclude`); training proceeds as plain backpropagation."
            )
        return messages


def patch_report(
    eligible: dict[str, str | None], patched: Sequence[str], include: Sequence[str] | None,
    exclude: Sequence[str] | None, before: Sequence[str] = (),
) -> PatchReport:  # fmt: skip
    """The :class:`PatchReport` of a model whose :func:`eligible_layers` were ``eligible`` before ``patched`` were
    patched with the patterns ``include`` and ``exclude``; ``before``: the layers patched already (a pattern naming
    one of them matches)."""
    done = set(patched)
    left = {name: why or LEFT_OUT for name, why in eligible.items() if name not in done}
    names = [*eligible, *before]
    unmatched = {
        arg: [p for p in patterns or [] if not any(matches(name, [p]) for name in names)]
        for arg, patterns in (("include", include), ("exclude", exclude))
    }
    return PatchReport(list(eligible), left, {arg: ps for arg, ps in unmatched.items() if ps}, [*before, *patched])


def decorrelate_reported(model: nn.Module, config: DecorConfig) -> tuple[list[str], PatchReport]:
    """:func:`lightning_decor.decorrelate` ``model`` with ``config``'s patterns and limits: the names of the layers
    patched now, and the :class:`PatchReport`."""
    eligible = eligible_layers(model, config.max_features, config.block_size)
    before = list(decorrelated_layers(model))
    new = decorrelate(model, include=config.include, exclude=config.exclude, max_features=config.max_features,
                      block_size=config.block_size)  # fmt: skip
    return new, patch_report(eligible, new, config.include, config.exclude, before)


SHARDED_NO_PLAN = (
    "Decorrelator: the layers are sharded (fully_shard); no cost plan is timed for sharded layers yet: every layer "
    "keeps its largest allowed block within the memory budget, fused into its weight (as with max_overhead=None)."
)


def all_plain_warning(plan: Plan) -> str:
    """Why ``plan`` leaves every layer plain, and what to do."""
    if plan.source == "pinned":
        why = "(a pinned plan)"
    else:
        step = "" if plan.step_seconds is None else f" of the measured {plan.step_seconds * 1e3:.1f} ms step"
        why = (f"decorrelating any of them would cost more than `max_overhead`={plan.max_overhead}{step} "
               f"({plan.source} costs)")  # fmt: skip
    hint = (
        " Under deterministic mode the plan comes from the analytic model, which counts only the planned layers' own "
        "work in the step: run once without deterministic mode (its measured costs are kept in the plan cache for "
        "later runs) or pin a plan."
        if plan.source == "analytic"
        else ""
    )
    return (
        f"Decorrelator: the plan leaves every layer plain: {why}. Training continues as plain backpropagation; raise "
        f"`max_overhead`, or set it to None for a dense R everywhere.{hint}"
    )


class DirectReads:
    """Tells which patched layers' weights got a gradient while their forward was not called: code that reads
    ``.weight`` directly (``F.linear(x, layer.weight)``) computes with the raw ``W`` instead of ``W @ R``, and ``R``
    cannot move. Made before a backward, asked after it."""

    def __init__(self, layers: dict[str, DecorrelatedLayer]) -> None:
        # Which .grad tensor each weight holds (weakly: a stale gradient may still be freed) and its version.
        self._marks = {name: self._mark(layer.weight) for name, layer in layers.items()}

    @staticmethod
    def _mark(param: Tensor) -> tuple[weakref.ref[Tensor] | None, int]:
        grad = param.grad
        return (None, 0) if grad is None else (weakref.ref(grad), grad._version)

    def found(self, layers: dict[str, DecorrelatedLayer], noted: Callable[[str], bool]) -> list[str]:
        """The layers whose weight a backward reached since this was made (a new ``.grad`` tensor, or the old one
        accumulated into) and whose forwards ``noted`` nothing."""
        found = []
        for name, layer in layers.items():
            grad, mark = layer.weight.grad, self._marks.get(name)
            if mark is None or grad is None or noted(name):
                continue
            old, version = mark
            if old is None or old() is not grad or grad._version != version:
                found.append(name)
        return found

    @staticmethod
    def message(names: list[str]) -> str:
        """The warning naming ``names``."""
        return (
            f"Decorrelator: the weights of {names} received a gradient in the first training batch, but their "
            "forward was not called: code that reads `.weight` directly (e.g. `F.linear(x, layer.weight)`) "
            "computes with the raw W instead of W @ R, and R does not move. Call the layer instead, or leave it "
            "out with `exclude`. (A penalty on the weights of a layer that this batch did not use gives such a "
            "gradient too; then there is nothing to fix.)"
        )
