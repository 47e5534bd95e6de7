"""One rank of a decorrelated model trained under FSDP2 (``fully_shard``, gloo, CPU), for tests/test_sharded.py.

Run as ``python tests/sharded_run.py RANK WORLD INIT_FILE OUT`` (plain PyTorch), or as ``python tests/sharded_run.py
lightning OUT`` (Lightning's ModelParallelStrategy on two CPU processes; the launcher runs this file again for rank 1).
Plain PyTorch: every rank patches the model (``Decorrelator``), then
shards each block and the model, trains STEPS steps on its part of every global batch, and writes to OUT what the test
compares with a single process on the whole batch: each layer's R, the fused weights ``W @ R`` gathered whole, the
model's full state dict (the plain layers' keys), then the folded weights, and a distributed checkpoint (``dcp.save``).

The gradient is reduced by sum (``set_gradient_divide_factor(1.0)``) of each rank's loss divided by the global batch:
the global batch's mean gradient whatever gloo's AVG reduction does (torch issue 162338).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

STEPS = 6
GLOBAL_BATCH = 16
ARGUMENTS = dict(max_overhead=None, sample_fraction=1.0, max_rows=None, decor_lr=0.05, use_cuda_stream=False)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(6), Block(6)])
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: correlated inputs (so R moves), three classes."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g) @ torch.randn(6, 6, generator=g)
    return x, torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def main(rank: int, world: int, init_file: str, out: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from lightning_decor import Decorrelator, decorrelation_matrices

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    local = GLOBAL_BATCH // world

    def sharded() -> tuple[Net, Decorrelator, torch.optim.Optimizer]:
        model = make_model()
        dec = Decorrelator(model, **ARGUMENTS)  # patched first, then sharded
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # a sum: each rank's loss carries 1 / GLOBAL_BATCH
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        return model, dec, torch.optim.SGD(model.parameters(), lr=0.1)

    def train(model: Net, dec: Decorrelator, optimizer: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            x, y = batch(step)
            x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
            loss = F.cross_entropy(model(x), y, reduction="sum") / GLOBAL_BATCH
            optimizer.zero_grad()
            loss.backward()
            dec.step()
            optimizer.step()

    model, dec, optimizer = sharded()
    train(model, dec, optimizer, range(STEPS // 2))
    saved = dec.state_dict()  # every rank: the whole raw W
    weights = {key: value.clone() for key, value in model.state_dict().items()}  # the fused shards, copied
    train(model, dec, optimizer, range(STEPS // 2, STEPS))
    again, dec_again, optimizer_again = sharded()  # a resume: the sharded checkpoint, then the engine's state
    again.load_state_dict(weights)
    dec_again.load_state_dict(saved)
    train(again, dec_again, optimizer_again, range(STEPS // 2, STEPS))
    resumed = {
        name: torch.equal(p.full_tensor(), q.full_tensor())
        for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters(), strict=True)
    } | {f"{n}.R": torch.equal(R, decorrelation_matrices(again)[n]) for n, R in decorrelation_matrices(model).items()}
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    result = {
        "R": {name: R.clone() for name, R in decorrelation_matrices(model).items()},
        "fused": {name: layer.decor_fused_weight().full_tensor() for name, layer in dec.layers.items()},
        "state": get_model_state_dict(model, options=full),  # gathered whole (rank 0 holds it)
        "updates": dec.updates,
        "resumed": resumed,  # bit for bit as the uninterrupted run
    }
    dcp.save(model.state_dict(), checkpoint_id=str(out / "dcp"))  # sharded, W @ R under the plain keys
    dec.fold()
    result["folded"] = {name: p.full_tensor() for name, p in model.named_parameters()}
    result["classes"] = {name: type(m).__name__ for name, m in model.named_modules()}
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()  # no rank tears its group down while another still talks to it
    dist.destroy_process_group()


def lightning_main(out: Path) -> None:
    """The same training through ``Trainer.fit``: the layers built in ``__init__`` (the callback patches them in
    ``setup``), ``fully_shard`` in ``configure_model``, the callback folding the sharded layers at the end."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_decor import DecorrelationCallback, decorrelation_matrices

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for block in self.net.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.net, mesh=mesh)
            for module in self.net.modules():
                if isinstance(module, FSDPModule):
                    module.set_gradient_divide_factor(1.0)
                    module.set_force_sum_reduction_for_comms(True)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y, reduction="sum") / GLOBAL_BATCH

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader:
            # this rank's half of every global batch, in order (use_distributed_sampler=False): the pooled rows are
            # the global batch's rows in its order
            half, rank, epoch = GLOBAL_BATCH // 2, self.global_rank, self.current_epoch  # epochs of STEPS // 2 steps
            xs, ys = zip(*(batch(step) for step in range(epoch * STEPS // 2, (epoch + 1) * STEPS // 2)))
            x, y = (torch.cat([t[rank * half : (rank + 1) * half] for t in ts]) for ts in (xs, ys))
            return DataLoader(TensorDataset(x, y), batch_size=half)

    class Keep(pl.Callback):
        """R and the raw weights (gathered) at the first training batch and at the end of training."""

        def state(self, pl_module: pl.LightningModule) -> dict[str, dict[str, torch.Tensor]]:
            R = {name: R.clone() for name, R in decorrelation_matrices(pl_module.net).items()}
            W = {name: p.full_tensor().clone() for name, p in pl_module.net.named_parameters()}
            return {"R": R, "W": W}

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
            if not hasattr(self, "start"):
                self.start = self.state(pl_module)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.end = self.state(pl_module)

    torch.set_num_threads(1)

    def trainer(steps: int, *callbacks: pl.Callback) -> pl.Trainer:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        return pl.Trainer(
            accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, use_distributed_sampler=False,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=list(callbacks), reload_dataloaders_every_n_epochs=1,
        )  # fmt: skip

    kept_first, kept = Keep(), Keep()
    first = trainer(STEPS // 2, DecorrelationCallback(**ARGUMENTS, fold_on_fit_end=False), kept_first)
    first.fit(Lit())
    first.save_checkpoint(out / "ckpt")  # the strategy's sharded save: W @ R of the shards, and the callback's state
    second = trainer(STEPS, DecorrelationCallback(**ARGUMENTS), kept)
    model = Lit()
    second.fit(model, ckpt_path=out / "ckpt")  # resumed at step 3, to step 6, folded at the end
    folded = {name: p.full_tensor() for name, p in model.net.named_parameters()}
    classes = {name: type(m).__name__ for name, m in model.net.named_modules()}
    result = {"first": kept_first.end, "resumed": kept.start, "end": kept.end, "folded": folded, "classes": classes,
              "updates": second.callbacks[0].updates}  # fmt: skip
    torch.save(result, out / f"lightning_rank{second.global_rank}.pt")
    dist.barrier()  # then tear the groups down before exit (gloo's threads otherwise abort at interpreter exit)
    dist.destroy_process_group()


def exchange_main(rank: int, world: int, init_file: str, out: Path) -> None:
    """R only (no optimizer), from each rank's half of every global batch, with rows gathered and with moments
    all-reduced: what each gives, and what "auto" chose."""
    from lightning_decor import Decorrelator, decorrelation_matrices

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    local = GLOBAL_BATCH // world
    result: dict[str, object] = {}
    for mode in ("rows", "moments", "auto"):
        model = make_model()
        dec = Decorrelator(model, **{**ARGUMENTS, "normalize": "spectral"})
        dec.exchange = mode
        for step in range(STEPS):
            x, _ = batch(step)
            model(x[rank * local : (rank + 1) * local]).sum().backward()  # rows; the weights stay
            dec.step()
            model.zero_grad()
        result[mode] = {name: R.clone() for name, R in decorrelation_matrices(model).items()}
        result[f"{mode}_exchanged"] = dec.exchanged
    torch.save(result, out / f"exchange_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def fabric_main(out: Path) -> None:
    """The README's Fabric path with FSDP2: the ``Decorrelator`` after ``fabric.launch()`` and before
    ``fabric.setup``, whose ``parallelize_fn`` shards the patched model."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from lightning_decor import Decorrelator, decorrelation_matrices

    def parallelize(model: nn.Module, mesh: object) -> nn.Module:
        mesh = mesh["data_parallel"]  # type: ignore[index]
        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model

    torch.set_num_threads(1)
    strategy = ModelParallelStrategy(parallelize, data_parallel_size=2, tensor_parallel_size=1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    model = make_model()
    dec = Decorrelator(model, **ARGUMENTS)
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    rank, local = fabric.global_rank, GLOBAL_BATCH // 2
    for step in range(STEPS):
        x, y = batch(step)
        loss = F.cross_entropy(model(x[rank * local : (rank + 1) * local]), y[rank * local : (rank + 1) * local],
                               reduction="sum") / GLOBAL_BATCH  # fmt: skip
        optimizer.zero_grad()
        fabric.backward(loss)
        dec.step()
        optimizer.step()
    R = {name: R.clone() for name, R in decorrelation_matrices(model).items()}
    dec.fold()
    folded = {name: p.full_tensor() for name, p in model.named_parameters()}
    torch.save({"R": R, "folded": folded, "updates": dec.updates}, out / f"fabric_rank{rank}.pt")
    fabric.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "fabric":
        fabric_main(Path(sys.argv[2]))
    elif sys.argv[1] == "lightning":
        lightning_main(Path(sys.argv[2]))
    elif sys.argv[1] == "exchange":
        exchange_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
    else:
        main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
