"""What a patched layer is: its ``R``, its form, its kind's rows and fused weight. The verbs that patch and fold
(:func:`lightning_decor.decorrelate`, :func:`lightning_decor.fold`) and the kind registry are in
:mod:`lightning_decor.patching`.

A patched layer keeps its class's parameters (the very same ``Parameter`` objects, so an existing optimizer stays
valid) and gains a non-persistent buffer ``decor_R`` (``d x d``, identity at start, at least float32). Its forward
is one ordinary ``linear``/``conv2d`` call with the fused weight ``A = W @ R``, so autograd's weight gradient is
``delta.T @ z`` with ``z = R x``: backprop on the decorrelated input. During training it also keeps a small sample
of its input rows, from which the engine (:class:`lightning_decor.Decorrelator`) moves ``R`` once per optimizer
step.

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

from lightning_decor.functional import decorrelate_rows, fuse_weight, identity_blocks, stats_dtype
from lightning_decor.rows import (
    Generators,
    conv_output_positions,
    conv_output_sizes,
    conv_patch_index,
    conv_patch_rows,
    generator_for,
    kept_count,
    sample_conv_patch_rows,
    uniform_sample_update,
)

__all__ = [
    "PENDING_FORWARDS",
    "DecorrelatedConv1d",
    "DecorrelatedConv2d",
    "DecorrelatedConv3d",
    "DecorrelatedConvNd",
    "DecorrelatedLayer",
    "DecorrelatedLinear",
    "LastDimRows",
]


# Rows of at most this many forwards' worth (of the largest one) wait per layer for an update: an accumulation window
# of up to 64 micro-batches keeps every row; beyond (steps that never reach the callback) a uniform sample is kept.
PENDING_FORWARDS = 64


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
        decor_collect: Whether training forwards keep a sample of their input rows.
        decor_observer: Called as ``decor_observer(layer, input)`` by every training forward while set (the
            planner's hook: it records what the layer sees while the plain step is measured, and is removed once
            the plan is made).
        decor_sample_fraction: Fraction of the batch's samples (images; for Linear, rows over all leading
            dimensions) kept.
        decor_max_rows: At most this many rows are kept per forward (random subset), ``None`` for all.
        decor_generator: Random generator for the row subset: a :class:`Generators` (one per device, the engine's),
            a ``torch.Generator`` on the input's device, or ``None`` (torch's global one).
    """

    _decor_base: type[nn.Module]
    weight: Tensor
    bias: Tensor | None
    decor_R: Tensor
    decor_form: str
    decor_collect: bool
    decor_observer: Callable[[DecorrelatedLayer, Any], None] | None
    decor_sample_fraction: float
    decor_max_rows: int | None
    decor_generator: torch.Generator | Generators | None
    _decor_rows: list[Tensor]
    _decor_seen: int
    _decor_largest: int

    def _decor_init(self, block: int | None = None) -> None:
        self.register_buffer("decor_R", torch.empty(0), persistent=False)
        self.decor_set_layout_(block, "fused")
        self.decor_collect = False
        self.decor_observer = None
        self.decor_sample_fraction = 1.0
        self.decor_max_rows = None
        self.decor_generator = None
        self._decor_rows = []
        self._decor_seen = 0  # rows captured since the last update (more than are kept once sampling began)
        self._decor_largest = 0  # the largest capture since the last update

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
        return self.weight[0].numel() * self.decor_groups

    @property
    def decor_out_features(self) -> int:
        """``C_out``, the layer's output features."""
        return self.weight.shape[0]

    @property
    def decor_group_features(self) -> int:
        """``d``, the input features of one group (``in_features``, or ``C_in / groups * prod(kernel_size)``)."""
        return self.weight[0].numel()

    @property
    def decor_groups(self) -> int:
        """Convolution groups (1 for Linear): each group has its own ``R`` (its own run of blocks)."""
        return int(getattr(self, "groups", 1))

    @property
    def decor_unit(self) -> int:
        """Features per input channel (``prod(kernel_size)``, 1 for Linear): blocks hold whole channels."""
        return self.weight[0, 0].numel() if self.weight.dim() > 2 else 1

    @property
    def decor_input_side(self) -> bool:
        """Whether the ``"input"`` form is available (Linear, and Conv1d/2d with ``groups == 1``)."""
        return self.weight.dim() <= 4 and self.decor_groups == 1

    @property
    def decor_block(self) -> int:
        """Features per diagonal block of ``R`` (``d`` for a dense ``R``)."""
        return self.decor_R.shape[-1]

    @property
    def decor_blocks(self) -> int:
        """Number of diagonal blocks of ``R`` (1 for a dense ``R``)."""
        return 1 if self.decor_R.dim() == 2 else self.decor_R.shape[0]

    def _decor_keep(self, x: Tensor) -> bool:
        # Rows belong to training steps (the engine sets decor_collect for them), not to `self.training`: a
        # sub-network kept in eval() during training (frozen BatchNorm statistics) still trains its weights.
        wanted = self.decor_collect or self.decor_observer is not None
        return wanted and torch.is_grad_enabled() and x.shape[0] > 0

    def decor_rows_per_forward(self, input: Tensor) -> int:  # noqa: A002 (torch's name)
        """Rows the layer multiplies in this forward (``N * L``: samples times output positions)."""
        raise NotImplementedError

    def decor_stat_rows(self, input: Tensor, rows: int) -> int:  # noqa: A002 (torch's name)
        """How many rows :meth:`decor_sample_rows` keeps from this forward of ``rows`` rows (without drawing)."""
        raise NotImplementedError

    def _decor_n_samples(self, n: int) -> int:
        return kept_count(self.decor_sample_fraction, n)

    @torch.compiler.disable
    def _decor_capture(self, input: Tensor) -> None:  # noqa: A002 (torch's name)
        # Eager even inside torch.compile (one graph break): the growing list, the counters and the private
        # generator stay out of the graph and its guards, so a compiled model does not recompile as rows accumulate.
        if _checkpoint_recomputation():  # activation checkpointing: these rows were captured in the first forward
            return
        if self.decor_observer is not None:
            self.decor_observer(self, input)
        if self.decor_collect:
            self._decor_store(self.decor_sample_rows(input))

    def _decor_store(self, rows: Tensor) -> None:
        """Keep ``rows`` for the next update; past ``PENDING_FORWARDS`` forwards' worth of rows (an optimizer that
        steps outside the callback's sight, or never), keep a uniform sample of that many of all rows instead."""
        n = rows.shape[0]
        if n == 0:  # e.g. sequences of length 0: nothing to keep (an update needs at least one row)
            return
        self._decor_largest = max(self._decor_largest, n)
        limit = PENDING_FORWARDS * self._decor_largest
        seen, pending = self._decor_seen, self.decor_pending_rows()  # seen > pending once only a sample is kept
        if seen == pending and seen + n <= limit:
            self._decor_rows.append(rows)  # the usual case: every row waits for the update
        elif seen == pending:  # the first overflow: `limit` rows drawn from all so far
            every = torch.cat([r.to(rows.dtype) for r in (*self._decor_rows, rows)])
            generator = generator_for(self.decor_generator, every.device)
            drawn = torch.randperm(every.shape[0], device=every.device, generator=generator)[:limit]
            self._decor_rows = [every[drawn]]
        else:  # a uniform sample already (seen > kept): reservoir sampling keeps it one
            (kept,) = self._decor_rows
            generator = generator_for(self.decor_generator, rows.device)
            self._decor_rows = [uniform_sample_update(kept, seen, rows, generator)]
        self._decor_seen = seen + n

    def decor_sample_rows(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name)
        """The raw input rows this layer keeps from one training forward (detached): :meth:`decor_rows` with the
        layer's ``decor_sample_fraction``, ``decor_max_rows`` and ``decor_generator``."""
        device = (input if isinstance(input, Tensor) else input[0]).device  # attention: (query, key, value)
        rows = self.decor_rows(
            input, self.decor_sample_fraction, self.decor_max_rows, generator_for(self.decor_generator, device)
        )
        # Rows that are a view of the input (every row of a Linear's input) are copied: the input may be an output of
        # a CUDA graph (`torch.compile(mode="reduce-overhead")`), overwritten by the graph's next replay before the
        # update reads it.
        return rows.clone() if rows._base is not None else rows

    def decor_rows(
        self, input: Any, fraction: float, cap: int | None, generator: torch.Generator | None  # noqa: A002
    ) -> Tensor:
        """The rows ``R`` acts on in one forward of ``input`` (the module's input, as a forward hook sees it),
        detached, ``(n, decor_features)``: those of the first ``ceil(fraction * N)`` samples (for the last-dimension
        kinds: ``ceil(fraction * rows)`` rows over all leading dimensions), at most ``cap`` of them drawn with
        ``generator``. Each layer kind says how its rows are taken (patches for a convolution)."""
        raise NotImplementedError

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
        """``A = W @ R`` in the weight's shape and dtype (differentiable in ``W``)."""
        return self.decor_fuse(self.weight, self.decor_R)

    def _decor_weight(self) -> Tensor:
        """The weight of the layer call: ``W @ R`` in the fused form, ``W`` itself otherwise."""
        return self.decor_fused_weight() if self.decor_form == "fused" else self.weight

    def decor_pending_rows(self) -> int:
        """Number of input rows kept for the next update (at most ``PENDING_FORWARDS`` forwards' worth)."""
        return sum(r.shape[0] for r in self._decor_rows)

    def decor_rows_seen(self) -> int:
        """Number of input rows captured since the last update; more than :meth:`decor_pending_rows` once so many
        waited that only a uniform sample of them is kept."""
        return self._decor_seen

    def decor_take_rows(self) -> Tensor | None:
        """Remove and return the collected rows as one ``(n, d)`` tensor, or ``None`` when there are none."""
        rows, self._decor_rows = self._decor_rows, []
        self._decor_seen = self._decor_largest = 0
        if not rows:
            return None
        return rows[0] if len(rows) == 1 else torch.cat([r.to(rows[0].dtype) for r in rows])

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

    def decor_rows_per_forward(self, input: Tensor) -> int:  # noqa: A002 (torch's name)
        return input.numel() // input.shape[-1]

    def decor_stat_rows(self, input: Tensor, rows: int) -> int:  # noqa: A002 (torch's name)
        kept = self._decor_n_samples(rows)  # a fraction of all rows
        return kept if self.decor_max_rows is None else min(kept, self.decor_max_rows)

    def decor_rows(
        self, input: Tensor, fraction: float, cap: int | None, generator: torch.Generator | None  # noqa: A002
    ) -> Tensor:
        """Every row when ``ceil(fraction * rows)`` (at most ``cap``) covers them all, otherwise that many rows
        drawn uniformly, with replacement, over all leading dimensions (samples and sequence positions alike: the
        first rows in memory order would all come from the first sequences)."""
        x = input.detach()
        lead = x.shape[:-1]  # (N, T, ...): one row per entry
        total = math.prod(lead)
        keep = kept_count(fraction, total)
        if cap is not None:
            keep = min(keep, cap)
        if keep >= total:
            return x.reshape(-1, x.shape[-1])  # (N * T, in_features)
        drawn = torch.randint(total, (keep,), device=x.device, generator=generator)
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
            input = decorrelate_rows(input, self.decor_R)  # noqa: A001 (z = x R^T, then the plain layer)
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

    def decor_rows_per_forward(self, input: Tensor) -> int:  # noqa: A002 (torch's name)
        x = self._decor_batched(input)
        positions = conv_output_positions(self._decor_conv_input(x[:1]), self.kernel_size, **self._decor_geometry())
        return x.shape[0] * positions

    def decor_stat_rows(self, input: Tensor, rows: int) -> int:  # noqa: A002 (torch's name)
        samples = self._decor_batched(input).shape[0]
        kept = self._decor_n_samples(samples) * (rows // max(samples, 1))  # a fraction of the samples, all patches
        return kept if self.decor_max_rows is None else min(kept, self.decor_max_rows)

    def decor_rows(
        self, input: Tensor, fraction: float, cap: int | None, generator: torch.Generator | None  # noqa: A002
    ) -> Tensor:
        """The im2col patches (``d = C_in / groups * prod(kernel_size)``, the groups side by side) of the first
        ``ceil(fraction * N)`` samples, at most ``cap`` of them drawn uniformly with replacement."""
        x = self._decor_batched(input)
        x = self._decor_conv_input(x[: kept_count(fraction, x.shape[0])].detach())  # samples, then pad
        geometry = self._decor_geometry()
        if cap is not None and cap < x.shape[0] * conv_output_positions(x, self.kernel_size, **geometry):
            # (cap, d), gathered without unfolding, with index tables kept for this input shape
            key = (tuple(x.shape), x.device)
            cached = self.__dict__.get("_decor_index")
            if cached is None or cached[0] != key:
                index = conv_patch_index(tuple(x.shape), self.kernel_size, device=x.device, **{
                    k: v for k, v in geometry.items() if k != "padding_mode"})  # fmt: skip
                cached = self.__dict__["_decor_index"] = (key, index)
            return sample_conv_patch_rows(x, cap, self.kernel_size, generator=generator, index=cached[1], **geometry)
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
