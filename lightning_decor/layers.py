"""Patched layers and the verbs on a model: :func:`decorrelate`, :func:`fold`, :func:`decorrelation_matrices`.

A patched layer keeps its class's parameters (the very same ``Parameter`` objects, so an existing optimizer stays
valid) and gains a non-persistent buffer ``decor_R`` (``d x d``, identity at start, at least float32). Its forward
is one ordinary ``linear``/``conv2d`` call with the fused weight ``A = W @ R``, so autograd's weight gradient is
``delta.T @ z`` with ``z = R x``: backprop on the decorrelated input. During training it also keeps a small sample
of its input rows, from which :meth:`DecorrelatedLayer.decor_update_` moves ``R`` once per optimizer step.

``state_dict()`` of a patched layer is the plain layer's: ``weight`` holds the fused ``W @ R`` under its usual key,
so checkpoints load into the unpatched model and predict the same.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_decor.functional import (
    conv_patch_rows,
    fuse_weight,
    guarded_decorrelation_update_,
    sample_conv_patch_rows,
    stats_dtype,
)

__all__ = [
    "DecorrelatedConv2d",
    "DecorrelatedLayer",
    "DecorrelatedLinear",
    "decorrelate",
    "decorrelated_layers",
    "decorrelation_matrices",
    "eligible_layers",
    "fold",
]


class DecorrelatedLayer(nn.Module):
    """Mixin of the patched layers. Not instantiated directly: :func:`decorrelate` swaps a layer's class.

    Attributes:
        decor_R: The ``(d, d)`` decorrelation matrix (non-persistent buffer, at least float32).
        decor_collect: Whether training forwards keep a sample of their input rows.
        decor_sample_fraction: Fraction of the batch's samples (images, or rows for Linear) kept.
        decor_max_rows: At most this many rows are kept per forward (random subset), ``None`` for all.
        decor_generator: Random generator for the row subset (``None``: torch's global one).
    """

    _decor_base: type[nn.Module]
    weight: Tensor
    bias: Tensor | None
    decor_R: Tensor
    decor_collect: bool
    decor_sample_fraction: float
    decor_max_rows: int | None
    decor_generator: torch.Generator | None
    _decor_rows: list[Tensor]

    def _decor_init(self) -> None:
        d = self.weight[0].numel()  # in_features, or C_in/groups * k_h * k_w
        eye = torch.eye(d, device=self.weight.device, dtype=stats_dtype(self.weight.dtype))
        self.register_buffer("decor_R", eye, persistent=False)
        self.decor_collect = False
        self.decor_sample_fraction = 1.0
        self.decor_max_rows = None
        self.decor_generator = None
        self._decor_rows = []

    @property
    def decor_features(self) -> int:
        """``d``, the side of ``R``."""
        return self.decor_R.shape[0]

    def _decor_keep(self, x: Tensor) -> bool:
        return self.decor_collect and self.training and torch.is_grad_enabled() and x.shape[0] > 0

    def _decor_n_samples(self, n: int) -> int:
        return max(1, math.ceil(self.decor_sample_fraction * n))

    def _decor_store(self, rows: Tensor) -> None:
        rows = rows.detach()
        cap = self.decor_max_rows
        if cap is not None and rows.shape[0] > cap:
            idx = torch.randint(rows.shape[0], (cap,), device=rows.device, generator=self.decor_generator)
            rows = rows.index_select(0, idx)
        self._decor_rows.append(rows)

    def decor_fused_weight(self) -> Tensor:
        """``A = W @ R`` in the weight's shape and dtype (differentiable in ``W``)."""
        return fuse_weight(self.weight, self.decor_R)

    def decor_pending_rows(self) -> int:
        """Number of input rows collected since the last update."""
        return sum(r.shape[0] for r in self._decor_rows)

    def decor_take_rows(self) -> Tensor | None:
        """Remove and return the collected rows as one ``(n, d)`` tensor, or ``None`` when there are none."""
        rows, self._decor_rows = self._decor_rows, []
        if not rows:
            return None
        return rows[0] if len(rows) == 1 else torch.cat([r.to(rows[0].dtype) for r in rows])

    def decor_update_(self, rows: Tensor, *, lr: float, kappa: float) -> tuple[Tensor, Tensor]:
        """One decorrelation step of ``decor_R`` from raw input ``rows``; a non-finite result is discarded.

        Returns:
            ``(loss, ok)``: the decorrelation loss before the step and a boolean scalar tensor that is ``False``
            when the step was skipped (``R`` unchanged; see
            :func:`lightning_decor.functional.guarded_decorrelation_update_`). Neither is read on the host here,
            so the update never synchronises the device.
        """
        return guarded_decorrelation_update_(self.decor_R, rows, lr=lr, kappa=kappa)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # A plain layer's state: the fused weight under the usual key, so checkpoints load into the plain model.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        with torch.no_grad():
            destination[prefix + "weight"] = self.decor_fused_weight().detach()


class DecorrelatedLinear(DecorrelatedLayer, nn.Linear):
    """``nn.Linear`` computing with the fused weight ``W @ R``; rows are the last-dimension vectors."""

    _decor_base = nn.Linear

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name)
        if self._decor_keep(input):
            rows = input.reshape(-1, input.shape[-1])  # (N * T, in_features)
            self._decor_store(rows[: self._decor_n_samples(rows.shape[0])])
        return F.linear(input, self.decor_fused_weight(), self.bias)


class DecorrelatedConv2d(DecorrelatedLayer, nn.Conv2d):
    """``nn.Conv2d`` (``groups == 1``) computing with the fused weight; rows are the im2col patches."""

    _decor_base = nn.Conv2d

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name)
        if self._decor_keep(input):
            x = input if input.dim() == 4 else input.unsqueeze(0)
            x = x[: self._decor_n_samples(x.shape[0])].detach()  # images, before any unfold
            geometry: dict[str, Any] = dict(
                stride=self.stride,
                padding=self.padding if isinstance(self.padding, str) else tuple(self.padding),
                dilation=self.dilation,
                padding_mode=self.padding_mode,
            )
            cap = self.decor_max_rows
            if cap is not None and cap < x.shape[0] * x.shape[2] * x.shape[3]:  # fewer rows than patches (for stride 1)
                rows = sample_conv_patch_rows(x, cap, self.kernel_size, generator=self.decor_generator, **geometry)
                self._decor_rows.append(rows)  # (cap, C_in * kh * kw), gathered without unfolding
            else:
                self._decor_store(conv_patch_rows(x, self.kernel_size, **geometry))  # (k * H_out * W_out, d)
        return self._conv_forward(input, self.decor_fused_weight(), self.bias)


_PATCHED: dict[type[nn.Module], type[DecorrelatedLayer]] = {
    nn.Linear: DecorrelatedLinear,
    nn.Conv2d: DecorrelatedConv2d,
}


def _matches(name: str, patterns: Sequence[str]) -> bool:
    # A pattern matches a qualified name by glob, or any module below a matching prefix ("layer4" -> "layer4.0.conv1").
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p.rstrip(".") + ".") for p in patterns)


def _check_patterns(arg: str, patterns: Sequence[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"Expected `{arg}` to be a list of name patterns (str), but got {patterns!r}.")
    return list(patterns)


def _skip_reason(module: nn.Module) -> str | None:
    """Why an eligible-type layer is not patched, or ``None``."""
    if not module.weight.requires_grad:
        return "frozen (weight.requires_grad is False)"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped convolution (groups={module.groups}) is not decorrelated"
    return None


def eligible_layers(model: nn.Module) -> dict[str, str | None]:
    """Qualified names of every ``nn.Linear``/``nn.Conv2d`` (exact type) mapped to why it would be skipped.

    ``None`` means the layer would be patched. Subclasses (such as ``nn.MultiheadAttention.out_proj``, whose weight
    is read directly rather than through ``forward``) are not eligible.
    """
    return {name: _skip_reason(m) for name, m in model.named_modules() if type(m) in _PATCHED}


def decorrelate(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Patch, in place, every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` for decorrelated backpropagation.

    Only exact types are patched (``type(m) is nn.Linear``), so subclasses such as attention's ``out_proj`` stay
    plain. Grouped convolutions and frozen layers are skipped. Layers already patched are left as they are, so
    calling this twice is harmless. The parameters are kept (same objects), ``R`` starts as the identity on the
    weight's device, and outputs are unchanged until ``R`` moves.

    Args:
        model: The model to patch.
        include: Glob patterns on qualified module names (``"features.*"``; a plain prefix such as ``"layer4"``
            also matches the modules below it). ``None`` includes every eligible layer.
        exclude: Patterns of layers to leave plain, applied after ``include``.

    Returns:
        The qualified names of the layers patched by this call.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> decorrelate(net, exclude=["2"])
        ['0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    inc = _check_patterns("include", include)
    exc = _check_patterns("exclude", exclude)
    patched: list[str] = []
    for name, reason in eligible_layers(model).items():
        if reason is not None or (inc is not None and not _matches(name, inc)) or (exc and _matches(name, exc)):
            continue
        module = model.get_submodule(name)
        module.__class__ = _PATCHED[type(module)]  # the class swap torch.nn.utils.parametrize also uses
        module._decor_init()  # type: ignore[operator]
        patched.append(name)
    return patched


def decorrelated_layers(model: nn.Module) -> dict[str, DecorrelatedLayer]:
    """The patched layers of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DecorrelatedLayer)}


def decorrelation_matrices(model: nn.Module) -> dict[str, Tensor]:
    """The live ``R`` tensors of ``model``'s patched layers by qualified name (no copies)."""
    return {name: m.decor_R for name, m in decorrelated_layers(model).items()}


@torch.no_grad()
def fold(model: nn.Module) -> list[str]:
    """Turn every patched layer back into its plain class with weight ``W @ R``; eval outputs are unchanged.

    The weight ``Parameter`` objects are kept (their values become the fused weights). A no-op on a plain model.

    Returns:
        The qualified names of the layers folded.
    """
    folded = []
    for name, m in decorrelated_layers(model).items():
        m.weight.copy_(m.decor_fused_weight())
        del m.decor_R
        for attr in ("decor_collect", "decor_sample_fraction", "decor_max_rows", "decor_generator", "_decor_rows"):
            m.__dict__.pop(attr, None)
        m.__class__ = m._decor_base
        folded.append(name)
    return folded
