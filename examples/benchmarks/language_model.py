"""A language model: byte-level causal transformer on the Python standard library's source, BP against DBP.

The corpus is every machine's offline text: the ``.py`` files of this interpreter's standard library, sorted by
path and concatenated (the first ``--corpus-mb`` MB), the last 5 % held out for validation. The model is a small
pre-norm causal transformer (``nn.TransformerEncoder`` with a causal mask: every projection — the attention's
packed in-projection and ``out_proj``, both MLP layers and the head — is an ``nn.Linear`` or attention projection
that DBP decorrelates), trained with AdamW and a warm-up + cosine schedule through ``Trainer.fit``. BP's learning
rate is chosen from ``--lrs`` on the validation loss (seed 0) and used for both; DBP runs with
``DecorrelationCallback()`` defaults. Per seed: validation loss against steps and training wall-clock (evaluation
excluded), and time to BP's final loss; then the step ratio with the steps of BP and DBP interleaved in one loop
(the engine, ``Decorrelator``), the low-noise figure.

    python examples/benchmarks/language_model.py                      # 3 seeds, ~11 min on 2 cores
    python examples/benchmarks/language_model.py --seeds 0 --steps 100   # a smoke test
"""

from __future__ import annotations

import argparse
import math
import statistics
import sysconfig
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_decor import DecorrelationCallback, Decorrelator
from lightning_decor.planner import plain_steps

from common import fresh_plan_cache, machine, write_json
from timing import TrainClock


def corpus(megabytes: float) -> torch.Tensor:
    """The standard library's source as bytes (uint8), the first ``megabytes`` MB of its sorted ``.py`` files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    limit, chunks, size = int(megabytes * 2**20), [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).clone()


class Windows(Dataset):
    """``(input, target)`` byte windows of ``context + 1`` at the given start offsets."""

    def __init__(self, text: torch.Tensor, starts: torch.Tensor, context: int) -> None:
        self.text, self.starts, self.context = text, starts, context

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        w = self.text[s : s + self.context + 1].long()
        return w[:-1], w[1:]


class ByteLM(pl.LightningModule):
    """A pre-norm causal transformer over bytes; nothing decorrelation-specific in it."""

    def __init__(self, lr: float, steps: int, width: int = 128, layers: int = 3, heads: int = 4, context: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(256, width)
        self.pos = nn.Parameter(0.02 * torch.randn(context, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        h = self.blocks(self.embed(x) + self.pos[:t], mask=mask, is_causal=True)
        return self.head(self.norm(h))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).reshape(-1, 256), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch), prog_bar=False)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        warmup = max(1, self.hparams.steps // 20)

        def factor(step: int) -> float:  # linear warm-up, then cosine to 10 %
            if step < warmup:
                return (step + 1) / warmup
            done = (step - warmup) / max(1, self.hparams.steps - warmup)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0)))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                    "interval": "step"}}  # fmt: skip


def loaders(text: torch.Tensor, args: argparse.Namespace, seed: int) -> tuple[DataLoader, DataLoader]:
    split = int(0.95 * len(text))
    train, val = text[:split], text[split:]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - args.context - 1, (args.steps * args.batch_size,), generator=g)
    val_starts = torch.linspace(0, len(val) - args.context - 2, args.val_windows).long()
    return (
        DataLoader(Windows(train, starts, args.context), batch_size=args.batch_size),  # the same order for BP and DBP
        DataLoader(Windows(val, val_starts, args.context), batch_size=64),
    )


def fit(text: torch.Tensor, args: argparse.Namespace, seed: int, lr: float, dbp: bool) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model = ByteLM(lr, args.steps, context=args.context)
    clock = TrainClock(monitor="val/loss")
    callbacks: list[pl.Callback] = [clock] + ([DecorrelationCallback()] if dbp else [])
    train, val = loaders(text, args, seed)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.steps, val_check_interval=args.eval_every, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=False, callbacks=callbacks, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(model, train, val)
    history = clock.history
    if not history or history[-1][1] != trainer.global_step:
        value = trainer.validate(model, val, verbose=False)[0]["val/loss"]
        history.append((clock.train_seconds, trainer.global_step, float(value)))
    decorrelated = 0
    if dbp and callbacks[-1].plan is not None:  # type: ignore[attr-defined]
        decorrelated = sum(p.form != "plain" for p in callbacks[-1].plan.layers.values())  # type: ignore[attr-defined]
    return {"history": history, "train_seconds": clock.train_seconds, "final_loss": history[-1][2],
            "decorrelated": decorrelated}  # fmt: skip


def first_reaching(history: list[tuple[float, int, float]], target: float) -> tuple[float, int] | None:
    """``(seconds, step)`` of the first evaluation with loss <= ``target``, or ``None``."""
    return next(((s, k) for s, k, v in history if v <= target), None)


def interleaved_ratio(args: argparse.Namespace) -> float:
    """Median DBP step / median BP step, the steps of the two models alternating in one loop after each one's
    planning steps alone (a slow spell of the machine then hits both alike)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch_size, args.context + 1), generator=g) for _ in range(4)]
    runs = {}
    for name in ("BP", "DBP"):
        torch.manual_seed(0)
        model = ByteLM(1e-3, 100, context=args.context)
        engine = Decorrelator(model) if name == "DBP" else None
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), engine)

    def step(name: str, i: int) -> float:
        model, opt, engine = runs[name]
        w = batches[i % len(batches)]
        start = time.perf_counter()
        loss = F.cross_entropy(model(w[:, :-1]).reshape(-1, 256), w[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if engine is not None:
            engine.step()
        opt.step()
        return time.perf_counter() - start

    warmup = plain_steps()
    for name in runs:
        for i in range(warmup):
            step(name, i)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup, warmup + args.interleave_steps):
        for name in ("BP", "DBP") if i % 2 else ("DBP", "BP"):
            times[name].append(step(name, i))
    return statistics.median(times["DBP"]) / statistics.median(times["BP"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="BP's AdamW grid")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--val-windows", type=int, default=256)
    parser.add_argument("--corpus-mb", type=float, default=8.0)
    parser.add_argument("--interleave-steps", type=int, default=40)
    parser.add_argument("--out", default="examples/benchmarks/results/language_model.json")
    args = parser.parse_args()
    fresh_plan_cache()
    started = time.perf_counter()
    text = corpus(args.corpus_mb)
    print(f"corpus: {len(text) / 2**20:.1f} MB of the standard library's .py files", flush=True)
    tuning = {lr: fit(text, args, args.seeds[0], lr, dbp=False)["final_loss"] for lr in args.lrs}
    lr = min(tuning, key=tuning.get)
    print(f"BP's lr {lr:g} (final validation loss {tuning})", flush=True)
    per_seed = []
    for seed in args.seeds:
        bp, dbp = fit(text, args, seed, lr, dbp=False), fit(text, args, seed, lr, dbp=True)
        target = bp["final_loss"]
        t_bp, t_dbp = first_reaching(bp["history"], target), first_reaching(dbp["history"], target)
        assert t_bp is not None
        row = {
            "seed": seed, "bp": bp, "dbp": dbp, "final_diff": dbp["final_loss"] - bp["final_loss"],
            "speedup": None if t_dbp is None else t_bp[0] / t_dbp[0],
            "steps_to_bp_final": None if t_dbp is None else t_dbp[1],
            "step_ratio_fit": (dbp["train_seconds"] / args.steps) / (bp["train_seconds"] / args.steps),
        }  # fmt: skip
        per_seed.append(row)
        print(f"  seed {seed}: BP {bp['final_loss']:.4f} ({bp['train_seconds']:.0f} s) | DBP {dbp['final_loss']:.4f} "
              f"({dbp['train_seconds']:.0f} s, {dbp['decorrelated']} layers decorrelated); DBP reaches BP's final "
              f"loss at step {row['steps_to_bp_final']}, speed-up {row['speedup']}", flush=True)  # fmt: skip
    ratio = interleaved_ratio(args)
    reached = [r["speedup"] for r in per_seed if r["speedup"] is not None]
    summary = {
        "lr": lr, "final_diff_mean": statistics.mean(r["final_diff"] for r in per_seed),
        "final_diff_range": [min(r["final_diff"] for r in per_seed), max(r["final_diff"] for r in per_seed)],
        "speedup_mean": statistics.mean(reached) if reached else 0.0, "reached": f"{len(reached)}/{len(per_seed)}",
        "step_ratio_fit": statistics.median(r["step_ratio_fit"] for r in per_seed), "step_ratio_interleaved": ratio,
    }  # fmt: skip
    print(f"\nDBP - BP final validation loss {summary['final_diff_mean']:+.4f} {summary['final_diff_range']}; speed-up "
          f"to BP's final loss {summary['speedup_mean']:.2f}x ({summary['reached']}); step ratio "
          f"{summary['step_ratio_fit']:.2f} (fit), {ratio:.2f} (interleaved)")  # fmt: skip
    write_json(args.out, {"machine": machine(), "args": vars(args), "minutes": (time.perf_counter() - started) / 60,
                          "tuning": tuning, "summary": summary, "seeds": per_seed})  # fmt: skip


if __name__ == "__main__":
    main()
