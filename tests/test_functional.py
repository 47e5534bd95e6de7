"""The update and the loss against an explicit float64 reference written here (numpy, no torch math)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_decor import functional
from lightning_decor.functional import (
    block_decorrelation_step,
    decorrelation_loss,
    decorrelation_update_,
    fuse_weight,
    reset_null_space,
)
from lightning_decor.im2col import conv_patch_rows, sample_conv_patch_rows


def reference_step(R: np.ndarray, x: np.ndarray, lr: float, kappa: float) -> tuple[np.ndarray, float]:
    """R - lr * [(1-k)(C - diag C) + k diag(diag C - 1)] R and the loss, written out with numpy; a feature with
    C_ii = 0 gets no unit-variance term (its row of C is 0, so its row of R stays)."""
    n, d = x.shape
    z = x @ R.T
    C = np.zeros((d, d))
    for row in z:
        C += np.outer(row, row)
    C /= n
    c = np.diag(C).copy()
    off = C - np.diag(c)
    G = (1 - kappa) * off + kappa * np.diag(np.where(c > 0, c - 1, 0.0))
    loss = ((1 - kappa) * (off**2).sum() + kappa * ((c - 1) ** 2).sum()) / d**2
    return R - lr * G @ R, loss


@pytest.mark.parametrize("kappa", [0.0, 0.01, 0.5, 1.0])
@pytest.mark.parametrize("n,d", [(50, 7), (5, 12)])  # n > d (explicit C) and n < d (through the rows)
def test_update_and_loss_match_reference_float64(kappa: float, n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    R0 = np.eye(d) + 0.1 * rng.standard_normal((d, d))
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    R = torch.tensor(R0)
    loss = decorrelation_update_(R, torch.tensor(x), lr=0.01, kappa=kappa)
    R_ref, loss_ref = reference_step(R0, x, 0.01, kappa)
    assert R.dtype == torch.float64 and loss.dtype == torch.float64
    # float64 on both sides: the error measured is at most 4e-15 (1, 2 and 4 threads, MKL's SSE4.2 path); 1e-6 is
    # far above it and far below what a wrong term changes (lr * C ~ 1e-2).
    np.testing.assert_allclose(R.numpy(), R_ref, rtol=0, atol=1e-6)
    assert abs(loss.item() - loss_ref) <= 1e-6 * max(1.0, abs(loss_ref))
    z = torch.tensor(x @ R0.T)
    assert abs(decorrelation_loss(z, kappa).item() - loss_ref) <= 1e-6 * max(1.0, abs(loss_ref))


def test_statistics_in_float32_for_low_precision_input() -> None:
    R = torch.eye(4)
    x = torch.randn(16, 4).to(torch.bfloat16)
    loss = decorrelation_update_(R, x, lr=1e-2, kappa=0.5)
    assert R.dtype == torch.float32 and loss.dtype == torch.float32
    assert decorrelation_loss(x, 0.5).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = decorrelation_update_(R, torch.randn(16, 4), lr=1e-2, kappa=0.5)
    assert loss.dtype == torch.float32 and R.dtype == torch.float32


def test_repeated_updates_decorrelate() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=g) @ (torch.eye(6) + 0.8 * torch.ones(6, 6)) / 3
    R = torch.eye(6, dtype=torch.float64)
    first = decorrelation_update_(R, x.double(), lr=0.05, kappa=0.5)
    for _ in range(300):
        last = decorrelation_update_(R, x.double(), lr=0.05, kappa=0.5)
    assert last < 1e-3 * first  # measured: 2e-13 against 1.7e-4
    z = x.double() @ R.T
    cov = z.T @ z / len(z)
    torch.testing.assert_close(cov, torch.eye(6, dtype=torch.float64), atol=0.02, rtol=0)  # converged: measured 2e-6


def test_conv_patch_rows_match_explicit_patches() -> None:
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    k, s, p, dil = (3, 2), (2, 1), (1, 2), (1, 2)
    rows = conv_patch_rows(x, k, stride=s, padding=p, dilation=dil)
    xp = torch.nn.functional.pad(x, (p[1], p[1], p[0], p[0]))
    expected = []
    for b in range(2):
        for i in range(0, xp.shape[2] - dil[0] * (k[0] - 1), s[0]):
            for j in range(0, xp.shape[3] - dil[1] * (k[1] - 1), s[1]):
                patch = xp[b, :, i : i + dil[0] * (k[0] - 1) + 1 : dil[0], j : j + dil[1] * (k[1] - 1) + 1 : dil[1]]
                expected.append(patch.reshape(-1))
    torch.testing.assert_close(rows, torch.stack(expected))  # copies of the same float64 values: exact (measured 0)


def test_fuse_weight_is_w_times_r() -> None:
    w = torch.randn(5, 3, 2, 2)
    R = torch.randn(12, 12)
    # the same float32 matmul on both sides: exact (measured 0); default tolerances (rtol 1.3e-6, atol 1e-5)
    torch.testing.assert_close(fuse_weight(w, R), (w.reshape(5, 12) @ R).reshape(5, 3, 2, 2))


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"Expected `kappa` in \[0, 1\], but got 1.5"):
        decorrelation_loss(torch.randn(4, 2), 1.5)
    with pytest.raises(ValueError, match=r"Expected `kappa` in \[0, 1\], but got nan"):
        decorrelation_loss(torch.randn(4, 2), float("nan"))
    with pytest.raises(TypeError, match=r"Expected `kappa` to be a float, but got str: '0.5'"):
        decorrelation_loss(torch.randn(4, 2), "0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Expected `z` to be a 2-D tensor of rows \(n, d\), but got \(4,\)"):
        decorrelation_loss(torch.randn(4), 0.5)
    with pytest.raises(ValueError, match=r"Expected `x` to have at least one row, but got shape \(0, 3\)"):
        decorrelation_update_(torch.eye(3), torch.randn(0, 3), lr=0.1, kappa=0.5)
    with pytest.raises(ValueError, match=r"Expected `lr` to be a finite number > 0, but got -0.1"):
        decorrelation_update_(torch.eye(3), torch.randn(4, 3), lr=-0.1, kappa=0.5)
    with pytest.raises(TypeError, match=r"Expected `lr` to be a float, but got list: \[0.1\]"):
        decorrelation_update_(torch.eye(3), torch.randn(4, 3), lr=[0.1], kappa=0.5)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"Expected `R` of shape \(d, d\) or \(G, d / G, d / G\) with d = x.shape\[1\] = 3, but got \(2, 2\)",
    ):
        decorrelation_update_(torch.eye(2), torch.randn(4, 3), lr=0.1, kappa=0.5)
    with pytest.raises(
        ValueError, match=r"Expected `padding` to be a tuple of ints, 'valid' or 'same', but got 'full'"
    ):
        conv_patch_rows(torch.randn(1, 1, 4, 4), (3, 3), stride=(1, 1), padding="full", dilation=(1, 1))


@pytest.mark.parametrize(
    "padding, padding_mode, stride, dilation",
    [((1, 2), "zeros", (2, 1), (1, 2)), ("same", "zeros", (1, 1), (2, 1)), ((1, 1), "reflect", (1, 2), (1, 1)),
     ((2, 1), "replicate", (1, 1), (1, 1)), ((1, 1), "circular", (2, 2), (1, 1)), ("valid", "zeros", (1, 1), (1, 1)),
     ("same", "reflect", (1, 1), (1, 1))],
)  # fmt: skip
def test_sampled_patch_rows_are_patch_rows(padding, padding_mode, stride, dilation) -> None:
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    conv = torch.nn.Conv2d(2, 1, (3, 2), stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode)
    full = conv_patch_rows(x, (3, 2), **kwargs)  # type: ignore[arg-type]
    # The reference rows reproduce nn.Conv2d itself: conv(x) == rows @ W.T (+ b). float64: measured 2e-16, so 1e-10
    # leaves ~1e6x while a wrong patch (another pixel) is off by O(1).
    y = conv.double()(x)
    torch.testing.assert_close(
        (full @ conv.weight.reshape(1, -1).T + conv.bias).reshape(3, -1), y.reshape(3, -1), rtol=1e-10, atol=1e-10
    )
    g = torch.Generator().manual_seed(0)
    sampled = sample_conv_patch_rows(x, 400, (3, 2), generator=g, **kwargs)  # type: ignore[arg-type]
    assert sampled.shape == (400, full.shape[1])
    dist = torch.cdist(sampled, full, compute_mode="donot_use_mm_for_euclid_dist")  # direct differences: exact zeros
    assert dist.min(dim=1).values.max() < 1e-12  # every drawn row is one of the layer's patch rows (measured 0)
    hit = dist.argmin(dim=1).unique()
    # and the draws spread over them: 400 uniform draws hit ~L (1 - exp(-400 / L)) of L rows, 135 of 144 for the
    # largest L here (measured 131; 0.6 L = 86); all of them for the smaller L. A bias to some rows falls below 0.6.
    assert len(hit) > 0.6 * len(full)


@pytest.mark.parametrize("n", [40, 3])
def test_block_diagonal_update_is_the_rule_per_block(n: int) -> None:
    rng = np.random.default_rng(1)
    G, b = 3, 4
    R0 = np.stack([np.eye(b) + 0.1 * rng.standard_normal((b, b)) for _ in range(G)])
    x = rng.standard_normal((n, G * b)) @ rng.standard_normal((G * b, G * b))
    R = torch.tensor(R0)
    loss = decorrelation_update_(R, torch.tensor(x), lr=0.02, kappa=0.3)
    refs = [reference_step(R0[g], x[:, g * b : (g + 1) * b], 0.02, 0.3) for g in range(G)]
    # float64 on both sides, as in test_update_and_loss_match_reference_float64: measured at most 4e-15
    np.testing.assert_allclose(R.numpy(), np.stack([r for r, _ in refs]), rtol=0, atol=1e-6)
    assert abs(loss.item() - np.mean([loss_g for _, loss_g in refs])) <= 1e-6
    z = np.concatenate([x[:, g * b : (g + 1) * b] @ R0[g].T for g in range(G)], axis=1)
    assert (
        abs(decorrelation_loss(torch.tensor(z), 0.3, blocks=G).item() - np.mean([loss_g for _, loss_g in refs])) <= 1e-6
    )
    w = torch.randn(5, G * b, dtype=torch.float64)
    torch.testing.assert_close(fuse_weight(w, R), w @ torch.block_diag(*R))  # float64 defaults (1e-7): measured 4e-16
    with pytest.raises(ValueError, match=r"Expected `blocks` to be a positive divisor of d = 12, but got 5"):
        decorrelation_loss(torch.tensor(z), 0.3, blocks=5)


def reference_normaliser(R: np.ndarray, x: np.ndarray, normalize: str) -> float:
    """The step's divisor, written out: mean(diag C) ("trace") or ||C||_F^2 / tr C ("spectral") of z = x R^T, at
    least 10."""
    z = x @ R.T
    C = z.T @ z / x.shape[0]
    if normalize == "trace":
        return max(10.0, float(np.trace(C) / C.shape[0]))
    return max(10.0, float((C**2).sum() / np.trace(C)))  # never below 10


@pytest.mark.parametrize("normalize", ["trace", "spectral"])
@pytest.mark.parametrize("n", [50, 5])  # explicit C and through the rows
def test_normalised_step_is_the_rule_with_lr_over_the_normaliser(normalize: str, n: int) -> None:
    rng = np.random.default_rng(2)
    G, b = 2, 6
    R0 = np.stack([np.eye(b) + 0.1 * rng.standard_normal((b, b)) for _ in range(G)])
    # the two blocks' inputs differ in scale by 30x: each block must get its own divisor
    x = rng.standard_normal((n, G * b)) @ rng.standard_normal((G * b, G * b)) * np.repeat([1.0, 30.0], b)
    R = torch.tensor(R0)
    decorrelation_update_(R, torch.tensor(x), lr=0.05, kappa=0.3, normalize=normalize)
    expected = []
    for g in range(G):
        xg = x[:, g * b : (g + 1) * b]
        lr = 0.05 / reference_normaliser(R0[g], xg, normalize)
        expected.append(reference_step(R0[g], xg, lr, 0.3)[0])
    np.testing.assert_allclose(R.numpy(), np.stack(expected), rtol=0, atol=1e-9)  # float64: measured ~1e-15


def test_spectral_step_does_not_depend_on_the_input_scale_and_is_stable_where_the_rule_diverges() -> None:
    rng = np.random.default_rng(3)
    d = 64
    x = rng.standard_normal((256, d)) + 2.0 * rng.standard_normal((256, 1))  # strongly correlated: l_max ~ 4 d
    for scale in (1.0, 1e2, 1e4):  # kappa = 0: the decorrelating part is homogeneous, so the step is the same
        R = torch.eye(d, dtype=torch.float64)
        decorrelation_update_(R, torch.tensor(x * scale), lr=0.1, kappa=0.0, normalize="spectral")
        if scale == 1.0:
            first = R.clone()
        torch.testing.assert_close(R, first, rtol=1e-9, atol=1e-12)
    # an input of little energy (divisor 1e-6 < 10) gets a tenth of the rule's own step, not a million times it
    R = torch.eye(d, dtype=torch.float64)
    tiny = x * 1e-3 / np.sqrt(((x.T @ x / 256) ** 2).sum() / np.trace(x.T @ x / 256))
    decorrelation_update_(R, torch.tensor(tiny), lr=0.1, kappa=0.5, normalize="spectral")
    np.testing.assert_allclose(R.numpy(), reference_step(np.eye(d), tiny, 0.1 / 10, 0.5)[0], rtol=0, atol=1e-12)
    # the same lr without normalising: lr * l_max ~ 25, and R blows up within a few steps; with it, the loss falls
    plain = torch.eye(d, dtype=torch.float64)
    spectral = torch.eye(d, dtype=torch.float64)
    xt = torch.tensor(x)
    first_loss = decorrelation_loss(xt, 0.5).item()
    for _ in range(20):
        decorrelation_update_(plain, xt, lr=0.1, kappa=0.5)
        decorrelation_update_(spectral, xt, lr=0.1, kappa=0.5, normalize="spectral")
    assert decorrelation_loss(xt @ spectral.T, 0.5).item() < 0.2 * first_loss
    assert not decorrelation_loss(xt @ plain.T, 0.5).item() < first_loss  # diverged (R kept where non-finite)


def test_normalised_step_keeps_an_input_without_energy() -> None:
    R = torch.eye(4)
    x = torch.zeros(8, 4)
    decorrelation_update_(R, x, lr=0.1, kappa=0.5, normalize="spectral")  # tr C = 0: no feature has variance
    torch.testing.assert_close(R, torch.eye(4), rtol=0, atol=0)  # the rule would scale it by 1 + lr * kappa
    choices = r"\('none', 'trace', 'spectral', 'layer'\)"
    with pytest.raises(ValueError, match=rf"Expected `normalize` in {choices}, but got 'max'"):
        decorrelation_update_(R, x, lr=0.1, kappa=0.5, normalize="max")


@pytest.mark.parametrize("normalize", ["none", "spectral"])
def test_a_feature_without_variance_keeps_its_row_over_many_steps(normalize: str) -> None:
    """A dead input (a dead ReLU channel, a tap that only sees padding): the rule without the exception multiplies
    its row by 1 + lr * kappa per step, (1.05)^2000 ~ 1e42, past float32; here the row stays e_i and R stays finite,
    while the live features are decorrelated as before."""
    rng = np.random.default_rng(4)
    n, d, dead = 128, 6, 2
    x = rng.standard_normal((n, d)) @ (np.eye(d) + 0.5 * rng.standard_normal((d, d)))
    x[:, dead] = 0.0
    R = torch.eye(d)
    xt = torch.tensor(x, dtype=torch.float32)
    first = decorrelation_loss(xt, 0.5).item()
    for _ in range(2000):
        decorrelation_update_(R, xt, lr=0.1, kappa=0.5, normalize=normalize)
    assert torch.isfinite(R).all()
    torch.testing.assert_close(R[dead], torch.eye(d)[dead], rtol=0, atol=0)
    live = [i for i in range(d) if i != dead]
    C = (xt @ R.T).T @ (xt @ R.T) / n
    off = C[live][:, live] - torch.diag(torch.diagonal(C)[live])
    assert off.abs().max() < 1e-3 and (torch.diagonal(C)[live] - 1).abs().max() < 1e-3  # decorrelated, unit variance
    # the loss keeps the dead feature's (0 - 1)^2 term: kappa * 1 / d^2 is its floor
    final = decorrelation_loss(xt @ R.T, 0.5).item()
    assert final == pytest.approx(0.5 / d**2, abs=1e-5) and final < first


def duplicated_rows(n: int, k: int, copies: int, seed: int) -> np.ndarray:
    """``n`` rows of ``k`` correlated features repeated ``copies`` times (a grayscale image fed as RGB): rank ``k``."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    return np.concatenate([u] * copies, axis=1)


def test_reset_null_space_is_the_soft_projection_and_keeps_z() -> None:
    x = duplicated_rows(200, 3, 2, seed=5)  # (200, 6), rank 3
    rng = np.random.default_rng(6)
    R0 = np.eye(6) + 0.2 * rng.standard_normal((6, 6))
    null = np.concatenate([np.eye(3), -np.eye(3)], axis=1).T / np.sqrt(2)  # (6, 3): x @ null = 0
    R0 = R0 + 50.0 * rng.standard_normal((6, 3)) @ null.T  # a large part on the null space, as the rule grows it
    new = reset_null_space(torch.tensor(R0)[None], torch.tensor(x)[None], None)[0].numpy()
    C = x.T @ x / 200
    e = 1e-4 * np.trace(C) / 6
    expected = R0 - (R0 - np.eye(6)) @ (e * np.linalg.inv(C + e * np.eye(6)))  # the formula, written out
    # float64 both sides, entries of R ~50 and C_x + e I conditioned ~1e5: measured 1.1e-10 and 4e-11; 1e-8 is far
    # below what a wrong term changes (the null-space part moves by ~50)
    np.testing.assert_allclose(new, expected, rtol=0, atol=1e-8)
    np.testing.assert_allclose(new @ null, null, rtol=0, atol=1e-8)  # the null space gets the identity's part
    z0, z1 = x @ R0.T, x @ new.T  # the decorrelated rows barely move: by e / (l + e) along each eigenvalue l
    assert np.abs(z1 - z0).max() < 1e-3 * np.abs(z0).max()  # measured 3e-5


def test_reset_null_space_keeps_blocks_it_cannot_judge() -> None:
    # 4 rows < 6 features: the sample's null space is not the input's
    x = torch.tensor(duplicated_rows(4, 3, 2, seed=7))
    R = torch.eye(6, dtype=torch.float64)[None] + 0.5
    torch.testing.assert_close(reset_null_space(R, x[None], None), R, rtol=0, atol=0)
    zeros = torch.zeros(1, 10, 6, dtype=torch.float64)  # no energy
    torch.testing.assert_close(reset_null_space(R, zeros, None), R, rtol=0, atol=0)
    counts = torch.tensor([4])  # 10 rows of which 4 are real
    padded = torch.cat([x, torch.zeros(6, 6, dtype=torch.float64)])[None]
    torch.testing.assert_close(reset_null_space(R, padded, counts), R, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Expected `eps` to be a finite float > 0, but got 0.0"):
        reset_null_space(R, padded, counts, eps=0.0)


def test_rule_on_a_rank_deficient_input_grows_r_without_the_reset() -> None:
    """Why the engine resets: on three equal copies of 4 features the rule alone grows R's null-space part by about
    (1 + step * kappa) per step (measured: |R| ~ 8e6 after 1000 steps of 3e-2: lr 0.3 over the spectral divisor's
    floor of 10), and float32 rounding of
    the cancelling entries then ruins z; with a reset every 20 steps R stays small and the loss at its floor."""
    xt = torch.tensor(duplicated_rows(512, 4, 3, seed=8), dtype=torch.float32)
    plain, reset = torch.eye(12), torch.eye(12)
    for step in range(1000):
        decorrelation_update_(plain, xt, lr=0.3, kappa=0.5, normalize="spectral")
        if step % 20 == 19:
            reset.copy_(reset_null_space(reset[None], xt[None], None)[0])
        decorrelation_update_(reset, xt, lr=0.3, kappa=0.5, normalize="spectral")
    assert plain.norm() > 1e5 and reset.norm() < 30
    assert decorrelation_loss(xt @ reset.T, 0.5).item() < 0.05  # its floor (unit variance is out of reach): 0.028


@pytest.mark.parametrize("n", [50, 100])  # all rows in the estimate, and the first 64 of them
def test_layer_step_divides_every_block_by_the_whole_layers_divisor(n: int) -> None:
    rng = np.random.default_rng(9)
    G, b = 3, 4
    R0 = np.stack([np.eye(b) + 0.1 * rng.standard_normal((b, b)) for _ in range(G)])
    # correlated across blocks: the layer's divisor is far above each block's
    x = rng.standard_normal((n, G * b)) + 1.5 * rng.standard_normal((n, 1))
    R = torch.tensor(R0)
    decorrelation_update_(R, torch.tensor(x), lr=0.05, kappa=0.3, normalize="layer")
    z = x @ torch.block_diag(*torch.tensor(R0)).numpy().T  # the layer's decorrelated rows
    m = min(n, 64)
    gram = z[:m] @ z[:m].T
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    divisor = np.mean([gram[i, j] ** 2 for i, j in pairs]) / np.mean(np.diag(gram))  # ||C||_F^2 / tr C, from pairs
    assert divisor > 1.5 * max(reference_normaliser(R0[g], x[:, g * b : (g + 1) * b], "spectral") for g in range(G))
    expected = [reference_step(R0[g], x[:, g * b : (g + 1) * b], 0.05 / max(10.0, divisor), 0.3)[0] for g in range(G)]
    np.testing.assert_allclose(R.numpy(), np.stack(expected), rtol=0, atol=1e-9)  # float64: measured ~1e-15


def test_segment_sum_adds_the_values_of_each_segment_in_a_fixed_order() -> None:
    values = torch.randn(7, 3, 2, dtype=torch.float64)
    segment = torch.tensor([0, 0, 2, 2, 2, 3, 3])
    values[6, 0, 0] = math.nan  # poisons that entry of its own segment only
    out = functional.segment_sum(values, segment, 4)
    expected = torch.stack([sum((values[g] for g in range(7) if segment[g] == s), torch.zeros(3, 2,
                            dtype=torch.float64)) for s in range(4)])  # fmt: skip
    assert out.shape == (4, 3, 2) and torch.equal(out[1], torch.zeros(3, 2, dtype=torch.float64))
    assert torch.isnan(out[3, 0, 0]) and torch.isfinite(out[3].flatten()[1:]).all()
    torch.testing.assert_close(out[:3], expected[:3], rtol=0, atol=1e-15)
    torch.testing.assert_close(out[3].flatten()[1:], expected[3].flatten()[1:], rtol=0, atol=1e-15)


@pytest.mark.parametrize("setting", ["legacy medium", "cuda tf32"])
def test_the_statistics_take_full_float32_products_whatever_the_matmul_precision(monkeypatch, setting) -> None:
    """Under ``torch.set_float32_matmul_precision("medium")`` (TF32 or bfloat16 products on some hardware), or a
    backend's ``fp32_precision = "tf32"`` (after which torch.get_float32_matmul_precision() raises), every product of
    the update runs in IEEE float32, and the user's setting is back afterwards."""
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    seen: list[tuple[str, str]] = []
    bmm = torch.bmm

    def spy(*args, **kwargs):
        seen.append((cuda.fp32_precision, mkldnn.fp32_precision))
        return bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", spy)
    saved = (cuda.fp32_precision, mkldnn.fp32_precision)
    try:
        if setting == "legacy medium":
            torch.set_float32_matmul_precision("medium")
        else:
            cuda.fp32_precision = "tf32"
        before = (cuda.fp32_precision, mkldnn.fp32_precision)
        key = functional.matmul_precision()  # readable either way
        R, x = torch.eye(4).expand(2, 4, 4).clone(), torch.randn(2, 16, 4)
        functional.block_decorrelation_step(R, x, None, lr=0.1, kappa=0.5, normalize="layer")
        assert (cuda.fp32_precision, mkldnn.fp32_precision) == before
        assert key == f"cuda={before[0]} mkldnn={before[1]}" and "tf32" in key
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = saved
        torch.set_float32_matmul_precision("highest")
    assert seen and set(seen) == {("ieee", "ieee")}


@pytest.mark.parametrize("normalize", ["none", "trace", "spectral"])
def test_the_step_from_summed_moments_is_the_step_from_the_rows(normalize: str) -> None:
    # What processes exchange instead of rows: x^T x per block and the row counts. The rule reads the rows only
    # through C = R (x^T x / n) R^T, so both give the same step (float64: rounding only, measured <= 4e-16).
    g = torch.Generator().manual_seed(0)
    R = torch.eye(5, dtype=torch.float64) + 0.1 * torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    x = torch.randn(3, 9, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    counts = torch.tensor([9, 6, 0])
    x[1, 6:] = 0  # padding past each block's count
    x[2] = 0
    moments = x.transpose(1, 2) @ x  # summed over the rows (over processes, by an all-reduce)
    rows = block_decorrelation_step(R, x, counts, lr=0.05, kappa=0.5, normalize=normalize)
    summed = block_decorrelation_step(R, None, counts, lr=0.05, kappa=0.5, normalize=normalize, moments=moments)
    for a, b in zip(rows, summed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, equal_nan=True)
    assert torch.equal(summed[0][2], R[2])  # no rows: the block keeps its R
    torch.testing.assert_close(reset_null_space(R, x, counts), reset_null_space(R, None, counts, moments=moments),
                               rtol=0, atol=1e-12)  # fmt: skip
    with pytest.raises(ValueError, match=r"Expected rows for normalize='layer'"):
        block_decorrelation_step(R, None, counts, lr=0.05, kappa=0.5, normalize="layer", moments=moments)
