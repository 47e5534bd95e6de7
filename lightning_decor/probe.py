"""Measured costs for the cost plan: each candidate form of each layer timed on the device, on the layer's shapes.

The flop counts of :mod:`lightning_decor.plan` miss what dominates many real layers: batched products of small
blocks run far below a large product's throughput, unfolding patches and the elementwise passes of the update are
memory-bound, and every kernel has a launch cost. So before the plan is made, :func:`measure_candidates` times the
operations DBP adds, on random tensors of the shapes each layer saw in the measured steps:

- ``fused`` with blocks of ``b``: forming ``A = W @ R`` and the weight gradient through it (forward and backward);
- ``input`` with blocks of ``b``: the layer's input-side forward and backward minus the plain layer's (a copy of
  the layer; the model is not touched);
- the update with blocks of ``b``: one batched step (:func:`lightning_decor.functional.block_decorrelation_step`)
  on a few hundred thousand numbers of blocks, per block;
- drawing the statistics rows, once per layer (every form draws the same rows).

Equal shapes are timed once. Each time is the best of a few runs after a warm-up (synchronising CUDA), so a busy
machine inflates it less than the step it is compared with. Random numbers come from a private generator: the
global RNG, and with it the data order and dropout, is untouched.

Beside the probe, the planner's bridge to real modules: :func:`make_planner` (each layer's shapes, the probe, the
device's timing and :func:`environment`, the plan cache's key) and the :class:`Observer` of each layer's forwards.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_decor.config import DecorConfig
from lightning_decor.functional import block_decorrelation_step, identity_blocks, matmul_precision, stats_dtype
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.plan import Costs, LayerShape, Plan, block_ladder, input_side_seconds
from lightning_decor.planner import PlanCache, Planner
from lightning_decor.rows import RowBuffers, Sampling

__all__ = [
    "Observer",
    "device_name",
    "environment",
    "extrapolated",
    "input_seconds",
    "make_planner",
    "measure_candidates",
    "measure_costs",
]

_PROBE_NUMBERS = 1 << 18  # numbers per timed update: enough blocks to reach the batched throughput
_REPEATS = 3
Format = tuple[str, str, bool]  # (input dtype, autocast dtype or "", channels_last), as the planner saw the layer
_PLAIN: Format = ("", "", False)  # the weight's dtype, no autocast, contiguous


def _dtype(name: str, default: torch.dtype) -> torch.dtype:
    """``"torch.bfloat16"`` as a dtype (``""``: ``default``)."""
    value = getattr(torch, name.removeprefix("torch."), None) if name else default
    return value if isinstance(value, torch.dtype) else default


def _random_input(shape: tuple[int, ...], fmt: Format, weight: Tensor, gen: torch.Generator) -> Tensor:
    """A random input of ``shape`` in the dtype and memory format training gave the layer."""
    x = torch.randn(shape, dtype=_dtype(fmt[0], weight.dtype), device=weight.device, generator=gen)
    return x.contiguous(memory_format=torch.channels_last) if fmt[2] and x.dim() == 4 else x


def _autocast(fmt: Format, device: torch.device) -> torch.autocast:
    """The autocast training ran the layer under (off when it ran without)."""
    return torch.autocast(device.type, dtype=_dtype(fmt[1], torch.bfloat16), enabled=bool(fmt[1]))


def _timer(device: torch.device, calls: int = 1) -> Callable[[Callable[[], Any]], float]:
    """The probe's one timer: seconds per call of ``fn``, the best of a few runs of ``calls`` calls each after a
    warm-up (allocations, kernels, caches), synchronising CUDA around each run (so a busy machine inflates it less
    than the step it is compared with)."""

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        best = float("inf")
        for _ in range(_REPEATS):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, (time.perf_counter() - start) / calls)
        return best

    return timed


def measure_costs(device: torch.device) -> Costs:
    """Measure the cost model's two device constants (:class:`lightning_decor.plan.Costs`) in a few milliseconds: a
    matrix product's time per flop and a small elementwise operation's time (launch and dispatch). The operands come
    from a private generator: the global RNG (the data order, dropout) is not touched."""
    size = 1024 if device.type == "cuda" else 256
    a = torch.randn(size, size, device=device, generator=torch.Generator(device=device).manual_seed(0))
    small = torch.zeros(8, device=device)
    per_flop = _timer(device, calls=3)(lambda: a @ a) / (2.0 * size**3)
    per_op = _timer(device, calls=50)(lambda: small.add_(1.0))
    return Costs(seconds_per_flop=per_flop, seconds_per_op=per_op)


@torch.no_grad()
def _update_seconds(
    b: int, n: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator, normalize: str
) -> float:
    """Seconds per block of one batched update with ``n`` rows per block of ``b`` features."""
    g = max(1, _PROBE_NUMBERS // (n * b + b * b))
    R = identity_blocks(g, b, dtype, device).reshape(g, b, b)
    x = torch.randn(g, n, b, dtype=dtype, device=device, generator=gen)
    counts = torch.full((g,), n, device=device)
    return _timer(device)(lambda: block_decorrelation_step(R, x, counts, lr=1e-4, kappa=0.5, normalize=normalize)) / g


def _fuse_seconds(layer: DecorrelatedLayer, b: int, gen: torch.Generator) -> float:
    """Seconds of forming ``W @ R`` with blocks of ``b`` and its backward into ``W``."""
    w = layer.weight.detach()
    # in the weight's memory format (a channels_last model fuses into a channels_last weight)
    weight = torch.empty_like(w).normal_(generator=gen).requires_grad_(True)
    blocks = layer.decor_features // b
    R = identity_blocks(blocks, b, stats_dtype(w.dtype), w.device)

    @torch.enable_grad()  # the engine steps under no_grad
    def run() -> None:
        fused = layer.decor_fuse(weight, R)
        fused.backward(torch.ones_like(fused))
        weight.grad = None

    return _timer(w.device)(run)


def input_seconds(
    layer: DecorrelatedLayer, shape: tuple[int, ...], b: int | None, gen: torch.Generator, fmt: Format = _PLAIN
) -> float:
    """Seconds of the layer's forward and backward on an input of ``shape`` in the format training gave it
    (:data:`Format`): input-side form with blocks of ``b``, or the plain layer (``b=None``)."""
    w = layer.weight.detach()
    twin = copy.copy(layer)  # shares the parameters; its own layout, no rows kept
    twin._buffers = dict(layer._buffers)
    twin.decor_buffer = twin.decor_rows_once = None
    twin.decor_set_layout_(b if b is not None else layer.decor_unit, "input" if b is not None else "identity")
    x = _random_input(shape, fmt, w, gen).requires_grad_(True)
    params = [p for p in (twin.weight, twin.bias) if p is not None]

    @torch.enable_grad()
    def run() -> None:
        with _autocast(fmt, w.device):
            y = twin.forward(x)  # not twin(x): hooks on the model's layer must not see the probe
        grads = torch.autograd.grad(y, [x, *params], torch.ones_like(y))
        del grads

    return _timer(w.device)(run)


def _sample_seconds(
    layer: DecorrelatedLayer, shape: tuple[int, ...], sampling: Sampling, gen: torch.Generator, fmt: Format = _PLAIN
) -> float:
    w = layer.weight.detach()
    x = _random_input(shape, fmt, w, gen)
    own = Sampling(sampling.fraction, sampling.max_rows, gen)  # the engine's generators (in a checkpoint) stay
    return _timer(w.device)(lambda: own.rows(layer, x))


def measure_candidates(
    layers: dict[str, DecorrelatedLayer],
    shapes: list[LayerShape],
    input_shapes: dict[str, tuple[int, ...]],
    estimates: dict[str, list[tuple[str, float]]],
    *,
    budget: float,
    time_limit: float,
    update_every: int = 1,
    normalize: str = "none",
    costs: Costs | None = None,
    formats: dict[str, Format] | None = None,
    sampling: Sampling | None = None,
) -> dict[str, list[tuple[str, float]]]:
    """Measured ``(form, seconds per step)`` of each layer's candidates, in the order of its block ladder
    (:func:`lightning_decor.plan.block_ladder`), for :func:`lightning_decor.plan.make_plan`'s ``measured``.

    Candidates are measured smallest block first (the ones a tight budget keeps), and only while their flop
    estimate fits ``budget`` (flops underestimate, so one whose estimate alone exceeds the budget cannot be
    chosen) and the measuring has taken less than ``time_limit`` seconds. The others keep their estimate,
    multiplied by the ratio of measured to estimated cost of the same layer's nearest measured candidate (the
    ratio falls as blocks grow, fixed costs weigh less: a ratio from other layers' small blocks would price large
    ones several times too high), or by the median ratio over all measured candidates for a layer with none.

    Args:
        layers: The patched layers by name (left as they are).
        shapes: What the planner knows of them (rows, forwards, statistics rows per step).
        input_shapes: The input shape of each layer's last measured forward; layers without one (attention, whose
            input is three tensors) get the fused form measured and no input-side candidate.
        estimates: Per layer, the flop estimates of its candidates (:func:`lightning_decor.plan.candidate_costs`).
        budget: Seconds per step the plan may spend in all.
        time_limit: Seconds the measuring may take.
        update_every: ``R`` moves every this many steps (divides the update's and the sampling's cost).
        normalize: The update's ``normalize`` (:func:`lightning_decor.functional.block_decorrelation_step`).
        costs: The device constants; with them, the input-side form is measured only where its flop estimate is
            below the measured fused form (flops underestimate: it could not win, and unfolding a large layer's
            patches to time it takes seconds). ``None``: measured wherever it is available.
        formats: Per layer, how training ran it (:data:`Format`: its input's dtype, the autocast dtype,
            channels-last), so that ``bf16-mixed`` and channels-last layers are timed as they run; ``None``: in
            the weight's dtype, without autocast, contiguous.
        sampling: How training draws rows (its fraction and cap; ``None``: every row).
    """
    sampling = sampling if sampling is not None else Sampling()
    start = time.perf_counter()
    gen: dict[torch.device, torch.Generator] = {}
    cache: dict[tuple[Any, ...], float] = {}

    def cached(key: tuple[Any, ...], fn: Callable[..., float], *args: Any) -> float:  # fn(*args), once per key
        if key not in cache:
            cache[key] = fn(*args)
        return cache[key]

    by_name = {s.name: s for s in shapes}
    ladders = {s.name: block_ladder(s.d, s.unit, s.max_block) for s in shapes}
    out: dict[str, list[tuple[str, float] | None]] = {s.name: [None] * len(estimates[s.name]) for s in shapes}
    # (name, ladder index) from the smallest block of every layer up to the largest
    order = sorted(((n, k) for n, e in estimates.items() if n in by_name for k in range(len(e))),
                   key=lambda nk: len(estimates[nk[0]]) - nk[1])  # fmt: skip
    ratios: list[float] = []
    for name, k in order:
        s, layer = by_name[name], layers[name]
        estimate = estimates[name][k][1]
        if estimate > budget or time.perf_counter() - start > time_limit:
            continue
        w = layer.weight
        g = gen.setdefault(w.device, torch.Generator(device=w.device).manual_seed(0))
        sig = (type(layer), tuple(w.shape), w.dtype, w.device, s.groups)
        shape = input_shapes.get(name)
        fmt = (formats or {}).get(name, _PLAIN)
        probeable = shape is not None  # a layer of one input tensor (not attention's query, key, value)
        sample = 0.0
        if probeable:
            sample = cached(("sample", sig, shape, fmt), _sample_seconds, layer, shape, sampling, g, fmt)
        b = ladders[name][k]
        fuse = cached(("fuse", sig, b), _fuse_seconds, layer, b, g) * s.forwards
        form, cost = "fused", fuse
        if s.input_side and probeable and (costs is None or input_side_seconds(s, b, costs) < cost):
            plain = cached(("plain", sig, shape, fmt), input_seconds, layer, shape, None, g, fmt)
            inp = max(cached(("input", sig, shape, fmt, b), input_seconds, layer, shape, b, g, fmt) - plain, 0.0)
            if inp * s.forwards < cost:
                form, cost = "input", inp * s.forwards
        rows = max(1, s.stat_rows)
        dtype = stats_dtype(w.dtype)
        key = ("update", b, rows, dtype, w.device)
        per_block = cached(key, _update_seconds, b, rows, dtype, w.device, g, normalize)
        update = per_block * (s.groups * s.d // b) + sample * s.forwards
        out[name][k] = (form, cost + update / update_every)
        if estimate > 0:
            ratios.append((cost + update / update_every) / estimate)
    median = sorted(ratios)[len(ratios) // 2] if ratios else 1.0
    return {name: extrapolated(entries, estimates[name], median) for name, entries in out.items()}


def extrapolated(
    measured: list[tuple[str, float] | None], estimates: list[tuple[str, float]], median: float
) -> list[tuple[str, float]]:
    """One layer's candidates: the measured ones as they are, each other one its estimate times the
    measured / estimated ratio of the layer's nearest measured candidate in the ladder (``median`` if none)."""
    known = [k for k, m in enumerate(measured) if m is not None and estimates[k][1] > 0]
    out = []
    for k, (m, (form, estimate)) in enumerate(zip(measured, estimates)):
        if m is not None:
            out.append(m)
            continue
        near = min(known, key=lambda j: (abs(j - k), j), default=None)
        ratio = median if near is None else measured[near][1] / estimates[near][1]  # type: ignore[index]
        out.append((form, estimate * ratio))
    return out


# ---------------------------------------------------------------------------------------------- the planner's bridge
def device_name(device: torch.device) -> str:
    """What the cache key calls the device: the GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(model: nn.Module, device: torch.device, normalize: str) -> dict[str, Any]:
    """What besides the layers' shapes the measured costs depend on: part of the plan cache's key."""
    return {
        "device": device_name(device), "device_type": device.type, "torch": str(torch.__version__),
        "threads": torch.get_num_threads(), "normalize": normalize,
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "parameters": sum(p.numel() for p in model.parameters()), "float32_matmul": matmul_precision(),
    }  # fmt: skip


class Observer:
    """A patched layer's observer (:attr:`lightning_decor.rows.RowBuffer.observer`) while the plain step is measured:
    tells ``planner`` the rows each training forward multiplies and keeps with ``sampling``, its input's shape,
    dtype, autocast dtype and memory format (the probe times the layer as training runs it)."""

    def __init__(self, planner: Planner, name: str, sampling: Sampling) -> None:
        self.planner, self.name, self.sampling = planner, name, sampling

    def __call__(self, layer: DecorrelatedLayer, input: Any) -> None:  # noqa: A002 (torch's name)
        single = isinstance(input, Tensor)  # attention passes (query, key, value)
        kind = (input if single else input[0]).device.type
        self.planner.observe(
            self.name, rows=layer.decor_row_count(input),
            stat_rows=layer.decor_drawn_count(input, self.sampling.fraction, self.sampling.max_rows),
            input_shape=tuple(input.shape) if single else None, dtype=str(input.dtype) if single else "",
            autocast=str(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else "",
            channels_last=single and input.dim() == 4 and not input.is_contiguous()
            and input.is_contiguous(memory_format=torch.channels_last),
        )  # fmt: skip


def make_planner(
    model: nn.Module,
    layers: dict[str, DecorrelatedLayer],
    config: DecorConfig,
    *,
    pinned: Plan | None,
    max_memory: int | None = None,
    device: Callable[[], torch.device],
    agree: Callable[[Any], Any],
    leader: bool,
    rows: RowBuffers,
) -> Planner:
    """The planner of ``layers`` (fresh, ``R = I``), measuring on ``device()`` (looked up when it measures: under
    Lightning the model moves to its device after the engine is made), with ``config``'s budget and the plan cache,
    ``agree`` taking the ``leader``'s decisions on every process. Until the plan is made the layers compute their
    plain function at its plain cost, and an :class:`Observer` on each one's buffer in the engine's ``rows`` tells
    the planner what its training forwards multiply."""
    sampling = Sampling(config.sample_fraction, config.max_rows)
    infos = [
        LayerShape(
            name=name,
            d=layer.decor_group_features,
            unit=layer.decor_unit,
            c_out=layer.decor_out_features,
            groups=layer.decor_groups,
            input_side=layer.decor_input_side,
            conv=layer.weight.dim() > 2,
            max_block=layer.decor_block_size,  # decorrelate() gave it its largest allowed block
        )  # fmt: skip
        for name, layer in layers.items()
    ]

    def probe(shapes: Any, inputs: Any, estimates: Any, **kw: Any) -> dict[str, list[tuple[str, float]]]:
        return measure_candidates(layers, shapes, inputs, estimates, update_every=config.update_every,
                                  normalize=config.normalize, sampling=sampling, **kw)  # fmt: skip

    def sync() -> None:
        if device().type == "cuda":
            torch.cuda.synchronize(device())

    planner = Planner(
        infos,
        max_overhead=config.max_overhead,
        max_memory=max_memory,
        update_every=config.update_every,
        pinned=pinned,
        cache=PlanCache.default() if config.plan_cache else None,
        environment=environment(model, device(), config.normalize),
        device_type=device().type,
        probe=probe,
        device_costs=lambda: measure_costs(device()),
        sync=sync,
        agree=agree,
        leader=leader,
    )
    for name, layer in layers.items():
        layer.decor_form = "identity"  # R = I: the plain function, at the plain cost
        rows[name].observer = Observer(planner, name, rows.sampling)
    return planner
