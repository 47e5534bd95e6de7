"""Layer kinds of ``timm`` whose forward is a plain convolution on a changed padding or weight, handled exactly.

- ``timm.layers.Conv2dSame`` (TensorFlow's "same" padding, as in ``tf_efficientnet``) pads its input by a size
  computed from the input (``timm.layers.padding.pad_same``), then runs a convolution without padding. Decorrelated,
  it pads the same way and runs the patched convolution, whose rows are the padded input's patches.
- ``StdConv2d`` / ``StdConv2dSame`` (weight standardisation, BiT's ``resnetv2``, the hybrid ViTs) and
  ``ScaledStdConv2d`` / ``ScaledStdConv2dSame`` (NFNets) make their convolution's weight from the parameter: each
  output channel's weights standardised to zero mean and unit variance (then scaled by ``gain * scale``).
  Decorrelated, they make it the same way from the fused ``A = W @ R``: the layer computes ``std(W R) * x``, so
  ``W`` trains through ``A = W R`` exactly as a plain convolution's does (its gradient is ``dL/dA R^T``), and the
  rows ``R`` decorrelates are the patches the convolution multiplies. ``state_dict`` holds ``A``, which the plain
  layer standardises the same way: checkpoints load into the unpatched model and :func:`lightning_decor.fold`
  leaves a plain ``StdConv2d`` computing the same function. Only the fused form exists for them: ``R`` on the input
  rows with the standardised ``W`` would compute ``std(W) R x``, another function.

Every other subclass of the conv and linear layers stays plain, and :func:`lightning_decor.patching.eligible_layers`
names its class. The kinds are recognised by their classes' modules and names, so nothing here imports ``timm`` (an
optional extra) until a model holds one of its layers.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_decor.layers import DecorrelatedConvNd
from lightning_decor.patching import LayerKind, patched_subclass, register_kind

__all__ = ["is_timm_layer"]

_SAME, _STANDARDISED = ("Conv2dSame",), ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def is_timm_layer(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether ``module``'s class is exactly one of ``timm.layers``' classes called ``names`` (not patched)."""
    kind = type(module)
    return kind.__name__ in names and kind.__module__.startswith("timm.layers")


class _TimmConv(DecorrelatedConvNd):
    """Pads as timm's "same" layers do (always for ``Conv2dSame``, where ``same_pad`` is set for the others), then
    computes and samples rows as a patched convolution; standardises the fused weight as the standardised layers
    standardise theirs."""

    kernel_size: tuple[int, int]
    out_channels: int

    eps: float
    scale: float

    @property
    def _decor_standardised(self) -> bool:
        return self._decor_base.__name__ in _STANDARDISED

    def _decor_conv_input(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name)
        if self._decor_base.__name__ in _SAME or getattr(self, "same_pad", False):
            from timm.layers.padding import pad_same  # timm is there: the model holds one of its layers

            return pad_same(input, self.kernel_size, self.stride, self.dilation)
        return input

    def _decor_layer_weight(self, weight: Tensor) -> Tensor:
        if not self._decor_standardised:  # Conv2dSame: the weight as it is
            return weight
        gain = getattr(self, "gain", None)  # ScaledStdConv2d: gain * scale, as timm applies them
        return F.batch_norm(
            weight.reshape(1, self.out_channels, -1), None, None,
            weight=None if gain is None else (gain * self.scale).view(-1),
            training=True, momentum=0.0, eps=self.eps,
        ).reshape_as(weight)  # fmt: skip

    @property
    def decor_input_side(self) -> bool:
        return not self._decor_standardised and super().decor_input_side  # standardised: the fused form only


register_kind(LayerKind(
    lambda module: is_timm_layer(module, _SAME + _STANDARDISED),
    lambda module: patched_subclass(_TimmConv, type(module), f"Decorrelated{type(module).__name__}"),
))  # fmt: skip
