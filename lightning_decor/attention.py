"""Transformer modules whose fused fast paths read weights directly, bypassing the patched layers' ``W @ R``.

In eval mode without autograd (``torch.no_grad``/``torch.inference_mode``, so validation and inference) PyTorch's
``nn.TransformerEncoderLayer`` computes the whole layer in one fused kernel that reads ``linear1.weight``,
``linear2.weight`` and the attention's projection weights itself, instead of calling the submodules; a patched
layer there would compute with its raw ``W``. :func:`lightning_decor.decorrelate` therefore routes every encoder
layer holding a patched layer through PyTorch's own slow path (its submodules' forwards), and turns off the nested
tensor conversion of the ``nn.TransformerEncoder`` around it (the slow path takes no nested tensors).
:func:`lightning_decor.fold` restores both, so a folded model has PyTorch's fast path again.
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from lightning_decor.layers import DecorrelatedLayer

__all__ = ["SlowPathTransformerEncoderLayer", "restore_containers", "route_containers"]


def _holds_patched(module: nn.Module) -> bool:
    return any(isinstance(m, DecorrelatedLayer) for m in module.modules())


class SlowPathTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that always computes through its submodules' forwards.

    This is PyTorch's own slow path (what the layer computes in training), taken in eval too, so that patched
    ``linear1``/``linear2`` and attention compute with ``W @ R``. :func:`lightning_decor.decorrelate` swaps it in
    for encoder layers that hold a patched layer; :func:`lightning_decor.fold` swaps the plain class back.
    """

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        # The masks are checked and converted by the attention itself, as on PyTorch's slow path.
        x = src
        if self.norm_first:
            x = x + self._decor_self_attention(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._decor_feed_forward(self.norm2(x))
        else:
            x = self.norm1(x + self._decor_self_attention(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._decor_feed_forward(x))
        return x

    def _decor_self_attention(
        self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        out = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False, is_causal=is_causal
        )[0]
        return self.dropout1(out)

    def _decor_feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


def route_containers(model: nn.Module) -> None:
    """After patching: send every ``nn.TransformerEncoderLayer`` holding a patched layer through its slow path and
    turn off the nested-tensor conversion of the ``nn.TransformerEncoder`` around it. Idempotent."""
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoderLayer) and type(m) is not SlowPathTransformerEncoderLayer:
            if not _holds_patched(m):
                continue
            if type(m) is nn.TransformerEncoderLayer:
                m.__class__ = SlowPathTransformerEncoderLayer
            else:  # a subclass may have a forward of its own: it is left alone
                warnings.warn(
                    f"{name!r} ({type(m).__name__}) subclasses nn.TransformerEncoderLayer: if its forward takes "
                    "PyTorch's fast path (eval mode without autograd), that path reads the raw weights and bypasses "
                    "W @ R.",
                    stacklevel=3,
                )
        elif isinstance(m, nn.TransformerEncoder) and m.use_nested_tensor and _holds_patched(m):
            m._decor_use_nested_tensor = True  # restored by fold
            m.use_nested_tensor = False


def restore_containers(model: nn.Module) -> None:
    """After folding: give the containers that no longer hold a patched layer their plain class and settings."""
    for m in model.modules():
        if type(m) is SlowPathTransformerEncoderLayer and not _holds_patched(m):
            m.__class__ = nn.TransformerEncoderLayer
        elif isinstance(m, nn.TransformerEncoder) and not _holds_patched(m):
            if "_decor_use_nested_tensor" in m.__dict__:
                m.use_nested_tensor = m.__dict__.pop("_decor_use_nested_tensor")
