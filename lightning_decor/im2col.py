"""A convolution's im2col patch geometry: the rows ``R`` of a convolution acts on (one per output position, its
receptive field over every input channel), all of them (:func:`conv_patch_rows`) or a uniform draw
(:func:`sample_conv_patch_rows`, with index tables :func:`conv_patch_index` kept per input shape by
:class:`lightning_decor.rows.Sampling`), and the output sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "conv_output_positions",
    "conv_output_sizes",
    "conv_patch_index",
    "conv_patch_rows",
    "sample_conv_patch_rows",
]


def _pads(
    kernel_size: tuple[int, ...], dilation: tuple[int, ...], padding: tuple[int, ...] | str
) -> list[tuple[int, int]]:
    """Padding (before, after) per spatial dimension, as ``nn.Conv*d`` applies it."""
    if padding == "valid":
        return [(0, 0)] * len(kernel_size)
    if padding == "same":  # total dilation * (k - 1), the extra pixel at the end
        totals = [dil * (k - 1) for k, dil in zip(kernel_size, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    if isinstance(padding, str):
        raise ValueError(f"Expected `padding` to be a tuple of ints, 'valid' or 'same', but got {padding!r}.")
    return [(p, p) for p in padding]


def conv_patch_rows(
    x: Tensor,
    kernel_size: tuple[int, ...],
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    padding_mode: str = "zeros",
) -> Tensor:
    """The im2col patch rows a ``Conv1d``/``Conv2d``/``Conv3d`` (``groups == 1``) multiplies with its weight.

    Args:
        x: Input of shape ``(N, C_in, *spatial)`` with 1, 2 or 3 spatial dimensions.
        kernel_size, stride, dilation: As in ``nn.Conv*d`` (one entry per spatial dimension).
        padding: A tuple of ints, or ``"valid"`` / ``"same"``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        Rows of shape ``(N * L_out, C_in * prod(kernel_size))``, ordered like ``weight.reshape(C_out, -1)``,
        output positions in row-major order.
    """
    pads = _pads(kernel_size, dilation, padding)
    if x.dim() == 3:  # Conv1d as a Conv2d of height 1
        return conv_patch_rows(
            x.unsqueeze(2),
            (1, *kernel_size),
            stride=(1, *stride),
            padding=padding if isinstance(padding, str) else (0, *padding),
            dilation=(1, *dilation),
            padding_mode=padding_mode,
        )
    if x.dim() == 4:
        if any(before != after for before, after in pads) or (padding_mode != "zeros" and any(sum(p) for p in pads)):
            flat = [v for before_after in reversed(pads) for v in before_after]  # F.pad order: last dim first
            x = F.pad(x, flat, mode="constant" if padding_mode == "zeros" else padding_mode)
            pads = [(0, 0)] * 2
        cols = F.unfold(x, kernel_size, dilation=dilation, padding=[p[0] for p in pads], stride=stride)  # (N, d, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N * L, d)
    # Conv3d: gather every output position (F.unfold is 2-D only).
    sizes = _out_sizes(x, kernel_size, stride, dilation, pads)
    grid = torch.meshgrid(*[torch.arange(s, device=x.device) for s in (x.shape[0], *sizes)], indexing="ij")
    pos = torch.stack([g.reshape(-1) for g in grid], dim=1)  # (N * L, 1 + S): image, then output coordinates
    return _gather_rows(x, pos, kernel_size, stride, dilation, pads, padding_mode)


def _out_sizes(
    x: Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
    pads: list[tuple[int, int]],
) -> list[int]:  # fmt: skip
    return [
        (size + before + after - dil * (k - 1) - 1) // st + 1
        for size, k, st, dil, (before, after) in zip(x.shape[2:], kernel_size, stride, dilation, pads)
    ]


def conv_output_positions(
    x: Tensor,
    kernel_size: tuple[int, ...],
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    padding_mode: str = "zeros",
) -> int:
    """Output positions per sample of a convolution on ``x`` ``(N, C, *spatial)``: each gives one patch row."""
    return math.prod(conv_output_sizes(x, kernel_size, stride=stride, padding=padding, dilation=dilation))


def conv_output_sizes(
    x: Tensor,
    kernel_size: tuple[int, ...],
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
) -> list[int]:
    """The output's spatial sizes of a convolution on ``x`` ``(N, C, *spatial)``, as ``nn.Conv*d`` computes them."""
    return _out_sizes(x, kernel_size, stride, dilation, _pads(kernel_size, dilation, padding))


def _gather_rows(
    x: Tensor, pos: Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
    pads: list[tuple[int, int]], padding_mode: str,
) -> Tensor:  # fmt: skip
    """Rows at output positions ``pos`` (n, 1 + S) = (image, coordinates...), gathered from the unpadded ``x``."""
    dev = x.device
    feats = torch.meshgrid(
        torch.arange(x.shape[1], device=dev), *[torch.arange(k, device=dev) for k in kernel_size], indexing="ij"
    )
    feats = [f.reshape(1, -1) for f in feats]  # (1, d) each: channel, then kernel offsets, ordered like the weight
    index: list[Tensor] = [pos[:, :1], feats[0]]
    valid: Tensor | None = None
    for i, (st, dil, (before, _)) in enumerate(zip(stride, dilation, pads)):
        coord = pos[:, i + 1 : i + 2] * st - before + feats[i + 1] * dil  # (n, d), in the padded frame
        src, ok = _source_index(coord, x.shape[i + 2], padding_mode)
        index.append(src)
        if ok is not None:
            valid = ok if valid is None else valid & ok
    rows = x[tuple(index)]  # (n, d)
    return rows if valid is None else rows * valid


def _source_index(pos: Tensor, size: int, padding_mode: str) -> tuple[Tensor, Tensor | None]:
    """Map coordinates in the padded input to the unpadded one; returns the index and, for zeros, a validity mask."""
    if padding_mode == "zeros":
        valid = (pos >= 0) & (pos < size)
        return pos.clamp(0, size - 1), valid
    if padding_mode == "replicate":
        return pos.clamp(0, size - 1), None
    if padding_mode == "circular":
        return pos.remainder(size), None
    if padding_mode == "reflect":
        period = 2 * (size - 1) if size > 1 else 1
        pos = pos.remainder(period)
        return torch.where(pos >= size, period - pos, pos), None
    raise ValueError(
        f"Expected `padding_mode` in ('zeros', 'reflect', 'replicate', 'circular'), but got {padding_mode!r}."
    )


def conv_patch_index(
    shape: tuple[int, ...],
    kernel_size: tuple[int, ...],
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    device: torch.device | None = None,
) -> tuple[list[tuple[int, int]], Tensor, Tensor, int]:
    """Flat-index tables for gathering patch rows from the padded input, computed once per input shape.

    Args:
        shape: The input's shape ``(N, C_in, *spatial)``.
        kernel_size, stride, padding, dilation: As in ``nn.Conv*d``.
        device: Where the tables live.

    Returns:
        ``(pads, start, offsets, image)``: the padding (before, after) per spatial dimension; ``start`` ``(L,)``, the
        flat offset of each output position's first patch element within one padded image; ``offsets`` ``(d,)``,
        each patch feature's offset from there (channel, then kernel offsets, ordered like the weight); ``image``,
        the size of one padded image. Patch row ``(i, l)`` is ``padded.flatten()[i * image + start[l] + offsets]``.
    """
    pads = _pads(kernel_size, dilation, padding)
    spatial = [size + before + after for size, (before, after) in zip(shape[2:], pads)]
    strides = [math.prod(spatial[i + 1 :]) for i in range(len(spatial))]  # row-major strides of a padded image
    outs = [(size - dil * (k - 1) - 1) // st + 1 for size, k, st, dil in zip(spatial, kernel_size, stride, dilation)]
    grid = torch.meshgrid(*[torch.arange(o, device=device) * st * sd for o, st, sd in zip(outs, stride, strides)],
                          indexing="ij")  # fmt: skip
    start = sum(g.reshape(-1) for g in grid)  # (L,)
    feats = torch.meshgrid(
        torch.arange(shape[1], device=device) * math.prod(spatial),
        *[torch.arange(k, device=device) * dil * sd for k, dil, sd in zip(kernel_size, dilation, strides)],
        indexing="ij",
    )
    offsets = sum(f.reshape(-1) for f in feats)  # (d,)
    return pads, start, offsets, shape[1] * math.prod(spatial)  # type: ignore[return-value]


def sample_conv_patch_rows(
    x: Tensor,
    n: int,
    kernel_size: tuple[int, ...],
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    padding_mode: str = "zeros",
    generator: torch.Generator | None = None,
    index: tuple[list[tuple[int, int]], Tensor, Tensor, int] | None = None,
) -> Tensor:
    """``n`` patch rows drawn uniformly (with replacement) from all rows of :func:`conv_patch_rows`, without
    unfolding: one flat gather from the padded input, ``O(n d)`` work instead of ``O(N L d)``, in a handful of
    kernels.

    Args:
        x: Input of shape ``(N, C_in, *spatial)`` with 1, 2 or 3 spatial dimensions.
        n: Number of rows to draw.
        kernel_size, stride, padding, dilation, padding_mode: As in ``nn.Conv*d`` (``groups == 1``).
        generator: Random generator on ``x``'s device (``None``: torch's global one).
        index: :func:`conv_patch_index` of ``x``'s shape, when the caller keeps it (computed here otherwise).

    Returns:
        Rows of shape ``(n, C_in * prod(kernel_size))``.
    """
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        _source_index(x, 1, padding_mode)  # raises the error naming the mode
    if index is None:
        index = conv_patch_index(
            tuple(x.shape), kernel_size, stride=stride, padding=padding, dilation=dilation, device=x.device
        )
    pads, start, offsets, image = index
    flat = [v for before_after in reversed(pads) for v in before_after]  # F.pad order: last dimension first
    if any(flat):
        x = F.pad(x, flat, mode="constant" if padding_mode == "zeros" else padding_mode)
    positions = start.numel()
    pos = torch.randint(x.shape[0] * positions, (n,), device=x.device, generator=generator)  # (image, position)
    first = torch.div(pos, positions, rounding_mode="floor") * image + start[pos % positions]  # (n,)
    return x.reshape(-1)[first[:, None] + offsets[None, :]]  # (n, d)
