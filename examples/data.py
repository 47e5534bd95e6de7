"""DataModules for the examples. Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` when it is
installed, otherwise torchvision downloads it; either way torchvision's ``FashionMNIST`` reads it."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchvision
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def prepare_fashion_mnist(root: str | os.PathLike[str], download: bool = True) -> Path:
    """Make ``root/FashionMNIST/raw`` readable by torchvision: from the Debian copy, or by torchvision's download."""
    raw = Path(root) / "FashionMNIST" / "raw"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if all((raw / n).exists() for n in names):
        return raw
    if all((DEBIAN_FASHION_MNIST / f"{n}.gz").exists() for n in names):
        raw.mkdir(parents=True, exist_ok=True)
        for n in names:
            with gzip.open(DEBIAN_FASHION_MNIST / f"{n}.gz", "rb") as src, open(raw / n, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return raw
    if not download:
        raise FileNotFoundError(
            f"Fashion-MNIST is neither in {raw} nor in {DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist)."
        )
    torchvision.datasets.FashionMNIST(root, train=True, download=True)
    torchvision.datasets.FashionMNIST(root, train=False, download=True)
    return raw


def _tensors(root: str, train: bool, limit: int | None) -> TensorDataset:
    ds = torchvision.datasets.FashionMNIST(root, train=train, download=False)
    x: Tensor = ds.data[:limit].float().div_(255).sub_(FASHION_MEAN).div_(FASHION_STD).unsqueeze(1)  # (N, 1, 28, 28)
    return TensorDataset(x, ds.targets[:limit].clone())


class FashionMNISTDataModule(pl.LightningDataModule):
    """Fashion-MNIST held in memory as normalised tensors; batches are sliced, not collated sample by sample.

    Args:
        data_dir: Where torchvision's ``FashionMNIST/raw`` lives (filled from Debian's copy when present).
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation/test (the 10,000 test images serve as validation).
        train_limit: Use only the first N training images (``None``: all 60,000).
        download: Allow torchvision to download when no local copy exists.
        seed: Seed of the shuffling generator (the data order is the same for every run with this seed).
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        train_limit: int | None = None,
        download: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.eval_batch_size = data_dir, batch_size, eval_batch_size
        self.train_limit, self.download, self.seed = train_limit, download, seed

    def prepare_data(self) -> None:
        prepare_fashion_mnist(self.data_dir, download=self.download)

    def setup(self, stage: str) -> None:
        if not hasattr(self, "train_set"):
            self.train_set = _tensors(self.data_dir, True, self.train_limit)
            self.test_set = _tensors(self.data_dir, False, None)

    def _loader(self, ds: TensorDataset, batch_size: int, shuffle: bool) -> DataLoader:
        if shuffle:
            sampler: torch.utils.data.Sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(self.seed))
        else:
            sampler = SequentialSampler(ds)
        # A batch sampler and batch_size=None: TensorDataset indexes a whole batch at once (no per-sample collate).
        return DataLoader(ds, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
