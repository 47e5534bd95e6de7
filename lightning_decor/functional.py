"""Pure tensor math of decorrelated backpropagation (DBP).

Everything here is a plain function on tensors: no modules, no state, no Lightning. Reading this file alone
gives the whole algorithm of Dalm, Offergeld, Ahmad & van Gerven, *Efficient Deep Learning with Decorrelated
Backpropagation* (https://arxiv.org/abs/2405.02385).

Notation (rows convention): ``x`` is an ``(n, d)`` matrix of a layer's raw input rows, ``R`` the ``(d, d)``
decorrelation matrix, ``z = x @ R.T`` the decorrelated rows, ``C = z.T @ z / n`` their second moments (no mean
removal, as the authors) and ``c = diag(C)``. The update moves ``R`` towards making ``C`` diagonal
(``kappa = 0``), the identity (``kappa = 0.5`` up to a factor) or unit-diagonal (``kappa = 1``)::

    R <- R - lr * [(1 - kappa) * (C - diag(c)) + kappa * diag(c - 1)] @ R
    L  = [(1 - kappa) * sum_{i != j} C_ij^2 + kappa * sum_i (c_i - 1)^2] / d^2
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "abs_correlation",
    "conv_output_positions",
    "conv_output_sizes",
    "conv_patch_index",
    "conv_patch_rows",
    "correlation_picture",
    "dense_matrix",
    "NORMALIZE",
    "block_decorrelation_step",
    "decorrelate_rows",
    "decorrelation_loss",
    "decorrelation_update_",
    "float32_matmul",
    "fuse_weight",
    "matmul_precision",
    "segment_sum",
    "guarded_decorrelation_update_",
    "identity_blocks",
    "off_diagonal",
    "sample_conv_patch_rows",
    "stats_dtype",
]


def _matmul_backends() -> list[object]:
    """The per-backend float32 matmul settings of this torch (``torch.backends.cuda.matmul``, ``...mkldnn.matmul``:
    ``fp32_precision``), or none on a torch before them."""
    found = [getattr(torch.backends.cuda, "matmul", None), getattr(getattr(torch.backends, "mkldnn", None), "matmul",
                                                                    None)]  # fmt: skip
    return [b for b in found if b is not None and hasattr(b, "fp32_precision")]


def matmul_precision() -> str:
    """How float32 matrix products are computed now, e.g. ``"cuda=tf32 mkldnn=none"`` (part of the plan cache's key:
    it changes the cost of the fused weight). Read per backend: ``torch.get_float32_matmul_precision()`` raises once
    a backend's ``fp32_precision`` was set."""
    backends = _matmul_backends()
    if not backends:
        return torch.get_float32_matmul_precision()
    return " ".join(f"{n}={b.fp32_precision}" for n, b in zip(("cuda", "mkldnn"), backends))  # type: ignore[attr-defined]


@contextlib.contextmanager
def float32_matmul() -> Iterator[None]:
    """Float32 matrix products in full float32 (IEEE) within the block, whatever ``torch.set_float32_matmul_precision``
    or ``torch.backends.*.matmul.fp32_precision`` say (Lightning recommends ``"high"``, TF32 on NVIDIA GPUs since
    Ampere: a 10-bit mantissa, about 1e-3 relative, the size of one step of the rule). The statistics and steps of
    the rule run in it; the fused weight ``W @ R`` takes the user's setting, like the layer's own product. The
    setting is the process's (torch has no per-thread one), restored on exit."""
    backends = _matmul_backends()
    if not backends:  # a torch before the per-backend settings
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    saved = [b.fp32_precision for b in backends]  # type: ignore[attr-defined]
    try:
        for b in backends:
            b.fp32_precision = "ieee"  # type: ignore[attr-defined]
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value  # type: ignore[attr-defined]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rows(name: str, rows: Tensor) -> None:
    if not isinstance(rows, Tensor) or rows.dim() != 2:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ValueError(f"Expected `{name}` to be a 2-D tensor of rows (n, d), but got {shape}.")
    if rows.shape[0] == 0:
        raise ValueError(f"Expected `{name}` to have at least one row, but got shape {tuple(rows.shape)}.")


def _check_kappa(kappa: float) -> None:
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)):
        raise TypeError(f"Expected `kappa` to be a float, but got {type(kappa).__name__}: {kappa!r}.")
    if not 0.0 <= kappa <= 1.0:  # also rejects NaN
        raise ValueError(f"Expected `kappa` in [0, 1], but got {kappa!r}.")


def identity_blocks(blocks: int, b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An identity ``R``: the ``(b, b)`` identity for one block, else a ``(blocks, b, b)`` stack of them."""
    eye = torch.eye(b, dtype=dtype, device=device)
    return eye if blocks == 1 else eye.expand(blocks, b, b).clone()


def _blocks(R: Tensor) -> Tensor:
    """``R`` as a stack of diagonal blocks ``(G, b, b)``: a dense ``(d, d)`` matrix is one block."""
    return R if R.dim() == 3 else R.unsqueeze(0)


def _frobenius_sq(gram_or_cov: Tensor) -> Tensor:
    """``||C||_F^2`` of each block ``(G,)`` from ``z z^T`` or ``C`` (``||z z^T||_F = ||z^T z||_F``): one dot product
    per block, no squared copy of the matrix."""
    flat = gram_or_cov.flatten(1)
    return torch.linalg.vecdot(flat, flat)


def _block_losses(c: Tensor, kappa: float, fro_sq: Tensor) -> Tensor:
    """Loss of each block ``(G,)`` from ``c`` (G, b), the diagonal of ``C``, and ``fro_sq`` (G,), ``||C||_F^2``."""
    b = c.shape[1]
    # sum_{i != j} C_ij^2: a difference of two sums of squares, so it is clamped at 0 against rounding
    off_sq = (fro_sq - c.square().sum(1)).clamp_min(0.0)
    return ((1.0 - kappa) * off_sq + kappa * (c - 1.0).square().sum(1)) / (b * b)


NORMALIZE = ("none", "trace", "spectral", "layer")
"""How the step is normalised: ``"none"`` is the authors' rule; ``"trace"`` divides it by the mean of ``diag C``;
``"spectral"`` by ``||C||_F^2 / tr C`` of each block; ``"layer"`` by that of the whole layer's input, estimated
from pairs of rows (see :func:`block_decorrelation_step`)."""
LAYER_ROWS = 64  # rows per layer for the "layer" divisor's estimate from pairs of rows
MIN_DIVISOR = 10.0
"""The normalised step's divisor counts as at least this: a step is never larger than ``lr / 10``, which at the
default ``decor_lr=3e-2`` is the authors' own 3e-3. Blocks whose input has ``||C||_F^2 / tr C`` below 10 (small
blocks, little or weakly correlated energy) take the authors' step; wider and more correlated ones a smaller one."""


def _step_sizes(
    lr: float, c: Tensor, fro_sq: Tensor, normalize: str, layer: Tensor | None = None
) -> float | Tensor:
    """The step size of each block: ``lr`` (``"none"``), else ``lr`` divided by the block's normaliser ``(G,)``,
    at least :data:`MIN_DIVISOR`. Without a floor an input of little energy (a nearly dead channel:
    ``diag C ~ 1e-6``) would get a step a million times ``lr``, and the unit-variance term, which does not shrink
    with the input's scale, would multiply its ``R`` by that much in one step; and small blocks, whose divisor is
    near 1, would take steps ten times the authors' (the tuning suite's ResNet-18 lost accuracy to that)."""
    if normalize == "none":
        return lr
    trace = c.sum(1)
    if normalize == "layer":
        assert layer is not None
        # a layer without a usable estimate (fewer than 2 rows) falls back to its block's own divisor
        norm = torch.where(torch.isfinite(layer), layer, fro_sq / trace)
    else:
        norm = trace / c.shape[1] if normalize == "trace" else fro_sq / trace
    return lr / torch.where(trace > 0, norm, 1.0).clamp_min(MIN_DIVISOR)


def segment_sum(values: Tensor, segment: Tensor, segments: int) -> Tensor:
    """``out[s] = sum of values[g] over g with segment[g] == s``, ``(segments, ...)`` for ``values`` ``(G, ...)``;
    NaN where a summed value is not finite (in that segment only). One product with a 0/1 matrix, summed in a fixed
    order (``index_add_`` on a GPU adds with atomics, in an order that changes from run to run); call it in full
    float32 (:func:`float32_matmul`)."""
    onehot = (segment[None, :] == torch.arange(segments, device=segment.device)[:, None]).to(values.dtype)
    flat = values.reshape(values.shape[0], -1)
    finite = torch.isfinite(flat)
    sums = onehot @ torch.where(finite, flat, 0.0)  # 0 * NaN would be NaN in every segment
    poisoned = onehot @ (~finite).to(values.dtype)
    return torch.where(poisoned > 0, math.nan, sums).reshape(segments, *values.shape[1:])


def _layer_divisors(
    z: Tensor, inv: float | Tensor, counts: Tensor | None, segment: Tensor | None, layers: int
) -> Tensor:
    """Each block's layer's ``||C||_F^2 / tr C`` ``(G,)``, from pairs of its first :data:`LAYER_ROWS` real rows:
    ``mean_{i != j} (z_i . z_j)^2 / mean_i |z_i|^2`` over the whole layer's decorrelated rows (an unbiased estimate
    of ``||C||_F^2`` over one of ``tr C``; the Gram of the layer is the sum of its blocks' Grams). NaN where a layer
    has fewer than 2 rows or no energy. ``z`` are the rows scaled by ``inv`` (:func:`_row_scale`)."""
    g, n = z.shape[0], z.shape[1]
    m = min(n, LAYER_ROWS)
    zm = z[:, :m] / inv  # back to the rows' own scale (inv is equal for all blocks of a layer)
    gram = torch.bmm(zm, zm.transpose(1, 2))  # (G, m, m)
    seg = torch.zeros(g, dtype=torch.long, device=z.device) if segment is None else segment
    full = segment_sum(gram, seg, layers)  # (L, m, m)
    k = torch.full((g,), m, device=z.device) if counts is None else counts.clamp_max(m)
    k = torch.zeros(layers, dtype=k.dtype, device=z.device).scatter_(0, seg, k)  # a layer's blocks share counts
    real = torch.arange(m, device=z.device)[None, :] < k[:, None]  # (L, m)
    pairs = real[:, :, None] & real[:, None, :]
    diag = torch.diagonal(full, dim1=1, dim2=2)
    eye = torch.eye(m, dtype=torch.bool, device=z.device)
    kf = k.to(gram.dtype)
    off = torch.where(pairs & ~eye, full.square(), 0.0).sum((1, 2)) / (kf * (kf - 1)).clamp_min(1.0)
    trace = torch.where(real, diag, 0.0).sum(1) / kf.clamp_min(1.0)
    ratio = torch.where((k >= 2) & (trace > 0), off / trace, math.nan)
    return ratio[seg]


def _second_moments(z: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(c, gram_or_cov, through_rows)`` of scaled rows ``z`` (G, n, b): through the ``n x n`` Gram when ``n < b``."""
    n, b = z.shape[1], z.shape[2]
    if n < b:
        return z.square().sum(1), torch.bmm(z, z.transpose(1, 2)), True  # diag(C) (G, b); Gram (G, n, n)
    C = torch.bmm(z.transpose(1, 2), z)  # (G, b, b)
    return torch.diagonal(C, dim1=1, dim2=2), C, False


def _row_scale(n: int, counts: Tensor | None, dtype: torch.dtype) -> float | Tensor:
    """``1 / sqrt(n_g)`` for rows ``(G, n, b)``, so that ``z^T z`` of the scaled rows is ``C``: a number when all
    ``n`` rows are real (``counts=None``), else ``(G, 1, 1)`` from each block's number of real rows ``counts``
    (G,) (the rest are zero padding)."""
    if counts is None:
        return 1.0 / math.sqrt(n)
    return counts.clamp_min(1).to(dtype).rsqrt()[:, None, None]


def _scaled(z: Tensor, counts: Tensor | None) -> Tensor:
    """Rows ``z`` (G, n, b) divided by ``sqrt(n_g)`` (:func:`_row_scale`), so that ``z^T z`` is ``C``."""
    return z * _row_scale(z.shape[1], counts, z.dtype)


def decorrelation_loss(z: Tensor, kappa: float, *, blocks: int = 1) -> Tensor:
    """Decorrelation loss of decorrelated rows ``z`` (n, d), computed in at least float32.

    ``L = [(1 - kappa) * sum_{i != j} C_ij^2 + kappa * sum_i (C_ii - 1)^2] / d^2`` with ``C = z.T @ z / n``.
    When ``n < d`` the off-diagonal sum is taken through the ``n x n`` Gram matrix
    (``sum_ij C_ij^2 = ||z z^T||_F^2 / n^2``), so no ``d x d`` matrix is formed.

    Args:
        z: Decorrelated input rows, shape ``(n, d)``.
        kappa: Weight of the unit-variance term, in ``[0, 1]``.
        blocks: For a block-diagonal ``R`` with this many equal blocks: only correlations within each block of
            ``d / blocks`` consecutive features count, and the loss is the mean of the blocks' losses (with ``b``
            in place of ``d``).

    Returns:
        A scalar tensor (float32, or float64 for float64 input).

    Example:
        >>> decorrelation_loss(torch.eye(3) * 3 ** 0.5, kappa=0.0)
        tensor(0.)
    """
    _check_rows("z", z)
    _check_kappa(kappa)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1 or z.shape[1] % blocks:
        raise ValueError(f"Expected `blocks` to be a positive divisor of d = {z.shape[1]}, but got {blocks!r}.")
    n, d = z.shape
    zg = _scaled(z.to(stats_dtype(z.dtype)).reshape(n, blocks, d // blocks).transpose(0, 1), None)  # (G, n, b)
    c, m, _ = _second_moments(zg)
    return _block_losses(c, kappa, _frobenius_sq(m)).mean()


def _check_normalize(normalize: str) -> None:
    if not isinstance(normalize, str) or normalize not in NORMALIZE:
        raise ValueError(f"Expected `normalize` in {NORMALIZE}, but got {normalize!r}.")


def _check_update_args(R: Tensor, x: Tensor, lr: float, kappa: float, normalize: str) -> None:
    _check_rows("x", x)
    _check_kappa(kappa)
    _check_normalize(normalize)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"Expected `lr` to be a float, but got {type(lr).__name__}: {lr!r}.")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"Expected `lr` to be a finite number > 0, but got {lr!r}.")
    blocks = _blocks(R) if R.dim() in (2, 3) else R
    if R.dim() not in (2, 3) or blocks.shape[1] != blocks.shape[2] or blocks.shape[0] * blocks.shape[1] != x.shape[1]:
        raise ValueError(
            f"Expected `R` of shape (d, d) or (G, d / G, d / G) with d = x.shape[1] = {x.shape[1]}, "
            f"but got {tuple(R.shape)}."
        )


def block_decorrelation_step(
    R: Tensor,
    x: Tensor,
    counts: Tensor | None,
    *,
    lr: float,
    kappa: float,
    normalize: str = "none",
    segment: Tensor | None = None,
    layers: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the rule for a stack of ``G`` independent diagonal blocks, out of place, without a host sync.

    This is the batched core that every update goes through: the blocks of one block-diagonal ``R``, the groups of
    a grouped convolution and the ``R`` of several layers with blocks of equal size all move in the same few
    batched matrix products. Call it with autocast off and tensors in the statistics dtype.

    Args:
        R: The blocks, ``(G, b, b)``.
        x: Raw input rows per block, ``(G, n, b)``; rows past ``counts[g]`` must be zero (padding).
        counts: ``(G,)`` number of real rows of each block (``None``: all ``n``). A block with no rows keeps
            its ``R`` and reports a NaN loss.
        lr: The decorrelation learning rate.
        kappa: Weight of the unit-variance term.
        normalize: ``"none"``: the authors' rule, step ``lr``. ``"trace"``: step ``lr / mean(diag C)``.
            ``"spectral"``: step ``lr / (||C||_F^2 / tr C)``; ``||C||_F^2 / tr C = sum(l^2) / sum(l)`` over the
            eigenvalues ``l`` of ``C`` is their mean weighted by themselves, between the mean and the largest
            eigenvalue, and 1 at ``C = I``. The rule is stable for ``lr * l_max << 1``; dividing by this
            normaliser makes the step nearly independent of the input's scale, width and correlation, at no extra
            cost (both sums are computed for the loss anyway). Each block has its own; the fixed point is the same.
            A divisor below :data:`MIN_DIVISOR` (10) counts as 10: no step is larger than ``lr / 10`` (at the
            default ``lr`` of the callback, 3e-2, the authors' 3e-3).
            ``"layer"``: step ``lr / (||C||_F^2 / tr C)`` of the block's whole *layer* (what a dense ``R`` would
            divide by, whatever the blocks: the cross-block correlations count), estimated from pairs of the
            layer's first :data:`LAYER_ROWS` rows at ``2 m^2 d`` flops; a layer with fewer than 2 rows uses its
            block's own divisor. In every mode a feature with ``c_i = 0`` keeps its row (see
            :func:`decorrelation_update_`).
        segment: ``(G,)`` the layer (``0 .. layers - 1``) of each block, for ``"layer"``; ``None``: one layer.
        layers: The number of layers in ``segment``.

    Returns:
        ``(new, loss, ok)``: the new blocks ``(G, b, b)`` (equal to ``R`` where a block does not move), each block's
        loss before the step ``(G,)``, and ``ok`` ``(G,)``: ``False`` where the statistics or the new block are
        non-finite (the block keeps its ``R``).
    """
    with float32_matmul():  # the statistics in full float32, also where TF32 is allowed
        return _block_step(R, x, counts, lr, kappa, normalize, segment, layers)


def _block_step(
    R: Tensor, x: Tensor, counts: Tensor | None, lr: float, kappa: float, normalize: str, segment: Tensor | None,
    layers: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    n, b = x.shape[1], x.shape[2]
    # z = x R^T / sqrt(n_g), so that C = z^T z; the scale goes on the smaller operand (R when b <= n).
    inv = _row_scale(n, counts, x.dtype)
    z = torch.bmm(x, (R * inv).transpose(1, 2)) if b <= n else torch.bmm(x, R.transpose(1, 2)) * inv
    c, m, through_rows = _second_moments(z)
    fro_sq = _frobenius_sq(m)
    loss = _block_losses(c, kappa, fro_sq)
    layer = _layer_divisors(z, inv, counts, segment, layers) if normalize == "layer" else None
    step = _step_sizes(lr, c, fro_sq, normalize, layer)  # lr, or (G,) per block
    per_block = isinstance(step, Tensor)
    eta = step[:, None] if per_block else step
    # G @ R = (1 - kappa) * (C - diag c) @ R + kappa * diag(c - 1) @ R = (1 - kappa) * C @ R + diag(s) @ R
    # with s = kappa * (c - 1) - (1 - kappa) * c; so R_new = diag(1 - lr * s) @ R - lr * (1 - kappa) * C @ R.
    scale = 1.0 - eta * (kappa * (c - 1.0) - (1.0 - kappa) * c)  # (G, b)
    ok = torch.isfinite(loss)  # non-finite statistics contribute nothing (masks, not branches: no host sync)
    moves = ok if counts is None else ok & (counts > 0)
    # A feature with no variance in the sample (c_i = 0: an always-zero input such as a dead ReLU channel or a
    # padding-only tap of a small feature map) keeps its row: the rule would multiply it by (1 + eta * kappa)
    # every step, without bound, and z_i = 0 whatever its row (the loss's gradient there is 0).
    scale = torch.where(moves[:, None] & (c > 0), scale, 1.0)
    # A block without rows has z = 0 (zero padding), so its product term is zero and it keeps R; a block with
    # non-finite statistics is replaced by its R below: z and C need no masking (bmm keeps blocks apart).
    new = R * scale[:, :, None]
    # C @ R through the rows, z^T @ (z @ R): 4 n b^2 flops per block, no b x b x b product
    left, right = (z.transpose(1, 2), torch.bmm(z, R)) if through_rows else (m, R)
    if per_block:  # each block's own step on the smaller factor
        new.baddbmm_(left, right * (-(1.0 - kappa) * step)[:, None, None])
    else:
        new.baddbmm_(left, right, alpha=-step * (1.0 - kappa))
    ok = ok & torch.isfinite(new.sum((1, 2)))  # one reduction per block instead of an elementwise check
    new = torch.where(ok[:, None, None], new, R)
    if counts is not None:
        loss = torch.where(counts > 0, loss, math.nan)
    return new, loss, ok


NULL_EPS = 1e-4
"""The soft threshold of :func:`reset_null_space`, relative to the mean eigenvalue of the input's ``C_x``."""


@torch.no_grad()
def reset_null_space(R: Tensor, x: Tensor, counts: Tensor | None, *, eps: float = NULL_EPS) -> Tensor:
    """Put the part of each block ``R`` that acts on the null space of its input back to the identity's, out of place.

    The rule multiplies the whole ``R`` from the left, also its part on directions the input never takes. When the
    input is rank-deficient (exact copies of features: a grayscale image fed as three equal RGB channels; linear
    dependencies), unit variance cannot be reached there, and that part grows as ``(1 + lr * kappa)`` per step
    without bound: ``z = R x`` does not change in exact arithmetic, but after a few thousand steps ``R`` holds
    entries of 1e6 and more that cancel on the data, and float32 rounding then ruins ``z`` and the fused weight.

    With ``C_x = x^T x / n`` of the raw rows and ``e = eps * tr(C_x) / b``, the soft projector onto the input's
    range is ``P = C_x (C_x + e I)^-1``, and the result is ``R P + (I - P) = R - (R - I) e (C_x + e I)^-1``:
    directions with variance well above ``e`` keep ``R`` (``z`` changes by a relative ``e / (l + e)`` along an
    eigenvalue ``l``), the null space gets the identity. Computed in float64 (a Cholesky factorisation per block).
    A block with fewer real rows than features (its sample cannot tell the null space), without energy, or whose
    factorisation fails, keeps its ``R``.

    Args:
        R: The blocks, ``(G, b, b)``.
        x: Raw input rows per block, ``(G, n, b)``; rows past ``counts[g]`` must be zero.
        counts: ``(G,)`` real rows of each block (``None``: all ``n``).
        eps: The threshold relative to the mean eigenvalue of ``C_x``, > 0.

    Returns:
        The new blocks ``(G, b, b)`` in ``R``'s dtype.
    """
    if not (isinstance(eps, float) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"Expected `eps` to be a finite float > 0, but got {eps!r}.")
    n, b = x.shape[1], x.shape[2]
    xd = x.double()  # float64: no TF32 here
    rows = torch.full((x.shape[0],), n, device=x.device) if counts is None else counts
    C = torch.bmm(xd.transpose(1, 2), xd) / rows.clamp_min(1).double()[:, None, None]
    e = eps * torch.diagonal(C, dim1=1, dim2=2).sum(1) / b  # (G,)
    eye = torch.eye(b, dtype=torch.float64, device=x.device)
    L, info = torch.linalg.cholesky_ex(C + torch.where(e > 0, e, 1.0)[:, None, None] * eye)
    # e (C_x + e I)^-1 = e L^-T L^-1 by two triangular solves: no error check, so no host sync (a batched
    # cholesky_solve reads its status back to the host); a failed factorisation is caught by `info` below.
    half = torch.linalg.solve_triangular(L, e[:, None, None] * eye.expand_as(C), upper=False)
    inv = torch.linalg.solve_triangular(L.transpose(1, 2), half, upper=True)
    Rd = R.double()
    new = Rd - torch.bmm(Rd - eye, inv)
    ok = (info == 0) & (rows >= b) & (e > 0) & torch.isfinite(new.sum((1, 2)))
    return torch.where(ok[:, None, None], new, Rd).to(R.dtype)


def _updated(R: Tensor, x: Tensor, lr: float, kappa: float, normalize: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(R_new, loss, ok)`` in the statistics dtype for one ``R`` (dense, or a stack of equal diagonal blocks each
    updated from its own ``b = d / G`` input features); ``ok`` is ``False`` when any block's step was non-finite."""
    dtype = stats_dtype(R.dtype)
    r = _blocks(R).to(dtype)  # (G, b, b)
    g, b = r.shape[0], r.shape[1]
    xg = x.to(device=R.device, dtype=dtype).reshape(x.shape[0], g, b).transpose(0, 1)  # (G, n, b)
    new, loss, ok = block_decorrelation_step(r, xg, None, lr=lr, kappa=kappa, normalize=normalize)
    ok = ok.all()
    return torch.where(ok, new, r).reshape(R.shape), loss.mean(), ok


@torch.no_grad()
def decorrelation_update_(R: Tensor, x: Tensor, *, lr: float, kappa: float, normalize: str = "none") -> Tensor:
    """Update ``R`` in place by one step of the decorrelation rule and return the loss before the step.

    With ``z = x @ R.T`` and ``C = z.T @ z / n``::

        R <- R - lr * [(1 - kappa) * (C - diag(c)) + kappa * diag(c - 1)] @ R

    except that a feature with no variance in the rows (``c_i = 0``: an always-zero input, such as a dead ReLU
    channel or a tap that only ever sees padding) keeps its row of ``R``: the rule would multiply that row by
    ``1 + lr * kappa`` at every step, without bound, while ``z_i`` stays 0 (the loss's gradient in that row is 0).
    On a rank-deficient input the same growth happens along the input's null space; a loop of many steps should
    call :func:`reset_null_space` now and then, as the engine does every 20 updates.

    The statistics are computed in ``R``'s dtype promoted to at least float32, with autocast off. When
    ``n < d`` the product ``C @ R`` is formed through the rows, ``z.T @ (z @ R) / n`` (``4 n d^2`` instead of
    ``2 n d^2 + 2 d^3`` flops); otherwise ``C`` is formed explicitly. A step with non-finite statistics or result
    leaves ``R`` unchanged (:func:`guarded_decorrelation_update_` also reports it).

    Args:
        R: The ``(d, d)`` decorrelation matrix (or a ``(G, b, b)`` stack of diagonal blocks), updated in place.
        x: Raw input rows ``(n, d)`` of the layer (any floating dtype).
        lr: The decorrelation learning rate ``eta`` (> 0).
        kappa: Weight of the unit-variance term, in ``[0, 1]``.
        normalize: ``"none"`` (default): the rule above, exactly. ``"trace"`` or ``"spectral"``: ``lr`` divided by
            ``mean(diag C)`` or by ``||C||_F^2 / tr C`` (each block its own; see
            :func:`block_decorrelation_step`).

    Returns:
        The decorrelation loss of ``z = x @ R.T`` before the update (a scalar tensor; see
        :func:`decorrelation_loss`).

    Example:
        >>> R = torch.eye(4)
        >>> loss = decorrelation_update_(R, torch.randn(64, 4) @ torch.randn(4, 4), lr=1e-2, kappa=0.5)
    """
    return guarded_decorrelation_update_(R, x, lr=lr, kappa=kappa, normalize=normalize)[0]


@torch.no_grad()
def guarded_decorrelation_update_(
    R: Tensor, x: Tensor, *, lr: float, kappa: float, normalize: str = "none"
) -> tuple[Tensor, Tensor]:
    """:func:`decorrelation_update_` that never writes a non-finite value into ``R``, without a host sync.

    The step is skipped (``R`` kept) when the statistics of ``x`` are non-finite (NaN/Inf input) or when the
    new ``R`` would hold a non-finite value (a diverging ``lr``).

    Returns:
        ``(loss, ok)``: the loss before the step and a boolean scalar tensor, ``False`` when the step was skipped.
    """
    _check_update_args(R, x, lr, kappa, normalize)
    with torch.autocast(R.device.type, enabled=False):
        new, loss, ok = _updated(R, x, lr, kappa, normalize)
        R.copy_(new)  # `new` is R wherever the step was skipped
    return loss, ok


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


def fuse_weight(weight: Tensor, R: Tensor, groups: int = 1) -> Tensor:
    """The fused weight ``A = W @ R`` with ``W`` reshaped to ``(C_out, d)``; same shape and dtype as ``weight``.

    A block-diagonal ``R`` given as ``(G, b, b)`` multiplies each run of ``b`` consecutive input features
    (``2 C_out d b`` flops instead of ``2 C_out d^2``). For a grouped convolution (``groups > 1``, ``weight`` of shape
    ``(C_out, C_in / groups, *kernel)``) ``R`` holds ``groups`` runs of ``G / groups`` blocks, one run per group,
    and the output channels of group ``g`` meet only that group's blocks. Autograd through ``A`` gives
    ``dL/dW = dL/dA @ R.T = delta.T @ z``: backprop on the decorrelated input.

    The product is formed in ``R``'s dtype (at least float32) with autocast off and rounded to the weight's dtype
    once: ``R`` moves in steps near bfloat16's resolution at 1 (2^-8), and a bfloat16 product of the rounded ``W``
    and ``R`` missed ``W @ R`` by 1.3-1.8 times the error of one rounding (BENCHMARKS.md, section 6).
    """
    c_out = weight.shape[0]
    with torch.autocast(weight.device.type, enabled=False):
        w = weight.to(R.dtype)
        if R.dim() == 2 and groups == 1:
            fused = (w.reshape(c_out, -1) @ R).reshape(weight.shape)  # (C_out, d) @ (d, d)
        else:
            blocks = _blocks(R)
            per_group, b = blocks.shape[0] // groups, blocks.shape[1]
            # (groups, C_out / groups, blocks per group, b) -> (G, C_out / groups, b): each block meets its
            # group's rows
            w4 = w.reshape(groups, c_out // groups, per_group, b).transpose(1, 2).reshape(-1, c_out // groups, b)
            fused = torch.bmm(w4, blocks)
            fused = fused.reshape(groups, per_group, c_out // groups, b).transpose(1, 2).reshape(weight.shape)
        fused = fused.to(weight.dtype)
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        fused = fused.contiguous(memory_format=torch.channels_last)
    return fused


def decorrelate_rows(x: Tensor, R: Tensor) -> Tensor:
    """``z = x @ R.T`` on the last dimension of ``x`` (``(..., d)``), for a dense ``(d, d)`` or a block-diagonal
    ``(G, b, b)`` ``R``, in ``x``'s dtype and differentiable in ``x``: the input-side form of DBP, cheaper than
    fusing ``W @ R`` when a layer sees fewer rows per step than it has output features. Formed in ``R``'s dtype
    with autocast off and rounded to ``x``'s dtype once, as :func:`fuse_weight`."""
    with torch.autocast(x.device.type, enabled=False):
        xr = x.to(R.dtype)
        if R.dim() == 2:
            return F.linear(xr, R).to(x.dtype)
        g, b = R.shape[0], R.shape[1]
        xg = xr.reshape(-1, g, b).transpose(0, 1)  # (G, rows, b)
        return torch.bmm(xg, R.transpose(1, 2)).transpose(0, 1).reshape(x.shape).to(x.dtype)


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


# Pictures and summaries for monitoring (TensorBoard): still pure tensor functions.
_PICTURE_SIDE = 256  # larger matrices are average-pooled to this side, so pictures stay small in the event file


def abs_correlation(rows: Tensor) -> Tensor:
    """``|C_ij| / sqrt(C_ii * C_jj)`` for ``C = rows.T @ rows / n``: the normalised second moments that DBP drives
    towards a diagonal (no mean removal, as in the update). A feature that is always zero gets a zero row."""
    c = rows.T @ rows / rows.shape[0]  # (d, d)
    s = c.diagonal().clamp_min(torch.finfo(c.dtype).tiny).sqrt()
    return (c / s[:, None] / s[None, :]).abs().clamp_(max=1.0)


def dense_matrix(R: Tensor) -> Tensor:
    """``R`` as one ``(d, d)`` matrix (a stack of diagonal blocks ``(G, b, b)`` becomes block-diagonal)."""
    return R if R.dim() == 2 else torch.block_diag(*R.unbind(0))


def off_diagonal(R: Tensor) -> Tensor:
    """The off-diagonal entries of ``R`` (of each diagonal block, for a stack of blocks), flattened."""
    b = R.shape[-1]
    return R.reshape(-1, b, b)[:, ~torch.eye(b, dtype=torch.bool, device=R.device)].flatten()


def correlation_picture(x: Tensor, R: Tensor) -> Tensor:
    """A ``(1, h, 2 * w + 2)`` grey image in [0, 1]: ``|corr|`` of the raw rows ``x`` (left) and of the
    decorrelated rows ``z = x @ R.T`` (right), separated by a mid-grey bar; ``h = w = min(d, 256)``."""
    R = dense_matrix(R)
    x = x.to(R.dtype)
    pictures = [abs_correlation(x), abs_correlation(x @ R.T)]
    if R.shape[0] > _PICTURE_SIDE:  # mean |corr| over blocks of features
        pictures = [F.adaptive_avg_pool2d(p[None, None], _PICTURE_SIDE)[0, 0] for p in pictures]
    bar = torch.full((pictures[0].shape[0], 2), 0.5, dtype=R.dtype, device=R.device)
    return torch.cat([pictures[0], bar, pictures[1]], dim=1)[None].float()
