"""Weight averages kept inside the model: ``torch.optim.swa_utils.AveragedModel`` averages ``W @ R``.

A module that keeps an EMA of its network (``self.ema = AveragedModel(self.net, multi_avg_fn=...)``, updated with
``self.ema.update_parameters(self.net)``) would average the raw ``W`` of each decorrelated layer, which is not the
function the layer computes (``W @ R``, with ``R`` moving): measured 2.5e-2 off an EMA of ``W @ R`` on a small MLP.
So the averaged copy's layers stay plain (:func:`lightning_decor.eligible_layers` says why), and
:func:`lightning_decor.decorrelate` routes every ``AveragedModel`` it finds in the model through :func:`update_fused`:
its ``update_parameters(model)`` then sees each decorrelated layer's fused weight ``W @ R`` in place of ``W`` (and no
``decor_R`` buffers), so the copy holds the average of the trained functions, a plain model ready for evaluation.
:func:`lightning_decor.fold` removes the routing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.patching import Routing, register_routing

__all__ = ["FusedView", "update_fused"]


class FusedView:
    """What ``AveragedModel.update_parameters`` reads of a model, with every decorrelated layer's weight ``W @ R``:
    its parameters in their order, and its buffers without the ``decor_R`` ones."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def parameters(self) -> Iterator[Tensor]:
        fused = {id(m.weight): m for m in self.model.modules() if isinstance(m, DecorrelatedLayer)}
        for p in self.model.parameters():
            layer = fused.get(id(p))
            yield p if layer is None else layer.decor_fused_weight().detach()

    def buffers(self) -> Iterator[Tensor]:
        for name, b in self.model.named_buffers():
            if name.rsplit(".", 1)[-1] != "decor_R":
                yield b


def update_fused(averaged: AveragedModel) -> Any:
    """``averaged.update_parameters``, averaging the fused weights of a decorrelated model."""
    original = type(averaged).update_parameters

    def update_parameters(model: nn.Module) -> None:
        decorrelated = any(isinstance(m, DecorrelatedLayer) for m in model.modules())
        original(averaged, FusedView(model) if decorrelated else model)  # type: ignore[arg-type]

    update_parameters._lightning_decor = True  # type: ignore[attr-defined]
    return update_parameters


def _averaged(model: nn.Module) -> Iterator[AveragedModel]:
    return (m for m in model.modules() if isinstance(m, AveragedModel))


def _route(model: nn.Module) -> None:
    for averaged in _averaged(model):
        if not getattr(averaged.__dict__.get("update_parameters"), "_lightning_decor", False):
            averaged.update_parameters = update_fused(averaged)  # type: ignore[method-assign]


def _restore(model: nn.Module) -> None:
    if any(isinstance(m, DecorrelatedLayer) for m in model.modules()):
        return
    for averaged in _averaged(model):
        if getattr(averaged.__dict__.get("update_parameters"), "_lightning_decor", False):
            del averaged.update_parameters


register_routing(Routing(_route, _restore))
