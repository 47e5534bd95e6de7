"""One training run in its own process, for tests/test_determinism.py: a small CNN with dropout on shuffled data,
``seed_everything(0)``, through ``Trainer.fit``; writes its final raw state and what its plans were to ``--out``.

``--skew S`` adds ``S`` seconds to every step the planner times once its first plan is made (as a busy machine
would): a run that decides by timing then makes other plans than one that does not."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decor import DecorrelationCallback, decorrelation_matrices


def slow_collate(batch: list) -> list:
    time.sleep(0.05)  # a loader as slow as a real one: the default budget then keeps layers of this tiny model
    return torch.utils.data.default_collate(batch)


def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 1, 8, 8, generator=g)
    x = base + torch.roll(base, 1, dims=-1) + torch.roll(base, 1, dims=-2)  # neighbouring pixels correlate
    return x, (base.mean((1, 2, 3)) > 0).long()


class SmallCNN(pl.LightningModule):
    """With ``positional=True`` each batch's data and dropout are a function of (epoch, batch index) alone: Lightning
    restores neither the global RNG nor a plain loader's position at a mid-epoch resume, so only then can a resumed
    run (of plain backprop too) equal the uninterrupted one."""

    def __init__(self, positional: bool = False) -> None:
        super().__init__()
        self.positional = positional
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Dropout(0.2),
            nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.positional:
            torch.manual_seed(1000 * self.current_epoch + batch_idx)  # dropout
            order = torch.randperm(512, generator=torch.Generator().manual_seed(self.current_epoch))
            x, y = (t[order[32 * batch_idx : 32 * (batch_idx + 1)]] for t in images())
        else:
            x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)

    def train_dataloader(self) -> DataLoader:
        x, y = images()
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=not self.positional, collate_fn=slow_collate)


class Skew(pl.Callback):
    """Adds ``seconds`` to the planner's clock at every call after its first plan."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_start(self, trainer, pl_module):
        (cb,) = [c for c in trainer.callbacks if isinstance(c, DecorrelationCallback)]
        planner = None if cb.engine is None else cb.engine.planner
        if planner is None or not self.seconds:
            return
        clock = planner.clock

        def skewed() -> float:
            extra = self.seconds * max(0, planner.calls - 5) if planner.plan is not None else 0.0
            return clock() + extra

        planner.clock = skewed


class Plans(pl.Callback):
    """Records every plan the callback applies (layouts and source) and every measured overhead."""

    def __init__(self) -> None:
        self.plans: list[dict] = []
        self.overheads: list[float] = []
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        (cb,) = [c for c in trainer.callbacks if isinstance(c, DecorrelationCallback)]
        if cb.plan is not None and cb.plan is not self._last:
            self._last = cb.plan
            self.plans.append({"source": cb.plan.source, "layouts": {k: list(v) for k, v in cb.plan.layouts().items()}})
        engine = cb.engine
        if engine is not None and engine.overhead is not None and engine.overhead not in self.overheads:
            self.overheads.append(engine.overhead)


class CrashAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--bp", action="store_true", help="no callback: plain backprop")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--max-overhead", type=float, default=None, help="default: the callback's own")
    parser.add_argument("--skew", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=2)  # 32 steps of 32 images
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--crash-at", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--positional", action="store_true", help="data and dropout from (epoch, batch) alone")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    model = SmallCNN(positional=args.positional)
    callbacks: list[pl.Callback] = []
    plans = Plans()
    if not args.bp:
        options = {} if args.max_overhead is None else {"max_overhead": args.max_overhead}
        callbacks += [DecorrelationCallback(fold_on_fit_end=False, **options), Skew(args.skew), plans]
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=8, save_top_k=-1))
    if args.crash_at is not None:
        callbacks.append(CrashAt(args.crash_at))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, deterministic=args.deterministic, logger=False,
        enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )  # fmt: skip
    try:
        trainer.fit(model, ckpt_path=args.resume)
    except RuntimeError as err:
        if str(err) != "crash":
            raise
    state = {n: p.detach().clone() for n, p in model.named_parameters()}  # the raw W
    state.update({f"{n}.R": R.clone() for n, R in decorrelation_matrices(model).items()})
    torch.save(state, Path(args.out) / "state.pt")
    (Path(args.out) / "plans.json").write_text(json.dumps({"plans": plans.plans, "overheads": plans.overheads}))


if __name__ == "__main__":
    main()
