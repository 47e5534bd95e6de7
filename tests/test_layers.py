"""Patched layers against explicit two-step references: first z = R x, then the plain layer on z.

Float bounds: comparisons in float64 use torch's default tolerances (rtol = atol = 1e-7) against references that sum
in another order; the error measured is at most 2e-14 (1, 2 and 4 threads, and MKL's SSE4.2 path with
ATEN_CPU_CAPABILITY=default), while a wrong R, W or patch is off by O(1). Comparisons marked "exact" repeat the same
float32 operations (or copy values) and were equal bitwise in every setting measured.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_decor import decorrelate, decorrelation_matrices, decorrelation_update_, fold
from lightning_decor.functional import guarded_decorrelation_update_
from lightning_decor.layers import DecorrelatedConv2d, DecorrelatedLinear
from lightning_decor.patching import eligible_layers
from lightning_decor.rows import Sampling

from conftest import collect_rows


def random_R(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)


def explicit_conv_rows(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, int, int]:
    """Patches by explicit slicing (zero padding), rows ordered (image, out_row, out_col)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(x.shape[0]):
        for i in range(h_out):
            for j in range(w_out):
                top, left = i * sh, j * sw
                patch = xp[b, :, top : top + dh * (kh - 1) + 1 : dh, left : left + dw * (kw - 1) + 1 : dw]
                rows.append(patch.reshape(-1))
    return torch.stack(rows), h_out, w_out


def test_patched_conv2d_is_w_of_rx() -> None:
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=True).double()
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    assert decorrelate(conv) == [""]
    assert isinstance(conv, DecorrelatedConv2d)
    R = random_R(3 * 3 * 2).double()
    conv.decor_R.copy_(R)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    y = conv(x)
    rows, h_out, w_out = explicit_conv_rows(x, conv)
    z = rows @ R.T  # step 1: decorrelate the input patches
    expected = z @ w.reshape(5, -1).T + b  # step 2: the plain layer on z
    expected = expected.reshape(2, h_out, w_out, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, expected)  # float64: measured 1e-15


@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 4)])  # 2-D batch and 3-D tokens
def test_patched_linear_is_w_of_rx(shape: tuple[int, ...]) -> None:
    lin = nn.Linear(4, 3).double()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    decorrelate(lin)
    R = random_R(4).double()
    lin.decor_R.copy_(R)
    x = torch.randn(*shape, dtype=torch.float64)
    z = x @ R.T
    torch.testing.assert_close(lin(x), z @ w.T + b)  # float64: measured 4e-16


def test_weight_gradient_is_delta_times_z() -> None:
    lin = nn.Linear(4, 3).double()
    decorrelate(lin)
    R = random_R(4).double()
    lin.decor_R.copy_(R)
    x = torch.randn(7, 4, dtype=torch.float64)
    delta = torch.randn(7, 3, dtype=torch.float64)
    (lin(x) * delta).sum().backward()
    torch.testing.assert_close(lin.weight.grad, delta.T @ (x @ R.T))  # float64: measured 1e-15

    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    decorrelate(conv)
    R = random_R(18, seed=1).double()
    conv.decor_R.copy_(R)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    delta = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    (conv(x) * delta).sum().backward()
    rows, _, _ = explicit_conv_rows(x, conv)
    delta_rows = delta.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(conv.weight.grad.reshape(3, -1), delta_rows.T @ (rows @ R.T))  # float64: 1e-14


def test_decorrelate_keeps_parameters_and_outputs() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    plain = copy.deepcopy(net)
    params = list(net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    assert decorrelate(net) == ["0", "3"]
    assert list(net.parameters()) == params and all(p is q for p, q in zip(net.parameters(), params))
    assert opt.param_groups[0]["params"][0] is net[0].weight
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(net(x), plain(x))  # R = I: W @ I is W, the same float32 convolution (exact)
    for R in decorrelation_matrices(net).values():
        torch.testing.assert_close(R, torch.eye(R.shape[0]))  # exact
    assert decorrelate(net) == []  # twice is harmless


def test_fold_keeps_outputs_and_state_dict_is_plain() -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    plain = copy.deepcopy(net)
    decorrelate(net)
    for i, R in enumerate(decorrelation_matrices(net).values()):
        R.copy_(random_R(R.shape[0], seed=i))
    x = torch.randn(3, 2, 5, 5)
    expected = net(x).detach()
    plain.load_state_dict(net.state_dict(), strict=True)  # the fused W @ R under the plain keys
    # the very fused weight the patched layers compute with, in the same float32 kernels: exact (measured 0)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
    assert fold(net) == ["0", "3"]
    assert type(net[0]) is nn.Conv2d and type(net[3]) is nn.Linear and not hasattr(net[0], "decor_R")
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)  # exact, as above
    assert fold(net) == []  # no-op on a plain model


def test_eligibility_and_patterns() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
            self.attn = nn.MultiheadAttention(4, 1)
            self.frozen = nn.Linear(4, 4).requires_grad_(False)
            self.head = nn.Linear(4, 2)

    net = Net()
    reasons = eligible_layers(net)
    assert reasons["attn"] is None and reasons["attn.out_proj"] is None  # attention's projections (test_attention)
    assert reasons["features.1"] is None  # grouped: one R per group
    assert reasons["frozen"] is not None and "frozen" in reasons["frozen"]
    assert decorrelate(copy.deepcopy(net)) == ["features.0", "features.1", "attn", "attn.out_proj", "head"]
    assert decorrelate(copy.deepcopy(net), include=["features"]) == ["features.0", "features.1"]
    assert decorrelate(copy.deepcopy(net), exclude=["head", "attn"]) == ["features.0", "features.1"]
    assert decorrelate(copy.deepcopy(net), include=["*.0", "head"], exclude=["he*"]) == ["features.0"]
    assert decorrelate(copy.deepcopy(net), exclude=["attn"]) == ["features.0", "features.1", "head"]  # out_proj too
    patched = copy.deepcopy(net)
    decorrelate(patched, include=["head"])
    assert type(patched.head) is DecorrelatedLinear and type(patched.attn) is nn.MultiheadAttention


def test_rows_collected_only_when_asked_and_with_grad() -> None:
    lin = nn.Linear(4, 2)
    decorrelate(lin)
    x = torch.randn(10, 4)
    lin(x)  # no buffer until an engine gives one: nothing kept
    (buffer,) = collect_rows(lin, fraction=0.3)
    buffer.sampling.collect = False
    lin(x)
    assert buffer.pending_count == 0  # collection is off until the engine switches it on
    buffer.sampling.collect = True
    lin(x)
    with torch.no_grad():
        lin(x)  # validation, inference: no rows
    assert buffer.pending_count == 3  # ceil(0.3 * 10), from the one forward with grad
    lin.eval()
    lin(x)  # a sub-network kept in eval() during training (frozen statistics) still trains: its rows count
    assert buffer.pending_count == 6
    buffer.take()
    lin.train()
    lin(x)
    rows = buffer.take()
    assert rows is not None and all((x == row).all(dim=1).any() for row in rows)  # drawn from the batch's rows
    assert buffer.take() is None


def test_update_skips_non_finite() -> None:
    lin = nn.Linear(3, 2)
    decorrelate(lin)
    rows = torch.randn(8, 3)
    rows[0, 0] = float("nan")
    loss, ok = guarded_decorrelation_update_(lin.decor_R, rows, lr=0.1, kappa=0.5)
    assert not ok and torch.equal(lin.decor_R, torch.eye(3))
    loss, ok = guarded_decorrelation_update_(lin.decor_R, torch.randn(8, 3) * 1e30, lr=1.0, kappa=0.5)
    assert not ok and torch.equal(lin.decor_R, torch.eye(3))  # non-finite statistics
    loss, ok = guarded_decorrelation_update_(lin.decor_R, torch.randn(8, 3) * 10, lr=1e38, kappa=0.5)
    assert torch.isfinite(loss) and not ok and torch.equal(lin.decor_R, torch.eye(3))  # finite stats, R overflows
    loss, ok = guarded_decorrelation_update_(lin.decor_R, torch.randn(8, 3), lr=0.1, kappa=0.5)
    assert ok and not torch.equal(lin.decor_R, torch.eye(3)) and torch.isfinite(loss)


def test_errors() -> None:
    with pytest.raises(TypeError, match=r"Expected `model` to be a torch.nn.Module, but got str"):
        decorrelate("net")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Expected `include` to be a list of name patterns \(str\), but got 'fc'"):
        decorrelate(nn.Linear(2, 2), include="fc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Expected `exclude` to be a list of name patterns \(str\), but got \[1\]"):
        decorrelate(nn.Linear(2, 2), exclude=[1])  # type: ignore[list-item]


def test_patched_conv1d_and_conv3d_are_w_of_rx() -> None:
    # Conv1d with reflect padding: patches by explicit slicing of the reflect-padded input.
    conv = nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2, padding_mode="reflect").double()
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    decorrelate(conv)
    R = random_R(6).double()
    conv.decor_R.copy_(R)
    x = torch.randn(2, 2, 9, dtype=torch.float64)
    xp = F.pad(x, (2, 2), mode="reflect")
    l_out = (xp.shape[-1] - 2 * 2 - 1) // 2 + 1
    rows = torch.stack([xp[n, :, i * 2 : i * 2 + 5 : 2].reshape(-1) for n in range(2) for i in range(l_out)])
    expected = ((rows @ R.T) @ w.reshape(3, -1).T + b).reshape(2, l_out, 3).permute(0, 2, 1)
    torch.testing.assert_close(conv(x), expected)  # float64: measured 2e-16

    conv3 = nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0)).double()
    w, b = conv3.weight.detach().clone(), conv3.bias.detach().clone()
    decorrelate(conv3)
    R = random_R(24, seed=2).double()
    conv3.decor_R.copy_(R)
    x = torch.randn(2, 2, 3, 5, 4, dtype=torch.float64)
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    outs = [(xp.shape[2] - 2) // 1 + 1, (xp.shape[3] - 3) // 2 + 1, (xp.shape[4] - 2) // 1 + 1]
    rows = torch.stack([
        xp[n, :, i : i + 2, j * 2 : j * 2 + 3, k : k + 2].reshape(-1)
        for n in range(2) for i in range(outs[0]) for j in range(outs[1]) for k in range(outs[2])
    ])  # fmt: skip
    expected = ((rows @ R.T) @ w.reshape(3, -1).T + b).reshape(2, *outs, 3).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(conv3(x), expected)  # float64: measured 9e-16


@pytest.mark.parametrize(
    "conv", [nn.Conv1d(2, 3, 3, padding=1), nn.Conv3d(2, 3, 2, padding=1, padding_mode="circular")]
)
def test_sampled_rows_of_conv1d_conv3d_are_patch_rows(conv: nn.Module) -> None:
    decorrelate(conv)
    x = torch.randn(2, 2, *([5] * (conv.weight.dim() - 2)), dtype=torch.float64)
    conv.double()
    full = Sampling().rows(conv, x)  # every row (no cap)
    sampled = Sampling(max_rows=7, generator=torch.Generator().manual_seed(0)).rows(conv, x)
    assert sampled.shape == (7, full.shape[1]) and full.shape[0] > 7
    dist = torch.cdist(sampled, full, compute_mode="donot_use_mm_for_euclid_dist")  # direct differences
    assert dist.min(dim=1).values.max() < 1e-12  # copies of patch rows: exact zeros (measured 0)
    # the full rows reproduce the layer itself: y = rows @ W.T + b (float64: measured 9e-16)
    y = conv(x).detach()
    torch.testing.assert_close(
        (full @ conv.weight.reshape(3, -1).T + conv.bias).reshape(2, -1, 3), y.reshape(2, 3, -1).transpose(1, 2)
    )


def test_max_features_skips_wide_layers() -> None:
    net = nn.Sequential(nn.Linear(4, 300), nn.Linear(300, 2))
    reasons = eligible_layers(net, max_features=100)
    assert reasons["0"] is None
    assert reasons["1"] == "d = 300 > max_features = 100 (R would take 0 MiB); raise `max_features` to include it"
    assert decorrelate(net, max_features=100) == ["0"]
    with pytest.raises(ValueError, match=r"Expected `max_features` to be >= 1 or None, but got 0"):
        decorrelate(nn.Linear(2, 2), max_features=0)
    with pytest.raises(TypeError, match=r"Expected `max_features` to be an int or None, but got float"):
        decorrelate(nn.Linear(2, 2), max_features=1.5)  # type: ignore[arg-type]


def test_tied_weights_and_frozen_layers_stay_plain() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # weight tying, as in language models
    net = nn.ModuleDict({"emb": emb, "head": head, "mid": nn.Linear(4, 4), "frozen": nn.Linear(4, 4)})
    net["frozen"].requires_grad_(False)
    reasons = eligible_layers(net)
    assert reasons == {
        "head": "weight shared with another module (tied weights)",
        "mid": None,
        "frozen": "frozen (weight.requires_grad is False)",
    }
    assert decorrelate(net) == ["mid"]


def test_layer_called_twice_pools_both_calls() -> None:
    lin = nn.Linear(3, 3)
    decorrelate(lin)
    (buffer,) = collect_rows(lin)
    x1, x2 = torch.randn(4, 3), torch.randn(5, 3)
    lin(lin(x1))
    lin(x2)
    rows = buffer.take()
    assert rows is not None and rows.shape == (4 + 4 + 5, 3)
    torch.testing.assert_close(rows[:4], x1)  # copies: exact
    torch.testing.assert_close(rows[8:], x2)


def test_block_diagonal_r_for_wide_layers() -> None:
    conv = nn.Conv2d(8, 5, 3, padding=1).double()  # d = 72
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    decorrelate(conv, block_size=20)  # whole channels per block: 2 channels * 9 = 18 <= 20 -> 4 blocks
    assert conv.decor_R.shape == (4, 18, 18) and conv.decor_block_count == 4 and conv.decor_features == 72
    for g in range(4):
        conv.decor_R[g].copy_(random_R(18, seed=g).double())
    dense = torch.block_diag(*conv.decor_R)  # the (72, 72) matrix the blocks stand for
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    rows, h_out, w_out = explicit_conv_rows(x, conv)
    expected = ((rows @ dense.T) @ w.reshape(5, -1).T + b).reshape(2, h_out, w_out, 5).permute(0, 3, 1, 2)
    y = conv(x)
    torch.testing.assert_close(y, expected)  # float64: measured 2e-15
    delta = torch.randn_like(y)
    (y * delta).sum().backward()
    delta_rows = delta.permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(conv.weight.grad.reshape(5, -1), delta_rows.T @ (rows @ dense.T))  # float64: 2e-14
    # the update moves each block by the rule on its own features
    before = conv.decor_R.clone()
    guarded_decorrelation_update_(conv.decor_R, rows, lr=0.01, kappa=0.5)
    for g in range(4):
        R_g = before[g].clone()
        decorrelation_update_(R_g, rows[:, g * 18 : (g + 1) * 18], lr=0.01, kappa=0.5)
        torch.testing.assert_close(conv.decor_R[g], R_g)  # float64, the same rule per block: measured 1e-16
    with torch.no_grad():
        y_patched = conv(x)
    fold(conv)
    assert type(conv) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(conv(x), y_patched)  # fold keeps the fused weight: exact
    lin = nn.Linear(10, 3)
    decorrelate(lin, block_size=4)  # 10 features: fewest equal blocks of <= 4 -> 5 blocks of 2
    assert lin.decor_R.shape == (5, 2, 2)
    with pytest.raises(ValueError, match=r"Expected `block_size` to be >= 1 or None, but got 0"):
        decorrelate(nn.Linear(2, 2), block_size=0)
    with pytest.raises(TypeError, match=r"Expected `block_size` to be an int or None, but got str"):
        decorrelate(nn.Linear(2, 2), block_size="4")  # type: ignore[arg-type]


def test_loading_a_state_dict_into_a_patched_layer_keeps_its_function() -> None:
    lin = nn.Linear(4, 3)
    decorrelate(lin)
    lin.decor_R.copy_(random_R(4))
    x = torch.randn(5, 4)
    expected = lin(x).detach()
    other = nn.Linear(4, 3)
    decorrelate(other)
    other.decor_R.copy_(random_R(4, seed=7))
    other.load_state_dict(lin.state_dict())  # the fused W @ R under "weight": R restarts from the identity
    torch.testing.assert_close(other(x), expected)  # the same fused float32 weight (R = I): exact
    torch.testing.assert_close(other.decor_R, torch.eye(4))  # exact


def test_block_size_without_an_equal_split_keeps_a_linear_dense() -> None:
    lin = nn.Linear(7, 2)  # 7 features: no equal split into blocks of at most 4
    with pytest.warns(UserWarning, match=r"block_size=4: 7 features have no equal split into blocks of at most 4"):
        decorrelate(lin, block_size=4)
    assert lin.decor_R.shape == (7, 7)


def test_a_linear_wider_than_max_features_without_an_equal_split_stays_plain() -> None:
    # 17 features, a prime: no equal split into blocks of at most 8, and a dense 17 x 17 R is over max_features=10.
    # (It used to fall back to a dense R, bypassing max_features.)
    net = nn.Sequential(nn.Linear(17, 4), nn.Linear(4, 2))
    reasons = eligible_layers(net, max_features=10, block_size=8)
    assert reasons["0"] is not None and "no equal split into blocks of at most 8 fits" in reasons["0"]
    assert decorrelate(net, max_features=10, block_size=8) == ["1"]
    assert type(net[0]) is nn.Linear


def test_strided_conv_cap_between_patches_and_pixels_keeps_distinct_patches() -> None:
    conv = nn.Conv2d(1, 1, 2, stride=2)  # 4x4 input: 16 pixels but only 4 patches per image
    decorrelate(conv)
    x = torch.randn(2, 1, 4, 4)
    rows = Sampling(max_rows=10).rows(conv, x)
    assert rows.shape == (8, 4)  # all 2 * 4 patches, fewer than the cap: no draws with replacement
    torch.testing.assert_close(rows, F.unfold(x, 2, stride=2).transpose(1, 2).reshape(-1, 4))  # copies: exact


def test_a_state_dict_whose_weight_fails_to_load_leaves_the_layer_as_it_was() -> None:
    lin = nn.Linear(4, 3).double()
    decorrelate(lin)
    R = random_R(4).double()
    lin.decor_R.copy_(R)
    w = lin.weight.detach().clone()
    wrong = {"weight": torch.zeros(3, 5), "bias": torch.full((3,), 0.5)}  # another layout: only the bias fits
    with pytest.raises(RuntimeError, match=r"size mismatch for weight"):  # raised after every module has loaded
        lin.load_state_dict(wrong, strict=False)
    assert torch.equal(lin.weight, w) and torch.equal(lin.decor_R, R)  # neither W nor R touched
    x = torch.randn(5, 4, dtype=torch.float64)
    # the layer still computes with W R (and the bias that did load). float64 with the default tolerances (rtol and
    # atol 1e-7): products in another order differ by ~4e-16 here (50 random draws), far below.
    torch.testing.assert_close(lin(x), (x @ R.T) @ w.T + 0.5)


@pytest.mark.parametrize("max_rows", [None, 24])
def test_linear_rows_of_sequences_are_drawn_uniformly_over_samples_and_positions(max_rows: int | None) -> None:
    n_seq, n_pos = 8, 16
    lin = nn.Linear(2, 3)
    decorrelate(lin)
    (buffer,) = collect_rows(lin, fraction=0.25, max_rows=max_rows, generator=torch.Generator().manual_seed(0))
    # every row says where it comes from: (sequence, position); stored (T, N, d) and transposed, so not contiguous
    where = torch.stack(torch.meshgrid(torch.arange(n_seq), torch.arange(n_pos), indexing="ij"), dim=-1).float()
    x = where.transpose(0, 1).contiguous().transpose(0, 1)  # (N, T, 2)
    forwards, parts = 400, []
    for f in range(forwards):
        lin(x)
        if f % 50 == 49:  # an update every 50 forwards, as training takes them (64 forwards' worth may wait)
            parts.append(buffer.take())
    rows = torch.cat(parts)
    per_forward = 32 if max_rows is None else 24  # ceil(0.25 * 128) rows, at most max_rows
    assert rows is not None and rows.shape == (forwards * per_forward, 2)
    cells = (rows[:, 0] * n_pos + rows[:, 1]).long()  # (n, t) as one index
    counts = torch.bincount(cells, minlength=n_seq * n_pos).double()
    expected = len(rows) / (n_seq * n_pos)  # 75 or 100 draws per (n, t) under uniform sampling
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # Uniform draws give chi2 ~ 127 +- 16 (127 degrees of freedom); 127 + 6 * 16 ~ 223 is exceeded with probability
    # ~1e-7 (and the seed is fixed). The first rows in memory order (the old behaviour) leave 3/4 of the cells
    # empty: chi2 ~ 3 * 12800 = 38400.
    assert chi2 < 223, chi2  # measured: 112 (max_rows=None), 106 (24); over 200 seeds 127 +- 14, at most 169
    assert counts.min() > 0  # every sequence at every position is drawn at some point


def test_rows_waiting_past_64_forwards_are_a_uniform_sample_of_all() -> None:
    lin = nn.Linear(3, 2)
    decorrelate(lin)
    (buffer,) = collect_rows(lin, generator=torch.Generator().manual_seed(0))
    forwards, per_forward = 1000, 4  # no update in between: e.g. an optimizer that steps outside the callback's sight
    for f in range(forwards):
        x = torch.stack([torch.full((per_forward,), float(f)), torch.arange(per_forward).float(), torch.zeros(4)], 1)
        lin(x)  # rows (forward, position, 0)
        assert buffer.pending_count <= 64 * per_forward  # bounded at every step, not only at the end
    assert buffer.seen_count == forwards * per_forward
    rows = buffer.take()
    assert rows is not None and rows.shape == (64 * per_forward, 3)
    assert len({(f, p) for f, p, _ in rows.tolist()}) == len(rows)  # distinct rows: a sample without replacement
    # Which forwards they come from, in 10 bins of 100: uniform sampling gives 25.6 per bin and chi2 ~ 9 +- 4.2
    # (9 degrees of freedom); 35 (= 9 + 6 * 4.2) is exceeded with probability ~1e-4 (and the seed is fixed). Keeping
    # the last (or first) rows puts all 256 in one bin: chi2 = 2304.
    counts = torch.bincount((rows[:, 0] // 100).long(), minlength=10).double()
    chi2 = ((counts - 25.6) ** 2 / 25.6).sum().item()
    assert chi2 < 35, chi2  # measured: 12.6; over 200 seeds 8.3 +- 3.5, at most 20.7
    assert buffer.seen_count == 0 and buffer.take() is None  # the count restarts after an update


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_captures_rows_once(use_reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint

    def rows_of(checkpointed: bool) -> dict[str, torch.Tensor | None]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        decorrelate(net)
        generator = torch.Generator().manual_seed(1)
        # 5 of the 16 rows drawn at random: the draws must not repeat either
        buffers = collect_rows(net[0], net[2], max_rows=5, generator=generator)
        x = torch.randn(16, 4, requires_grad=True)
        out = checkpoint(net, x, use_reentrant=use_reentrant) if checkpointed else net(x)
        out.sum().backward()  # the checkpointed run computes its forward again here
        return {"0": buffers[0].take(), "2": buffers[1].take()}

    expected, got = rows_of(False), rows_of(True)
    for name in expected:  # the rows of one forward, as without checkpointing: the recompute adds none
        assert got[name] is not None and expected[name] is not None
        assert got[name].shape == expected[name].shape == (5, 4 if name == "0" else 8), name
        assert torch.equal(got[name], expected[name]), name  # the same inputs through the same float32 ops


def test_forwards_past_the_cap_keep_its_worth_of_rows_and_count_every_row() -> None:
    lin = nn.Linear(3, 2)
    decorrelate(lin)
    (buffer,) = collect_rows(lin, generator=torch.Generator().manual_seed(0))
    for _ in range(100):  # no update takes them: past 64 forwards' worth, a uniform sample of that many is kept
        lin(torch.randn(4, 3))
    assert buffer.pending_count == 64 * 4 and buffer.seen_count == 400


def test_a_sequence_of_length_zero_keeps_no_rows() -> None:
    lin = nn.Linear(3, 2)
    decorrelate(lin)
    (buffer,) = collect_rows(lin)
    lin(torch.randn(4, 0, 3))  # (N, T = 0, d): no rows at all
    assert buffer.take() is None  # nothing waits, so no update on an empty set of rows


# ------------------------------------------------------------------ every form of R, against two explicit steps
def block_diagonal(R: torch.Tensor) -> torch.Tensor:
    return R if R.dim() == 2 else torch.block_diag(*R.unbind(0))


FORMS = [  # (layer, input shape, block, form)
    (lambda: nn.Linear(12, 5), (7, 12), None, "fused"),
    (lambda: nn.Linear(12, 5), (3, 7, 12), None, "input"),
    (lambda: nn.Linear(12, 5), (7, 12), 4, "fused"),
    (lambda: nn.Linear(12, 5), (3, 7, 12), 6, "input"),
    (lambda: nn.Linear(12, 5), (7, 12), None, "identity"),
    (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5), None, "fused"),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), (2, 4, 5, 5), None, "input"),
    (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5), 18, "fused"),
    (lambda: nn.Conv2d(4, 6, (3, 2), padding=(1, 0), dilation=(1, 2)), (2, 4, 5, 6), 12, "input"),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5), None, "fused"),  # one dense R per group
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5), 9, "fused"),  # blocks within each group
    (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), (2, 4, 5, 5), None, "fused"),  # depthwise
]


@pytest.mark.parametrize("make, shape, block, form", FORMS)
def test_every_form_is_w_of_rx_with_the_gradient_of_backprop_on_z(make, shape, block, form) -> None:
    torch.manual_seed(0)
    layer = make().double()
    w = layer.weight.detach().clone()
    b = None if layer.bias is None else layer.bias.detach().clone()
    decorrelate(layer)
    layer.decor_set_layout_(block, form)
    if form != "identity":  # the identity form stands for R = I, before a plan is made
        with torch.no_grad():
            layer.decor_R.add_(0.3 * torch.randn_like(layer.decor_R))
    R = block_diagonal(layer.decor_R.detach())  # (D, D) over all groups' features
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    grad_y = torch.randn_like(y)
    (y * grad_y).sum().backward()

    # Reference: step 1, z = R x on the rows (patches for a convolution); step 2, each group's W_g on its own z_g.
    groups, c_out = getattr(layer, "groups", 1), w.shape[0]
    if isinstance(layer, nn.Linear):
        rows, out_shape, delta = x.reshape(-1, 12), None, grad_y.reshape(-1, c_out)
    else:
        rows, h_out, w_out = explicit_conv_rows(x, layer)
        out_shape, delta = (x.shape[0], h_out, w_out, c_out), grad_y.permute(0, 2, 3, 1).reshape(-1, c_out)
    z = rows @ R.T
    d, per_group = z.shape[1] // groups, c_out // groups
    expected, grad_w = [], []
    for g in range(groups):
        z_g, w_g = z[:, g * d : (g + 1) * d], w[g * per_group : (g + 1) * per_group].reshape(per_group, d)
        expected.append(z_g @ w_g.T)
        grad_g = delta[:, g * per_group : (g + 1) * per_group].T @ z_g  # (C_out / groups, d)
        grad_w.append(grad_g.reshape(per_group, *w.shape[1:]))
    expected_y = torch.cat(expected, dim=1) + (0 if b is None else b)
    if out_shape is None:
        expected_y = expected_y.reshape(y.shape)
    else:
        expected_y = expected_y.reshape(out_shape).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-12)  # float64: rounding only
    torch.testing.assert_close(layer.weight.grad, torch.cat(grad_w), rtol=0, atol=1e-12)  # dL/dW = delta^T z

    plain = make().double()
    plain.load_state_dict(layer.state_dict())  # strict: the plain layer's keys, the fused weight
    fold(layer)
    assert type(layer) is type(plain)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected_y, rtol=0, atol=1e-12)  # fold is exact
        torch.testing.assert_close(plain(x), expected_y, rtol=0, atol=1e-12)


def test_grouped_conv_update_moves_each_group_by_its_own_rows() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    decorrelate(conv)
    assert conv.decor_R.shape == (2, 18, 18)  # one dense R per group of 2 channels x 3 x 3
    (buffer,) = collect_rows(conv)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    x[:, 1] += x[:, 0]  # correlated channels inside the first group
    conv.train()
    conv(x)
    rows = buffer.take()
    explicit, _, _ = explicit_conv_rows(x, conv)
    torch.testing.assert_close(rows, explicit)  # all patches of all channels, groups side by side
    R0 = conv.decor_R.clone()
    guarded_decorrelation_update_(conv.decor_R, rows, lr=0.01, kappa=0.5)
    for g in range(2):  # reference: the rule in float64 on group g's 18 features alone
        r, x_g = R0[g], rows[:, g * 18 : (g + 1) * 18]
        z = x_g @ r.T
        C = z.T @ z / z.shape[0]
        c = torch.diagonal(C)
        expected = r - 0.01 * (0.5 * (C - torch.diag(c)) + 0.5 * torch.diag(c - 1)) @ r
        torch.testing.assert_close(conv.decor_R[g], expected, rtol=0, atol=1e-12)


def test_set_layout_errors() -> None:
    lin, conv = nn.Linear(12, 5), nn.Conv2d(4, 6, 3, groups=2)
    decorrelate(lin)
    decorrelate(conv)
    with pytest.raises(ValueError, match=r"Expected `block` to divide d = 12 into equal blocks of whole input "
                       r"channels \(1 features each\), but got 5"):  # fmt: skip
        lin.decor_set_layout_(5, "fused")
    with pytest.raises(ValueError, match=r"Expected `block` to divide d = 18 .*\(9 features each\), but got 6"):
        conv.decor_set_layout_(6, "fused")  # 6 divides 18 but splits a channel's 3 x 3 patch
    with pytest.raises(ValueError, match=r"Expected `form` in \('fused', 'input', 'identity'\), but got 'rows'"):
        lin.decor_set_layout_(None, "rows")
    with pytest.raises(ValueError, match=r"Expected `form` 'fused' or 'identity' for DecorrelatedConv2d, but got"):
        conv.decor_set_layout_(None, "input")  # grouped: no input-side form
