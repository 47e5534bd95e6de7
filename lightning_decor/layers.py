"""What a patched layer is: its ``R``, its form, its kind's rows and fused weight. The verbs that patch and fold
(:func:`lightning_decor.decorrelate`, :func:`lightning_decor.fold`) and the kind registry are in
:mod:`lightning_decor.patching`.

A patched layer keeps its class's parameters (the very same ``Parameter`` objects, so an existing optimizer stays
valid) and gains a non-persistent buffer ``decor_R`` (``d x d``, identity at start, at least float32). Its forward
is one ordinary ``linear``/``conv2d`` call with the fused weight ``A = W @ R``, so autograd's weight gradient is
``delta.T @ z`` with ``z = R x``: backprop on the decorrelated input. During training it also keeps a small sample
of its input rows, from which the engine (:class:`lightning_decor.Decorrelator`) moves ``R`` once per optimizer
step, in the :class:`lightning_decor.rows.RowBuffer` the engine gives it (the layer's only other state).

``state_dict()`` of a patched layer is the plain layer's: ``weight`` holds the fused ``W @ R`` under its usual key,
so checkpoints load into the unpatched model and predict the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fully_shard import get_cls_to_fsdp_cls
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_decor.functional import decorrelate_rows, fuse_weight, identity_blocks, stats_dtype
from lightning_decor.im2col import (
    conv_output_positions,
    conv_output_sizes,
    conv_patch_index,
    conv_patch_rows,
    sample_conv_patch_rows,
)
from lightning_decor.rows import RowBuffer, Sampling, kept_count

__all__ = [
    "DecorrelatedConv1d",
    "DecorrelatedConv2d",
    "DecorrelatedConv3d",
    "DecorrelatedConvNd",
    "DecorrelatedLayer",
    "DecorrelatedLinear",
    "LastDimRows",
]


def _checkpoint_recomputation() -> bool:
    """Whether this forward is ``torch.utils.checkpoint``'s recomputation during backward (``use_reentrant=False``),
    whose rows its first forward captured already.

    Told by two things torch does not expose publicly: a backward is running (the graph task id), and the innermost
    saved-tensor hooks are the checkpoint's own (marked ``_checkpoint_internal``; ``_recomputation_hook`` by name in
    older torch). The reentrant variant runs its first forward without grad (nothing captured) and recomputes without
    such hooks, so its recomputation is captured, once. Where these internals are missing the answer is ``False``
    (rows are captured twice, as before).
    """
    try:
        if torch._C._current_graph_task_id() == -1:  # outside any backward: a first forward
            return False
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):  # another torch: no way to tell
        return False
    if hooks is None:
        return False
    pack = hooks[0]
    return bool(getattr(pack, "_checkpoint_internal", False)) or "_recomputation_hook" in getattr(
        pack, "__qualname__", ""
    )


class DecorrelatedLayer(nn.Module):
    """Mixin of the patched layers, not instantiated directly: :func:`lightning_decor.decorrelate` swaps a class.

    Attributes:
        decor_R: The ``(d, d)`` decorrelation matrix, or a ``(G, b, b)`` stack of diagonal blocks (block-diagonal
            ``R``; for a grouped convolution the blocks of each group in turn). A non-persistent buffer, at least
            float32.
        decor_form: How the layer applies ``R``: ``"fused"`` (one layer call with ``W @ R``), ``"input"`` (``R`` on
            the input rows, then the plain layer) or ``"identity"`` (the plain layer: only while ``R`` is still the
            identity, e.g. before a plan is made). All three compute ``W (R x)``.
        decor_rows_once: For layers sharing one ``R`` (:mod:`lightning_decor.sharing`), the input form's ``z = x R^T``
            computed once per input for all of them; ``None``: each computes its own.
        decor_buffer: Where training forwards report (:class:`lightning_decor.rows.RowBuffer`: the rows kept for
            the next update, the planner's observer), given by the engine; ``None``: nothing is kept.
    """

    _decor_base: type[nn.Module]
    weight: Tensor
    bias: Tensor | None
    decor_R: Tensor
    decor_form: str
    decor_buffer: RowBuffer | None
    decor_rows_once: Callable[[Tensor, Tensor], Tensor] | None

    def _decor_init(self, block: int | None = None) -> None:
        self.register_buffer("decor_R", torch.empty(0), persistent=False)
        self.decor_set_layout_(block, "fused")
        self.decor_buffer = None
        self.decor_rows_once = None  # layers sharing an R (lightning_decor.sharing): z = x R^T once per input

    def _decor_input_rows(self, x: Tensor) -> Tensor:
        """``z = x R^T`` of the input form, once for the layers that share this ``R`` and read this ``x``."""
        once = self.decor_rows_once
        return decorrelate_rows(x, self.decor_R) if once is None else once(x, self.decor_R)

    def decor_unpatch_(self) -> None:
        """Back to the plain class, every ``decor_*`` attribute removed (the weight as it is: :func:`fold` writes
        ``W @ R`` into it first). A layer sharded by ``fully_shard`` after it was patched (its class FSDP's subclass
        of the patched one) gets FSDP's subclass of the plain class."""
        del self.decor_R
        for name in [n for n in vars(self) if n.startswith(("decor_", "_decor_"))]:
            del self.__dict__[name]
        base = self._decor_base
        if isinstance(self, FSDPModule) and not issubclass(base, FSDPModule):
            wrappers = get_cls_to_fsdp_cls()
            if base not in wrappers:  # as fully_shard makes it for a plain layer of this class
                wrappers[base] = type(
                    f"FSDP{base.__name__}", (FSDPModule, base), {"__deepcopy__": type(self).__deepcopy__}
                )
            base = wrappers[base]
        self.__class__ = base  # type: ignore[assignment]

    def reset_parameters(self) -> None:
        """The plain layer's initialisation, and ``R`` back to the identity: a model built on the meta device is
        materialised this way (``to_empty``, then ``reset_parameters``; Lightning's ``ModelParallelStrategy``)."""
        reset = getattr(super(), "reset_parameters", None)
        if reset is not None:
            reset()
        if "decor_R" in self._buffers:
            self.decor_reset_()

    def decor_check_layout(self, block: int | None, form: str) -> int:
        """The block size of a valid layout (``block`` features per block, ``None``: one dense block per group, in
        ``form``); raises ``ValueError`` naming what does not fit this layer."""
        d = self.decor_group_features
        b = d if block is None else block
        if form not in ("fused", "input", "identity"):
            raise ValueError(f"Expected `form` in ('fused', 'input', 'identity'), but got {form!r}.")
        if form == "input" and not self.decor_input_side:
            raise ValueError(f"Expected `form` 'fused' or 'identity' for {type(self).__name__}, but got 'input'.")
        if isinstance(b, bool) or not isinstance(b, int) or b < 1 or d % b or (d // b > 1 and b % self.decor_unit):
            raise ValueError(
                f"Expected `block` to divide d = {d} into equal blocks of whole input channels "
                f"({self.decor_unit} features each), but got {block!r}."
            )
        return b

    @torch.no_grad()
    def decor_set_layout_(self, block: int | None, form: str) -> None:
        """Give the layer an identity ``R`` of blocks of ``block`` features (``None``: one dense block per group)
        applied in ``form`` (``"fused"``, ``"input"`` or ``"identity"``). Resets ``R``: call it before ``R`` moves."""
        d, groups = self.decor_group_features, self.decor_groups
        b = self.decor_check_layout(block, form)
        g = groups * (d // b)
        self.decor_R = identity_blocks(g, b, stats_dtype(self.weight.dtype), self.weight.device)
        self.decor_form = form

    @property
    def decor_features(self) -> int:
        """``D``, the width of the rows ``R`` acts on: all input features (of every group for a grouped conv)."""
        return self.decor_group_features * self.decor_groups

    @property
    def decor_out_features(self) -> int:
        """``C_out``, the layer's output features."""
        return self.weight.shape[0]

    @property
    def decor_group_features(self) -> int:
        """``d``, the input features of one group (``in_features``, or ``C_in / groups * prod(kernel_size)``)."""
        return math.prod(self.weight.shape[1:])  # from the shape: indexing a sharded weight would gather it

    @property
    def decor_groups(self) -> int:
        """Convolution groups (1 for Linear): each group has its own ``R`` (its own run of blocks)."""
        return int(getattr(self, "groups", 1))

    @property
    def decor_unit(self) -> int:
        """Features per input channel (``prod(kernel_size)``, 1 for Linear): blocks hold whole channels."""
        return math.prod(self.weight.shape[2:])  # 1 for Linear

    @property
    def decor_input_side(self) -> bool:
        """Whether the ``"input"`` form is available (Linear, and Conv1d/2d with ``groups == 1``)."""
        return self.weight.dim() <= 4 and self.decor_groups == 1

    @property
    def decor_block_size(self) -> int:
        """Features per diagonal block of ``R`` (``d`` for a dense ``R``)."""
        return self.decor_R.shape[-1]

    @property
    def decor_block_count(self) -> int:
        """Number of diagonal blocks of ``R`` (1 for a dense ``R``)."""
        return 1 if self.decor_R.dim() == 2 else self.decor_R.shape[0]

    def _decor_keep(self, x: Tensor) -> bool:
        # Rows belong to training steps (the engine's Sampling.collect), not to `self.training`: a sub-network kept
        # in eval() during training (frozen BatchNorm statistics) still trains its weights.
        buffer = self.decor_buffer
        return buffer is not None and buffer.wanted and torch.is_grad_enabled() and x.shape[0] > 0

    def decor_row_count(self, input: Any) -> int:  # noqa: A002 (torch's name)
        """Rows the layer multiplies in this forward (``N * L``: samples times output positions)."""
        raise NotImplementedError

    def decor_drawn_count(self, input: Any, fraction: float, cap: int | None) -> int:  # noqa: A002
        """How many rows :meth:`decor_rows` takes from this forward (without drawing them): those of the first
        ``ceil(fraction * N)`` samples (for the last-dimension kinds: ``ceil(fraction * rows)`` rows over all
        leading dimensions), at most ``cap``. The one place each kind counts its rows."""
        raise NotImplementedError

    def decor_rows(self, input: Any, sampling: Sampling) -> Tensor:  # noqa: A002 (torch's name)
        """The rows ``R`` acts on in one forward of ``input`` (the module's input, as a forward hook sees it),
        detached, ``(n, decor_features)``: :meth:`decor_drawn_count` of them with ``sampling``'s fraction and cap,
        drawn with its generator. Each layer kind says how its rows are taken (patches for a convolution)."""
        raise NotImplementedError

    @torch.compiler.disable
    def _decor_capture(self, input: Any) -> None:  # noqa: A002 (torch's name)
        # Eager even inside torch.compile (one graph break): the growing list, the counters and the private
        # generator stay out of the graph and its guards, so a compiled model does not recompile as rows accumulate.
        if _checkpoint_recomputation():  # activation checkpointing: these rows were captured in the first forward
            return
        if self.decor_buffer is not None:
            self.decor_buffer.capture(self, input)

    def _apply(self, fn: Any, recurse: bool = True) -> DecorrelatedLayer:
        # Casts (`model.half()`, Lightning's "16-true"/"bf16-true") keep R in its statistics dtype: steps of
        # lr * C ~ 1e-3 vanish below the 8e-3 resolution of bfloat16 near 1. Device moves apply as usual.
        R = self._buffers.get("decor_R")
        super()._apply(fn, recurse)
        moved = self._buffers.get("decor_R")
        if R is not None and moved is not None and moved.dtype != stats_dtype(moved.dtype):
            self._buffers["decor_R"] = R.to(device=moved.device, dtype=stats_dtype(moved.dtype))
        return self

    def decor_fuse(self, weight: Tensor, R: Tensor) -> Tensor:
        """``W @ R`` for a weight of this layer's layout (a layer kind whose weight is stored otherwise, such as
        ``(in, out)``, says so here)."""
        return fuse_weight(weight, R, self.decor_groups)

    def decor_fused_weight(self) -> Tensor:
        """``A = W @ R`` in the weight's shape and dtype (differentiable in ``W``). A weight sharded by FSDP2 (a
        ``DTensor`` outside the forward) gives ``W @ R`` sharded alike."""
        weight = self.weight
        if not isinstance(weight, DTensor):
            return self.decor_fuse(weight, self.decor_R)
        placements = weight.placements
        rows_apart = type(self).decor_fuse is DecorrelatedLayer.decor_fuse and self.decor_groups == 1
        if rows_apart and all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in placements):
            # Row shards of W times R are the row shards of W @ R: no communication.
            local = self.decor_fuse(weight.to_local(), self.decor_R)
            return DTensor.from_local(local, weight.device_mesh, placements, shape=weight.shape,
                                      stride=weight.stride())  # fmt: skip
        # Another layout (groups, a transposed weight, another sharded dimension): fused whole, sharded again.
        fused = self.decor_fuse(weight.full_tensor(), self.decor_R)
        return distribute_tensor(fused, weight.device_mesh, placements, src_data_rank=None)

    def _decor_weight(self) -> Tensor:
        """The weight of the layer call: ``W @ R`` in the fused form, ``W`` itself otherwise."""
        return self.decor_fused_weight() if self.decor_form == "fused" else self.weight

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A state dict holds the fused W @ R under "weight" (see _save_to_state_dict): loading it into W means the
        # layer must restart from R = I to compute the same function. (Resuming training restores raw W and R
        # afterwards, from the callback's own state.) Only when "weight" really loads: after a failed load (e.g. a
        # size mismatch under strict=False, reported by load_state_dict after every module has loaded) W and R must
        # stay as they were, so the layer keeps its function.
        key = prefix + "weight"
        value = state_dict.get(key)
        loads = torch.overrides.is_tensor_like(value) and tuple(value.shape) == tuple(self.weight.shape)
        error_msgs: list[str] = kwargs["error_msgs"] if "error_msgs" in kwargs else args[4]
        known_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if loads and not any(f'"{key}"' in msg or f"for {key}:" in msg for msg in error_msgs[known_errors:]):
            self.decor_reset_()

    @torch.no_grad()
    def decor_reset_(self) -> None:
        """``R`` back to the identity, in place (its layout kept): the layer computes with ``W`` alone, as after
        loading a state dict whose weight holds a fused ``W @ R``."""
        eye = torch.eye(self.decor_R.shape[-1], dtype=self.decor_R.dtype, device=self.decor_R.device)
        self.decor_R.copy_(eye.expand_as(self.decor_R))

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # A plain layer's state: the fused weight under the usual key, so checkpoints load into the plain model.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        with torch.no_grad():
            destination[prefix + "weight"] = self.decor_fused_weight().detach()


class LastDimRows(DecorrelatedLayer):
    """Rows of a layer that multiplies the last dimension of its input (``nn.Linear``, Hugging Face's ``Conv1D``):
    one row per entry of the leading dimensions (samples and sequence positions alike)."""

    def decor_row_count(self, input: Tensor) -> int:  # noqa: A002 (torch's name)
        return input.numel() // input.shape[-1]

    def decor_drawn_count(self, input: Tensor, fraction: float, cap: int | None) -> int:  # noqa: A002
        kept = kept_count(fraction, self.decor_row_count(input))  # a fraction of all rows
        return kept if cap is None else min(kept, cap)

    def decor_rows(self, input: Tensor, sampling: Sampling) -> Tensor:  # noqa: A002 (torch's name)
        """Every row when the count covers them all, otherwise that many rows drawn uniformly, with replacement,
        over all leading dimensions (samples and sequence positions alike: the first rows in memory order would all
        come from the first sequences)."""
        x = input.detach()
        lead = x.shape[:-1]  # (N, T, ...): one row per entry
        total = math.prod(lead)
        keep = self.decor_drawn_count(x, sampling.fraction, sampling.max_rows)
        if keep >= total:
            return x.reshape(-1, x.shape[-1])  # (N * T, in_features)
        drawn = torch.randint(total, (keep,), device=x.device, generator=sampling.generator_on(x.device))
        # The multi-index of each drawn row by integer division with host ints (torch.unravel_index would copy the
        # shape to the device: two blocking copies per forward on a GPU); then (keep, in_features) gathered row by
        # row: O(keep * in_features), no copy of the whole activation.
        index = []
        for size in reversed(lead):
            index.append(drawn % size)
            drawn = drawn // size
        return x[tuple(reversed(index))]


class DecorrelatedLinear(LastDimRows, nn.Linear):
    """``nn.Linear`` computing with the fused weight ``W @ R``; rows are the last-dimension vectors."""

    _decor_base = nn.Linear

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name)
        if self._decor_keep(input):
            self._decor_capture(input)
        if self.decor_form == "input":
            input = self._decor_input_rows(input)  # noqa: A001 (z = x R^T, then the plain layer)
        return F.linear(input, self._decor_weight(), self.bias)


class DecorrelatedConvNd(DecorrelatedLayer):
    """Shared forward of the patched ``Conv1d``/``Conv2d``/``Conv3d``: one ordinary convolution with the fused
    weight, or (input form) the im2col patch rows times ``R^T`` times ``W^T``; rows are the patches
    (``d = C_in / groups * prod(kernel_size)`` per group, the groups side by side)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    padding_mode: str

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name)
        if self._decor_keep(input):
            self._decor_capture(input)
        x = self._decor_conv_input(input)
        if self.decor_form == "input":
            return self._decor_input_forward(x)
        return self._conv_forward(x, self._decor_layer_weight(self._decor_weight()), self.bias)  # type: ignore[attr-defined,operator]

    def _decor_conv_input(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name)
        """What the convolution itself sees of the module's input (a kind that pads in its forward pads here)."""
        return input

    def _decor_layer_weight(self, weight: Tensor) -> Tensor:
        """The convolution's weight made from ``W @ R`` (``W`` before ``R`` moves), as the plain layer makes its
        weight from ``W`` (a kind that standardises its weight does it here)."""
        return weight

    def _decor_geometry(self) -> dict[str, Any]:
        return dict(
            stride=self.stride,
            padding=self.padding if isinstance(self.padding, str) else tuple(self.padding),
            dilation=self.dilation,
            padding_mode=self.padding_mode,
        )

    def _decor_input_forward(self, x: Tensor) -> Tensor:
        # im2col, z = rows R^T, y = z W^T: cheaper than forming W @ R when the layer sees few rows (N * L < C_out).
        batched = x.dim() == self.weight.dim()
        x = x if batched else x.unsqueeze(0)  # unbatched input
        geometry = self._decor_geometry()
        rows = decorrelate_rows(conv_patch_rows(x, self.kernel_size, **geometry), self.decor_R)  # (N * L, d)
        y = F.linear(rows, self.weight.reshape(self.weight.shape[0], -1), self.bias)  # (N * L, C_out)
        sizes = conv_output_sizes(x, self.kernel_size, stride=self.stride, padding=geometry["padding"],
                                  dilation=self.dilation)  # fmt: skip
        y = y.reshape(x.shape[0], -1, y.shape[-1]).transpose(1, 2).reshape(x.shape[0], -1, *sizes)
        return y if batched else y.squeeze(0)

    def _decor_batched(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name)
        return input if input.dim() == self.weight.dim() else input.unsqueeze(0)  # unbatched input: one sample

    def _decor_positions(self, x: Tensor) -> int:
        """Output positions per sample (one patch row each) of the batched input ``x``."""
        return conv_output_positions(self._decor_conv_input(x[:1]), self.kernel_size, **self._decor_geometry())

    def decor_row_count(self, input: Tensor) -> int:  # noqa: A002 (torch's name)
        x = self._decor_batched(input)
        return x.shape[0] * self._decor_positions(x)

    def decor_drawn_count(self, input: Tensor, fraction: float, cap: int | None) -> int:  # noqa: A002
        x = self._decor_batched(input)
        kept = kept_count(fraction, x.shape[0]) * self._decor_positions(x)  # a fraction of the samples, all patches
        return kept if cap is None else min(kept, cap)

    def decor_rows(self, input: Tensor, sampling: Sampling) -> Tensor:  # noqa: A002 (torch's name)
        """The im2col patches (``d = C_in / groups * prod(kernel_size)``, the groups side by side) of the first
        ``ceil(fraction * N)`` samples; a uniform draw with replacement when the cap keeps fewer."""
        x = self._decor_batched(input)
        samples = kept_count(sampling.fraction, x.shape[0])
        n = self.decor_drawn_count(x, sampling.fraction, sampling.max_rows)
        every = n == samples * self._decor_positions(x)
        x = self._decor_conv_input(x[:samples].detach())  # samples, then pad
        geometry = self._decor_geometry()
        if not every:  # (n, d), gathered without unfolding
            plain = {k: v for k, v in geometry.items() if k != "padding_mode"}
            key = (tuple(x.shape), x.device, self.kernel_size, *plain.values())
            index = sampling.index_tables(key, lambda: conv_patch_index(tuple(x.shape), self.kernel_size,
                                                                        device=x.device, **plain))  # fmt: skip
            generator = sampling.generator_on(x.device)
            return sample_conv_patch_rows(x, n, self.kernel_size, generator=generator, index=index, **geometry)
        return conv_patch_rows(x, self.kernel_size, **geometry)  # (k * L_out, d)


class DecorrelatedConv1d(DecorrelatedConvNd, nn.Conv1d):
    """``nn.Conv1d`` computing with the fused weight ``W @ R``."""

    _decor_base = nn.Conv1d


class DecorrelatedConv2d(DecorrelatedConvNd, nn.Conv2d):
    """``nn.Conv2d`` computing with the fused weight ``W @ R``."""

    _decor_base = nn.Conv2d


class DecorrelatedConv3d(DecorrelatedConvNd, nn.Conv3d):
    """``nn.Conv3d`` computing with the fused weight ``W @ R``."""

    _decor_base = nn.Conv3d
