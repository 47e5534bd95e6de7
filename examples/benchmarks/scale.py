"""Where DBP meets transformer widths: the memory of R, with and without one R per input and the memory budget, for
GPT-2-small- and Llama-7B-shaped stacks (counted from their shapes, nothing allocated), and on this machine the
step of a small Llama-shaped model, BP against DBP with q/k/v and gate/up sharing one R against each its own.

    python examples/benchmarks/scale.py                       # the memory table, then the timed steps
    python examples/benchmarks/scale.py --out examples/benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_decor import Decorrelator
from lightning_decor.config import MIN_MEMORY
from lightning_decor.distributed import cheaper_exchange
from lightning_decor.memory import fit_memory, memory_bytes, r_bytes
from lightning_decor.plan import block_ladder

# (layers, width, MLP width, projections reading the block's first input, ... the second input): per block, every
# projection with its input width; groups share an input (q/k/v; gate/up). GPT-2 packs q/k/v in one Conv1D (c_attn).
SHAPES = {
    "gpt2-small": dict(blocks=12, groups=[["c_attn"], ["c_proj"], ["c_fc"], ["mlp.c_proj"]],
                       width={"c_attn": 768, "c_proj": 768, "c_fc": 768, "mlp.c_proj": 3072},
                       parameters=124_439_808),
    "llama-7b": dict(blocks=32, groups=[["q", "k", "v"], ["o"], ["gate", "up"], ["down"]],
                     width={"q": 4096, "k": 4096, "v": 4096, "o": 4096, "gate": 4096, "up": 4096, "down": 11008},
                     parameters=6_738_415_616),
}  # fmt: skip


def memory_table() -> list[dict]:
    rows = []
    for name, shape in SHAPES.items():
        layers = [(f"{b}.{p}", shape["width"][p], g) for b in range(shape["blocks"])
                  for g, group in enumerate(shape["groups"]) for p in group]  # fmt: skip
        leaders = {f"{b}.{group[0]}" for b in range(shape["blocks"]) for group in shape["groups"]}
        each = sum(r_bytes(d, 1, d) for _, d, _ in layers)  # dense R of every layer
        shared = sum(r_bytes(d, 1, d) for n, d, _ in layers if n in leaders)  # one R per input
        workspace = memory_bytes([(d, r_bytes(d, 1, d)) for n, d, _ in layers if n in leaders])
        for world in (1, 8):
            budget = max(int(4.0 * 4 * shape["parameters"] / world), MIN_MEMORY)  # max_memory=4, float32 parameters
            kept = [(n, d) for n, d, _ in layers if n in leaders]
            ladders = {n: block_ladder(d, 1, d) for n, d in kept}
            choice = fit_memory({n: 0 for n, _ in kept}, ladders, {n: (d, 1) for n, d in kept}, budget)
            fitted = [(ladders[n][k], r_bytes(d, 1, ladders[n][k]))
                      for n, d in kept if (k := choice[n]) < len(ladders[n])]  # fmt: skip
            blocks = sorted({b for b, _ in fitted}, reverse=True)
            rows.append(dict(
                model=name, world=world, dense_each_GiB=each / 2**30, dense_shared_GiB=shared / 2**30,
                dense_shared_with_workspace_GiB=workspace / 2**30, budget_GiB=budget / 2**30,
                planned_GiB=memory_bytes(fitted) / 2**30, blocks=blocks,
                parameters_GiB=4 * shape["parameters"] / 2**30 / world,
            ))  # fmt: skip
    return rows


def exchange_table() -> list[dict]:
    """What the processes would exchange before an update of GPT-2 small's layers (dense R) for a few world sizes and
    rows per process and layer (64: the default ``max_rows`` per forward; 819: 10 % of 8 x 1024 tokens; 8192: all)."""
    shape = SHAPES["gpt2-small"]
    widths = [shape["width"][p] for _ in range(shape["blocks"]) for g in shape["groups"] for p in g]
    blocks = [(widths.count(d), d) for d in sorted(set(widths))]
    out = []
    for world in (2, 8, 64):
        for rows in (64, 819, 8192):
            choice = cheaper_exchange([[rows] * len(widths)] * world, widths, blocks)
            out.append(dict(world=world, rows_per_process=rows, exchange=choice))
    return out


class Block(nn.Module):
    """A Llama-shaped block (RMS norm, q/k/v/o attention, gated MLP); with ``copies`` every projection reads its own
    copy of the input, so nothing can share an R (the copies cost a little in BP too)."""

    def __init__(self, d: int, copies: bool) -> None:
        super().__init__()
        self.copies = copies
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(d, 4 * d, bias=False), nn.Linear(
            4 * d, d, bias=False
        )

    def read(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone() if self.copies else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x, x.shape[-1:])
        q, k, v = (p(self.read(h)) for p in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        h = F.rms_norm(x, x.shape[-1:])
        return x + self.down(F.silu(self.gate(self.read(h))) * self.up(self.read(h)))


def timed_steps(d: int, blocks: int, batch: int, seq: int, steps: int, repeats: int) -> list[dict]:
    results: dict[str, list[float]] = {}
    for repeat in range(repeats):  # the four methods interleaved, each repeat in a new order
        methods = [("BP", False, False), ("DBP, one R per input", False, True), ("BP, copies", True, False),
                   ("DBP, an R each (copies)", True, True)]  # fmt: skip
        for label, copies, dbp in methods[repeat % 4 :] + methods[: repeat % 4]:
            torch.manual_seed(repeat)
            model = nn.Sequential(*(Block(d, copies) for _ in range(blocks)))
            dec = Decorrelator(model, max_overhead=None) if dbp else None
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            x = torch.randn(batch, seq, d)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                loss = model(x).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                if dec is not None:
                    dec.step()
                optimizer.step()
                times.append(time.perf_counter() - start)
            results.setdefault(label, []).append(statistics.median(times[steps // 3 :]))
            if dec is not None and repeat == 0:
                print(f"{label}: {len(dec.shared)} layers read another's R; plan {dec.plan.memory / 2**20:.1f} MiB")
    bp = {"DBP, one R per input": "BP", "DBP, an R each (copies)": "BP, copies"}
    out = []
    for label, values in results.items():
        median = statistics.median(values)
        ratio = median / statistics.median(results[bp[label]]) if label in bp else 1.0
        out.append(
            dict(method=label, median_step_ms=median * 1e3, ratio_to_bp=ratio, step_ms=[v * 1e3 for v in values])
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    table = memory_table()
    head = f"{'model':<11} {'ranks':>5} {'R each':>8} {'R shared':>9} {'+work':>8}"
    print(head + f" {'params':>8} {'budget':>8} {'planned':>8}  blocks")
    for r in table:
        sizes = f"{r['parameters_GiB']:>7.2f}G {r['budget_GiB']:>7.2f}G {r['planned_GiB']:>7.2f}G"
        work = r["dense_shared_with_workspace_GiB"]
        dense = f"{r['dense_each_GiB']:>7.2f}G {r['dense_shared_GiB']:>8.2f}G {work:>7.2f}G"
        print(f"{r['model']:<11} {r['world']:>5} {dense} {sizes}  {r['blocks']}")
    exchanges = exchange_table()
    for e in exchanges:
        print(f"gpt2-small, {e['world']:>2} processes, {e['rows_per_process']:>5} rows each: {e['exchange']}")
    steps = timed_steps(args.width, args.blocks, args.batch, args.seq, args.steps, args.repeats)
    for r in steps:
        print(f"{r['method']:<26} median step {r['median_step_ms']:7.1f} ms, to its BP {r['ratio_to_bp']:.3f}")
    if args.out:
        cpu = platform.processor() or platform.machine()
        machine = dict(cpu=cpu, torch=torch.__version__, threads=torch.get_num_threads())
        result = dict(machine=machine, args=vars(args), memory=table, exchange=exchanges, steps=steps)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
