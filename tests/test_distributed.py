"""Row pooling across processes: the CPU group for the row counts (one process here; two in test_integration)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lightning_decor import DecorrelationCallback
from lightning_decor.distributed import count_group

from conftest import TinyModule


@pytest.fixture()
def one_process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A default group of one process whose backend reads as NCCL (as on GPUs), so that `count_group` makes a gloo
    group of its own, as it does in a multi-GPU run."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    real = dist.get_backend
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl" if group is None else real(group))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("end", ["on_fit_end", "on_exception"])
def test_the_count_group_of_a_fit_is_destroyed_when_the_fit_ends(
    one_process_group: None, end: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, cb = TinyModule(), DecorrelationCallback(fold_on_fit_end=False, max_overhead=None)
    trainer = SimpleNamespace(world_size=2, callbacks=[], strategy=SimpleNamespace(root_device=torch.device("cpu")))
    cb.setup(trainer, model, "fit")  # type: ignore[arg-type]
    made: list[dist.ProcessGroup] = []
    new_group = dist.new_group
    monkeypatch.setattr(dist, "new_group", lambda *a, **kw: made.append(new_group(*a, **kw)) or made[-1])
    with monkeypatch.context() as patched:  # two processes, as the engine sees them: it pools rows and makes a group
        patched.setattr(dist, "get_world_size", lambda group=None: 2)
        cb.on_fit_start(trainer, model)  # type: ignore[arg-type]
    assert len(made) == 1 and dist.get_backend(made[0]) == "gloo"  # a group of its own, made for this fit
    getattr(cb, end)(trainer, model, *([RuntimeError("crash")] if end == "on_exception" else []))
    with pytest.raises(ValueError, match="is not initialized in the world group map"):
        dist.get_backend(made[0])  # destroyed: repeated fits no longer leak one gloo group (and its sockets) each


def test_count_group_reuses_a_gloo_default_group() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert count_group() is None  # None stands for the default group: nothing is made, nothing to destroy
    finally:
        dist.destroy_process_group()
