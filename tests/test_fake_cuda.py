"""The GPU paths on a CPU machine: models whose tensors live on a *fake* ``cuda`` device.

Under ``torch._subclasses.fake_tensor.FakeTensorMode`` every tensor carries a real device and every op checks it as
CUDA would (``FakeTensorDeviceMismatchError`` for a CPU index given with CUDA tensors), and an op whose output
depends on data (``.item()``, ``nonzero``, ``repeat_interleave`` without ``output_size``) raises: on a GPU each of
those is a host synchronisation. Only two things of a GPU run are stood in for, because they cannot exist without
CUDA: a CUDA generator (a CPU generator that says it is a CUDA one; ``GeneratorDevices`` checks every draw's
generator against the draw's device, as CUDA does) and the eager autograd engine's backward (the gradients are set
by hand). The side stream needs CUDA too: these runs use ``use_cuda_stream=False``; tests/gpu/ checks the stream.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from lightning_decor import Decorrelator, decorrelation_matrices
from lightning_decor import probe as probe_module
from lightning_decor import rows as rows_module
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.rows import Generators

STEPS = 21  # past the 20th update, where the null-space reset runs


class GeneratorDevices(TorchFunctionMode):
    """Refuses a draw whose generator is of another device type than the draw, as CUDA does ("Expected a 'cuda'
    device type for generator"). ``claimed`` maps the stand-in generators to the device they stand in for."""

    def __init__(self) -> None:
        super().__init__()
        self.claimed: dict[int, torch.device] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator) and isinstance(out, torch.Tensor):
            device = self.claimed.get(id(generator), generator.device)
            if device.type != out.device.type:
                raise RuntimeError(
                    f"Expected a '{out.device.type}' device type for generator but found '{device.type}' ({func})"
                )
        return out


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> GeneratorDevices:
    """Stand-in CUDA generators (CPU generators that claim the device they were made for) and their check."""
    check = GeneratorDevices()
    made: list[torch.Generator] = []  # kept alive: ids stay unique

    def new_generator(device: torch.device) -> torch.Generator:
        generator = torch.Generator()
        made.append(generator)
        check.claimed[id(generator)] = torch.device(device)
        return generator

    monkeypatch.setattr(rows_module, "new_generator", new_generator)
    return check


@contextlib.contextmanager
def fake_mode(check: GeneratorDevices) -> Iterator[None]:
    """Fake tensors (real tensors made before become fake when an op meets them) and the generator check."""
    with FakeTensorMode(allow_non_fake_inputs=True), check:
        yield


@pytest.fixture
def fake_cuda(stand_ins: GeneratorDevices) -> Iterator[GeneratorDevices]:
    with fake_mode(stand_ins):
        yield stand_ins


def backward_stand_in(model: nn.Module) -> None:
    """What backward leaves for the engine: a gradient in every trainable parameter (fake tensors cannot run the eager
    autograd engine)."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),  # grouped: one R per group
        nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 4),
    )  # fmt: skip


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class Gpt2Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        self.c_fc, self.c_proj = conv1d(32, 16), conv1d(16, 32)  # Conv1D(out, in): weight (in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)))


# (model, input shape, engine arguments, layers given the input form)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, Any], list[str]]] = {
    "mlp": (mlp, (32, 8), {"sample_fraction": 1.0, "max_rows": None}, []),
    "mlp-input-form-3d-sampled": (mlp, (4, 16, 8), {"sample_fraction": 0.5, "max_rows": 24}, ["2"]),
    "cnn-groups-blocks": (cnn, (4, 3, 8, 8), {"block_size": 36, "sample_fraction": 1.0, "max_rows": 200}, ["4"]),
    "cnn-all-patches": (cnn, (2, 3, 8, 8), {"sample_fraction": 1.0, "max_rows": None}, []),
    "attention": (Attention, (4, 6, 16), {"sample_fraction": 1.0, "max_rows": 16}, ["encoder.linear1"]),
    "hf-conv1d": (Gpt2Mlp, (4, 5, 16), {"sample_fraction": 1.0, "max_rows": None}, []),
}


def train(model: nn.Module, dec: Decorrelator, shape: tuple[int, ...], steps: int, forwards: int = 1) -> None:
    """Forwards, the backward stand-in, and the engine's step; every other step queued first (``launch``), as
    beside an optimizer step."""
    for i in range(steps):
        for _ in range(forwards):
            model(torch.randn(shape, device="cuda"))
        backward_stand_in(model)
        if i % 2:
            dec.launch()
        dec.step()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_decorrelated_model_on_a_gpu_patches_steps_saves_and_folds(fake_cuda: GeneratorDevices, case: str) -> None:
    make, shape, arguments, input_form = CASES[case]
    with torch.device("cuda"):
        model = make()
    plain = {name: type(m) for name, m in model.named_modules()}
    dec = Decorrelator(model, max_overhead=None, use_cuda_stream=False, **arguments)
    for name in input_form:  # the input form on some layers: R on the rows, then the plain layer
        layer = dec.layers[name]
        layer.decor_set_layout_(layer.decor_block_size, "input")
    assert dec.layers and all(R.device.type == "cuda" for R in decorrelation_matrices(model).values())
    train(model, dec, shape, STEPS)

    assert dec.updates == STEPS
    assert dec.last_losses is not None and dec.last_losses.device.type == "cuda"
    assert dec.skipped is not None and dec.skipped.device.type == "cuda"
    assert all(R.device.type == "cuda" for R in decorrelation_matrices(model).values())
    state = dec.state_dict()
    assert all(R.device.type == "cpu" for R in state["R"].values())
    # the stand-in CUDA generator's state, made where rows are drawn at random (all rows need none)
    assert set(state["generator"]["states"]) == ({"cuda"} if arguments["max_rows"] is not None else set())
    weights = model.state_dict()  # the fused W @ R under the plain keys
    assert all(w.device.type == "cuda" for w in weights.values())
    dec.fold()
    assert {name: type(m) for name, m in model.named_modules()} == plain
    assert not any(isinstance(m, DecorrelatedLayer) for m in model.modules())
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_rows_waiting_past_the_limit_are_sampled_on_the_gpu(fake_cuda: GeneratorDevices) -> None:
    """More forwards than PENDING_FORWARDS before an update: the uniform sample (randperm, then reservoir sampling)
    draws on the device."""
    with torch.device("cuda"):
        model = mlp()
    dec = Decorrelator(model, max_overhead=None, use_cuda_stream=False, sample_fraction=1.0, max_rows=8)
    train(model, dec, (32, 8), steps=2, forwards=rows_module.PENDING_FORWARDS + 3)
    assert dec.updates == 2 and dec.last_losses.device.type == "cuda"


def test_a_model_moved_to_the_gpu_after_the_engine_was_made_samples_there(stand_ins: GeneratorDevices) -> None:
    """The README's Fabric order and Lightning's: the engine is made on the CPU, the model moves afterwards; the first
    GPU forward draws its rows with a CUDA generator."""
    model = mlp()  # a real model on the CPU
    dec = Decorrelator(model, max_overhead=None, use_cuda_stream=False, sample_fraction=0.5, max_rows=8)
    with fake_mode(stand_ins):
        model.to("cuda")
        train(model, dec, (32, 8), steps=3)
        assert dec.updates == 3
        assert all(R.device.type == "cuda" for R in decorrelation_matrices(model).values())
        assert set(dec.state_dict()["generator"]["states"]) == {"cuda"}


def test_a_gpu_runs_saved_sampling_state_waits_for_the_gpu(stand_ins: GeneratorDevices) -> None:
    """Lightning restores a callback's state while the model is still on the CPU: the saved CUDA generator state is
    kept until the model samples on the GPU, which then continues the saved run's draws, without a warning."""
    with fake_mode(stand_ins):
        with torch.device("cuda"):
            model = mlp()
        dec = Decorrelator(model, max_overhead=None, use_cuda_stream=False, sample_fraction=0.5, max_rows=8)
        train(model, dec, (32, 8), steps=2)
    advanced = Generators(seed=0)
    advanced.load_state_dict(dec.state_dict()["generator"])  # the engine's saved sampling state, the GPU's in it
    torch.rand(7, generator=advanced(torch.device("cuda:0")))  # fake draws do not advance the stand-in
    saved = advanced.state_dict()

    restored = Generators(seed=123)
    restored.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu = restored(torch.device("cpu"))  # made while the model is on the CPU: not given the GPU's state
        gpu = restored(torch.device("cuda:0"))
    assert not torch.equal(cpu.get_state(), saved["states"]["cuda"])
    assert torch.equal(gpu.get_state(), saved["states"]["cuda"])  # (fake tensors have no values to draw)


def test_the_plan_is_made_for_the_device_the_model_trains_on(
    stand_ins: GeneratorDevices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made while the model is on the CPU (as Lightning and the README's Fabric order make it), the planner takes the
    device of ``start`` (the callback's ``on_fit_start``): the plan cache's key and the analytic model's constants
    name the GPU."""
    monkeypatch.setattr(probe_module, "device_name", lambda device: f"name of {device.type}")
    model = mlp()
    dec = Decorrelator(model, max_overhead=0.1, use_cuda_stream=False)
    assert dec.planner is not None and dec.planner.environment["device"] == "name of cpu"
    with fake_mode(stand_ins):
        model.to("cuda")
        dec.start(torch.device("cuda"))
    assert dec.planner.device_type == "cuda"
    assert dec.planner.environment["device_type"] == "cuda"
    assert dec.planner.environment["device"] == "name of cuda"
