"""Models and the LightningModule used by the examples and benchmarks. Nothing decorrelation-specific here:
DBP comes only from ``DecorrelationCallback`` in the Trainer's callbacks."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchvision
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


def benchmark_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """The 5-conv BatchNorm CNN of the prototype (32-32-64-64-128 channels, 3x3, two max-pools) + linear head."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(in_channels, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )  # fmt: skip


def cifar_resnet18(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool (for 32x32 input)."""
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()  # type: ignore[assignment]
    return net


def build_model(name: str, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """``"cnn"``, ``"cifar_resnet18"`` or a torchvision classification model name (``"resnet50"``)."""
    if name == "cnn":
        return benchmark_cnn(in_channels, num_classes)
    if name == "cifar_resnet18":
        return cifar_resnet18(in_channels, num_classes)
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        raise ValueError(f"Expected `in_channels` = 3 for torchvision model {name!r}, but got {in_channels}.")
    return net


class ImageClassifier(pl.LightningModule):
    """A plain image classifier: cross-entropy, Adam or SGD, optional one-cycle schedule, accuracy metrics.

    Args:
        model: Architecture name for :func:`build_model`.
        in_channels: Input channels.
        num_classes: Number of classes.
        lr: Peak learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9, nesterov).
        weight_decay: Weight decay.
        schedule: ``"onecycle"`` (per step, over the whole fit) or ``"constant"``.
    """

    def __init__(
        self,
        model: str = "cnn",
        in_channels: int = 1,
        num_classes: int = 10,
        lr: float = 3e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        schedule: str = "onecycle",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_model(model, in_channels, num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc.update(self(x), y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc.update(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        hp = self.hparams
        if hp.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=0.9, nesterov=True, weight_decay=hp.weight_decay
            )
        else:
            raise ValueError(f"Expected `optimizer` in ('adam', 'sgd'), but got {hp.optimizer!r}.")
        if hp.schedule == "constant":
            return opt
        if hp.schedule != "onecycle":
            raise ValueError(f"Expected `schedule` in ('onecycle', 'constant'), but got {hp.schedule!r}.")
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
