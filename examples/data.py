"""DataModules for the examples. Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` when it is
installed, otherwise torchvision downloads it; either way torchvision's ``FashionMNIST`` reads it. CIFAR-10 is
torchvision's ``CIFAR10`` (downloaded on request); ImageNet is an ``ImageFolder`` tree the user already has."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchvision
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset
from torchvision.transforms import v2 as T

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


def _image_loader(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 through torchvision's ``CIFAR10``: 50,000 training and 10,000 test images (the test set serves as
    validation), 32x32 RGB, normalised with the training set's per-channel mean and std.

    Args:
        data_dir: Where torchvision keeps ``cifar-10-batches-py``.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation/test.
        num_workers: DataLoader worker processes.
        download: Let torchvision download the data (about 170 MB) into ``data_dir`` when it is missing.
        augment: Random crop (4-pixel padding) and horizontal flip on the training images.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        num_workers: int = 4,
        download: bool = True,
        augment: bool = True,
    ) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.eval_batch_size = data_dir, batch_size, eval_batch_size
        self.num_workers, self.download, self.augment = num_workers, download, augment

    def prepare_data(self) -> None:
        for train in (True, False):  # torchvision says how to get the data when it is missing and download=False
            torchvision.datasets.CIFAR10(self.data_dir, train=train, download=self.download)

    def transform(self, train: bool) -> T.Compose:
        """The image transform of the training (``train=True``) or evaluation images."""
        augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train and self.augment else []
        return T.Compose(
            [T.ToImage(), *augment, T.ToDtype(torch.float32, scale=True), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        )

    def setup(self, stage: str) -> None:
        if not hasattr(self, "train_set"):
            self.train_set = torchvision.datasets.CIFAR10(self.data_dir, train=True, transform=self.transform(True))
            self.test_set = torchvision.datasets.CIFAR10(self.data_dir, train=False, transform=self.transform(False))

    def train_dataloader(self) -> DataLoader:
        return _image_loader(self.train_set, self.batch_size, True, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return _image_loader(self.test_set, self.eval_batch_size, False, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetDataModule(pl.LightningDataModule):
    """ImageNet (ILSVRC-2012), or any image classification tree, read by torchvision's ``ImageFolder`` from
    ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (the validation images sorted into class folders).
    Nothing is downloaded. Standard transforms: random-resized crop and flip for training; resize and centre crop for
    validation; ImageNet mean and std.

    Args:
        data_dir: Root holding the ``train`` and ``val`` folders.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation/test.
        num_workers: DataLoader worker processes (JPEG decoding needs many).
        image_size: Side of the square crops fed to the model.
        eval_resize: Shorter side the validation images are resized to before the centre crop.
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 256,
        eval_batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        eval_resize: int = 256,
    ) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.eval_batch_size = data_dir, batch_size, eval_batch_size
        self.num_workers, self.image_size, self.eval_resize = num_workers, image_size, eval_resize

    def _folder(self, split: str) -> Path:
        folder = Path(self.data_dir).expanduser() / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Expected an ImageFolder tree at {folder} ({split}/<class>/<image>), but it does not exist. "
                "Set `data.init_args.data_dir` to the folder that holds `train` and `val`."
            )
        return folder

    def prepare_data(self) -> None:
        for split in ("train", "val"):
            self._folder(split)  # fail before any worker starts

    def transform(self, train: bool) -> T.Compose:
        """The image transform of the training (``train=True``) or evaluation images."""
        if train:
            crop = [T.RandomResizedCrop(self.image_size, antialias=True), T.RandomHorizontalFlip()]
        else:
            crop = [T.Resize(self.eval_resize, antialias=True), T.CenterCrop(self.image_size)]
        return T.Compose(
            [T.ToImage(), *crop, T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def setup(self, stage: str) -> None:
        if not hasattr(self, "train_set"):
            self.train_set = torchvision.datasets.ImageFolder(self._folder("train"), transform=self.transform(True))
            self.val_set = torchvision.datasets.ImageFolder(self._folder("val"), transform=self.transform(False))

    def train_dataloader(self) -> DataLoader:
        return _image_loader(self.train_set, self.batch_size, True, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return _image_loader(self.val_set, self.eval_batch_size, False, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
