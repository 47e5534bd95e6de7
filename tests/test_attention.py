"""Transformer layers: every path (training, and eval under no_grad/inference_mode, where PyTorch takes fused fast
paths that read weights directly) computes with W @ R.

References: the folded plain model (PyTorch's own modules with the fused weights, taking their fast paths) and
PyTorch's own slow-path forward of the same module."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.utils.data import DataLoader, TensorDataset

from lightning_decor import DecorrelationCallback, decorrelate, decorrelation_matrices, fold
from lightning_decor.attention import AttentionWithDecorrelatedOutProj, SlowPathTransformerEncoderLayer
from lightning_decor.functional import guarded_decorrelation_update_
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.patching import eligible_layers

from conftest import collect_rows, quiet_trainer

GRAD_MODES: dict[str, Callable[[], object]] = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@torch.no_grad()
def randomise_r(model: nn.Module, seed: int = 0) -> None:
    """Every R of ``model`` (every block) becomes a random well-conditioned ``I + 0.3 N / sqrt(b)``."""
    g = torch.Generator().manual_seed(seed)
    for R in decorrelation_matrices(model).values():
        b = R.shape[-1]
        R.copy_(torch.eye(b) + 0.3 * torch.randn(R.shape, generator=g) / b**0.5)


def encoder(norm_first: bool = False, num_layers: int = 2, dropout: float = 0.1) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, batch_first=True, norm_first=norm_first)
    # (norm_first has no nested-tensor path; saying so avoids PyTorch's warning)
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=not norm_first)


def padding_mask() -> torch.Tensor:
    mask = torch.zeros(4, 7, dtype=torch.bool)  # True: padding, left-aligned sequences as the nested path needs
    mask[1, 5:] = True
    mask[3, 3:] = True
    return mask


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("grad_mode", sorted(GRAD_MODES))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_in_eval_computes_with_fused_weights(
    grad_mode: str, masked: bool, norm_first: bool
) -> None:
    model = encoder(norm_first)
    decorrelate(model)
    assert {"layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"} <= set(
        decorrelation_matrices(model)
    )
    randomise_r(model)
    plain = copy.deepcopy(model)
    fold(plain)  # PyTorch's own modules with W @ R as weights: in eval they take the fused fast paths
    assert all(type(layer) is nn.TransformerEncoderLayer for layer in plain.layers)
    assert plain.use_nested_tensor is not norm_first  # restored: the nested fast path is back
    x = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(1))
    mask = padding_mask() if masked else None
    model.eval(), plain.eval()
    with GRAD_MODES[grad_mode]():
        got, expected = model(x, src_key_padding_mask=mask), plain(x, src_key_padding_mask=mask)
    kept = ~mask if mask is not None else torch.ones(4, 7, dtype=torch.bool)  # padded positions are not outputs
    # Same float32 math on O(1) activations, by PyTorch's fused kernel on one side and its separate ops on the
    # other: measured up to 7e-7 apart; the raw W (the bug) is 0.4 away.
    torch.testing.assert_close(got[kept], expected[kept], rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_slow_path_encoder_layer_is_pytorchs_own_slow_path(norm_first: bool) -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=norm_first)
    decorrelate(layer)
    assert type(layer) is SlowPathTransformerEncoderLayer
    randomise_r(layer)
    x, mask = torch.randn(4, 7, 16), padding_mask()
    for training in (True, False):  # training: dropout drawn in the same order from the same seed
        layer.train(training)
        torch.manual_seed(3)
        got = layer(x, src_key_padding_mask=mask)
        torch.manual_seed(3)
        expected = nn.TransformerEncoderLayer.forward(layer, x, src_key_padding_mask=mask)  # grad on: slow path
        assert torch.equal(got, expected)
    fold(layer)
    assert type(layer) is nn.TransformerEncoderLayer


class TinyTransformer(pl.LightningModule):
    """A 2-layer nn.TransformerEncoder classifier on random sequences; nothing decorrelation-specific in it."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = encoder(dropout=dropout)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(sequences(64), batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(sequences(32, seed=1), batch_size=16)


def sequences(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 7, 16, generator=g) @ (torch.randn(16, 16, generator=g) + 1.0) / 4  # correlated features
    return TensorDataset(x, (x[:, 0, 0] > 0).long())


@pytest.mark.parametrize("fold_on_fit_end", [False, True])
def test_validation_of_a_transformer_sees_the_trained_function(tmp_path, fold_on_fit_end: bool) -> None:
    model = TinyTransformer()
    # No cost plan: which layers it keeps depends on the measured step time (machine load), and this test needs R in
    # linear1 to move on every machine.
    cb = DecorrelationCallback(
        decor_lr=0.1, sample_fraction=1.0, max_rows=None, fold_on_fit_end=fold_on_fit_end, max_overhead=None
    )
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb])
    trainer.fit(model)
    plain = copy.deepcopy(model)
    fold(plain)  # a no-op when the callback folded already
    assert all(type(layer) is nn.TransformerEncoderLayer for layer in plain.encoder.layers) and not any(
        isinstance(m, DecorrelatedLayer) for m in plain.modules()
    )
    if fold_on_fit_end:  # the callback handed back PyTorch's plain modules, fast paths included
        assert all(type(layer) is nn.TransformerEncoderLayer for layer in model.encoder.layers)
        assert model.encoder.use_nested_tensor
    else:
        assert (model.encoder.layers[0].linear1.decor_R - torch.eye(16)).abs().max() > 1e-2  # R moved
    x, y = sequences(32, seed=1).tensors
    plain.eval()
    with torch.no_grad():  # the fused weights on PyTorch's fast path
        expected = F.cross_entropy(plain(x), y).item()
    # float32 logits of O(1) by two kernel paths (about 1e-6 apart, see above); the raw W gave 1.6e-3 here
    assert trainer.validate(model, verbose=False)[0]["val_loss"] == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------- attention
E, HEADS = 16, 4


def reference_update(R: torch.Tensor, x: torch.Tensor, lr: float = 0.05, kappa: float = 0.5) -> torch.Tensor:
    """One step of the rule of Dalm et al. in float64: z = x R^T, C = z^T z / n,
    R <- R - lr [(1 - kappa)(C - diag C) + kappa diag(diag C - 1)] R."""
    R, x = R.double(), x.double()
    z = x @ R.T
    C = z.T @ z / z.shape[0]
    c = torch.diagonal(C)
    return R - lr * ((1 - kappa) * (C - torch.diag(c)) + kappa * torch.diag(c - 1)) @ R


def per_input(mha: nn.Module) -> list[torch.Tensor]:
    """The dense R of the query, key and value (block-diagonal R written out)."""
    blocks = mha.decor_R.reshape(3, -1, *mha.decor_R.shape[-2:])
    return [torch.block_diag(*b) for b in blocks]


def two_step_reference(
    plain: nn.MultiheadAttention, Rs: list[torch.Tensor], R_out: torch.Tensor, query, key, value, **kwargs
):
    """R applied to the input rows, then the plain module: the inputs times R_q, R_k, R_v, PyTorch's attention with
    an identity output projection, then R_out on its output rows and the plain out_proj (W, b) by hand."""
    ref = copy.deepcopy(plain)
    W, b = ref.out_proj.weight.detach().clone(), ref.out_proj.bias.detach().clone()
    with torch.no_grad():
        ref.out_proj.weight.copy_(torch.eye(E))
        ref.out_proj.bias.zero_()
    q, k, v = query @ Rs[0].T, key @ Rs[1].T, value @ Rs[2].T
    attended, weights = ref(q, k, v, **kwargs)  # q, k, v are distinct tensors: PyTorch's slow path
    return F.linear(attended @ R_out.T, W, b), weights, attended


def attention_inputs(batch_first: bool, cross: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    shape = (lambda n, length: (n, length, E)) if batch_first else (lambda n, length: (length, n, E))
    x = torch.randn(*shape(3, 5), generator=g) @ (torch.eye(E) + torch.randn(E, E, generator=g) / 2)
    memory = torch.randn(*shape(3, 6), generator=g) if cross else x  # cross-attention: L = 5 queries, S = 6 keys
    return x, memory


MODES = {
    "train": (True, torch.enable_grad),
    "eval_no_grad": (False, torch.no_grad),  # plain MHA's fused fast path territory
    "eval_inference_mode": (False, torch.inference_mode),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_computes_with_decorrelated_projections_on_every_path(
    batch_first: bool, cross: bool, mode: str
) -> None:
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
    plain = copy.deepcopy(mha)
    assert decorrelate(mha) == ["", "out_proj"]
    randomise_r(mha)
    Rs, R_out = per_input(mha), mha.out_proj.decor_R
    x, memory = attention_inputs(batch_first, cross)
    L, S = (5, 6) if cross else (5, 5)
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    padding = torch.zeros(3, S, dtype=torch.bool)
    padding[1, 4:] = True
    training, grad_mode = MODES[mode]
    mha.train(training), plain.train(training)
    buffers = collect_rows(mha, mha.out_proj)
    for masks in ({}, {"key_padding_mask": padding}, {"attn_mask": causal}):
        for need_weights in (True, False):
            for collect in (False, True):  # sampling rows: out_proj is called on the attention output
                buffers[0].sampling.collect = collect
                kwargs: dict = dict(need_weights=need_weights, **masks)
                with grad_mode():
                    got, got_weights = mha(x, memory, memory, **kwargs)
                    expected, weights, _ = two_step_reference(plain, Rs, R_out, x, memory, memory, **kwargs)
                # float32 on O(1) values: W (R x) in two products against (W R) x in one; measured <= 2e-7
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
                if need_weights:
                    torch.testing.assert_close(got_weights, weights, rtol=0, atol=1e-6)  # softmax in [0, 1]
                else:
                    assert got_weights is None
                buffers[0].take(), buffers[1].take()


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_samples_the_rows_of_each_input_and_updates_each_r_from_its_own(
    batch_first: bool, cross: bool
) -> None:
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
    plain = copy.deepcopy(mha)
    decorrelate(mha)
    randomise_r(mha)
    Rs, R_out = per_input(mha), mha.out_proj.decor_R.clone()
    x, memory = attention_inputs(batch_first, cross)
    buffers = collect_rows(mha, mha.out_proj)
    mha(x, memory, memory, need_weights=False)
    rows, out_rows = buffers[0].take(), buffers[1].take()
    q_rows, kv_rows = x.reshape(-1, E), memory.reshape(-1, E)  # every (position, sample) row of each input
    assert rows.shape == (15, 3 * E)  # 15 query rows; the 18 key/value rows are sampled down to 15
    torch.testing.assert_close(rows[:, :E], q_rows, rtol=0, atol=0)
    if cross:  # key and value rows are the same draw of memory rows
        assert torch.equal(rows[:, E : 2 * E], rows[:, 2 * E :])
        assert all((kv_rows == r).all(dim=1).any() for r in rows[:, E : 2 * E])
    else:  # self-attention: the three inputs are one tensor
        assert torch.equal(rows, torch.cat([q_rows] * 3, dim=1))
    _, _, attended = two_step_reference(plain, Rs, R_out, x, memory, memory, need_weights=False)
    if batch_first:
        attended = attended.transpose(0, 1)  # out_proj works on the (L, N, E) layout of PyTorch's attention
    torch.testing.assert_close(out_rows, attended.reshape(-1, E), rtol=0, atol=1e-5)  # as above
    guarded_decorrelation_update_(mha.decor_R, rows, lr=0.05, kappa=0.5)
    new = per_input(mha)
    for p, part in enumerate((rows[:, :E], rows[:, E : 2 * E], rows[:, 2 * E :])):
        # float32 update against the float64 formula, entries O(1)
        torch.testing.assert_close(new[p].double(), reference_update(Rs[p], part), rtol=0, atol=1e-6)


def test_attention_state_dict_and_fold_give_the_plain_module() -> None:
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    params = list(mha.parameters())
    decorrelate(mha, block_size=8)  # two blocks per input: (3 * 2, 8, 8)
    assert mha.decor_R.shape == (6, 8, 8) and mha.out_proj.decor_R.shape == (2, 8, 8)
    randomise_r(mha)
    x, _ = attention_inputs(True, False)
    mha.eval()
    with torch.no_grad():
        expected = mha(x, x, x)[0]
    plain = nn.MultiheadAttention(E, HEADS, batch_first=True).eval()
    assert set(mha.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(mha.state_dict())  # strict; the fused weights under the usual keys
    with torch.no_grad():  # the plain module on its fused fast path; rounding as above
        torch.testing.assert_close(plain(x, x, x)[0], expected, rtol=0, atol=1e-5)
    fresh = copy.deepcopy(mha)
    fresh.load_state_dict(mha.state_dict())  # into a patched module: R restarts from the identity
    assert torch.equal(fresh.decor_R, torch.eye(8).expand(6, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, x, x)[0], expected, rtol=0, atol=1e-5)
    assert fold(mha) == ["", "out_proj"]
    assert type(mha) is nn.MultiheadAttention and type(mha.out_proj) is NonDynamicallyQuantizableLinear
    assert list(mha.parameters()) == params and not hasattr(mha, "decor_R")  # same Parameter objects
    with torch.no_grad():
        torch.testing.assert_close(mha(x, x, x)[0], expected, rtol=0, atol=1e-5)


def test_attention_with_separate_projections_decorrelates_its_out_proj_only() -> None:
    mha = nn.MultiheadAttention(E, HEADS, kdim=8, vdim=8)
    reasons = eligible_layers(mha)
    assert reasons == {"": "separate q/k/v projection weights (kdim or vdim != embed_dim) are not decorrelated",
                       "out_proj": None}  # fmt: skip
    plain = copy.deepcopy(mha)
    assert decorrelate(mha) == ["out_proj"] and type(mha) is AttentionWithDecorrelatedOutProj
    randomise_r(mha)
    x, memory = torch.randn(5, 3, E), torch.randn(6, 3, 8)
    expected, _, _ = two_step_reference(plain, [torch.eye(E), torch.eye(8), torch.eye(8)],
                                        mha.out_proj.decor_R, x, memory, memory)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(mha(x, memory, memory)[0], expected, rtol=0, atol=1e-5)  # as above
    fold(mha)
    assert type(mha) is nn.MultiheadAttention and type(mha.out_proj) is NonDynamicallyQuantizableLinear
    with torch.no_grad():
        torch.testing.assert_close(mha(x, memory, memory)[0], expected, rtol=0, atol=1e-5)


def test_patched_attention_refuses_nested_tensors() -> None:
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    decorrelate(mha)
    x = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(5, E)])
    match = (
        r"Expected dense `query`, `key` and `value`: a decorrelated nn.MultiheadAttention computes on PyTorch's "
        r"slow path, which takes no nested tensors, but got is_nested=True, True, True\."
    )
    with pytest.raises(ValueError, match=match):
        mha.eval()(x, x, x)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("name", ["vit", "transformer"])
def test_every_projection_of_a_vit_and_a_transformer_is_decorrelated(name: str) -> None:
    if name == "vit":
        model: nn.Module = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
        )
        inputs: tuple = (torch.randn(2, 3, 32, 32),)
        attention = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    else:
        model = nn.Transformer(d_model=E, nhead=HEADS, num_encoder_layers=2, num_decoder_layers=2,
                               dim_feedforward=32, batch_first=True)  # fmt: skip
        inputs = (torch.randn(2, 7, E), torch.randn(2, 5, E))
        attention = [f"encoder.layers.{i}.self_attn" for i in range(2)]
        attention += [f"decoder.layers.{i}.{a}" for i in range(2) for a in ("self_attn", "multihead_attn")]
    decorrelate(model)
    Rs = decorrelation_matrices(model)
    assert {*attention, *(f"{a}.out_proj" for a in attention)} <= set(Rs)  # in- and output projections
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in Rs]  # every Linear
    randomise_r(model)
    plain = copy.deepcopy(model)
    fold(plain)  # PyTorch's own modules with the fused weights, fast paths included
    model.eval(), plain.eval()
    with torch.no_grad():
        # float32, O(1) activations through a few layers by two kernel paths; the raw weights are >0.1 off
        torch.testing.assert_close(model(*inputs), plain(*inputs), rtol=0, atol=1e-4)


def raw_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The raw parameters (W, not W R) and every R of a patched model."""
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"{n}.R": R.clone() for n, R in decorrelation_matrices(model).items()})
    return state


@pytest.mark.filterwarnings("ignore:.*`ckpt_path`")
def test_transformer_checkpoints_load_plainly_and_resume_exactly(tmp_path) -> None:
    def fit(epochs: int, **kwargs: Any) -> tuple[TinyTransformer, pl.Trainer]:
        pl.seed_everything(0)
        model = TinyTransformer(dropout=0.0)  # no dropout: the global RNG is not part of a checkpoint
        # No cost plan: the resumed run carries the checkpoint's plan, but the uninterrupted run would plan afresh
        # from its own timed steps, which on a loaded machine keep other layers (seen in CI).
        cb = DecorrelationCallback(
            decor_lr=0.01, sample_fraction=0.5, max_rows=24, fold_on_fit_end=False, max_overhead=None
        )
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = quiet_trainer(tmp_path, max_epochs=epochs, callbacks=[cb, ckpt], enable_checkpointing=True,
                                limit_val_batches=0)  # fmt: skip
        trainer.fit(model, **kwargs)
        return model, trainer

    first, _ = fit(1)
    saved = decorrelation_matrices(first)["encoder.layers.0.self_attn"].clone()
    plain = TinyTransformer.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # strict, into plain modules
    assert not any(isinstance(m, DecorrelatedLayer) for m in plain.modules())
    x = sequences(8, seed=3).tensors[0]
    first.eval(), plain.eval()
    with torch.no_grad():  # rounding as above
        torch.testing.assert_close(plain(x), first(x), rtol=0, atol=1e-5)
    resumed, _ = fit(2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    full, _ = fit(2)
    expected, got = raw_state(full), raw_state(resumed)
    assert "encoder.layers.0.self_attn.R" in got and set(got) == set(expected)
    for name in expected:  # the same float32 operations in the same order
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert (got["encoder.layers.0.self_attn.R"] - saved).abs().max() > 1e-3  # R moved on after the checkpoint


def test_correlation_picture_of_an_attention_in_projection_is_refused(tmp_path) -> None:
    model = TinyTransformer()
    cb = DecorrelationCallback(log_correlation_image="encoder.layers.0.self_attn")
    match = (
        r"Expected `log_correlation_image` to name a Linear or convolution, but got 'encoder.layers.0.self_attn', "
        r"an attention in-projection \(one R per input\); its out_proj can be drawn."
    )
    with pytest.raises(ValueError, match=match):
        quiet_trainer(tmp_path, callbacks=[cb]).fit(model)
    assert not any(isinstance(m, DecorrelatedLayer) for m in model.modules())  # left plain, fast paths included
    assert type(model.encoder.layers[0]) is nn.TransformerEncoderLayer and model.encoder.use_nested_tensor
