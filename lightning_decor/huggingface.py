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

import torch
from torch import Tensor, nn

from lightning_decor.functional import fuse_weight
from lightning_decor.layers import LastDimRows
from lightning_decor.patching import LayerKind, patched_subclass, register_kind

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
            x = self._decor_input_rows(x)
        weight = self.decor_fused_weight() if self.decor_form == "fused" else self.weight
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), weight).view(size_out)  # as Conv1D computes


register_kind(LayerKind(
    is_hf_conv1d,
    lambda module: patched_subclass(DecorrelatedHFConv1D, type(module), "DecorrelatedConv1D"), transposed=True,
))  # fmt: skip
