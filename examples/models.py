"""Models and the LightningModule used by the examples and benchmarks. Nothing decorrelation-specific here:
DBP comes only from ``DecorrelationCallback`` in the Trainer's callbacks."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchvision
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


def benchmark_cnn(in_channels: int = 1, num_classes: int = 10, batch_norm: bool = True) -> nn.Sequential:
    """The 5-conv BatchNorm CNN of the prototype (32-32-64-64-128 channels, 3x3, two max-pools) + linear head;
    with ``batch_norm=False`` the convolutions have biases and no normalisation follows them."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        if not batch_norm:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
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


def mlp(in_features: int = 784, width: int = 512, num_classes: int = 10) -> nn.Sequential:
    """A multilayer perceptron ``in_features``-512-512-``num_classes`` with ReLU on flattened pixels."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )  # fmt: skip


def small_vit(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """torchvision's ``VisionTransformer``, small: patch 4, width 128, 4 blocks of 4 heads, MLP 256; its patch
    embedding takes ``in_channels``."""
    net = torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=256,
        num_classes=num_classes,
    )  # fmt: skip
    net.conv_proj = nn.Conv2d(in_channels, 128, kernel_size=4, stride=4)
    return net


class ToRGB32(nn.Module):
    """Grey images resized to 32x32 (bilinear) with the channel repeated three times, for stock RGB models."""

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def build_model(name: str, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """``"cnn"`` (``"cnn_nobn"`` without BatchNorm), ``"mlp"``, ``"vit"`` (:func:`small_vit`), ``"cifar_resnet18"``,
    ``"resnet18_32"`` (stock ResNet-18 on grey images as 3x32x32) or a torchvision classification model name."""
    if name in ("cnn", "cnn_nobn"):
        return benchmark_cnn(in_channels, num_classes, batch_norm=name == "cnn")
    if name == "mlp":
        return mlp(in_channels * 28 * 28, num_classes=num_classes)
    if name == "vit":
        return small_vit(in_channels, num_classes)
    if name == "resnet18_32":
        return nn.Sequential(ToRGB32(), torchvision.models.resnet18(num_classes=num_classes))
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
