"""Layer kinds of Hugging Face ``transformers``: ``transformers.pytorch_utils.Conv1D`` (GPT-2, OpenAI-GPT,
ImageGPT, ...).

``Conv1D(nf, nx)`` is a linear layer whose weight is stored transposed, ``(in, out) = (nx, nf)``, and computes
``y = x @ W + b``. Decorrelated, it computes ``y = (x R^T) @ W + b = x @ (R^T W) + b``: the fused weight is
``R^T W`` (``W^T R``, transposed back), so its state_dict holds a plain ``Conv1D``'s weight and ``fold`` leaves a
plain ``Conv1D``. Its rows are those of ``nn.Linear`` (every entry of the leading dimensions).

The kind is recognised by its class's module and name, so nothing here imports ``transformers`` (slow to import,
and an optional extra): the patched class is made on first use as a subclass of the model's own ``Conv1D``.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn

from lightning_decor.functional import decorrelate_rows, fuse_weight
from lightning_decor.layers import LastDimRows, LayerExtension, _skip_reason, register_extension

__all__ = ["DecorrelatedHFConv1D", "is_hf_conv1d"]

_MODULE, _NAME = "transformers.pytorch_utils", "Conv1D"


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly a ``transformers.pytorch_utils.Conv1D`` (not a subclass, not patched)."""
    kind = type(module)
    return kind.__module__ == _MODULE and kind.__name__ == _NAME


class DecorrelatedHFConv1D(LastDimRows):
    """Hugging Face's ``Conv1D`` (weight ``(in, out)``) computing with ``R^T W``; see the module docstring."""

    weight: Tensor
    nf: int

    @property
    def decor_out_features(self) -> int:
        return self.weight.shape[1]

    @property
    def decor_group_features(self) -> int:
        return self.weight.shape[0]

    @property
    def decor_features(self) -> int:
        return self.weight.shape[0]

    @property
    def decor_unit(self) -> int:
        return 1

    @property
    def decor_input_side(self) -> bool:
        return True

    def decor_fuse(self, weight: Tensor, R: Tensor) -> Tensor:
        return fuse_weight(weight.t(), R).t()  # (out, in) @ R, back to (in, out)

    def forward(self, x: Tensor) -> Tensor:
        if self._decor_keep(x):
            self._decor_capture(x)
        if self.decor_form == "input":
            x = decorrelate_rows(x, self.decor_R)
        weight = self.decor_fused_weight() if self.decor_form == "fused" else self.weight
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), weight).view(size_out)  # as Conv1D computes


_CLASSES: dict[type[nn.Module], type[DecorrelatedHFConv1D]] = {}


def _kind(module: nn.Module) -> type[DecorrelatedHFConv1D] | None:
    if not is_hf_conv1d(module):
        return None
    base = type(module)
    if base not in _CLASSES:
        _CLASSES[base] = types.new_class(
            "DecorrelatedConv1D", (DecorrelatedHFConv1D, base), {},
            lambda ns: ns.update({"_decor_base": base, "__module__": __name__}),
        )  # fmt: skip
    return _CLASSES[base]


def _view(module: nn.Module) -> Any:
    """The ``(out, in)`` weight the block-size rules read."""
    return types.SimpleNamespace(weight=module.weight.t()) if is_hf_conv1d(module) else None


def _reasons(
    model: nn.Module, owners: dict[int, int], max_features: int | None, block_size: int | None
) -> dict[str, str | None]:
    reasons: dict[str, str | None] = {}
    for name, m in model.named_modules():
        if is_hf_conv1d(m):
            tied = owners.get(id(m.weight), 0) > 1
            reasons[name] = (
                "weight shared with another module (tied weights)"
                if tied
                else _skip_reason(m, max_features, block_size, view=_view(m))
            )
    return reasons


register_extension(
    LayerExtension(patched={}, reasons=_reasons, route=lambda model: None, restore=lambda model: None,
                   kind=_kind, view=_view)  # fmt: skip
)
