"""Soak test (not in CI): >= 10,000 small training steps with the default callback; R must stay finite and the
decorrelation loss bounded. Prints a summary and writes JSON.

    python examples/benchmarks/soak.py [--steps 10000]
"""

from __future__ import annotations

import argparse
import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decor import DecorrelationCallback, decorrelation_matrices

from common import machine, write_json


class Soak(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 4),
        )  # fmt: skip

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--out", default="examples/benchmarks/results/soak.json")
    parser.add_argument("--log-dir", default="runs/soak")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2048, 1, 8, 8, generator=g)
    x = base + 0.8 * torch.roll(base, 1, dims=-1)  # correlated neighbouring pixels, never perfectly decorrelated
    y = (base.mean((1, 2, 3)) > 0).long() * 2 + (base[:, 0, 0, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = Soak()
    cb = DecorrelationCallback(fold_on_fit_end=False)
    logger = CSVLogger(args.log_dir, name="soak")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.steps, logger=logger, log_every_n_steps=100, callbacks=[cb],
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, loader)
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as f:
        losses = [float(r["decor/loss"]) for r in csv.DictReader(f) if r.get("decor/loss")]
    finite = all(torch.isfinite(R).all() for R in decorrelation_matrices(model).values())
    summary = {
        "steps": trainer.global_step,
        "updates": cb.updates,
        "R_finite": bool(finite),
        "decor_loss_first": losses[0],
        "decor_loss_max": max(losses),
        "decor_loss_last": losses[-1],
        "decor_loss_all_finite": all(math.isfinite(v) for v in losses),
        "max_abs_R": max(float(R.abs().max()) for R in decorrelation_matrices(model).values()),
    }
    print(summary)
    write_json(args.out, {"machine": machine(), "args": vars(args), "summary": summary, "losses": losses})
    assert finite and summary["decor_loss_all_finite"], "R or the decorrelation loss became non-finite"


if __name__ == "__main__":
    main()
