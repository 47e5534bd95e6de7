"""What a checkpoint keeps of the patched layers and how it is written back: each ``R`` and raw weight ``W`` (the
module's own ``state_dict`` holds the fused ``W @ R``), whole even where FSDP2 shards the weight
(:func:`layer_state`); which layers a saved state fits (:func:`saved_layers`); writing it back, each process its shard
(:func:`write_layers`). The engine's ``state_dict`` adds the plan, the planner and the counters around these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.plan import LayerPlan, Plan

__all__ = ["layer_state", "misfit_warning", "saved_layers", "write_layers"]


def _whole(weight: Tensor) -> Tensor:
    """A copy of ``weight`` on the CPU, whole: a sharded weight is gathered (every process calls ``state_dict``; a
    checkpoint keeps one process's copy)."""
    whole = weight.detach().full_tensor() if isinstance(weight, DTensor) else weight.detach()
    return whole.cpu().clone()


def layer_state(layers: dict[str, DecorrelatedLayer], updated: dict[str, DecorrelatedLayer]) -> dict[str, Any]:
    """``{"R": ..., "raw_weight": ...}``: a CPU copy of the ``R`` of every layer in ``updated`` (one per shared
    input) and of the raw weight of every layer in ``layers``."""
    return {
        "R": {name: layer.decor_R.detach().cpu().clone() for name, layer in updated.items()},
        "raw_weight": {name: _whole(layer.weight) for name, layer in layers.items()},
    }


def saved_layers(
    layers: dict[str, DecorrelatedLayer],
    R: dict[str, Tensor],
    raw: dict[str, Tensor],
    plan: Plan | None,
    followers: dict[str, str] | None = None,
) -> tuple[dict[str, tuple[Tensor | None, Tensor]], list[str]]:
    """Which of ``layers`` a saved state can restore: ``{name: (R, raw W)}`` for those whose saved ``R`` and raw
    weight fit their layout in the saved ``plan`` (``None``: their layout now), and the names of those that do not
    fit (a layer patched now but not then). Layers the plan leaves plain are in neither. A layer in ``followers``
    reads its leader's ``R``: only its raw weight is restored (``R`` is ``None``), whatever its plan entry."""
    followers = followers or {}
    restorable: dict[str, tuple[Tensor | None, Tensor]] = {}
    misfits = []
    for name, layer in layers.items():
        entry = None if plan is None else plan.layers.get(name)
        if entry is not None and entry.form == "plain" and name not in followers:
            continue
        r, w = (None, raw.get(name)) if name in followers else (R.get(name), raw.get(name))
        fits = name in followers or (r is not None and _layout_fits(layer, r, entry))
        if w is None or w.shape != layer.weight.shape or not fits:
            misfits.append(name)
        else:
            restorable[name] = (r, w)
    return restorable, misfits


def misfit_warning(names: list[str]) -> str:
    """The warning for layers a saved state does not fit (:func:`saved_layers`)."""
    return (
        f"Decorrelator: the saved state has no R of matching layout for {names}; these layers keep their current R "
        "and weights (the model's checkpoint already holds their trained function)."
    )


def _layout_fits(layer: DecorrelatedLayer, R: Tensor, entry: LayerPlan | None) -> bool:
    """Whether a saved ``R`` fits ``layer`` in the layout of its plan ``entry`` (``None``: its layout now)."""
    if entry is None:
        return tuple(R.shape) == tuple(layer.decor_R.shape)
    blocks = layer.decor_groups * (layer.decor_group_features // entry.block)
    return tuple(R.shape) == ((entry.block, entry.block) if blocks == 1 else (blocks, entry.block, entry.block))


@torch.no_grad()
def write_layers(layers: dict[str, DecorrelatedLayer], restorable: dict[str, tuple[Tensor | None, Tensor]]) -> None:
    """Write what :func:`saved_layers` found restorable into ``layers``: each ``R`` (none for a follower) and raw
    weight; a sharded weight gets this process's rows of the saved whole one."""
    for name, (R, raw) in restorable.items():
        layer = layers[name]
        if R is not None:
            layer.decor_R.copy_(R.reshape(layer.decor_R.shape))
        weight = layer.weight
        if isinstance(weight, DTensor) and not isinstance(raw, DTensor):
            raw = distribute_tensor(raw.to(weight.device), weight.device_mesh, weight.placements, src_data_rank=None)
        weight.copy_(raw)
