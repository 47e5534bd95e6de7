"""DecorrelationCallback with the rest of the Trainer: checkpoints and resume, gradient accumulation, DDP, precision,
torch.compile, manual optimisation, the fit/validate/test/predict lifecycle and activation checkpointing.

References are independent of the package: the update rule written out in float64 below, an uninterrupted run for
resume, a plain unpatched module for checkpoints, an eager run for torch.compile.

Run as a script (``python tests/test_integration.py ddp OUT``), this file is the training script that
``strategy="ddp"`` relaunches for its second rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    EMAWeightAveraging,
    GradientAccumulationScheduler,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_decor import DecorrelationCallback, decorrelation_matrices
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.plan import Plan
from lightning_decor.planner import CALIBRATION_STEPS, plain_steps

from conftest import TinyModule, checkout_env, correlated_data, quiet_trainer

LR, KAPPA = 0.05, 0.5
# Float bounds, from the errors measured on CPU (torch 2.14.1; 1, 2 and 4 threads, and MKL's SSE4.2 path with
# ATEN_CPU_CAPABILITY=default standing in for another CPU):
# - R_ATOL: R after the callback's float32 update against `reference_update` in float64. R's entries are O(1) and the
#   statistics sum at most 128 rows: float32 rounding leaves at most 3e-7, so 1e-5 leaves 30x. One row more or less
#   in the statistics moves R by 2e-3 or more, far above it.
# - SAME_OPS_ATOL: the same float32 kernels on the same values in this process (a plain model holding the fused
#   weights against the patched one, a resumed run against an uninterrupted one, compiled against eager): equal
#   bitwise in every setting measured; 1e-6 (~10 float32 ulps of these O(1) values) only allows for a kernel that
#   sums in another order for another memory layout.
R_ATOL, SAME_OPS_ATOL = 1e-5, 1e-6


def reference_update(
    R: torch.Tensor, x: torch.Tensor, lr: float = LR, kappa: float = KAPPA, normalize: str = "spectral"
) -> torch.Tensor:
    """One step of the rule of Dalm et al. in float64: z = x R^T, C = z^T z / n,
    R <- R - lr [(1 - kappa)(C - diag C) + kappa diag(diag C - 1)] R, with the default normalised step
    lr / max(10, ||C||_F^2 / tr C) (``normalize="none"``: the authors' step lr)."""
    R, x = R.double(), x.double()
    z = x @ R.T
    C = z.T @ z / z.shape[0]
    c = torch.diagonal(C)
    if normalize == "spectral":
        lr = lr / max(10.0, float((C**2).sum() / c.sum()))
    return R - lr * ((1 - kappa) * (C - torch.diag(c)) + kappa * torch.diag(c - 1)) @ R


def callback(**kwargs: Any) -> DecorrelationCallback:
    """Every row kept, R readable after fit; a large rate so R moves visibly in a few steps; no cost plan (R moves
    from the first step; tests of the plan with the Trainer set `max_overhead` themselves)."""
    defaults = {"decor_lr": LR, "sample_fraction": 1.0, "fold_on_fit_end": False, "max_overhead": None}
    return DecorrelationCallback(**{**defaults, **kwargs})


class Recorder(pl.Callback):
    """Per training batch: the first layer's input, every R before and after the batch, the raw parameters after."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        before = {name: R.clone() for name, R in decorrelation_matrices(pl_module).items()}
        self.batches.append({"x": batch[0].clone(), "before": before})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches[-1]["after"] = {name: R.clone() for name, R in decorrelation_matrices(pl_module).items()}
        self.batches[-1]["params"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def raw_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The raw parameters (W, not W R) and every R of a patched model."""
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"{n}.R": R.clone() for n, R in decorrelation_matrices(model).items()})
    return state


def eval_outputs(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    x = correlated_data(16, seed=3).tensors[0] if x is None else x
    model.eval()
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------------------------- 1. checkpoints
@pytest.mark.parametrize("fold_on_fit_end", [False, True])
@pytest.mark.parametrize("save_weights_only", [False, True])
def test_checkpoints_load_into_the_plain_module(tmp_path: Path, save_weights_only: bool, fold_on_fit_end: bool) -> None:
    model = TinyModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_weights_only=save_weights_only)
    cb = callback(fold_on_fit_end=fold_on_fit_end)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb, ckpt], enable_checkpointing=True).fit(model)
    assert cb.updates == 16
    expected = eval_outputs(model)  # the trained model, patched or folded
    plain = TinyModule.load_from_checkpoint(tmp_path / "last.ckpt")  # strict
    assert type(plain.net[0]) is nn.Linear and not hasattr(plain.net[0], "decor_R")
    torch.testing.assert_close(eval_outputs(plain), expected, rtol=0, atol=SAME_OPS_ATOL)
    untrained = TinyModule()
    assert (eval_outputs(untrained) - expected).abs().max() > 1e-2  # training moved the outputs (measured ~1)
    loaded = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(loaded["state_dict"]) == set(untrained.state_dict())


class IndexedData(TinyModule):
    """Each batch is a function of (epoch, batch_idx), shuffled per epoch: a plain DataLoader restarts from its first
    batch after a mid-epoch resume, so the data must not depend on the loader's position for an exact comparison."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(256)), batch_size=32)  # 8 batches; only their number is used

    def training_step(self, batch, batch_idx):
        x, y = correlated_data().tensors
        order = torch.randperm(256, generator=torch.Generator().manual_seed(1000 + self.current_epoch))
        idx = order[32 * batch_idx : 32 * (batch_idx + 1)]
        return F.cross_entropy(self(x[idx]), y[idx])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class CrashAt(pl.Callback):
    def __init__(self, epoch: int, batch_idx: int) -> None:
        self.at = (epoch, batch_idx)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            raise RuntimeError("crash")


@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the ModelCheckpoint is left out on purpose
@pytest.mark.parametrize("plan", [False, True], ids=["no_plan", "plan"])
@pytest.mark.parametrize("stop", ["epoch_boundary", "mid_epoch"])
def test_resume_continues_exactly(tmp_path: Path, stop: str, plan: bool) -> None:
    # sampled rows (max_rows) exercise the generator state; momentum the optimizer state; accumulation the counters;
    # with the plan (a budget every layer fits in, so both runs plan alike), the checkpoint carries the plan
    # with the plan, 6 epochs of 4 steps: R moves after the 17 planning steps, and the checkpoints fall inside them
    kwargs: dict[str, Any] = dict(max_epochs=6 if plan else 3, accumulate_grad_batches=2, limit_val_batches=0)
    options: dict[str, Any] = dict(sample_fraction=0.5, max_rows=12, max_overhead=100.0 if plan else None)

    pl.seed_everything(0)
    full = IndexedData()
    quiet_trainer(tmp_path / "full", callbacks=[callback(**options)], **kwargs).fit(full)

    pl.seed_everything(0)
    first = IndexedData()
    if stop == "epoch_boundary":  # a finished run of one epoch
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = quiet_trainer(
            tmp_path, callbacks=[callback(**options), ckpt], enable_checkpointing=True, **{**kwargs, "max_epochs": 2}
        )  # fmt: skip (8 steps: the plan is being checked)
        trainer.fit(first)
        path = tmp_path / "ckpt" / "last.ckpt"
    else:  # checkpoint after optimizer step 5 (epoch 1, batch 1), crash three batches later
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
        trainer = quiet_trainer(tmp_path, callbacks=[callback(**options), ckpt, CrashAt(1, 4)],
                                enable_checkpointing=True, **kwargs)  # fmt: skip
        with pytest.raises(RuntimeError, match="crash"):
            trainer.fit(first)
        path = tmp_path / "ckpt" / "epoch=1-step=5.ckpt"

    pl.seed_everything(123)  # the resumed run must not depend on the fresh model's initialisation
    resumed = IndexedData()
    cb = callback(**options)
    quiet_trainer(tmp_path / "resumed", callbacks=[cb], **kwargs).fit(resumed, ckpt_path=path)
    assert cb.updates == (24 - plain_steps() if plan else 12)  # the count continues from the checkpoint
    saved_state = torch.load(path, weights_only=True)["callbacks"]["DecorrelationCallback"]
    if plan and saved_state["plan"] is not None:  # the resumed run took the checkpoint's plan
        assert cb.plan is not None and cb.plan.layouts() == Plan.from_state_dict(saved_state["plan"]).layouts()
    expected, got = raw_state(full), raw_state(resumed)
    assert (
        set(got) == set(expected) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.0.R", "net.2.R"}
    )
    for name in expected:
        assert torch.equal(got[name], expected[name]), name  # bit for bit (the determinism contract, on CPU)
    saved = saved_state["R"]["net.0"]
    assert (saved - expected["net.0.R"]).abs().max() > 1e-3  # R moved on after the checkpoint (measured >= 0.13)


# ---------------------------------------------------------------------------------------------- 2. accumulation
@pytest.mark.parametrize("schedule", ["fixed", "scheduler"])
def test_accumulation_moves_r_once_per_step_from_the_pooled_micro_batches(tmp_path: Path, schedule: str) -> None:
    if schedule == "fixed":  # 8 batches: windows of 3, 3 and a last partial one of 2 (Lightning steps at epoch end)
        kwargs: dict[str, Any] = dict(max_epochs=1, accumulate_grad_batches=3)
        windows = [3, 3, 2]
    else:
        kwargs = dict(max_epochs=2, callbacks=[GradientAccumulationScheduler({0: 2, 1: 4})])
        windows = [2, 2, 2, 2, 4, 4]
    recorder, cb = Recorder(), callback()
    trainer = quiet_trainer(
        tmp_path, limit_val_batches=0, **{**kwargs, "callbacks": [cb, recorder, *kwargs.get("callbacks", [])]}
    )
    trainer.fit(TinyModule())
    assert trainer.global_step == cb.updates == len(windows)
    batches = iter(recorder.batches)
    for size in windows:
        window = [next(batches) for _ in range(size)]
        for b in window[:-1]:  # micro-batches that do not step leave R alone
            for name in b["before"]:
                assert torch.equal(b["after"][name], b["before"][name]), name
        R0 = window[0]["before"]["net.0"]
        expected = reference_update(R0, torch.cat([b["x"] for b in window]))  # rows of all micro-batches pooled
        torch.testing.assert_close(window[-1]["after"]["net.0"].double(), expected, rtol=0, atol=R_ATOL)
    assert next(batches, None) is None


# ---------------------------------------------------------------------------------------------- 3. DDP
class RankRecorder(Recorder):
    """A :class:`Recorder` that also notes which buffers DDP broadcasts and saves everything to ``<out>/rank<r>.pt``
    (DDP workers share nothing else with the test process)."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.broadcast: list[str] = []

    def on_train_start(self, trainer, pl_module):
        self.broadcast = sorted(trainer.model.named_module_buffers)  # what DDP sends from rank 0 before a forward

    def on_fit_end(self, trainer, pl_module):
        (cb,) = [c for c in trainer.callbacks if isinstance(c, DecorrelationCallback)]
        plan = None if cb.plan is None else cb.plan.state_dict()
        record = dict(batches=self.batches, broadcast=self.broadcast, state_dict=pl_module.state_dict(), plan=plan)
        torch.save(record, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


class BufferedModule(TinyModule):
    """TinyModule with a buffer of its own, which DDP must still broadcast, and a smaller batch on rank 1 (so the
    ranks contribute different numbers of rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(correlated_data(), batch_size=32 if self.global_rank == 0 else 24, shuffle=True)


def fit_on_two_ranks(strategy: str, out: str, plan: bool = False) -> TinyModule:
    pl.seed_everything(0)
    model = BufferedModule()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=6 if plan else 1,
        limit_train_batches=4 if plan else 3,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback(max_overhead=0.5 if plan else None), RankRecorder(out)],
    )  # fmt: skip
    trainer.fit(model)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_ranks_pool_their_rows_and_stay_identical(
    tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    if strategy == "ddp":  # the subprocess launcher reruns the script, so it cannot run inside pytest
        run = subprocess.run([sys.executable, __file__, "ddp", str(tmp_path)], timeout=240, env=checkout_env(),
                             cwd=Path(__file__).parent, capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
    else:
        model = fit_on_two_ranks(strategy, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:  # R is not broadcast by DDP (each rank computes the same R); the module's own buffer is
        assert rank["broadcast"] == ["scale"]
    steps = list(zip(ranks[0]["batches"], ranks[1]["batches"], strict=True))
    assert len(steps) == 3
    for b0, b1 in steps:
        assert (len(b0["x"]), len(b1["x"])) == (32, 24)  # each rank saw its own data, in batches of its own size
        # Bitwise equal across the two processes: both run the same float32 kernels on the same pooled rows (in rank
        # order) with the same thread count (Lightning sets OMP_NUM_THREADS for its workers), and DDP's gradient
        # average of two ranks is a + b either way (commutative). Held at 1 and 2 threads and on MKL's SSE4.2 path.
        for name in b0["after"]:  # the same R and the same model on both ranks after every step
            assert torch.equal(b0["after"][name], b1["after"][name]), name
        for name in b0["params"]:
            assert torch.equal(b0["params"][name], b1["params"][name]), name
        pooled = reference_update(b0["before"]["net.0"], torch.cat([b0["x"], b1["x"]]))
        torch.testing.assert_close(b0["after"]["net.0"].double(), pooled, rtol=0, atol=R_ATOL)
        rank0_only = reference_update(b0["before"]["net.0"], b0["x"])
        assert (rank0_only - pooled).abs().max() > 1e-4  # the comparison tells pooling from rank 0 alone (>= 4e-3)
    if strategy == "ddp_spawn":  # the launching process gets the trained weights (fused W R in the state_dict)
        assert type(model.net[0]) is nn.Linear  # the callback ran in the workers only
        final = ranks[0]["state_dict"]
        assert set(model.state_dict()) == set(final)
        for name, value in final.items():
            assert torch.equal(model.state_dict()[name], value), name
        assert not torch.equal(final["net.0.weight"], steps[0][0]["params"]["net.0.weight"])


def test_ddp_ranks_share_rank_zeros_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    fit_on_two_ranks("ddp_spawn", str(tmp_path), plan=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    plans = [rank["plan"] for rank in ranks]
    assert plans[0] is not None and plans[0] == plans[1]  # one plan, measured on rank 0 (each rank times its own)
    steps = list(zip(ranks[0]["batches"], ranks[1]["batches"], strict=True))
    assert len(steps) == 24  # (rank 0 has 4 batches of 32 of its 128 samples, six epochs)
    for b0, b1 in steps:  # the same layouts, R and model on both ranks after every step
        for name in b0["after"]:
            assert torch.equal(b0["after"][name], b1["after"][name]), name
        for name in b0["params"]:
            assert torch.equal(b0["params"][name], b1["params"][name]), name
    for name in steps[-1][0]["after"]:  # R moved in the steps after the planning ones
        assert not torch.equal(steps[-1][0]["after"][name], steps[plain_steps() - 1][0]["after"][name]), name


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
def test_sharded_strategies_are_refused(strategy: type) -> None:
    trainer = SimpleNamespace(strategy=strategy.__new__(strategy))  # DeepSpeed needs its package to be constructed
    name = strategy.__name__
    match = rf"does not support `strategy`={name}: its wrappers shard the weights .* use ModelParallelStrategy"
    with pytest.raises(ValueError, match=match):
        DecorrelationCallback().setup(trainer, TinyModule(), "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize("listed_first", [True, False])
@pytest.mark.parametrize("averaging", [EMAWeightAveraging, StochasticWeightAveraging])
def test_weight_averaging_is_refused(tmp_path: Path, averaging: type, listed_first: bool) -> None:
    # Refused rather than supported: these callbacks average the raw W (and R apart, or not at all), so their model
    # is not an average of the trained W @ R; with EMAWeightAveraging listed first it was 0.09 off (weights ~0.5)
    # and with use_buffers=False it crashed, depending on which callback's setup ran first.
    average = averaging(swa_lrs=0.01) if averaging is StochasticWeightAveraging else averaging()
    model, cb = TinyModule(), callback()
    match = (
        rf"DecorrelationCallback does not support {averaging.__name__} in the Trainer's callbacks: weight averaging "
        r"averages the raw weights W apart from each layer's R, so the averaged model would not be an average of "
        r"the trained functions W @ R\."
    )
    with pytest.raises(ValueError, match=match):
        quiet_trainer(tmp_path, callbacks=[average, cb] if listed_first else [cb, average]).fit(model)
    assert not decorrelation_matrices(model)  # refused before anything was patched


# ---------------------------------------------------------------------------------------------- 4. precision
@pytest.mark.parametrize(
    "precision, weight_dtype",
    [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16), ("16-true", torch.float16)],
)
def test_low_precision_keeps_statistics_and_r_in_float32(
    tmp_path: Path, precision: str, weight_dtype: torch.dtype
) -> None:
    recorder, model = Recorder(), TinyModule()
    trainer = quiet_trainer(tmp_path, precision=precision, limit_train_batches=3, limit_val_batches=0,
                            callbacks=[callback(), recorder])  # fmt: skip
    trainer.fit(model)
    assert model.net[0].weight.dtype == weight_dtype
    for name, R in decorrelation_matrices(model).items():
        assert R.dtype == torch.float32, name  # "-true" casts every buffer; R must not lose its small steps
        assert torch.isfinite(R).all() and (R - torch.eye(len(R))).abs().max() > 1e-3, name  # measured >= 0.06
    assert recorder.batches[0]["x"].dtype == (torch.float32 if precision == "bf16-mixed" else weight_dtype)
    for b in recorder.batches:  # statistics in float32 from the rows as the layer saw them
        expected = reference_update(b["before"]["net.0"], b["x"])
        torch.testing.assert_close(b["after"]["net.0"].double(), expected, rtol=0, atol=R_ATOL)


class OverflowModule(TinyModule):
    """Its third batch's loss is scaled to overflow: the GradScaler skips that optimizer step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * (1e38 if batch_idx == 2 else 1.0)


def test_an_optimizer_step_the_grad_scaler_skips_leaves_r_alone(tmp_path: Path) -> None:
    """``16-mixed`` (here on the CPU, with float16 autocast and a GradScaler): R moves with the optimizer steps the
    scaler takes and not on the one it skips, told on the device by the scale it backs off."""
    from lightning.pytorch.plugins import MixedPrecision

    recorder, model = Recorder(), OverflowModule()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = quiet_trainer(tmp_path, plugins=[plugin], limit_train_batches=4, limit_val_batches=0,
                            callbacks=[callback(), recorder])  # fmt: skip
    trainer.fit(model)
    skipped = recorder.batches[2]
    assert torch.equal(skipped["params"]["net.0.weight"], recorder.batches[1]["params"]["net.0.weight"])  # skipped
    for name in skipped["before"]:
        assert torch.equal(skipped["after"][name], skipped["before"][name]), name
    for b in (recorder.batches[i] for i in (0, 1, 3)):  # the others move by the rule, from their rows
        expected = reference_update(b["before"]["net.0"], b["x"])
        torch.testing.assert_close(b["after"]["net.0"].double(), expected, rtol=0, atol=R_ATOL)


class BeforeStep(pl.Callback):
    """Every R at the optimizer step (listed after the DecorrelationCallback: after its on_before_optimizer_step)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append({name: R.clone() for name, R in decorrelation_matrices(pl_module).items()})


def test_the_update_queued_before_the_optimizer_step_writes_r_at_the_end_of_the_batch(tmp_path: Path) -> None:
    """Under automatic optimisation the update is queued in ``on_before_optimizer_step`` (beside the optimizer
    step, on a GPU) from the rows of the batch, and ``R`` keeps its value until the end of the batch."""
    recorder, before_step, model = Recorder(), BeforeStep(), TinyModule()
    trainer = quiet_trainer(tmp_path, limit_train_batches=4, limit_val_batches=0,
                            callbacks=[callback(), before_step, recorder])  # fmt: skip
    trainer.fit(model)
    assert len(before_step.seen) == 4
    for b, at_step in zip(recorder.batches, before_step.seen):
        for name in b["before"]:
            assert torch.equal(at_step[name], b["before"][name]), name
        expected = reference_update(b["before"]["net.0"], b["x"])
        torch.testing.assert_close(b["after"]["net.0"].double(), expected, rtol=0, atol=R_ATOL)


# ---------------------------------------------------------------------------------------------- 5. torch.compile
class NoLogModule(TinyModule):
    """Without `self.log` in the step, whose guards on Lightning's logger state recompile on their own."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


class FrameCounter(pl.Callback):
    def __init__(self) -> None:
        self.frames: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.frames.append(torch._dynamo.utils.counters["frames"]["ok"])  # frames compiled so far


def test_compiled_model_trains_without_recompiling(tmp_path: Path) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    states, counter = {}, FrameCounter()
    for compiled in (False, True):  # the eager run is the reference
        pl.seed_everything(0)
        model = NoLogModule()
        cb = callback(sample_fraction=0.5, max_rows=8)  # random row sampling with the callback's generator
        trainer = quiet_trainer(tmp_path, max_epochs=2, accumulate_grad_batches=2, limit_val_batches=0,
                                callbacks=[cb, counter] if compiled else [cb])  # fmt: skip
        trainer.fit(torch.compile(model, backend="aot_eager") if compiled else model)  # aot_eager: no C++ build
        assert cb.updates == 8
        states[compiled] = raw_state(model)
    frames = counter.frames
    assert len(frames) == 16 and frames[1] > 0
    assert frames[1:] == [frames[1]] * 15  # all compiled in the first batch: no recompilation as rows accumulate
    for name, value in states[False].items():
        torch.testing.assert_close(states[True][name], value, rtol=0, atol=SAME_OPS_ATOL, msg=name)
    assert (states[True]["net.0.R"] - torch.eye(8)).abs().max() > 1e-2  # rows captured while compiled (0.22)


def test_compiled_model_recompiles_once_for_the_plan(tmp_path: Path) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    states, counter = {}, FrameCounter()
    for compiled in (False, True):
        pl.seed_everything(0)
        model = NoLogModule()
        cb = callback(max_overhead=100.0)  # a budget every layer fits in: both runs plan alike
        trainer = quiet_trainer(tmp_path, max_epochs=3, limit_val_batches=0,
                                callbacks=[cb, counter] if compiled else [cb])  # fmt: skip
        trainer.fit(torch.compile(model, backend="aot_eager") if compiled else model)
        assert cb.updates == 24 - plain_steps()
        states[compiled] = raw_state(model)
    frames = counter.frames
    assert len(frames) == 24
    # Compiled in the first batch (layers plain while the step is measured), once more when the plan gives the
    # layers their forms (after the fifth step, so the sixth batch compiles), then never again.
    c = CALIBRATION_STEPS
    assert (
        frames[1 : c + 1] == [frames[1]] * c
        and frames[c + 1] > frames[c]
        and frames[c + 1 :] == [frames[c + 1]] * (24 - c - 1)
    )
    for name, value in states[False].items():
        torch.testing.assert_close(states[True][name], value, rtol=0, atol=SAME_OPS_ATOL, msg=name)
    assert (states[True]["net.0.R"] - torch.eye(8)).abs().max() > 1e-2  # rows were captured while compiled


# ---------------------------------------------------------------------------------------------- 6. manual optimisation
class TwoOptimizers(TinyModule):
    """Manual optimisation, two optimizers: the classifier steps, then a critic on a second forward steps."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.critic = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        opt_net, opt_critic = self.optimizers()
        x, y = batch
        opt_net.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        opt_net.step()
        opt_critic.zero_grad()
        self.manual_backward(self.critic(self(x).detach()).pow(2).mean())  # second forward through net
        opt_critic.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05), torch.optim.SGD(self.critic.parameters(), lr=0.05)


def test_manual_optimization_with_two_optimizers_moves_r_once_per_batch(tmp_path: Path) -> None:
    recorder, cb = Recorder(), callback()
    trainer = quiet_trainer(tmp_path, limit_val_batches=0, callbacks=[cb, recorder])
    model = TwoOptimizers()
    trainer.fit(model)
    assert set(decorrelation_matrices(model)) == {"net.0", "net.2", "critic.0", "critic.2"}
    assert trainer.global_step == 16 and cb.updates == 8  # two optimizer steps per batch, one R update
    for b in recorder.batches:  # R moves at the end of the batch, from the rows of both of its forwards through net
        expected = reference_update(b["before"]["net.0"], torch.cat([b["x"], b["x"]]))
        torch.testing.assert_close(b["after"]["net.0"].double(), expected, rtol=0, atol=R_ATOL)


class GAN(pl.LightningModule):
    """The GAN pattern under manual optimisation: the fake batch (the generator's graph) is built once, the
    discriminator steps on it, then the generator's loss backpropagates through that same graph. Plain PyTorch
    allows this (the discriminator's step does not touch the generator's weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.noise: list[torch.Tensor] = []
        self.fakes: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        x = batch[0]
        z = torch.randn(x.shape[0], 4)
        fake = self.generator(z)  # kept, with its graph, for the generator's loss after the discriminator's step
        self.noise.append(z)
        self.fakes.append(fake.detach().clone())
        d_loss = F.softplus(-self.discriminator(x)).mean() + F.softplus(self.discriminator(fake.detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.softplus(-self.discriminator(fake)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)  # through the generator's graph built before the discriminator stepped
        opt_g.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.generator.parameters(), lr=0.05),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.05),
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(correlated_data(), batch_size=32)


def test_gan_backpropagates_a_graph_built_before_another_optimizer_stepped(tmp_path: Path) -> None:
    quiet_trainer(tmp_path).fit(GAN())  # the pattern itself is valid without the callback
    recorder, cb, model = Recorder(), callback(), GAN()
    trainer = quiet_trainer(tmp_path, callbacks=[cb, recorder])
    trainer.fit(model)  # raised "modified by an inplace operation" when R moved at the first step()
    assert trainer.global_step == 16 and cb.updates == 8  # two optimizer steps per batch, one R update
    for b, z, fake in zip(recorder.batches, model.noise, model.fakes, strict=True):
        # R moves at the end of the batch, from the rows of every forward of the batch
        expected = reference_update(b["before"]["generator.0"], z)
        torch.testing.assert_close(b["after"]["generator.0"].double(), expected, rtol=0, atol=R_ATOL)
        expected = reference_update(b["before"]["discriminator.0"], torch.cat([b["x"], fake, fake]))
        torch.testing.assert_close(b["after"]["discriminator.0"].double(), expected, rtol=0, atol=R_ATOL)


class LBFGSModule(TinyModule):
    """Automatic optimisation with LBFGS, whose step evaluates Lightning's closure (forward and backward) several
    times; notes the first layer's R at every evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch_idx, self.net[0].decor_R.clone()))
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4)


def test_lbfgs_closure_evaluations_of_one_step_see_the_same_r(tmp_path: Path) -> None:
    recorder, cb, model = Recorder(), callback(), LBFGSModule()
    quiet_trainer(tmp_path, limit_val_batches=0, callbacks=[cb, recorder]).fit(model)
    assert cb.updates == 8
    for batch_idx, b in enumerate(recorder.batches):
        seen = [R for i, R in model.seen if i == batch_idx]
        assert len(seen) > 1  # LBFGS evaluated the closure several times in this step
        for R in seen:  # every evaluation computes the same function of W: R moves after the step
            assert torch.equal(R, b["before"]["net.0"])
        # the rows of all evaluations are the same x repeated, whose second moments are those of x
        expected = reference_update(b["before"]["net.0"], b["x"])
        torch.testing.assert_close(b["after"]["net.0"].double(), expected, rtol=0, atol=R_ATOL)


# ---------------------------------------------------------------------------------------------- 7. lifecycle
class FullModule(TinyModule):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def plain_copy(model: nn.Module) -> FullModule:
    """An unpatched FullModule holding ``model``'s (fused) weights."""
    plain = FullModule()
    plain.load_state_dict(model.state_dict())
    return plain.eval()


@pytest.mark.parametrize("fold_on_fit_end", [False, True])
def test_one_trainer_fits_validates_tests_predicts_and_fits_again(tmp_path: Path, fold_on_fit_end: bool) -> None:
    model, cb = FullModule(), callback(fold_on_fit_end=fold_on_fit_end)
    trainer = quiet_trainer(tmp_path, callbacks=[cb])
    x_val = torch.cat([b[0] for b in model.val_dataloader()])
    assert trainer.validate(model, verbose=False)[0]["val_loss"] > 0  # before fit: nothing patched, nothing moves
    assert not decorrelation_matrices(model)
    for round_ in (1, 2):
        trainer.fit_loop.max_epochs = round_  # the second fit continues with the same Trainer
        trainer.fit(model)
        assert cb.updates == 8 * round_
        assert bool(decorrelation_matrices(model)) is not fold_on_fit_end
        reference = plain_copy(model)
        with torch.no_grad():
            expected = reference(x_val)
            loss = F.cross_entropy(expected, torch.cat([b[1] for b in model.val_dataloader()])).item()
        # Lightning's epoch mean over 2 batches against the loss of the whole set: float32 rounding, measured 6e-8
        assert trainer.validate(model, verbose=False)[0]["val_loss"] == pytest.approx(loss, abs=1e-5)
        assert trainer.test(model, verbose=False)[0]["test_loss"] == pytest.approx(loss, abs=1e-5)
        torch.testing.assert_close(torch.cat(trainer.predict(model)), expected, rtol=0, atol=SAME_OPS_ATOL)


def test_callback_reused_by_a_new_trainer_updates_from_its_first_batch(tmp_path: Path) -> None:
    model, cb = TinyModule(), callback()
    for _ in range(2):  # each Trainer counts batches from 1 again
        quiet_trainer(tmp_path, callbacks=[cb], limit_train_batches=1, limit_val_batches=0).fit(model)
    assert cb.updates == 2


class SnapshotAt(CrashAt):
    """Crashes like CrashAt, after keeping the model's (fused) state at that moment."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


@pytest.mark.parametrize("fold_on_fit_end", [False, True])
def test_exception_mid_fit_leaves_a_usable_model(tmp_path: Path, fold_on_fit_end: bool) -> None:
    model, cb, crash = FullModule(), callback(fold_on_fit_end=fold_on_fit_end), SnapshotAt(0, 3)
    with pytest.raises(RuntimeError, match="crash"):
        quiet_trainer(tmp_path, callbacks=[cb, crash]).fit(model)
    assert cb.updates == 3
    layers = [m for m in model.modules() if isinstance(m, DecorrelatedLayer)]
    assert len(layers) == (0 if fold_on_fit_end else 2)
    for layer in layers:  # still patched: no longer collecting, nothing pending, R finite
        assert (
            not layer.decor_buffer.wanted
            and layer.decor_buffer.pending_count == 0
            and torch.isfinite(layer.decor_R).all()
        )
    x = correlated_data(16, seed=3).tensors[0]
    torch.testing.assert_close(eval_outputs(model, x), eval_outputs(plain_copy(model), x), rtol=0, atol=SAME_OPS_ATOL)
    plain = FullModule()
    plain.load_state_dict(crash.state)  # the model as it was when the exception struck
    torch.testing.assert_close(eval_outputs(model, x), eval_outputs(plain, x), rtol=0, atol=SAME_OPS_ATOL)
    cb_again = callback()
    quiet_trainer(tmp_path, callbacks=[cb_again]).fit(model.train())  # and it trains on
    assert cb_again.updates == 8


class OnTrainEndOutputs(pl.Callback):
    def on_train_end(self, trainer, pl_module):  # before the callbacks' on_fit_end
        self.outputs = eval_outputs(pl_module)
        pl_module.train()


def test_fold_on_fit_end_hands_back_a_plain_model(tmp_path: Path) -> None:
    model, outputs = TinyModule(), OnTrainEndOutputs()
    quiet_trainer(tmp_path, callbacks=[callback(fold_on_fit_end=True), outputs]).fit(model)
    assert [type(m) for m in model.net] == [nn.Linear, nn.Tanh, nn.Linear]
    assert not any(hasattr(m, "decor_R") for m in model.modules()) and not decorrelation_matrices(model)
    assert set(model.state_dict()) == set(TinyModule().state_dict())
    torch.testing.assert_close(eval_outputs(model), outputs.outputs, rtol=0, atol=SAME_OPS_ATOL)
    assert (outputs.outputs - eval_outputs(TinyModule())).abs().max() > 1e-2  # a trained model (measured ~1)


class BuiltInConfigureModel(TinyModule):
    """Builds its layers in `configure_model`, idempotently as Lightning requires."""

    def __init__(self, idempotent: bool = True) -> None:
        super().__init__()
        self.net = None  # type: ignore[assignment]
        self.idempotent = idempotent

    def configure_model(self) -> None:
        if self.net is None or not self.idempotent:
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def test_layers_built_in_configure_model_are_decorrelated(tmp_path: Path) -> None:
    model, recorder, cb = BuiltInConfigureModel(), Recorder(), callback()
    quiet_trainer(tmp_path, callbacks=[cb, recorder], limit_val_batches=0).fit(model)
    assert set(decorrelation_matrices(model)) == {"net.0", "net.2"} and cb.updates == 8
    for b in recorder.batches:
        expected = reference_update(b["before"]["net.0"], b["x"])
        torch.testing.assert_close(b["after"]["net.0"].double(), expected, rtol=0, atol=R_ATOL)
    assert not torch.equal(
        recorder.batches[0]["params"]["net.0.weight"], recorder.batches[-1]["params"]["net.0.weight"]
    )


def test_configure_model_that_rebuilds_its_layers_is_refused(tmp_path: Path) -> None:
    model = BuiltInConfigureModel(idempotent=False)
    with pytest.raises(
        RuntimeError,
        match=r"patched \['net.0', 'net.2'\] in `setup`, but `configure_model` built "
        r"them anew afterwards\. Expected `configure_model` to be idempotent",
    ):
        quiet_trainer(tmp_path, callbacks=[callback()]).fit(model)


# ------------------------------------------------------------------------------------------ 8. activation checkpointing
class Checkpointed(TinyModule):
    """Its MLP under `torch.utils.checkpoint`: backward computes the forward again."""

    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_reentrant is None or not self.training:
            return self.net(x)
        return checkpoint(self.net, x.requires_grad_(), use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_matches_a_run_without_it(tmp_path: Path, use_reentrant: bool) -> None:
    states, pending = {}, {}
    for mode in (None, use_reentrant):  # None: no checkpointing, the reference
        pending[mode] = []

        class Spy(DecorrelationCallback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # where the update is queued
                buffer = self.engine.layers["net.0"].decor_buffer
                pending[mode].append(buffer.pending_count)  # noqa: B023 (called in this loop)
                super().on_before_optimizer_step(trainer, pl_module, optimizer)

        pl.seed_everything(0)
        model = Checkpointed(mode)
        # random row sampling: a second capture in the recomputation would add rows and draws
        cb = Spy(**{"decor_lr": LR, "sample_fraction": 0.5, "max_rows": 8, "fold_on_fit_end": False,
                    "max_overhead": None})  # fmt: skip
        quiet_trainer(tmp_path, limit_val_batches=0, callbacks=[cb]).fit(model)
        assert cb.updates == 8
        states[mode] = raw_state(model)
    assert pending[use_reentrant] == pending[None] == [8] * 8  # the rows of one forward per step
    for name, value in states[None].items():
        torch.testing.assert_close(states[use_reentrant][name], value, rtol=0, atol=SAME_OPS_ATOL, msg=name)


if __name__ == "__main__":  # python tests/test_integration.py ddp OUT (also how strategy="ddp" starts rank 1)
    fit_on_two_ranks(sys.argv[1], sys.argv[2])
