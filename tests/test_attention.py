"""Transformer layers: every path (training, and eval under no_grad/inference_mode, where PyTorch takes fused fast
paths that read weights directly) computes with W @ R.

References: the folded plain model (PyTorch's own modules with the fused weights, taking their fast paths) and
PyTorch's own slow-path forward of the same module."""

from __future__ import annotations

import copy
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decor import DecorrelationCallback, decorrelate, decorrelation_matrices, fold
from lightning_decor.attention import SlowPathTransformerEncoderLayer
from lightning_decor.layers import DecorrelatedLayer

GRAD_MODES: dict[str, Callable[[], object]] = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@torch.no_grad()
def randomise_r(model: nn.Module, seed: int = 0) -> None:
    """Every R of ``model`` (every block) becomes a random well-conditioned ``I + 0.3 N / sqrt(b)``."""
    g = torch.Generator().manual_seed(seed)
    for R in decorrelation_matrices(model).values():
        b = R.shape[-1]
        R.copy_(torch.eye(b) + 0.3 * torch.randn(R.shape, generator=g) / b**0.5)


def encoder(norm_first: bool = False, num_layers: int = 2) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=norm_first)
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

    def __init__(self) -> None:
        super().__init__()
        self.encoder = encoder()
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(sequences(64), batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(sequences(32, seed=1), batch_size=16)


def sequences(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 7, 16, generator=g) @ (torch.randn(16, 16, generator=g) + 1.0)  # correlated features
    return TensorDataset(x, (x[:, 0, 0] > 0).long())


@pytest.mark.parametrize("fold_on_fit_end", [False, True])
def test_validation_of_a_transformer_sees_the_trained_function(tmp_path, fold_on_fit_end: bool) -> None:  # type: ignore[no-untyped-def]
    model = TinyTransformer()
    cb = DecorrelationCallback(decor_lr=0.05, sample_fraction=1.0, max_rows=None, fold_on_fit_end=fold_on_fit_end)
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
