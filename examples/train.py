"""Train an image classifier from a YAML config with LightningCLI; DBP is just a callback in the config.

    python examples/train.py fit --config examples/configs/fashion_mnist_dbp.yaml   # decorrelated backprop
    python examples/train.py fit --config examples/configs/fashion_mnist_bp.yaml    # the same run, plain backprop
    python examples/train.py fit --config examples/configs/fashion_mnist_dbp.yaml --print_config
    python examples/train.py fit --config examples/configs/fashion_mnist_bp.yaml \\
        --trainer.callbacks+=lightning_decor.DecorrelationCallback --trainer.callbacks.decor_lr=0.001

The model is :class:`models.ImageClassifier` (no decorrelation code in it); the data is any ``LightningDataModule``
given by ``data.class_path`` (``FashionMNISTDataModule``, ``CIFAR10DataModule``, ``ImageNetDataModule`` from
``data.py``). Every ``DecorrelationCallback`` argument can be set under
``trainer.callbacks[*].init_args`` or on the command line. ``--trainer.callbacks.help DecorrelationCallback``
lists them with their help.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning_decor  # noqa: E402, F401  (`DecorrelationCallback` becomes a valid short name)

import data  # noqa: E402, F401  (its DataModules become valid `data.class_path` short names)
from models import ImageClassifier  # noqa: E402


class TrainCLI(LightningCLI):
    """LightningCLI that says where the logs go, before and after ``fit``."""

    @rank_zero_only
    def _print_logs(self, when: str) -> None:
        if self.trainer.fast_dev_run:
            print(f"{when} (fast_dev_run): loggers and checkpoints are off, nothing is written.", flush=True)
            return
        if not self.trainer.loggers:
            print(f"{when}: no logger configured (trainer.logger is false).", flush=True)
            return
        print(f"{when}: logs in {Path(self.trainer.log_dir or '.').resolve()}", flush=True)
        for lg in self.trainer.loggers:
            if isinstance(lg, TensorBoardLogger):  # its save_dir holds every run: BP and DBP side by side
                print(f"View them with: tensorboard --logdir {shlex.quote(str(lg.save_dir))}", flush=True)

    def before_fit(self) -> None:
        self._print_logs("Training")

    def after_fit(self) -> None:
        self._print_logs("Done")


def cli_main(args: list[str] | None = None, run: bool = True) -> TrainCLI:
    """Build (and with ``run=True`` run) the CLI; ``args=None`` reads ``sys.argv``."""
    return TrainCLI(ImageClassifier, LightningDataModule, subclass_mode_data=True, args=args, run=run)


if __name__ == "__main__":
    cli_main()
