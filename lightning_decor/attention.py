"""Attention and transformer modules: projections whose weights PyTorch reads directly, and fused fast paths.

``nn.MultiheadAttention`` (torchvision's ViT, ``nn.Transformer``, ``nn.TransformerEncoderLayer``) does not call
layers for its projections: ``F.multi_head_attention_forward`` and the fused fast paths read the packed
``in_proj_weight`` and ``out_proj.weight`` themselves. Following Carrigg et al. (https://arxiv.org/abs/2510.14657),
who decorrelate every linear projection of a ViT, both are decorrelated here:

- :class:`DecorrelatedMultiheadAttention` (the attention module itself, class-swapped): the packed in-projection
  ``(3E, E)`` computes with ``[W_q R_q; W_k R_k; W_v R_v]``, one ``R`` per input (query, key, value), each moved
  from the rows of its own input, stored as one ``(3, E, E)`` stack (``(3 G, b, b)`` with ``block_size``). In
  self-attention the three inputs are one tensor, so the three ``R`` see the same rows and stay equal; in
  cross-attention (``nn.Transformer``'s decoder) the query's ``R`` follows the query and the key/value ``R`` the
  memory. Separate q/k/v weights (``kdim``/``vdim != embed_dim``) are not decorrelated.
- :class:`DecorrelatedOutProj` (``out_proj``, a ``Linear`` subclass that MHA never calls): an ordinary patched
  ``Linear``; the attention module calls it on the attention output when it samples rows, and passes its fused
  weight to PyTorch's attention otherwise. An attention module whose ``out_proj`` alone is patched becomes an
  :class:`AttentionWithDecorrelatedOutProj` for the same reason.

A patched attention module always computes through ``F.multi_head_attention_forward`` (PyTorch's slow path, any
``need_weights``, ``batch_first``, masks, self- or cross-attention), with the fused weights. ``state_dict()`` holds
the fused weights under the usual keys (``in_proj_weight``, ``out_proj.weight``), so checkpoints load into the plain
model, and :func:`lightning_decor.fold` leaves plain ``nn.MultiheadAttention`` modules with their fast path.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_decor.layers import DecorrelatedLayer, DecorrelatedLinear
from lightning_decor.patching import LayerKind, Routing, register_kind, register_routing
from lightning_decor.rows import Sampling, kept_count

__all__ = [
    "AttentionWithDecorrelatedOutProj",
    "DecorrelatedMultiheadAttention",
    "DecorrelatedOutProj",
    "SlowPathTransformerEncoderLayer",
    "restore_containers",
    "route_containers",
]


def _attention_forward(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
    in_proj_weight: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` on PyTorch's slow path, with ``in_proj_weight`` as the packed in-projection
    and the (patched) ``out_proj``'s fused weight."""
    if query.is_nested or key.is_nested or value.is_nested:
        raise ValueError(
            "Expected dense `query`, `key` and `value`: a decorrelated nn.MultiheadAttention computes on PyTorch's "
            f"slow path, which takes no nested tensors, but got is_nested={query.is_nested}, {key.is_nested}, "
            f"{value.is_nested}. Fold the model (lightning_decor.fold) for the fast path."
        )
    out_proj = mha.out_proj
    explicit = isinstance(out_proj, DecorrelatedLayer) and out_proj._decor_keep(query)
    if explicit:  # the attention output is out_proj's input row sample: an identity here, out_proj called below
        out_weight: Tensor = torch.eye(mha.embed_dim, dtype=out_proj.weight.dtype, device=out_proj.weight.device)
        out_bias = None
    elif isinstance(out_proj, DecorrelatedLayer):  # any form computes W (R x) = (W R) x: pass the fused weight
        identity = out_proj.decor_form == "identity"  # R = I before a plan: the plain weight, at the plain cost
        out_weight = out_proj.weight if identity else out_proj.decor_fused_weight()
        out_bias = out_proj.bias
    else:
        out_weight, out_bias = out_proj.weight, out_proj.bias
    batched = query.dim() == 3
    if mha.batch_first and batched:  # (N, L, E) -> (L, N, E), keeping `is` (self-attention projects once)
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query,
        key,
        value,
        mha.embed_dim,
        mha.num_heads,
        in_proj_weight,
        mha.in_proj_bias,
        mha.bias_k,
        mha.bias_v,
        mha.add_zero_attn,
        mha.dropout,
        out_weight,
        out_bias,
        training=mha.training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        use_separate_proj_weight=not mha._qkv_same_embed_dim,
        q_proj_weight=mha.q_proj_weight,
        k_proj_weight=mha.k_proj_weight,
        v_proj_weight=mha.v_proj_weight,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    if explicit:
        out = out_proj(out)  # its own forward: samples its input rows, computes with W @ R
    return (out.transpose(1, 0) if mha.batch_first and batched else out), weights


class DecorrelatedMultiheadAttention(DecorrelatedLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose packed in-projection computes with ``W_p @ R_p`` for ``p`` in query, key,
    value (see the module docstring). Swapped in by :func:`lightning_decor.decorrelate` for attention modules with a
    packed ``in_proj_weight``.

    For the callback it is one patched layer: :attr:`weight` is the raw ``in_proj_weight``, ``decor_R`` the
    ``(3 G, b, b)`` stack (the query's blocks, then the key's, then the value's) and a row sample is ``(n, 3 E)``,
    ``n`` rows of the query, of the key and of the value side by side, so the block-diagonal update moves each
    ``R_p`` from its own input.
    """

    _decor_base = nn.MultiheadAttention

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """The raw packed in-projection weight ``in_proj_weight`` ``(3 E, E)``, which ``R`` multiplies."""
        return self.in_proj_weight

    @property
    def decor_groups(self) -> int:
        """Three inputs (query, key, value), each with its own ``R``: like a grouped layer of three groups, so the
        fused weight is ``[W_q R_q; W_k R_k; W_v R_v]`` and a row sample ``(n, 3 E)`` moves each ``R`` from its own
        input (``decor_features`` is ``3 E``)."""
        return 3

    def decor_row_count(self, input: Any) -> int:  # noqa: A002 (the base's name)
        return max(t.numel() // t.shape[-1] for t in input)  # rows of the longest of query, key and value

    def decor_drawn_count(self, input: Any, fraction: float, cap: int | None) -> int:  # noqa: A002
        n = min(kept_count(fraction, t.numel() // t.shape[-1]) for t in input)  # the same n from each input
        return n if cap is None else min(n, cap)

    def decor_rows(self, input: Any, sampling: Sampling) -> Tensor:  # noqa: A002 (the base's name)
        """``(n, 3 E)``: ``n`` rows drawn uniformly from each of ``input = (query, key, value)`` (one draw per
        distinct tensor, so self-attention gives three equal parts), ``n`` the smaller of ``ceil(fraction * rows)``
        over the inputs, at most the cap. All rows, in order, when that is every row of each input."""
        tensors = [t.detach() for t in input]
        rows = [t.reshape(-1, t.shape[-1]) for t in tensors]  # (L * N, E) in either layout
        n = self.decor_drawn_count(tensors, sampling.fraction, sampling.max_rows)
        generator = sampling.generator_on(rows[0].device)
        drawn: dict[int, Tensor] = {}
        for t, r in zip(input, rows):
            if id(t) not in drawn:
                if n == r.shape[0]:
                    drawn[id(t)] = r
                else:
                    idx = torch.randint(r.shape[0], (n,), device=r.device, generator=generator)
                    drawn[id(t)] = r.index_select(0, idx)
        return torch.cat([drawn[id(t)] for t in input], dim=1)  # a copy: the activations are not kept alive

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if self._decor_keep(query):
            self._decor_capture((query, key, value))  # type: ignore[arg-type]
        return _attention_forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
            self._decor_weight(),  # W @ R, or W itself while R is the identity (before a plan is made)
        )  # fmt: skip

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # The plain module's state, with the fused in-projection under its usual key.
        super(DecorrelatedLayer, self)._save_to_state_dict(destination, prefix, keep_vars)
        with torch.no_grad():
            destination[prefix + "in_proj_weight"] = self.decor_fused_weight().detach()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, missing_keys: list[str],
        unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        # The state holds the fused in-projection: once it is loaded into W, R restarts from the identity.
        key, errors = prefix + "in_proj_weight", len(error_msgs)
        super(DecorrelatedLayer, self)._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in state_dict and not any(key in message for message in error_msgs[errors:]):
            self.decor_reset_()


class DecorrelatedOutProj(DecorrelatedLinear, NonDynamicallyQuantizableLinear):
    """Attention's ``out_proj`` (``NonDynamicallyQuantizableLinear``), patched like any ``nn.Linear``; its attention
    module calls it (or reads its fused weight), see :func:`_attention_forward`."""

    _decor_base = NonDynamicallyQuantizableLinear


class AttentionWithDecorrelatedOutProj(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose ``out_proj`` alone is patched (its in-projection is plain: separate q/k/v
    weights, frozen, or left out by ``include``/``exclude``): the output projection computes with ``W @ R``."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        return _attention_forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
            self.in_proj_weight,
        )  # fmt: skip


def _separate_projections(module: nn.Module) -> str | None:
    assert isinstance(module, nn.MultiheadAttention)
    if not module._qkv_same_embed_dim:
        return "separate q/k/v projection weights (kdim or vdim != embed_dim) are not decorrelated"
    return None


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
    """After patching: send every ``nn.TransformerEncoderLayer`` holding a patched layer through its slow path, turn
    off the nested-tensor conversion of the ``nn.TransformerEncoder`` around it, and let attention modules whose
    ``out_proj`` alone is patched use its fused weight. Idempotent."""
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
        elif type(m) is nn.MultiheadAttention and isinstance(m.out_proj, DecorrelatedLayer):
            m.__class__ = AttentionWithDecorrelatedOutProj
        elif isinstance(m, nn.TransformerEncoder) and m.use_nested_tensor and _holds_patched(m):
            m.__dict__["_decor_use_nested_tensor"] = True  # restored by fold
            m.use_nested_tensor = False


def restore_containers(model: nn.Module) -> None:
    """After folding: give the containers that no longer hold a patched layer their plain class and settings."""
    for m in model.modules():
        if type(m) is SlowPathTransformerEncoderLayer and not _holds_patched(m):
            m.__class__ = nn.TransformerEncoderLayer  # type: ignore[assignment]
        elif type(m) is AttentionWithDecorrelatedOutProj and not _holds_patched(m):
            m.__class__ = nn.MultiheadAttention  # type: ignore[assignment]
        elif isinstance(m, nn.TransformerEncoder) and not _holds_patched(m):
            if "_decor_use_nested_tensor" in m.__dict__:
                m.use_nested_tensor = m.__dict__.pop("_decor_use_nested_tensor")


# The packed in-projection (named by the attention module; the checks of a Linear with in_features = E on the
# packed weight), and out_proj (a Linear subclass that only marks it as not dynamically quantizable).
register_kind(LayerKind(
    lambda module: type(module) in (nn.MultiheadAttention, AttentionWithDecorrelatedOutProj),
    lambda module: DecorrelatedMultiheadAttention, weight="in_proj_weight", reason=_separate_projections,
))  # fmt: skip
register_kind(LayerKind(
    lambda module: type(module) is NonDynamicallyQuantizableLinear, lambda module: DecorrelatedOutProj
))  # fmt: skip
register_routing(Routing(route_containers, restore_containers))
