"""What only a GPU can show: no host sync on the step path, the side stream racing nothing, the plan made for the GPU,
exact resume on the GPU, the GradScaler's skipped steps, bf16-mixed with channels_last, the README's loops on CUDA,
and DDP on two GPUs. Marked ``gpu`` and skipped where torch sees no CUDA device; ``make gpu-check`` runs them first.

References are independent of the code under test: a run with the side stream off (every kernel on one stream),
an uninterrupted run, an explicit copy of ``R`` before a skipped step.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decor import DecorrelationCallback, Decorrelator, decorrelation_matrices
from lightning_decor import update as update_module
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.planner import PlanCache, plain_steps

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import checkout_env  # noqa: E402

# Deterministic cuBLAS for the bitwise comparisons; read when cuBLAS makes its first workspace, so set on import.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (`make gpu-check` on one)"),
]
CUDA = torch.device("cuda")


def images(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, 16, 16, generator=g)
    x = base + torch.roll(base, 1, dims=-1) + torch.roll(base, 1, dims=-2)  # neighbouring pixels correlate
    return TensorDataset(x, (base.mean((1, 2, 3)) > 0).long())


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(),
        nn.Linear(64, 2),
    )  # fmt: skip


class CNNModule(pl.LightningModule):
    def __init__(self, overflow_at: int | None = None, channels_last: bool = False) -> None:
        super().__init__()
        self.net = cnn()
        self.overflow_at, self.channels_last = overflow_at, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss * (1e38 if batch_idx == self.overflow_at else 1.0)  # overflows the scaled gradients

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(images(), batch_size=32, shuffle=True)


def trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    defaults = dict(default_root_dir=tmp_path, accelerator="gpu", devices=1, max_epochs=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    return pl.Trainer(**{**defaults, **kwargs})


class History(pl.Callback):
    """``decor/loss`` as Lightning saw it after every batch (a device tensor, read after the fit)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        loss = trainer.callback_metrics.get("decor/loss")
        if loss is not None:
            self.losses.append(loss.detach().clone())


def raw_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"{n}.R": R.clone() for n, R in decorrelation_matrices(model).items()})
    return state


def plain_loop(
    model: nn.Module,
    dec: Decorrelator,
    steps: int,
    data: TensorDataset,
    optimizer: torch.optim.Optimizer | None = None,
    launch: bool = True,
) -> torch.optim.Optimizer:
    """The README's plain loop on batches of 32 taken from ``data`` on the GPU (moved there before: a copy from
    pageable host memory synchronises); with ``launch``, the update queued beside the optimizer step."""
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all, y_all = (t.to(CUDA) for t in data.tensors)
    for i in range(steps):
        x, y = x_all[32 * (i % 8) : 32 * (i % 8 + 1)], y_all[32 * (i % 8) : 32 * (i % 8 + 1)]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        stepped(dec, optimizer, launch)
    return optimizer


def stepped(dec: Decorrelator, optimizer: torch.optim.Optimizer, launch: bool) -> None:
    """After the backward: with ``launch``, the update queued beside the optimizer step; else ``step`` first."""
    if launch:
        dec.launch()
        optimizer.step()
        dec.step()
    else:
        dec.step()
        optimizer.step()


def kept(dec: Decorrelator) -> bool:
    """Whether the plan kept a layer (on a fast GPU a small model's step may leave none within the budget)."""
    return bool(dec.layers)


@pytest.fixture(autouse=True)
def _no_tf32_leak() -> Any:
    """Each test starts and ends with the float32 matmul precision it found."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("launch", [True, False])
@pytest.mark.parametrize("max_overhead", [None, 0.5])
def test_a_steady_state_step_never_synchronises_with_the_host(max_overhead: float | None, launch: bool) -> None:
    """After the planning steps, forward, backward, ``dec.step()`` and the optimizer step run with CUDA's sync
    debug mode set to raise: nothing reads a value back to the host."""
    torch.manual_seed(0)
    model = cnn().to(CUDA)
    dec = Decorrelator(model, max_overhead=max_overhead)
    data = TensorDataset(*(t.to(CUDA) for t in images().tensors))
    warm = plain_steps() + 3 if max_overhead is not None else 3  # the plan, the stacks, the caches
    optimizer = plain_loop(model, dec, warm, data, launch=launch)
    torch.cuda.synchronize()
    before = dec.updates
    torch.cuda.set_sync_debug_mode("error")
    try:
        plain_loop(model, dec, 25, data, optimizer, launch=launch)  # past the 20th update: the null-space reset
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert max_overhead is not None or kept(dec)
    if kept(dec):
        assert dec.updates == before + 25 and torch.isfinite(dec.last_losses).all()


def slow_side_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batched update starts with ~10 ms of GPU sleep on the stream it runs on: a reader that does not wait
    for the side stream reads the old R (or unfinished losses)."""
    step = update_module.block_decorrelation_step

    def slow(*args: Any, **kwargs: Any) -> Any:
        torch.cuda._sleep(20_000_000)
        return step(*args, **kwargs)

    monkeypatch.setattr(update_module, "block_decorrelation_step", slow)


def test_a_slowed_side_stream_equals_the_update_on_the_main_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through ``Trainer.fit``: R, the weights and every logged ``decor/loss`` bit for bit as with
    ``use_cuda_stream=False``; and a plain loop with ``launch()`` likewise, R read right after each loop."""
    slow_side_stream(monkeypatch)
    runs = {}
    for stream in (False, True):
        pl.seed_everything(0, verbose=False)
        model, history = CNNModule(), History()
        cb = DecorrelationCallback(max_overhead=None, use_cuda_stream=stream, fold_on_fit_end=False)
        trainer(tmp_path, callbacks=[cb, history], log_every_n_steps=1, deterministic=True).fit(model)
        runs[stream] = (raw_state(model), torch.stack(history.losses).cpu())
    for name, value in runs[False][0].items():
        assert torch.equal(runs[True][0][name], value), name
    assert torch.equal(runs[True][1], runs[False][1])

    plain = {}
    for stream in (False, True):
        torch.manual_seed(0)
        model = cnn().to(CUDA)
        dec = Decorrelator(model, max_overhead=None, use_cuda_stream=stream)
        plain_loop(model, dec, 12, images())
        plain[stream] = (raw_state(model), dec.last_losses.clone())
    for name, value in plain[False][0].items():
        assert torch.equal(plain[True][0][name], value), name
    assert torch.equal(plain[True][1], plain[False][1])


def test_after_a_fit_on_the_gpu_the_plan_and_its_cache_key_name_the_gpu(tmp_path: Path) -> None:
    cb = DecorrelationCallback(fold_on_fit_end=False)
    trainer(tmp_path, callbacks=[cb], max_steps=plain_steps() + 2).fit(CNNModule())
    planner = cb.engine.planner
    assert planner is not None and planner.device_type == "cuda"
    assert planner.environment["device"] == torch.cuda.get_device_name(CUDA)
    cache = PlanCache.default()
    assert cache is not None
    entries = [json.loads(p.read_text()) for p in Path(cache.directory).glob("*.json")]
    keys = [e["key"] for e in entries if "key" in e]
    assert not keys or all(k["environment"]["device_type"] == "cuda" for k in keys)
    assert cache.get(planner.key()) is not None  # kept under the GPU's key


def test_resume_on_the_gpu_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    def fit(max_epochs: int, ckpt: str | None = None, save: bool = False) -> nn.Module:
        pl.seed_everything(0, verbose=False)
        model = CNNModule()
        callbacks: list[pl.Callback] = [
            DecorrelationCallback(fold_on_fit_end=False, sample_fraction=0.5, max_rows=64)
        ]  # random row sampling on the GPU
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True))
        trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, deterministic=True,
                enable_checkpointing=save).fit(model, ckpt_path=ckpt)  # fmt: skip
        return model

    whole = raw_state(fit(3))
    fit(2, save=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*row-sampling state.*")
        resumed = raw_state(fit(3, ckpt=str(tmp_path / "last.ckpt")))
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[dict[str, dict[str, torch.Tensor]]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.batches.append({"before": {n: R.clone() for n, R in decorrelation_matrices(pl_module).items()}})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.batches[-1]["after"] = {n: R.clone() for n, R in decorrelation_matrices(pl_module).items()}


def test_a_step_the_grad_scaler_skips_leaves_r_alone(tmp_path: Path) -> None:
    recorder = Recorder()
    cb = DecorrelationCallback(max_overhead=None, fold_on_fit_end=False)
    trainer(tmp_path, precision="16-mixed", callbacks=[cb, recorder], limit_train_batches=5).fit(
        CNNModule(overflow_at=2)
    )
    for i, b in enumerate(recorder.batches):
        moved = any(not torch.equal(b["after"][n], b["before"][n]) for n in b["before"])
        assert moved == (i != 2), i


@pytest.mark.parametrize("max_overhead", [None, 0.1])
def test_bf16_mixed_with_channels_last_trains(tmp_path: Path, max_overhead: float | None) -> None:
    """With the plan (timed in bfloat16 and channels-last, as the step runs) and without."""
    model = CNNModule(channels_last=True).to(memory_format=torch.channels_last)
    cb = DecorrelationCallback(fold_on_fit_end=False, max_overhead=max_overhead)
    trainer(tmp_path, precision="bf16-mixed", callbacks=[cb], max_epochs=3).fit(model)
    assert cb.plan is not None and (max_overhead is not None or kept(cb.engine))
    if kept(cb.engine):
        assert cb.updates == 3 * 8 - (0 if max_overhead is None else plain_steps())
        assert torch.isfinite(cb.engine.last_losses).all()
    for name, R in decorrelation_matrices(model).items():
        assert R.dtype == torch.float32 and torch.isfinite(R).all(), name
        assert not torch.equal(R, torch.eye(R.shape[-1], device=R.device).expand_as(R)), name  # it moved


README = (ROOT / "README.md").read_text()


def readme_snippet(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", README[start:end], flags=re.DOTALL)[0]


def test_the_readme_plain_pytorch_loop_runs_on_the_gpu() -> None:
    torch.manual_seed(0)
    model = cnn().to(CUDA)
    data = images()
    loader = [(x.to(CUDA), y.to(CUDA)) for x, y in DataLoader(data, batch_size=32)] * 3
    reference = copy.deepcopy(model)
    namespace: dict[str, Any] = {"model": model, "loader": loader}
    exec(compile(readme_snippet("Usage in plain PyTorch"), "README.md", "exec"), namespace)  # noqa: S102
    dec = namespace["dec"]
    assert dec.updates == (24 - plain_steps() if dec.plan is not None and any(
        p.form != "plain" for p in dec.plan.layers.values()) else 0)  # fmt: skip
    assert not any(isinstance(m, DecorrelatedLayer) for m in model.modules())
    assert not torch.equal(model[0].weight, reference[0].weight)


FABRIC_PRELUDE = """
import os
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 2))
g = torch.Generator().manual_seed(1)
x = torch.randn(4096, 64, generator=g) @ (torch.randn(64, 64, generator=g) + 2.0)
loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=64)
"""

FABRIC_EPILOGUE = """
torch.save({"state": {k: v.detach().cpu() for k, v in dec.model.state_dict().items()}, "updates": dec.updates,
            "kept": any(p.form != "plain" for p in dec.plan.layers.values())},
           os.path.join(os.environ["OUT"], f"rank{fabric.global_rank}.pt"))
"""


@pytest.mark.parametrize("devices", [1, 2])
def test_the_readme_fabric_loop_runs_on_gpus(tmp_path: Path, devices: int) -> None:
    """The README's Fabric example with ``accelerator="cuda"`` (one GPU, and DDP on two when present): ``R`` and the
    weights identical on every rank."""
    if devices > torch.cuda.device_count():
        pytest.skip(f"needs {devices} GPUs")
    snippet = readme_snippet("Usage with Lightning Fabric")
    snippet = snippet.replace('accelerator="cpu", devices=2', f'accelerator="cuda", devices={devices}')
    assert 'accelerator="cuda"' in snippet
    script = tmp_path / "fabric_snippet.py"
    script.write_text(FABRIC_PRELUDE + snippet + FABRIC_EPILOGUE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**checkout_env(), "OUT": str(tmp_path), "MASTER_PORT": str(port)}
    for var in ("MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(devices)]
    assert all(r["updates"] == (4096 // 64 // devices - plain_steps() if r["kept"] else 0) for r in ranks)
    for name, value in ranks[0]["state"].items():
        for other in ranks[1:]:
            assert torch.equal(value, other["state"][name]), name


def test_ddp_on_two_gpus_keeps_r_identical(tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "ranks"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, __file__, "ddp", str(out)], env={**checkout_env(), **os.environ}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name


def _ddp_main(out: str) -> None:
    pl.seed_everything(0, verbose=False)
    model = CNNModule()
    cb = DecorrelationCallback(max_overhead=None, fold_on_fit_end=False)
    t = pl.Trainer(accelerator="gpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[cb])  # fmt: skip
    t.fit(model)
    torch.save(raw_state(model), Path(out) / f"rank{t.global_rank}.pt")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "ddp":
    _ddp_main(sys.argv[2])


def test_the_statistics_stay_in_full_float32_when_tf32_is_allowed() -> None:
    """Under ``torch.set_float32_matmul_precision("high")`` (TF32 on Ampere and later: ~1e-3 relative per product)
    the update's loss and new R match the float64 update to float32's precision (TF32 would miss by ~1e-3)."""
    from lightning_decor.functional import block_decorrelation_step

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 512, 128, generator=g) @ (torch.randn(128, 128, generator=g) / 128**0.5 + torch.eye(128))
    R = torch.eye(128).expand(4, 128, 128).clone()
    args = dict(lr=0.3, kappa=0.5, normalize="none")
    new64, loss64, _ = block_decorrelation_step(R.double(), x.double(), None, **args)
    torch.set_float32_matmul_precision("high")
    new32, loss32, _ = block_decorrelation_step(R.to(CUDA), x.to(CUDA), None, **args)
    torch.testing.assert_close(loss32.cpu().double(), loss64, rtol=1e-5, atol=0)
    torch.testing.assert_close(new32.cpu().double(), new64, rtol=0, atol=1e-5)


@pytest.mark.parametrize("launch", [True, False])
def test_layers_sharing_an_r_never_synchronise_with_the_host(launch: bool) -> None:
    """A Llama-style block (q/k/v and gate/up share an R; the input form's z once per input): the per-step check of
    the groups and the per-layer losses of the followers read nothing back to the host."""
    from test_sharing import Block, data

    torch.manual_seed(0)
    model = Block().to(CUDA)
    dec = Decorrelator(model, max_overhead=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = [data(i).to(CUDA) for i in range(8)]

    def steps(n: int) -> None:
        for i in range(n):
            loss = model(inputs[i % 8]).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            stepped(dec, optimizer, launch)

    steps(3)  # the groups, the stacks, the caches
    assert dec.shared == {"k": "q", "v": "q", "up": "gate"}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps(25)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(dec.last_losses).all() and model.k.decor_R is model.q.decor_R


def test_fully_shard_on_one_gpu_fuses_and_folds_the_shards() -> None:
    """FSDP2 on a CUDA mesh of one process: the sharded weights' W @ R (a DTensor on the GPU), the state dict and
    fold, against the same model unsharded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = cnn().to(CUDA)
        reference = copy.deepcopy(model)
        dec, ref = Decorrelator(model, max_overhead=None), Decorrelator(reference, max_overhead=None)
        fully_shard(model, mesh=init_device_mesh("cuda", (1,)))
        data = TensorDataset(*(t.to(CUDA) for t in images().tensors))
        plain_loop(model, dec, 5, data, launch=False)
        plain_loop(reference, ref, 5, data, launch=False)
        for name, R in decorrelation_matrices(reference).items():
            torch.testing.assert_close(decorrelation_matrices(model)[name], R, rtol=0, atol=1e-5, msg=name)
        state = model.state_dict()
        for key, value in reference.state_dict().items():
            got = state[key].full_tensor() if hasattr(state[key], "full_tensor") else state[key]
            torch.testing.assert_close(got, value, rtol=0, atol=1e-4, msg=key)
        dec.fold()
        ref.fold()
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=0, atol=1e-4, msg=name)
    finally:
        dist.destroy_process_group()
