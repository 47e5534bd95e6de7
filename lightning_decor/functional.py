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

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_decor.precision import float32_matmul, matmul_precision

__all__ = [
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
    "stats_dtype",
]


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


def _step_sizes(lr: float, c: Tensor, fro_sq: Tensor, normalize: str, layer: Tensor | None = None) -> float | Tensor:
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
    moments: Tensor | None = None,
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
        moments: Instead of rows (``x`` is then ``None``): each block's ``x^T x`` ``(G, b, b)`` summed over
            ``counts`` rows (what processes exchange instead of rows: the rule reads the rows only through
            ``C = R (x^T x / n) R^T``); not with ``"layer"``, which needs pairs of rows.

    Returns:
        ``(new, loss, ok)``: the new blocks ``(G, b, b)`` (equal to ``R`` where a block does not move), each block's
        loss before the step ``(G,)``, and ``ok`` ``(G,)``: ``False`` where the statistics or the new block are
        non-finite (the block keeps its ``R``).
    """
    if moments is not None and (normalize == "layer" or counts is None):
        raise ValueError("Expected rows for normalize='layer' (its divisor pairs rows), and `counts` with `moments`.")
    with float32_matmul():  # the statistics in full float32, also where TF32 is allowed
        return _block_step(R, x, counts, lr, kappa, normalize, segment, layers, moments)


def _block_step(
    R: Tensor, x: Tensor | None, counts: Tensor | None, lr: float, kappa: float, normalize: str,
    segment: Tensor | None, layers: int, moments: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    if moments is not None:  # C = R (x^T x / n) R^T: the same C the rows give, from what processes summed
        assert counts is not None
        scaled = moments / counts.clamp_min(1).to(moments.dtype)[:, None, None]
        z, inv = None, 1.0
        m = torch.bmm(torch.bmm(R, scaled), R.transpose(1, 2))
        c, through_rows = torch.diagonal(m, dim1=1, dim2=2), False
    else:
        assert x is not None
        n, b = x.shape[1], x.shape[2]
        # z = x R^T / sqrt(n_g), so that C = z^T z; the scale goes on the smaller operand (R when b <= n).
        inv = _row_scale(n, counts, x.dtype)
        z = torch.bmm(x, (R * inv).transpose(1, 2)) if b <= n else torch.bmm(x, R.transpose(1, 2)) * inv
        c, m, through_rows = _second_moments(z)
    fro_sq = _frobenius_sq(m)
    loss = _block_losses(c, kappa, fro_sq)
    layer = _layer_divisors(z, inv, counts, segment, layers) if normalize == "layer" and z is not None else None
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
    left, right = (z.transpose(1, 2), torch.bmm(z, R)) if through_rows and z is not None else (m, R)
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
def reset_null_space(
    R: Tensor, x: Tensor | None, counts: Tensor | None, *, eps: float = NULL_EPS, moments: Tensor | None = None
) -> Tensor:
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
        moments: Instead of rows (``x`` is then ``None``): each block's ``x^T x`` over ``counts`` rows.

    Returns:
        The new blocks ``(G, b, b)`` in ``R``'s dtype.
    """
    if not (isinstance(eps, float) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"Expected `eps` to be a finite float > 0, but got {eps!r}.")
    b = R.shape[-1]
    if moments is not None:
        assert counts is not None
        rows, M = counts, moments.double()
    else:
        assert x is not None
        xd = x.double()  # float64: no TF32 here
        rows = torch.full((x.shape[0],), x.shape[1], device=x.device) if counts is None else counts
        M = torch.bmm(xd.transpose(1, 2), xd)
    C = M / rows.clamp_min(1).double()[:, None, None]
    e = eps * torch.diagonal(C, dim1=1, dim2=2).sum(1) / b  # (G,)
    eye = torch.eye(b, dtype=torch.float64, device=R.device)
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
