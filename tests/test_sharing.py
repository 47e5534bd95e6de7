"""One R per input (lightning_decor.sharing): the q, k and v projections of a Llama-style block, and the gate and up
projections of its gated MLP, read the same tensor and share one R; layers on different tensors of equal shape never
do. The reference is the same model whose projections read copies of the input (the same rows, nothing shared)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lightning_decor import Decorrelator
from lightning_decor.plan import Plan

D = 16


class Block(nn.Module):
    """A Llama-style block: RMS-normed input to q, k, v (one tensor), attention, o; RMS-normed input to a gated MLP's
    gate and up (one tensor), then down. With ``copies``, every projection reads its own copy of the input."""

    def __init__(self, copies: bool = False) -> None:
        super().__init__()
        self.copies = copies
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def read(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone() if self.copies else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        q, k, v = self.q(self.read(h)), self.k(self.read(h)), self.v(self.read(h))
        a = torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1) @ v
        x = x + self.o(a)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + self.down(F.silu(self.gate(self.read(h))) * self.up(self.read(h)))


def data(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 6, D, generator=g) @ torch.randn(D, D, generator=g)  # correlated features: R moves


def train(model: nn.Module, dec: Decorrelator, steps: range) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in steps:
        loss = model(data(step)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        dec.step()
        optimizer.step()


ARGUMENTS = dict(max_overhead=None, sample_fraction=1.0, max_rows=None, decor_lr=0.05)


def pair() -> tuple[Block, Block]:
    torch.manual_seed(0)
    shared = Block()
    reference = copy.deepcopy(shared)
    reference.copies = True
    return shared, reference


def pinned(layouts: dict[str, tuple[str, int]]) -> Plan:
    """A pinned plan of ``layouts`` (``{layer: (form, block)}``) for :class:`Block`."""
    return Plan.from_state_dict({
        "layers": {n: dict(name=n, form=f, block=b, d=D if n != "down" else 2 * D, rows=0,
                           c_out=2 * D if n in ("gate", "up") else D, groups=1, cost=0.0)
                   for n, (f, b) in layouts.items()},
        "source": "pinned",
    })  # fmt: skip


def test_projections_of_one_input_share_one_r_and_train_as_if_each_had_its_own() -> None:
    model, reference = pair()
    dec, ref = Decorrelator(model, **ARGUMENTS), Decorrelator(reference, **ARGUMENTS)
    train(model, dec, range(6))
    train(reference, ref, range(6))
    assert dec.shared == {"k": "q", "v": "q", "up": "gate"} and ref.shared == {}  # copies: nothing shared
    assert model.k.decor_R is model.q.decor_R and model.up.decor_R is model.gate.decor_R  # one tensor, one memory
    for name, layer in ref.layers.items():  # the same rows, so the same R and weights as with an R each
        torch.testing.assert_close(dec.layers[name].decor_R, layer.decor_R, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(dec.layers[name].weight, layer.weight, rtol=0, atol=1e-6, msg=name)
    assert (model.q.decor_R - torch.eye(D)).abs().max() > 1e-3  # R moved (measured 5.7e-3)
    assert dec.last_losses is not None and len(dec.last_losses) == len(dec.layers) == 7
    torch.testing.assert_close(dec.last_losses[1], dec.last_losses[0], rtol=0, atol=0)  # k's loss is q's


def test_the_plan_table_names_the_shared_r_and_counts_its_memory_once() -> None:
    model, _ = pair()
    dec = Decorrelator(model, **ARGUMENTS)
    train(model, dec, range(1))
    assert dec.plan is not None
    rows = {line.split()[0]: line for line in dec.plan.table().splitlines()[2:]}
    assert rows["k"].endswith("(shares the R of q)") and rows["up"].endswith("(shares the R of gate)")
    assert dec.plan.layers["k"].memory == 0 and dec.plan.layers["q"].memory == 4 * D * D
    # R of q, o, gate (16 x 16) and down (32 x 32), and twice the largest stack (down alone) for the workspace
    assert dec.plan.memory == 4 * (3 * D * D + (2 * D) ** 2) + 2 * 4 * (2 * D) ** 2


def test_layers_on_different_tensors_of_equal_shape_never_share() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x + 0.0)  # equal shapes, equal values at first: another tensor all the same

    model = Two()
    dec = Decorrelator(model, **ARGUMENTS)
    train(model, dec, range(2))
    assert dec.shared == {} and model.a.decor_R is not model.b.decor_R


def test_fold_and_the_state_dict_are_exact_and_a_resume_continues_the_groups() -> None:
    model, _ = pair()
    dec = Decorrelator(model, **ARGUMENTS)
    train(model, dec, range(3))
    state, weights = copy.deepcopy(dec.state_dict()), copy.deepcopy(model.state_dict())
    assert set(state["R"]) == {"q", "o", "gate", "down"}  # one R per group in the checkpoint
    resumed = Block()
    resumed.load_state_dict(weights)  # the plain keys: W @ R
    again = Decorrelator(resumed, **ARGUMENTS)
    again.load_state_dict(state)
    assert again.shared == dec.shared and resumed.k.decor_R is resumed.q.decor_R
    train(model, dec, range(3, 6))
    train(resumed, again, range(3, 6))
    for name, layer in dec.layers.items():  # the uninterrupted run, bit for bit
        assert torch.equal(again.layers[name].decor_R, layer.decor_R), name
        assert torch.equal(again.layers[name].weight, layer.weight), name
    x = data(99)
    with torch.no_grad():
        before = model(x)
    dec.fold()
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(model(x).detach(), before, rtol=0, atol=1e-6)  # each W folded with the shared R
    plain = Block()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(x).detach(), before, rtol=0, atol=1e-6)


def test_a_plan_giving_the_group_different_blocks_separates_it() -> None:
    model, _ = pair()
    layouts = {name: ("fused", D) for name in ("q", "v", "o")} | {"k": ("fused", D // 2)}
    layouts |= {"gate": ("fused", D), "up": ("fused", D), "down": ("fused", 2 * D)}
    plan = pinned(layouts)
    dec = Decorrelator(model, **(ARGUMENTS | {"max_overhead": 0.1}), plan=plan)
    train(model, dec, range(20))
    assert dec.shared == {"v": "q", "up": "gate"}  # k got blocks of 8: its own R
    assert model.v.decor_R is model.q.decor_R and model.k.decor_R.shape == (2, D // 2, D // 2)
    assert (model.k.decor_R - torch.eye(D // 2)).abs().max() > 1e-3  # and it moves on its own rows


def test_a_layer_called_apart_leaves_its_group_with_the_r_reached_so_far() -> None:
    class Aux(nn.Module):
        """An auxiliary head on the trunk's input, used on even steps only."""

        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.aux = nn.Linear(D, D), nn.Linear(D, 2)
            self.use_aux = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.trunk(x).pow(2).mean()
            return y + self.aux(x).pow(2).mean() if self.use_aux else y

    torch.manual_seed(0)
    model = Aux()
    dec = Decorrelator(model, **ARGUMENTS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(i: int, aux: bool) -> None:
        model.use_aux = aux
        optimizer.zero_grad()
        model(data(i)).backward()
        dec.step()
        optimizer.step()

    step(0, aux=True)
    assert dec.shared == {"aux": "trunk"} and model.aux.decor_R is model.trunk.decor_R
    after_first = model.trunk.decor_R.clone()
    step(1, aux=False)  # the trunk alone: aux leaves, keeping the R both had
    assert dec.shared == {} and model.aux.decor_R is not model.trunk.decor_R
    assert torch.equal(model.aux.decor_R, after_first) and not torch.equal(model.trunk.decor_R, after_first)
    assert dec.last_losses is not None and torch.isnan(dec.last_losses[1])  # aux had no rows of its own
    step(2, aux=True)  # its own rows from now on
    assert not torch.equal(model.aux.decor_R, after_first)


def test_the_scale_benchmark_counts_the_memory_of_r_as_written_out() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "benchmarks"))
    import scale

    rows = {(r["model"], r["world"]): r for r in scale.memory_table()}
    llama = rows[("llama-7b", 1)]  # 32 blocks: q, k, v, o, gate, up of width 4096; down of 11008; float32 R
    assert llama["dense_each_GiB"] * 2**30 == 32 * (6 * 4096**2 + 11008**2) * 4
    assert llama["dense_shared_GiB"] * 2**30 == 32 * (3 * 4096**2 + 11008**2) * 4  # q/k/v one R, gate/up one R
    sharded = rows[("llama-7b", 8)]
    assert sharded["planned_GiB"] <= sharded["budget_GiB"] == 4 * 4 * 6_738_415_616 / 8 / 2**30
    assert rows[("gpt2-small", 1)]["dense_each_GiB"] * 2**30 == 12 * (3 * 768**2 + 3072**2) * 4


def test_a_plan_folding_a_layer_of_a_group_and_a_frozen_layer_leave_it() -> None:
    model, _ = pair()
    layouts = {"q": ("fused", D), "k": ("plain", 0), "v": ("fused", D), "o": ("fused", D)}
    layouts |= {"gate": ("fused", D), "up": ("fused", D), "down": ("fused", 2 * D)}
    plan = pinned(layouts)
    dec = Decorrelator(model, **(ARGUMENTS | {"max_overhead": 0.1}), plan=plan)
    train(model, dec, range(20))  # k folded by the plan: no longer a layer, no longer in the group
    assert dec.shared == {"v": "q", "up": "gate"} and type(model.k) is nn.Linear
    model.up.weight.requires_grad_(False)  # frozen: its W @ R must stay as it is
    frozen = model.up.decor_fused_weight().detach().clone()
    train(model, dec, range(20, 22))
    assert dec.shared == {"v": "q"} and model.up.decor_R is not model.gate.decor_R
    assert torch.equal(model.up.decor_fused_weight(), frozen)


def test_a_state_saved_before_groups_existed_keeps_an_r_for_each_layer() -> None:
    model, _ = pair()
    dec = Decorrelator(model, **ARGUMENTS)
    train(model, dec, range(2))
    state = copy.deepcopy(dec.state_dict())
    state.pop("sharing")  # as written before this version: every layer's own R
    state["R"] |= {name: dec.layers[leader].decor_R.detach().clone() for name, leader in dec.shared.items()}
    again = Block()
    again.load_state_dict(model.state_dict())
    resumed = Decorrelator(again, **ARGUMENTS)
    resumed.load_state_dict(state)
    train(again, resumed, range(2, 4))
    assert resumed.shared == {} and again.k.decor_R is not again.q.decor_R  # never tied after R moved


def test_in_the_input_form_the_group_computes_z_once_per_input(monkeypatch) -> None:
    from lightning_decor import layers as layers_module
    from lightning_decor import sharing as sharing_module

    layouts = {n: ("input", D) for n in ("q", "k", "v")} | {"o": ("fused", D), "gate": ("input", D)}
    layouts |= {"up": ("input", D), "down": ("fused", 2 * D)}
    model, reference = pair()
    dec = Decorrelator(model, **(ARGUMENTS | {"max_overhead": 0.1}), plan=pinned(layouts))
    ref = Decorrelator(reference, **(ARGUMENTS | {"max_overhead": 0.1}), plan=pinned(layouts))
    train(model, dec, range(20))
    train(reference, ref, range(20))
    assert dec.shared == {"k": "q", "v": "q", "up": "gate"} and ref.shared == {}
    calls = []
    for module in (layers_module, sharing_module):
        real = module.decorrelate_rows
        monkeypatch.setattr(module, "decorrelate_rows", lambda x, R, real=real: calls.append(x) or real(x, R))
    x = data(99)
    out = model(x)
    out.sum().backward()  # z is kept for the backward by the group's first layer, and reused by the others
    assert len(calls) == 2  # one z for q, k, v and one for gate, up (the copies model would compute five)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-6)  # what an R each computes
    for name, layer in ref.layers.items():
        torch.testing.assert_close(dec.layers[name].decor_R, layer.decor_R, rtol=0, atol=1e-6, msg=name)
