"""Step time of plain backprop (BP) vs decorrelated backprop (DBP), measured through ``Trainer.fit``.

Interleaved A/B runs in one process: for each repeat, every method trains a fresh copy of the model (same seed)
for ``--steps`` steps on random data of the model's input shape; the first ``--warmup`` steps of each run are
dropped; the table shows the median step time and the median over repeats of the per-repeat ratio DBP/BP.
A per-layer breakdown times, for each patched layer on its real input, the three parts DBP adds: fusing
``A = W @ R`` (forward and backward), sampling the input rows, and the ``R`` update.

    python examples/benchmarks/overhead.py --models cnn cifar_resnet18 resnet50
    python examples/benchmarks/overhead.py --device cuda --models cifar_resnet18 resnet50 --batch-size 256 128
    python examples/benchmarks/overhead.py --zoo          # stock torchvision models on small images, batch 32

The zoo (``--zoo``) is what a new user meets: stock torchvision models at small input sizes and batch 32 (and the
benchmark CNN at batch 128), ``DecorrelationCallback()`` with its defaults (the cost plan) against
``max_overhead=None`` (a dense ``R`` everywhere, the behaviour before the plan).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from lightning_decor import DecorrelationCallback, Decorrelator, decorrelate
from lightning_decor.functional import block_decorrelation_step
from lightning_decor.patching import decorrelated_layers
from lightning_decor.planner import CALIBRATION_STEPS, plain_steps
from lightning_decor.rows import Sampling

from common import StepTimer, fresh_plan_cache, machine, write_json
from models import ImageClassifier

SHAPES = {
    "cnn": (1, 28, 28), "mlp": (1, 28, 28), "cifar_resnet18": (3, 32, 32), "resnet18": (3, 224, 224),
    "resnet50": (3, 224, 224),
}  # fmt: skip
CPU_BATCH = {"cnn": 128, "mlp": 128, "cifar_resnet18": 128, "resnet18": 32, "resnet50": 32}


def _vit32() -> torch.nn.Module:
    """A small ViT for 32x32 images: patch 4 (64 tokens), width 128, 4 blocks of 4 heads, MLP 512."""
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=512, num_classes=10
    )


# The zoo: stock torchvision models at small input sizes, as a user fine-tuning on small images meets them.
ZOO: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...], int]] = {
    "resnet18@32": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32), 32),
    "resnet18@96": (lambda: torchvision.models.resnet18(num_classes=10), (3, 96, 96), 32),
    "mobilenet_v3_small@64": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (3, 64, 64), 32),
    "convnext_tiny@32": (lambda: torchvision.models.convnext_tiny(num_classes=10), (3, 32, 32), 32),
    "vit@32": (_vit32, (3, 32, 32), 32),
}
for _name, (_build, _shape, _batch) in ZOO.items():
    SHAPES[_name], CPU_BATCH[_name] = _shape, _batch
ZOO_MODELS = [*ZOO, "cnn"]
ZOO_METHODS = ["BP", "DBP defaults", "DBP max_overhead=0.05", "DBP all plain", "DBP max_overhead=None"]

# The methods compared. "DBP defaults" is DecorrelationCallback() as a user gets it; "DBP paper-like" samples
# 10 % of the images with all their patches and no row cap, as the authors' code does.
METHODS: dict[str, dict[str, Any] | None] = {
    "BP": None,
    "DBP defaults": {},
    "DBP paper-like": {"sample_fraction": 0.1, "max_rows": None},
    "DBP max_overhead=None": {"max_overhead": None},  # dense R everywhere: the behaviour before the cost plan
    # On a GPU: the update on the main stream instead of the side stream (the stream's gain, or its cost)
    "DBP defaults, no stream": {"use_cuda_stream": False},
    "DBP max_overhead=None, no stream": {"max_overhead": None, "use_cuda_stream": False},
    "DBP max_overhead=0.05": {"max_overhead": 0.05},  # half the default budget
    # Cheaper variants, measured for docs/TUNING.md (not in the default comparison):
    "DBP block_size=576": {"block_size": 576},
    "DBP update_every=2": {"update_every": 2},
    # Every layer left plain by a budget nothing fits: what the callback costs by itself (hooks, the measured steps)
    "DBP all plain": {"max_overhead": 1e-9},
}
DEFAULT_METHODS = ["BP", "DBP defaults", "DBP paper-like"]
# Steps a planned run must drop before its timing means anything: the planning steps (R moves from the next one),
# which also time the interval between two of their own steps and so must run alone when the steps are interleaved.


def plan_warmup(methods: list[str]) -> int:
    """The planning steps of the method that has most (``update_every`` lengthens the plan's check)."""
    return max((plain_steps((METHODS[m] or {}).get("update_every", 1)) for m in methods if plans(m)), default=0)


def plans(method: str) -> bool:
    """Whether the method's callback makes a cost plan (``max_overhead`` is set, as by default)."""
    kwargs = METHODS[method]
    return kwargs is not None and kwargs.get("max_overhead", 0.1) is not None


def rotated(methods: list[str], k: int) -> list[str]:
    """``methods`` starting at the ``k``-th (modulo): run in this order, no method always goes first."""
    k %= len(methods)
    return methods[k:] + methods[:k]


def build_module(model_name: str) -> ImageClassifier:
    """The benchmark's LightningModule (cross-entropy, Adam 1e-3, constant rate) around the named network."""
    zoo = model_name in ZOO
    module = ImageClassifier(
        model="cnn" if zoo else model_name, in_channels=SHAPES[model_name][0], schedule="constant", lr=1e-3
    )
    if zoo:
        module.net = ZOO[model_name][0]()
    return module


def fit_steps(model_name: str, batch: int, steps: int, kwargs: dict[str, Any] | None, args: argparse.Namespace):
    pl.seed_everything(0, verbose=False)
    module = build_module(model_name)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    x = torch.randn(batch * steps, *SHAPES[model_name])
    y = torch.randint(0, 10, (batch * steps,))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    timer = StepTimer()
    callbacks: list[pl.Callback] = []
    if kwargs is not None:
        callbacks.append(DecorrelationCallback(**kwargs))
    callbacks.append(timer)  # last: its batch end comes after the callback's, where R moves
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=steps,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, train_dataloaders=loader)
    plan = callbacks[0].plan if kwargs is not None else None  # type: ignore[attr-defined]
    PLANS[model_name] = PLANS.get(model_name, {})
    if plan is not None:
        PLANS[model_name][json_key(kwargs)] = plan.state_dict()
    return timer.times[args.warmup :]


PLANS: dict[str, dict[str, Any]] = {}  # per model and settings, the plan of the last run


def json_key(kwargs: dict[str, Any] | None) -> str:
    import json

    return json.dumps(kwargs, sort_keys=True)


def layer_breakdown(model_name: str, batch: int, args: argparse.Namespace, kwargs: dict[str, Any]) -> list[dict]:
    """Milliseconds per layer for fusing (fwd+bwd), sampling rows and the R update, on the layer's real input."""
    cb = DecorrelationCallback(**kwargs)
    dev = torch.device(args.device)
    module = build_module(model_name).to(dev)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: inputs.__setitem__(name, inp[0].detach()))
        for name, m in module.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    with torch.no_grad():
        module(torch.randn(batch, *SHAPES[model_name], device=dev))
    for h in hooks:
        h.remove()
    decorrelate(module, include=cb.include, exclude=cb.exclude)
    gen = torch.Generator(device=dev).manual_seed(0)

    def timed(fn, reps: int = 5) -> float:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps * 1e3

    rows_out = []
    sampling = Sampling(cb.sample_fraction, cb.max_rows, gen)
    for name, layer in decorrelated_layers(module).items():
        x = inputs[name]

        def fuse() -> None:
            layer.weight.grad = None
            (layer.decor_fused_weight() * 1.0).sum().backward()

        rows = sampling.rows(layer, x)
        b = layer.decor_block_size
        stacked = layer.decor_R.reshape(-1, b, b)
        blocks = rows.reshape(rows.shape[0], -1, b).transpose(0, 1).to(stacked.dtype)  # (G, n, b), as the engine
        counts = torch.full((stacked.shape[0],), rows.shape[0], device=dev)

        def update() -> None:  # the engine's batched step on this layer's blocks (out of place: R is kept)
            block_decorrelation_step(stacked, blocks, counts, lr=cb.decor_lr, kappa=cb.kappa, normalize=cb.normalize)

        rows_out.append(
            {
                "layer": name,
                "d": layer.decor_features,
                "c_out": layer.weight.shape[0],
                "rows": rows.shape[0],
                "fuse_ms": timed(fuse),
                "sample_ms": timed(lambda: sampling.rows(layer, x)),
                "update_ms": timed(update),
            }
        )
    return rows_out


def interleaved_steps(model_name: str, batch: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Step times of every method with the steps interleaved: one model per method in one plain PyTorch loop
    (``Decorrelator``, the engine the callback drives), each first trained alone for ``--warmup`` steps (the plan
    measures the plain step as the time between two of its own steps, so that part may not be interleaved), then
    one step of each method in turn, the order rotating, for the remaining steps. A slow or fast spell of the
    machine then hits every method alike, which fits (seconds apart) cannot promise on a shared VM."""
    device = torch.device(args.device)
    runs: dict[str, Any] = {}
    for method in args.methods:
        torch.manual_seed(0)
        net = build_module(model_name).net.to(device)
        if args.channels_last:
            net = net.to(memory_format=torch.channels_last)
        kwargs = METHODS[method]
        engine = Decorrelator(net, **kwargs) if kwargs is not None else None
        runs[method] = (net, torch.optim.Adam(net.parameters(), lr=1e-3), engine)
    generator = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(batch, *SHAPES[model_name], generator=generator).to(device),
         torch.randint(0, 10, (batch,), generator=generator).to(device))
        for _ in range(4)
    ]  # fmt: skip

    def step(method: str, i: int) -> float:
        net, optimizer, engine = runs[method]
        x, y = data[i % len(data)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        if engine is not None:
            engine.step()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for method in args.methods:
        for i in range(args.warmup):
            step(method, i)
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for i in range(args.warmup, args.steps):
        for method in rotated(args.methods, i):
            times[method].append(step(method, i))
    for method, (_, _, engine) in runs.items():
        if engine is not None and engine.plan is not None:
            PLANS.setdefault(model_name, {})[f"interleaved {json_key(METHODS[method])}"] = engine.plan.state_dict()
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv[1:]``), checked before anything trains: a usage error exits
    with status 2."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn", "cifar_resnet18", "resnet50"], choices=sorted(SHAPES))
    parser.add_argument(
        "--zoo", action="store_true", help="the zoo models (overrides --models) and methods (unless --methods is given)"
    )
    parser.add_argument("--batch-size", nargs="+", type=int, help="one per model (default: CPU sizes)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "16-mixed", "bf16-mixed", "bf16-true"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=26, help="steps per fit, the warm-up included")
    parser.add_argument(
        "--warmup", type=int, default=17, help="steps dropped: the plan's 17 (5 measure the plain step, 12 check it)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help=f"default: {DEFAULT_METHODS}")
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument(
        "--interleave-steps",
        action="store_true",
        help="also time the methods step by step in one plain PyTorch loop (the engine, no Trainer), --steps steps "
        "per method after its --warmup alone: the low-noise ratio",
    )
    parser.add_argument("--out", default="examples/benchmarks/results/overhead.json")
    args = parser.parse_args(argv)
    if args.zoo:
        args.models = ZOO_MODELS
    if args.methods is None:
        args.methods = ZOO_METHODS if args.zoo else DEFAULT_METHODS
    batches = args.batch_size or [CPU_BATCH[m] for m in args.models]
    if len(batches) != len(args.models):
        parser.error(f"--batch-size needs one value per model ({len(args.models)}), got {len(batches)}")
    if args.steps - args.warmup < 3:
        parser.error(
            f"--steps counts the warm-up: --steps {args.steps} --warmup {args.warmup} would time "
            f"{max(args.steps - args.warmup, 0)} step(s) per fit; time at least 3 (e.g. --steps {args.warmup + 9})"
        )
    if "BP" not in args.methods:
        args.methods = ["BP", *args.methods]
    warmup = plan_warmup(args.methods)
    if args.warmup < warmup:
        parser.error(
            f"--warmup must be >= {warmup} for the cost plan: R moves after its planning steps ({CALIBRATION_STEPS} "
            "measure the plain step, the rest check the plan), which time their own steps and must run alone"
        )
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU, and torch sees none")
    batches = args.batch_size or [CPU_BATCH[m] for m in args.models]
    fresh_plan_cache()  # the first fit of each model and method measures; the later repeats replay its plan
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "models": {}}
    for model_name, batch in zip(args.models, batches):
        print(f"\n== {model_name}, batch {batch}, {args.device}, {args.precision} ==", flush=True)
        times: dict[str, list[list[float]]] = {m: [] for m in args.methods}
        for rep in range(args.repeats):
            # the order rotates from repeat to repeat: a machine that speeds up or slows down within a repeat
            # favours no method
            for method in rotated(args.methods, rep):
                t = fit_steps(model_name, batch, args.steps, METHODS[method], args)
                times[method].append(t)
                print(
                    f"  repeat {rep + 1}/{args.repeats} {method:<15} median step {statistics.median(t) * 1e3:8.1f} ms",
                    flush=True,
                )
        entry: dict[str, Any] = {"batch": batch, "methods": {}}
        for method in args.methods if args.repeats else []:  # --repeats 0: the interleaved steps only
            ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(times[method], times["BP"])]
            entry["methods"][method] = {
                "median_step_ms": statistics.median([s for run in times[method] for s in run]) * 1e3,
                "ratio_to_bp": statistics.median(ratios),
                "ratios": ratios,
                "step_times_s": times[method],
            }
        if args.interleave_steps:
            steps = interleaved_steps(model_name, batch, args)
            entry["interleaved"] = {
                m: {
                    "median_step_ms": statistics.median(t) * 1e3,
                    "ratio_to_bp": statistics.median(t) / statistics.median(steps["BP"]),
                    "step_times_s": t,
                }
                for m, t in steps.items()
            }
        if not args.no_breakdown:
            entry["breakdown"] = {
                m: layer_breakdown(model_name, batch, args, METHODS[m] or {}) for m in args.methods if m != "BP"
            }
        entry["plans"] = PLANS.get(model_name, {})
        results["models"][model_name] = entry
        print(f"\n{'method':<16} {'median step':>12} {'ratio to BP':>12}")
        for method, v in entry["methods"].items():
            print(f"{method:<16} {v['median_step_ms']:9.1f} ms {v['ratio_to_bp']:12.3f}")
        for method, v in entry.get("interleaved", {}).items():
            print(f"{method + ' (steps interleaved)':<40} {v['median_step_ms']:9.1f} ms {v['ratio_to_bp']:12.3f}")
        for method, layers in entry.get("breakdown", {}).items():
            print(f"\n  per layer, {method} (ms): layer, d, rows, fuse fwd+bwd, sample, update")
            for r in layers:
                print(
                    f"  {r['layer']:<28} {r['d']:6d} {r['rows']:7d} {r['fuse_ms']:8.2f} {r['sample_ms']:8.2f} "
                    f"{r['update_ms']:8.2f}"
                )
            tot = {k: sum(r[k] for r in layers) for k in ("fuse_ms", "sample_ms", "update_ms")}
            print(
                f"  {'total':<28} {'':6} {'':7} {tot['fuse_ms']:8.2f} {tot['sample_ms']:8.2f} {tot['update_ms']:8.2f}"
            )
    out = write_json(args.out, results)
    print(f"\nJSON written to {out}")


if __name__ == "__main__":
    main()
