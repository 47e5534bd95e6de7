"""Tiny models and data shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def correlated_data(n: int = 256, d: int = 8, seed: int = 0) -> TensorDataset:
    """Inputs with strongly correlated features (a random mixing of a few sources) and a linear target class."""
    g = torch.Generator().manual_seed(seed)
    sources = torch.randn(n, d, generator=g)
    mixing = torch.randn(d, d, generator=g) + 2.0 * torch.ones(d, d)
    x = sources @ mixing / d**0.5
    y = (sources[:, 0] > 0).long()
    return TensorDataset(x, y)


class TinyModule(pl.LightningModule):
    """A 2-layer MLP classifier; nothing decorrelation-specific in it."""

    def __init__(self, d: int = 8, hidden: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(correlated_data(), batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(correlated_data(64, seed=1), batch_size=32)


class TinyConvModule(TinyModule):
    """A small CNN on 1x8x8 inputs."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 3 * 3, 2),
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(128, 1, 8, 8, generator=g)
        x = base + torch.roll(base, 1, dims=-1) + torch.roll(base, 1, dims=-2)  # neighbouring pixels correlate
        return DataLoader(TensorDataset(x, (base.mean((1, 2, 3)) > 0).long()), batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(32, 1, 8, 8), torch.zeros(32, dtype=torch.long)), batch_size=16)


def quiet_trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def checkout_env() -> dict[str, str]:
    """The environment for a subprocess that must import this checkout's ``lightning_decor``: a script's folder comes
    first on its path, not the working directory, so it would import whichever copy is installed (another checkout's
    editable install, a wheel), and compare the test with other code than this one."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(autouse=True)
def _seed() -> None:
    pl.seed_everything(0, verbose=False)


@pytest.fixture(autouse=True)
def plan_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty plan cache for every test (and the subprocesses it starts): no test plans from costs another
    test, or an earlier run of the suite, kept in ~/.cache."""
    folder = tmp_path_factory.mktemp("plan_cache")
    monkeypatch.setenv("LIGHTNING_DECOR_CACHE", str(folder))
    return folder


def collect_rows(
    *layers: nn.Module, fraction: float = 1.0, max_rows: int | None = None, generator: torch.Generator | None = None
) -> list:
    """Give patched layers row buffers that keep their training forwards' rows, sharing one sampling (as an engine
    does); returns the buffers (``lightning_decor.rows.RowBuffer``)."""
    from lightning_decor.rows import RowBuffer, Sampling

    sampling = Sampling(fraction, max_rows, generator, collect=True)
    buffers = []
    for layer in layers:
        layer.decor_buffer = RowBuffer(sampling)
        buffers.append(layer.decor_buffer)
    return buffers
