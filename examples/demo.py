"""Quick start demo: the benchmark CNN on Fashion-MNIST with plain backprop (BP) and with decorrelated backprop
(DBP, ``DecorrelationCallback()`` with its defaults), same model, data order, optimizer and budget; prints a
side-by-side table and where the TensorBoard logs went.

    python examples/demo.py [--epochs 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_decor import DecorrelationCallback  # noqa: E402

from data import FashionMNISTDataModule  # noqa: E402
from models import ImageClassifier  # noqa: E402
from timing import TrainClock, first_time_reaching  # noqa: E402


def run(method: str, args: argparse.Namespace, log_dir: Path) -> TrainClock:
    pl.seed_everything(args.seed, verbose=False)
    model = ImageClassifier(model="cnn", lr=args.lr)
    clock = TrainClock()
    callbacks: list[pl.Callback] = [clock]
    if method == "DBP":
        callbacks.append(DecorrelationCallback())
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        val_check_interval=args.eval_every,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(log_dir, name=method, version=f"seed{args.seed}"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    title = f"{method}: {args.epochs} epoch(s) of Fashion-MNIST, batch 128, Adam {args.lr} one-cycle"
    print(f"\n=== {title} ===", flush=True)
    data = FashionMNISTDataModule(args.data_dir, seed=args.seed)
    trainer.fit(model, datamodule=data)
    if not clock.history or clock.history[-1][1] != trainer.global_step:  # evaluate the final model too
        acc = trainer.validate(model, datamodule=data, verbose=False)[0]["val/acc"]
        clock.history.append((clock.train_seconds, trainer.global_step, float(acc)))
    return clock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``): a usage error exits with status 2."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=78, help="evaluate on the test set every N steps")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--log-dir", default="runs/demo")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    log_dir = Path(args.log_dir)
    clocks = {method: run(method, args, log_dir) for method in ("BP", "DBP")}

    bp_best = max(v for _, _, v in clocks["BP"].history)
    rows = []
    for method, clock in clocks.items():
        final = clock.history[-1][2]
        best = max(v for _, _, v in clock.history)
        reach = first_time_reaching(clock.history, bp_best)
        reach_s = f"{reach[0]:7.1f} s (step {reach[1]})" if reach else "not reached"
        rows.append((method, clock.train_seconds, final, best, reach_s))
    print("\nFashion-MNIST, benchmark CNN, same data order and budget (test accuracy; evaluation time excluded)")
    print(f"{'method':<6} {'train time':>11} {'final acc':>10} {'best acc':>9}  time to BP's best ({bp_best:.2%})")
    for method, seconds, final, best, reach_s in rows:
        print(f"{method:<6} {seconds:9.1f} s {final:10.2%} {best:9.2%}  {reach_s}")
    print(f"\nTensorBoard logs: {log_dir.resolve()}  (decor/loss under DBP)")
    print(f"Open them with:   {Path(sys.executable).parent / 'tensorboard'} --logdir {log_dir}")


if __name__ == "__main__":
    main()
