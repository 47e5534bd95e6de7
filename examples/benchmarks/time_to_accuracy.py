"""Time to accuracy: plain backprop (BP) vs decorrelated backprop (DBP) on Fashion-MNIST.

Same model (the benchmark CNN), data order, optimizer (Adam, one-cycle) and budget for both methods; test accuracy
is recorded against training wall-clock with evaluation excluded. Reports
  (a) the seed paper's protocol: time for DBP to first reach BP's best test accuracy vs BP's time to its best;
  (b) the final accuracy difference;
  (c) a Pareto check: final accuracy at budgets of 1, 2 and 4 epochs, each budget with its own one-cycle schedule.
With --tune, each method's learning rate is first chosen from the same grid on a validation split (the last 5,000
training images; the test set is not used for tuning), so the baseline gets the same tuning effort.

    python examples/benchmarks/time_to_accuracy.py            # defaults: 3 seeds, 16k-image subset, ~30 min
    python examples/benchmarks/time_to_accuracy.py --quick    # 1 seed, 1 budget, <= 5 min
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_decor import DecorrelationCallback

from common import fresh_plan_cache, machine, write_json
from data import FashionMNISTDataModule
from models import ImageClassifier
from timing import TrainClock, first_time_reaching, record


def run(
    method: str,
    seed: int,
    epochs: int,
    lr: float,
    args: argparse.Namespace,
    dbp: dict[str, Any],
    validation: bool = False,
    eval_every: int | None = None,
) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    module = ImageClassifier(model="cnn", lr=lr)
    clock = TrainClock()
    callbacks: list[pl.Callback] = [clock]
    if method == "DBP":
        callbacks.append(DecorrelationCallback(**dbp))
    data = FashionMNISTDataModule(args.data_dir, train_limit=args.train_limit, seed=seed)
    if validation:  # tune on held-out training images, never on the test set
        data.setup("fit")
        x, y = data.train_set.tensors
        data.test_set = torch.utils.data.TensorDataset(x[-5000:], y[-5000:])
        data.train_set = torch.utils.data.TensorDataset(x[:-5000], y[:-5000])
    steps_per_epoch = -(-len(data.train_set) // 128) if validation else -(-(args.train_limit or 60000) // 128)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        val_check_interval=min(eval_every or steps_per_epoch * epochs, steps_per_epoch),
        check_val_every_n_epoch=1 if eval_every else epochs,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress,
    )
    trainer.fit(module, datamodule=data)
    result = record(clock, trainer, module, data)
    print(
        f"    {method:<4} seed {seed} lr {lr:g} {epochs} ep: final acc {result['final_acc']:.4f}, "
        f"train {result['train_seconds']:.1f} s",
        flush=True,
    )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``), checked: a usage error exits with status 2."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4], help="epochs; the largest is (a)")
    parser.add_argument("--train-limit", type=int, default=16000, help="training images (default a 16k subset)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam peak lr for both (tuned: docs/TUNING.md)")
    parser.add_argument("--tune", type=float, nargs="*", help="lr grid tuned per method on a validation split")
    parser.add_argument("--eval-every", type=int, default=75, help="steps between test evaluations in (a)")
    parser.add_argument("--dbp", type=json.loads, default={}, help="DecorrelationCallback kwargs as JSON")
    parser.add_argument("--quick", action="store_true", help="1 seed, budgets [2], 10k images")
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="examples/benchmarks/results/time_to_accuracy.json")
    parser.add_argument("--plot", default="examples/benchmarks/results/time_to_accuracy.png")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    fresh_plan_cache()
    if args.quick:
        args.seeds, args.budgets, args.train_limit = args.seeds[:1], [2], 10000
    torch.set_num_threads(torch.get_num_threads())
    FashionMNISTDataModule(args.data_dir).prepare_data()
    lrs = {"BP": args.lr, "DBP": args.lr}
    tuning: dict[str, Any] = {}
    if args.tune:
        print(f"Tuning lr over {args.tune} on a validation split ({max(args.budgets)} epochs, seed 0)", flush=True)
        for method in ("BP", "DBP"):
            scores = {
                lr: run(method, 0, max(args.budgets), lr, args, args.dbp, validation=True)["final_acc"]
                for lr in args.tune
            }
            lrs[method] = max(scores, key=scores.__getitem__)
            tuning[method] = scores
        print(f"Chosen: {lrs}", flush=True)
    top = max(args.budgets)
    runs: dict[str, dict[int, dict[int, Any]]] = {"BP": {}, "DBP": {}}
    for seed in args.seeds:
        for budget in sorted(args.budgets, reverse=True):
            for method in ("BP", "DBP"):  # interleaved: the machine's state affects both alike
                eval_every = args.eval_every if budget == top else None
                runs[method].setdefault(budget, {})[seed] = run(
                    method, seed, budget, lrs[method], args, args.dbp, eval_every=eval_every
                )
    # (a) the paper's protocol on the largest budget, per seed
    protocol = []
    for seed in args.seeds:
        bp, dbp = runs["BP"][top][seed], runs["DBP"][top][seed]
        bp_best = bp["best_acc"]
        t_bp = first_time_reaching(bp["history"], bp_best)
        t_dbp = first_time_reaching(dbp["history"], bp_best)
        protocol.append(
            {
                "seed": seed,
                "bp_best": bp_best,
                "bp_time_to_best": t_bp[0],
                "bp_steps_to_best": t_bp[1],
                "dbp_time_to_bp_best": t_dbp[0] if t_dbp else None,
                "dbp_steps_to_bp_best": t_dbp[1] if t_dbp else None,
                "speedup": t_bp[0] / t_dbp[0] if t_dbp else None,
                "step_speedup": t_bp[1] / t_dbp[1] if t_dbp else None,
                "final_diff_pp": 100 * (dbp["final_acc"] - bp["final_acc"]),
                "time_ratio": dbp["train_seconds"] / bp["train_seconds"],
            }
        )
    pareto = {
        b: {m: statistics.mean(runs[m][b][s]["final_acc"] for s in args.seeds) for m in ("BP", "DBP")}
        | {f"{m}_seconds": statistics.mean(runs[m][b][s]["train_seconds"] for s in args.seeds) for m in ("BP", "DBP")}
        for b in sorted(args.budgets)
    }
    print(f"\n(a) time to BP's best test accuracy ({top} epochs of {args.train_limit} images, lr {lrs})")
    print(
        f"{'seed':>4} {'BP best':>8} {'BP t':>8} {'DBP t':>8} {'speed-up':>9} {'steps BP/DBP':>13} {'final diff':>11}"
    )
    for p in protocol:
        dbp_t = f"{p['dbp_time_to_bp_best']:7.1f}s" if p["speedup"] else "  never"
        sp = f"{p['speedup']:8.2f}x" if p["speedup"] else "      -"
        steps = f"{p['bp_steps_to_best']}/{p['dbp_steps_to_bp_best']}"
        print(
            f"{p['seed']:>4} {p['bp_best']:8.2%} {p['bp_time_to_best']:7.1f}s {dbp_t:>8} {sp:>9} {steps:>13} "
            f"{p['final_diff_pp']:+10.2f}pp"
        )
    speedups = [p["speedup"] for p in protocol if p["speedup"]]
    if speedups:
        print(f"mean speed-up {statistics.mean(speedups):.2f}x over {len(speedups)}/{len(protocol)} seeds")
    print(f"(b) final accuracy difference, mean: {statistics.mean(p['final_diff_pp'] for p in protocol):+.2f} pp")
    print("(c) Pareto: mean final test accuracy and training seconds per budget")
    for b, v in pareto.items():
        print(
            f"  {b} epoch(s): BP {v['BP']:.2%} in {v['BP_seconds']:.0f} s | "
            f"DBP {v['DBP']:.2%} in {v['DBP_seconds']:.0f} s"
        )
    payload = {
        "machine": machine(),
        "args": vars(args),
        "lrs": lrs,
        "tuning": tuning,
        "protocol": protocol,
        "pareto": pareto,
        "runs": runs,
    }
    print(f"\nJSON: {write_json(args.out, payload)}")
    plot(runs, top, args.seeds, Path(args.plot))
    print(f"Plot: {args.plot}")


def plot(runs: dict[str, Any], top: int, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, color in (("BP", "tab:blue"), ("DBP", "tab:orange")):
        hists = [runs[method][top][s]["history"] for s in seeds]
        n = min(len(h) for h in hists)
        t = np.array([[h[i][0] for i in range(n)] for h in hists])
        a = np.array([[h[i][2] for i in range(n)] for h in hists]) * 100
        ax.plot(t.mean(0), a.mean(0), color=color, label=f"{method} (mean of {len(seeds)} seeds)")
        ax.fill_between(t.mean(0), a.min(0), a.max(0), color=color, alpha=0.2)
    ax.set_xlabel("training wall-clock (s, evaluation excluded)")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_ylim(bottom=max(60, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("BP vs DBP, benchmark CNN, Adam one-cycle")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
