"""The tuning suite: plain backprop (BP) vs decorrelated backprop (DBP) on five different models, one command.

Every task trains on a subset of Fashion-MNIST (offline: Debian's ``dataset-fashion-mnist``) through
``Trainer.fit`` with Adam and a one-cycle schedule:

  cnn_bn    the benchmark CNN with BatchNorm (5 convs, 1x28x28)
  cnn_nobn  the same CNN without BatchNorm (biases instead)
  mlp       an MLP 784-512-512-10 on the standardised pixels (Linear layers only)
  vit       a small ViT (torchvision ``VisionTransformer``: patch 4, width 128, 4 blocks; Linear projections)
  resnet18  torchvision ``resnet18`` on the images resized to 3x32x32

Per task, Adam's learning rate is chosen for BP from a grid on a validation split (the last 5,000 training images,
never trained on; seed 0, the same budget) and used for both methods. Then, per seed, BP and every DBP
configuration train with the same data order, interleaved, and are evaluated every ``eval_every`` steps on the
first 5,000 test images (evaluation excluded from the clock). Reported per task: final test accuracy DBP - BP (mean
over seeds, with min and max), wall-clock speed-up to BP's best (BP's time to its best / DBP's time to first reach
it; ``k/n`` seeds reached it), and the step-time ratio DBP / BP. JSON and a plot go to ``--out`` / ``--plot``.

    python examples/benchmarks/suite.py                          # defaults vs BP, 3 seeds, ~35 min on 2 cores
    python examples/benchmarks/suite.py --seeds 0 --dbp '{}' '{"normalize": "none"}'   # compare configurations
    python examples/benchmarks/suite.py --quick                  # 1 seed, small budgets, a smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset

from lightning_decor import DecorrelationCallback

from common import fresh_plan_cache, machine, write_json
from data import FashionMNISTDataModule
from models import ImageClassifier
from timing import TrainClock, first_time_reaching, record


@dataclass(frozen=True)
class Task:
    model: str  # a name for models.build_model
    train_limit: int  # training images (the first ones)
    epochs: int
    batch_size: int
    eval_every: int  # steps between test evaluations
    lrs: tuple[float, ...]  # Adam peak learning rates tried for BP on the validation split


TASKS: dict[str, Task] = {
    "cnn_bn": Task("cnn", 10000, 2, 128, 26, (3e-3, 1e-2, 3e-2)),
    "cnn_nobn": Task("cnn_nobn", 10000, 2, 128, 26, (3e-3, 1e-2, 3e-2)),
    "mlp": Task("mlp", 20000, 3, 128, 50, (1e-3, 3e-3, 1e-2)),
    "vit": Task("vit", 10000, 2, 128, 26, (1e-3, 3e-3, 1e-2)),
    "resnet18": Task("resnet18_32", 10000, 2, 128, 26, (1e-3, 3e-3, 1e-2)),
}
VALIDATION = 5000  # the last training images: the validation split for choosing the learning rate
TEST = 5000  # the first test images: evaluated during training


def _data(task: Task, seed: int, validation: bool, root: str) -> FashionMNISTDataModule:
    data = FashionMNISTDataModule(root, batch_size=task.batch_size, seed=seed)
    data.setup("fit")
    x, y = data.train_set.tensors
    data.train_set = TensorDataset(x[: task.train_limit], y[: task.train_limit])
    if validation:
        data.test_set = TensorDataset(x[-VALIDATION:], y[-VALIDATION:])
    else:
        tx, ty = data.test_set.tensors
        data.test_set = TensorDataset(tx[:TEST], ty[:TEST])
    return data


def run(task: Task, seed: int, lr: float, dbp: dict[str, Any] | None, root: str, validation: bool = False) -> dict:
    """One fit; ``dbp=None`` is plain BP. Returns the accuracy history and timings."""
    pl.seed_everything(seed, verbose=False)
    module = ImageClassifier(model=task.model, lr=lr)
    clock = TrainClock()
    callbacks: list[pl.Callback] = [clock]
    if dbp is not None:
        callbacks.append(DecorrelationCallback(**dbp))
    data = _data(task, seed, validation, root)
    steps = -(-task.train_limit // task.batch_size) * task.epochs
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=task.epochs,
        val_check_interval=1.0 if validation else task.eval_every,  # steps, counted across epochs
        check_val_every_n_epoch=task.epochs if validation else None,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=data)
    skipped = int(trainer.callback_metrics.get("decor/skipped", torch.tensor(0.0)).item()) if dbp is not None else 0
    return {
        **record(clock, trainer, module, data),
        "steps": steps,
        "skipped": skipped,
        "finite": all(torch.isfinite(p).all() for p in module.parameters()),
    }


def compare(bp: dict, dbp: dict) -> dict[str, Any]:
    """One seed's figures: final difference, speed-up to BP's best, step ratio."""
    target = bp["best_acc"]
    t_bp = first_time_reaching(bp["history"], target)
    t_dbp = first_time_reaching(dbp["history"], target)
    assert t_bp is not None
    return {
        "final_diff_pp": 100 * (dbp["final_acc"] - bp["final_acc"]),
        "speedup": t_bp[0] / t_dbp[0] if t_dbp else None,
        "step_ratio": (dbp["train_seconds"] / dbp["steps"]) / (bp["train_seconds"] / bp["steps"]),
    }


def summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    diffs = [s["final_diff_pp"] for s in per_seed]
    reached = [s["speedup"] for s in per_seed if s["speedup"] is not None]
    return {
        "final_diff_pp": statistics.mean(diffs),
        "final_diff_min": min(diffs),
        "final_diff_max": max(diffs),
        "speedup": statistics.mean(reached) if reached else 0.0,  # 0: never reached BP's best
        "reached": f"{len(reached)}/{len(per_seed)}",
        "step_ratio": statistics.median(s["step_ratio"] for s in per_seed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dbp", type=json.loads, nargs="+", default=[{}], help="DecorrelationCallback kwargs (JSON)")
    parser.add_argument("--lrs", type=json.loads, help='chosen lrs as JSON {"task": lr}: skips the tuning')
    parser.add_argument("--quick", action="store_true", help="1 seed, a quarter of the images, 1 epoch")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="examples/benchmarks/results/suite.json")
    parser.add_argument("--plot", default="examples/benchmarks/results/suite.png")
    args = parser.parse_args()
    fresh_plan_cache()
    tasks = {name: TASKS[name] for name in args.tasks}
    if args.quick:
        args.seeds = args.seeds[:1]
        tasks = {
            n: Task(t.model, t.train_limit // 4, 1, t.batch_size, t.eval_every // 2, t.lrs[1:2])
            for n, t in tasks.items()
        }
    FashionMNISTDataModule(args.data_dir).prepare_data()
    labels = [json.dumps(d, sort_keys=True) for d in args.dbp]
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for name, task in tasks.items():
        if args.lrs and name in args.lrs:
            lr, tuning = float(args.lrs[name]), {}
        else:
            tuning = {str(lr): run(task, 0, lr, None, args.data_dir, validation=True)["final_acc"] for lr in task.lrs}
            lr = float(max(tuning, key=tuning.__getitem__))
        print(f"{name}: lr {lr:g} (validation {tuning})", flush=True)
        runs: dict[str, list[dict]] = {"BP": [], **{label: [] for label in labels}}
        for seed in args.seeds:
            runs["BP"].append(run(task, seed, lr, None, args.data_dir))
            for label, dbp in zip(labels, args.dbp, strict=True):  # interleaved with BP, same data order
                runs[label].append(run(task, seed, lr, dbp, args.data_dir))
            line = " | ".join(
                f"{m[:40]} {r[-1]['final_acc']:.4f} {r[-1]['train_seconds']:.0f}s" for m, r in runs.items()
            )
            print(f"  seed {seed}: {line}", flush=True)
        per_config = {}
        for label in labels:
            per_seed = [compare(b, d) for b, d in zip(runs["BP"], runs[label], strict=True)]
            per_config[label] = {"per_seed": per_seed, **summary(per_seed)}
        results[name] = {"task": asdict(task), "lr": lr, "tuning": tuning, "configs": per_config, "runs": runs}
    minutes = (time.perf_counter() - start) / 60
    print(f"\nSuite ({len(args.seeds)} seeds, {minutes:.1f} min): DBP - BP final accuracy (mean [min, max] over "
          "seeds), speed-up to BP's best (seeds reaching it), step ratio")  # fmt: skip
    table: dict[str, dict[str, Any]] = {}
    for label in labels:
        print(f"\nDBP {label}")
        rows = {name: results[name]["configs"][label] for name in results}
        for name, r in rows.items():
            print(
                f"  {name:<9} {r['final_diff_pp']:+6.2f} pp [{r['final_diff_min']:+.2f}, {r['final_diff_max']:+.2f}]"
                f"  {r['speedup']:5.2f}x ({r['reached']})  step {r['step_ratio']:.2f}"
            )
        mean_speedup = statistics.mean(r["speedup"] for r in rows.values())
        worst = min(r["final_diff_pp"] for r in rows.values())
        skipped = sum(run["skipped"] for name in results for run in results[name]["runs"][label])
        finite = all(run["finite"] for name in results for run in results[name]["runs"][label])
        print(f"  mean speed-up {mean_speedup:.2f}x, worst task {worst:+.2f} pp, skipped updates {skipped}, "
              f"finite {finite}")  # fmt: skip
        table[label] = {"mean_speedup": mean_speedup, "worst_diff_pp": worst, "skipped": skipped, "finite": finite}
    payload = {"machine": machine(), "args": vars(args), "minutes": minutes, "summary": table, "tasks": results}
    print(f"\nJSON: {write_json(args.out, payload)}")
    plot(results, labels, Path(args.plot))
    print(f"Plot: {args.plot}")


def plot(results: dict[str, Any], labels: list[str], path: Path) -> None:
    """Per task: final accuracy DBP - BP (bars: mean, whiskers: min/max over seeds) and the speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        rows = [results[n]["configs"][label] for n in names]
        x = np.arange(len(names)) + i * width
        mean = np.array([r["final_diff_pp"] for r in rows])
        err = np.array([[m - r["final_diff_min"], r["final_diff_max"] - m] for m, r in zip(mean, rows)]).T
        left.bar(x, mean, width, yerr=err, capsize=3, label=f"DBP {label}")
        right.bar(x, [r["speedup"] for r in rows], width, label=f"DBP {label}")
    for ax, title in ((left, "final test accuracy DBP - BP (pp)"), (right, "speed-up to BP's best (x)")):
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    left.axhline(0, color="black", lw=0.8)
    right.axhline(1, color="black", lw=0.8)
    left.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
