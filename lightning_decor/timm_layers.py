"""Layer kinds of ``timm``: ``timm.layers.Conv2dSame`` (TensorFlow's "same" padding, as in ``tf_efficientnet``).

``Conv2dSame`` pads its input by a size computed from the input (``timm.layers.padding.pad_same``) and then runs a
plain convolution without padding: decorrelated, it pads the same way and runs the patched convolution, whose rows
are then the padded input's patches, exactly. Other subclasses of the conv and linear layers stay plain, named with
the reason (for ``StdConv2d``, whose forward standardises its weight first, a fused ``W @ R`` saved in a checkpoint
would be standardised again by the plain module, so no checkpoint of it could load into the plain model).

The kind is recognised by its class's module and name, so nothing here imports ``timm`` (an optional extra).
"""

from __future__ import annotations

import types

from torch import Tensor, nn

from lightning_decor.layers import LayerExtension, _DecorrelatedConvNd, register_extension

__all__ = ["is_conv2d_same"]


def is_conv2d_same(module: nn.Module) -> bool:
    """Whether ``module`` is exactly a ``timm.layers`` ``Conv2dSame`` (not patched)."""
    kind = type(module)
    return kind.__name__ == "Conv2dSame" and kind.__module__.startswith("timm.layers")


class _SamePadded(_DecorrelatedConvNd):
    """Pads as ``Conv2dSame`` does, then computes (and samples rows) as a patched convolution without padding."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name)
        from timm.layers.padding import pad_same  # timm is there: the model holds one of its layers

        return super().forward(pad_same(input, self.kernel_size, self.stride, self.dilation))


_CLASSES: dict[type[nn.Module], type[_DecorrelatedConvNd]] = {}


def _kind(module: nn.Module) -> type[_DecorrelatedConvNd] | None:
    if not is_conv2d_same(module):
        return None
    base = type(module)
    if base not in _CLASSES:
        _CLASSES[base] = types.new_class(
            "DecorrelatedConv2dSame", (_SamePadded, base), {},
            lambda ns: ns.update({"_decor_base": base, "__module__": __name__}),
        )  # fmt: skip
    return _CLASSES[base]


def _reasons(
    model: nn.Module, owners: dict[int, int], max_features: int | None, block_size: int | None
) -> dict[str, str | None]:
    from lightning_decor.layers import _skip_reason

    reasons: dict[str, str | None] = {}
    for name, m in model.named_modules():
        if is_conv2d_same(m):
            tied = owners.get(id(m.weight), 0) > 1
            reasons[name] = "weight shared with another module (tied weights)" if tied else _skip_reason(
                m, max_features, block_size
            )
    return reasons


register_extension(
    LayerExtension(patched={}, reasons=_reasons, route=lambda model: None, restore=lambda model: None, kind=_kind)
)
