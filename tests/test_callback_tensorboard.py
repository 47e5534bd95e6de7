"""DecorrelationCallback's opt-in TensorBoard pictures: R histograms and the input-correlation image."""

from __future__ import annotations

import glob
import io

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from lightning_decor import DecorrelationCallback, decorrelation_matrices
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.planner import plain_steps

from conftest import TinyConvModule, TinyModule, correlated_data, quiet_trainer


class InOrderData(pl.LightningDataModule):
    """``correlated_data()`` in a fixed order, so the last training batch of an epoch is known."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(correlated_data(), batch_size=32, shuffle=False)


def events(tmp_path) -> EventAccumulator:
    acc = EventAccumulator(glob.glob(str(tmp_path / "tb" / "*"))[0], size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    return acc


def abs_corr64(x: torch.Tensor) -> np.ndarray:
    """Reference: |C_ij| / sqrt(C_ii C_jj) of the second moments C = x^T x / n, in float64."""
    x = x.double()
    c = x.T @ x / x.shape[0]
    s = c.diagonal().sqrt()
    return (c / torch.outer(s, s)).abs().numpy()


def test_histograms_and_correlation_image_match_an_independent_reference(tmp_path) -> None:
    model = TinyModule()
    cb = DecorrelationCallback(
        max_overhead=None,
        decor_lr=0.05,
        normalize="none",  # the rule this decor_lr was chosen for (a picture test, not a rule test)
        sample_fraction=1.0,
        fold_on_fit_end=False,
        log_histograms_every_n_epochs=2,
        log_correlation_image="net.0",
    )
    trainer = quiet_trainer(
        tmp_path, max_epochs=4, callbacks=[cb], logger=TensorBoardLogger(tmp_path, name="tb"), limit_val_batches=0
    )
    trainer.fit(model, datamodule=InOrderData())
    acc = events(tmp_path)
    assert set(acc.Tags()["histograms"]) == {"decor/R_offdiag/net.0", "decor/R_offdiag/net.2"}
    assert acc.Tags()["images"] == ["decor/correlation/net.0"]

    # Histograms after epochs 2 and 4 (8 steps each); the last one describes the final R.
    hists = acc.Histograms("decor/R_offdiag/net.0")
    assert [h.step for h in hists] == [16, 32]
    R = decorrelation_matrices(model)["net.0"].double()
    off = R[~torch.eye(8, dtype=torch.bool)]
    h = hists[-1].histogram_value
    assert h.num == 8 * 7 and sum(h.bucket) == 8 * 7
    # min, max and the last limit are entries of R itself: exact (measured 0). The sums are taken in float32 over 56
    # entries, the reference in float64: measured 1.1e-6 for the sum (of ~8, whose worst-case float32 error
    # 56 * 6e-8 * sum |v| is ~3e-5; 1e-4 leaves 90x) and a relative 6e-8 for the sum of squares (1e-5 leaves 150x).
    assert h.min == pytest.approx(off.min().item(), abs=1e-6) and h.max == pytest.approx(off.max().item(), abs=1e-6)
    assert h.sum == pytest.approx(off.sum().item(), abs=1e-4)
    assert h.sum_squares == pytest.approx(off.square().sum().item(), rel=1e-5)
    assert h.bucket_limit[-1] == pytest.approx(off.max().item(), abs=1e-6)

    # One picture per epoch; the last one is the epoch's last batch (rows 224..255), before (x) and after (x R^T).
    images = acc.Images("decor/correlation/net.0")
    assert [im.step for im in images] == [8, 16, 24, 32]
    picture = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("L"), dtype=np.int64)
    assert picture.shape == (8, 8 + 2 + 8)
    x = correlated_data().tensors[0][224:256]
    before, after = abs_corr64(x), abs_corr64(x @ R.float().T)
    # TensorBoard stores (p * 255).astype(uint8): truncation loses less than one grey level. The callback computes
    # p in float32, the reference in float64: allow 1e-4 of error in |corr| (~100x float32 rounding here), i.e.
    # 255e-4 ~ 0.03 grey levels on top. (Without it a pixel just above an integer failed by 6e-14 on one machine.)
    tolerance = 1.0 + 255 * 1e-4
    assert np.abs(picture[:, :8] - before * 255).max() <= tolerance
    assert np.abs(picture[:, 10:] - after * 255).max() <= tolerance
    off_mask = ~np.eye(8, dtype=bool)
    assert after[off_mask].mean() < 0.5 * before[off_mask].mean()  # the picture shows the decorrelation (0.20, 0.84)
    assert not any(m._forward_hooks for m in model.modules())  # the input hook is gone after fit


def test_conv_layer_picture_uses_patch_rows(tmp_path) -> None:
    cb = DecorrelationCallback(log_correlation_image="net.2", log_image_every_n_epochs=2, max_overhead=None)
    model = TinyConvModule()
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb], logger=TensorBoardLogger(tmp_path, name="tb")).fit(model)
    images = events(tmp_path).Images("decor/correlation/net.2")
    assert [(im.step, im.height, im.width) for im in images] == [(8, 36, 36 + 2 + 36)]  # d = 4 channels * 3 * 3
    assert not any(isinstance(m, DecorrelatedLayer) or m._forward_hooks for m in model.modules())


def test_pictures_need_a_tensorboard_logger(tmp_path) -> None:
    cb = DecorrelationCallback(log_histograms_every_n_epochs=1, log_correlation_image="net.0", max_overhead=100.0)
    trainer = quiet_trainer(tmp_path, callbacks=[cb], logger=CSVLogger(tmp_path), max_epochs=3)
    with pytest.warns(UserWarning, match="log only through a TensorBoardLogger, and the Trainer has none"):
        trainer.fit(TinyModule())
    assert cb.updates == 24 - plain_steps()  # training went on (R moves after the planning steps)


def test_unknown_picture_layer_fails_before_training_and_leaves_a_plain_model(tmp_path) -> None:
    model = TinyModule()
    cb = DecorrelationCallback(log_correlation_image="net.1")  # the Tanh: not a decorrelated layer
    match = (
        r"Expected `log_correlation_image` to name a decorrelated layer, one of \['net.0', 'net.2'\], but got 'net.1'."
    )
    with pytest.raises(ValueError, match=match):
        quiet_trainer(tmp_path, callbacks=[cb]).fit(model)
    assert cb.updates == 0
    assert not any(isinstance(m, DecorrelatedLayer) for m in model.modules())


def test_picture_hook_is_removed_after_an_exception(tmp_path) -> None:
    hooked: list[bool] = []

    class Crash(TinyModule):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1 and batch_idx == 3:
                hooked.append(bool(self.net[0]._forward_hooks))
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Crash()
    cb = DecorrelationCallback(log_correlation_image="net.0", max_overhead=None)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[cb], logger=TensorBoardLogger(tmp_path, name="tb"))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model)
    assert hooked == [True]  # the hook was there when the exception came
    assert not any(m._forward_hooks for m in model.modules())
    assert cb.pictures.input is None  # no batch kept alive


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"log_histograms_every_n_epochs": 0},
            ValueError,
            r"Expected `log_histograms_every_n_epochs` to be >= 1 or None, but got 0\.",
        ),
        (
            {"log_histograms_every_n_epochs": 1.5},
            TypeError,
            r"Expected `log_histograms_every_n_epochs` to be an int or None, but got float: 1\.5\.",
        ),
        (
            {"log_histograms_every_n_epochs": True},
            TypeError,
            r"Expected `log_histograms_every_n_epochs` to be an int or None, but got bool: True\.",
        ),
        (
            {"log_correlation_image": 0},
            TypeError,
            r"Expected `log_correlation_image` to be a layer name \(str\) or None, but got int: 0\.",
        ),
        ({"log_image_every_n_epochs": 0}, ValueError, r"Expected `log_image_every_n_epochs` to be >= 1, but got 0\."),
        (
            {"log_image_every_n_epochs": None},
            TypeError,
            r"Expected `log_image_every_n_epochs` to be an int, but got NoneType: None\.",
        ),
        (
            {"log_image_every_n_epochs": "2"},
            TypeError,
            r"Expected `log_image_every_n_epochs` to be an int, but got str: '2'\.",
        ),
    ],
)
def test_bad_picture_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DecorrelationCallback(**kwargs)


def test_picture_helpers_accept_a_stack_of_diagonal_blocks() -> None:
    from lightning_decor.pictures import correlation_picture as _correlation_picture
    from lightning_decor.pictures import off_diagonal as _off_diagonal

    blocks = torch.randn(2, 3, 3, dtype=torch.float64)
    dense = torch.zeros(6, 6, dtype=torch.float64)
    dense[:3, :3], dense[3:, 3:] = blocks[0], blocks[1]
    expected = [blocks[g, i, j] for g in range(2) for i in range(3) for j in range(3) if i != j]
    torch.testing.assert_close(_off_diagonal(blocks), torch.stack(expected))  # copies: exact
    x = torch.randn(50, 6, dtype=torch.float64)
    picture = _correlation_picture(x, blocks)
    assert picture.shape == (1, 6, 6 + 2 + 6)
    torch.testing.assert_close(picture, _correlation_picture(x, dense))  # both draw the same dense matrix: exact
    # a float32 picture of float64 correlations: measured 9e-9 (float32 rounding of values <= 1), 1e-6 leaves 100x
    torch.testing.assert_close(picture[0, :, 8:].double(), torch.from_numpy(abs_corr64(x @ dense.T)), atol=1e-6, rtol=0)


def test_the_picture_keeps_a_copy_of_its_input_or_its_rows() -> None:
    """The picture layer's input may be a CUDA graph's output, overwritten by the next replay: the hook keeps a copy,
    or, when the picture's at most 8192 rows are fewer numbers than the input, those rows drawn from it now."""
    from lightning_decor import decorrelate
    from lightning_decor.pictures import TensorBoardPictures

    net = nn.Sequential(nn.Linear(4, 2))
    decorrelate(net)
    pictures = TensorBoardPictures(None, "0", 1)
    small, large = torch.randn(32, 4), torch.randn(64, 200, 4)  # 128 numbers; 51200 > 8192 rows * 4
    net.train()
    pictures.keep_input(net[0], (small,), None)
    assert pictures.rows is None and torch.equal(pictures.input, small)
    assert pictures.input.untyped_storage().data_ptr() != small.untyped_storage().data_ptr()
    pictures.keep_input(net[0], (large,), None)
    assert pictures.input is None and pictures.rows.shape == (8192, 4)
    flat = large.reshape(-1, 4)
    assert all((flat == row).all(1).any() for row in pictures.rows[:256])  # rows of the input itself
