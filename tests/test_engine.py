"""The Lightning-free engine, ``Decorrelator``, in plain PyTorch loops: the rule in float64 as the reference, plain
unpatched models, and uninterrupted runs. Nothing here imports Lightning (checked in a subprocess)."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_decor import Decorrelator, decorrelation_matrices, functional
from lightning_decor import plan as plan_module
from lightning_decor import probe as probe_module
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.plan import Plan
from lightning_decor.planner import CALIBRATION_STEPS, plain_steps

LR, KAPPA = 0.05, 0.5


def reference_update(R: torch.Tensor, x: torch.Tensor, normalize: str = "spectral") -> torch.Tensor:
    """One step of the rule of Dalm et al. in float64 on one block: z = x R^T, C = z^T z / n,
    R <- R - lr [(1 - kappa)(C - diag C) + kappa diag(diag C - 1)] R; with ``normalize="spectral"`` the step is
    lr / max(10, ||C||_F^2 / tr C), the default."""
    R, x = R.double(), x.double()
    z = x @ R.T
    C = z.T @ z / z.shape[0]
    c = torch.diagonal(C)
    if normalize == "layer":  # ||C||_F^2 / tr C from pairs of the (at most 64) rows: dense R, one block
        gram = z[:64] @ z[:64].T
        m = gram.shape[0]
        off = (gram.square().sum() - torch.diagonal(gram).square().sum()) / (m * (m - 1))
        lr = LR / max(10.0, float(off / torch.diagonal(gram).mean()))
    else:
        lr = LR if normalize == "none" else LR / max(10.0, float((C**2).sum() / c.sum()))
    return R - lr * ((1 - KAPPA) * (C - torch.diag(c)) + KAPPA * torch.diag(c - 1)) @ R


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))


def data(steps: int, n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    mixing = torch.randn(8, 8, generator=g) + 2.0
    return [(torch.randn(n, 8, generator=g) @ mixing / 8**0.5, torch.randint(0, 2, (n,), generator=g))
            for _ in range(steps)]  # fmt: skip


def inputs_of(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[torch.utils.hooks.RemovableHandle]]:
    """Every patched layer's input in the last forward, by name (a hook independent of the package's capture)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].detach().clone()))
        for name, m in model.named_modules()
        if isinstance(m, DecorrelatedLayer)
    ]
    return seen, hooks


def train(model: nn.Module, dec: Decorrelator, batches, record=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, hooks = inputs_of(model)
    for x, y in batches:
        before = {n: R.clone() for n, R in decorrelation_matrices(model).items()}
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        dec.step()
        opt.step()
        if record is not None:
            record.append((before, dict(seen), {n: R.clone() for n, R in decorrelation_matrices(model).items()}))
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("normalize", ["none", "spectral", "layer"])
def test_plain_pytorch_loop_moves_every_r_by_the_rule(normalize: str) -> None:
    model = mlp()
    dec = Decorrelator(
        model, decor_lr=LR, kappa=KAPPA, sample_fraction=1.0, max_rows=None, max_overhead=None, normalize=normalize
    )
    assert sorted(dec.layers) == ["0", "2", "4"]
    record: list = []
    train(model, dec, data(4), record)
    assert dec.updates == 4
    for before, rows, after in record:  # layers "0" and "4" share a block size of 8: one batched update
        for name in ("0", "2", "4"):  # (each layer with its own divisor when normalised)
            torch.testing.assert_close(after[name].double(), reference_update(before[name], rows[name], normalize),
                                       rtol=0, atol=1e-6)  # fmt: skip  # float32 R vs float64 reference


def test_layers_with_equal_blocks_and_different_row_counts_move_independently() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor, use_b: bool = True) -> torch.Tensor:
            out = self.a(x).sum()
            return out + self.b(x[:3]).sum() if use_b else out  # b sees 3 rows, a sees all

    torch.manual_seed(0)
    model = TwoInputs()
    dec = Decorrelator(model, decor_lr=LR, kappa=KAPPA, sample_fraction=1.0, max_rows=None, max_overhead=None)
    x = data(1, n=10)[0][0]
    seen, _ = inputs_of(model)
    R0 = {n: R.clone() for n, R in decorrelation_matrices(model).items()}
    model(x).backward()
    dec.step()
    for name in ("a", "b"):
        torch.testing.assert_close(model.get_submodule(name).decor_R.double(), reference_update(R0[name], seen[name]),
                                   rtol=0, atol=1e-6)  # fmt: skip
    assert dec.last_losses is not None and torch.isfinite(dec.last_losses).all()
    R1 = {n: R.clone() for n, R in decorrelation_matrices(model).items()}
    model(x, use_b=False).backward()  # b has no rows in this step: it keeps its R and reports NaN
    dec.step()
    assert torch.equal(model.b.decor_R, R1["b"]) and not torch.equal(model.a.decor_R, R1["a"])
    assert torch.isnan(dec.last_losses[1]) and torch.isfinite(dec.last_losses[0])
    assert dec.skipped is not None and dec.skipped.sum() == 0  # no rows is not a skip


def test_plan_is_made_after_the_plain_measured_steps_and_r_moves_from_a_fixed_step() -> None:
    assert CALIBRATION_STEPS == 5  # four intervals, the shortest counts (docs/TUNING.md)
    assert plain_steps() == 17 and plain_steps(2) == 27  # calibration, then room for two checks of 5 windows
    model = mlp()
    dec = Decorrelator(model, max_overhead=100.0)  # a budget everything fits in: the plan keeps every layer
    batches = data(plain_steps() + 2)
    for layer in dec.layers.values():
        assert layer.decor_form == "identity"
    train(model, dec, batches[: CALIBRATION_STEPS - 1])
    assert dec.plan is None and dec.planner is not None and not dec.planner.done
    train(model, dec, batches[CALIBRATION_STEPS - 1 : CALIBRATION_STEPS])
    assert dec.plan is not None and dec.updates == 0 and not dec.planner.done
    assert {n: (p.form, p.block) for n, p in dec.plan.layers.items()} == {
        n: (layer.decor_form, layer.decor_block_size) for n, layer in dec.layers.items()
    }
    assert all(p.form in ("fused", "input") and p.block == p.d for p in dec.plan.layers.values())
    assert all(layer.decor_buffer.observer is None for layer in dec.layers.values())  # the observers are gone
    train(model, dec, batches[CALIBRATION_STEPS : plain_steps()])  # the check: the plan's forms with R = I
    assert dec.updates == 0 and dec.planner.done and dec.overhead is not None
    assert dec.plan.measured_overhead == dec.overhead
    assert all(torch.equal(R, torch.eye(R.shape[-1])) for R in decorrelation_matrices(model).values())
    train(model, dec, batches[plain_steps() :])
    assert dec.updates == 2
    assert all(not torch.equal(R, torch.eye(R.shape[-1])) for R in decorrelation_matrices(model).values())


def test_a_plan_with_every_layer_plain_warns_and_trains_plainly() -> None:
    model = mlp()
    dec = Decorrelator(model, max_overhead=1e-9)  # no decorrelation fits a billionth of a step
    with pytest.warns(UserWarning, match=r"the plan leaves every layer plain: decorrelating any of them would cost "
                      r"more than `max_overhead`=1e-09 of the measured .* ms step"):  # fmt: skip
        train(model, dec, data(CALIBRATION_STEPS + 1))
    assert dec.layers == {} and dec.updates == 0
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.Tanh) for m in model.modules())


def test_the_measured_steps_compute_the_plain_model() -> None:
    model, reference = mlp(), mlp()
    dec = Decorrelator(model)
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in data(CALIBRATION_STEPS):
        for m, o in ((model, opt), (reference, opt_ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if m is model:
                dec.step()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # identical: R = I computed as the plain layer


@pytest.mark.parametrize("stop", [3, 8, 14, plain_steps() + 2], ids=["calibration", "check", "after-check", "moving"])
def test_state_dict_round_trip_continues_exactly(stop: int) -> None:
    batches = data(plain_steps() + 5)
    settings = dict(decor_lr=LR, kappa=KAPPA, sample_fraction=0.5, max_rows=8, max_overhead=100.0)
    model = mlp()
    dec = Decorrelator(model, **settings)  # type: ignore[arg-type]
    train(model, dec, batches)  # uninterrupted: it measures, and keeps what it measured in the plan cache

    first = mlp()
    dec1 = Decorrelator(first, **settings)  # type: ignore[arg-type]
    train(first, dec1, batches[:stop])
    saved_model, saved_engine = copy.deepcopy(first.state_dict()), copy.deepcopy(dec1.state_dict())

    resumed = mlp()  # a fresh process: a new model and engine, then the checkpoint
    dec2 = Decorrelator(resumed, **settings)  # type: ignore[arg-type]
    resumed.load_state_dict(saved_model)  # fused weights W R (patched layers restart from R = I)
    dec2.load_state_dict(saved_engine)  # the plan, R, raw W, the sampling generator
    train(resumed, dec2, batches[stop:])  # the optimiser is fresh SGD without momentum: no state lost
    assert dec2.plan is not None and dec.plan is not None and dec2.plan.layouts() == dec.plan.layouts()
    assert dec2.updates == dec.updates == 5
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(q, p), n  # bit for bit
    for n, R in decorrelation_matrices(model).items():
        assert torch.equal(decorrelation_matrices(resumed)[n], R), n


def test_load_with_another_layout_warns_and_never_half_restores() -> None:
    model = mlp()
    dec = Decorrelator(model, decor_lr=LR, max_overhead=None)
    train(model, dec, data(2))
    state = copy.deepcopy(dec.state_dict())
    state["R"]["2"] = torch.eye(4).expand(4, 4, 4).clone()  # saved with blocks of 4; this run has a dense 16 x 16
    del state["R"]["4"]  # and "4" was not decorrelated then
    other = mlp()
    dec2 = Decorrelator(other, decor_lr=LR, max_overhead=None)
    other.load_state_dict(model.state_dict())  # the module checkpoint: fused weights, R back to I
    expected = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.warns(UserWarning, match=r"no R of matching layout for \['2', '4'\]; these layers keep their current"):
        dec2.load_state_dict(state)
    torch.testing.assert_close(other[0].decor_R, model[0].decor_R)  # restored
    torch.testing.assert_close(other[0].weight, model[0].weight)  # the raw W beside it
    for name in ("2", "4"):  # kept: R = I with the fused weight it loaded
        assert torch.equal(other.get_submodule(name).decor_R, torch.eye(other.get_submodule(name).decor_R.shape[0]))
        torch.testing.assert_close(other.get_submodule(name).weight, expected[f"{name}.weight"], rtol=0, atol=0)
    x = data(1)[0][0]
    with torch.no_grad():  # the function of the checkpoint, whichever layers were restored
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "changed, match",
    [
        (dict(exclude=["4"]), r"`exclude` is \['4'\] here and was None in the checkpoint\. Resume with exclude=None"),
        (dict(block_size=4), r"`block_size` is 4 here and was None in the checkpoint"),
        (dict(max_overhead=0.2), r"`max_overhead` is 0\.2 here and was 100\.0 in the checkpoint"),
        (dict(update_every=2), r"`update_every` is 2 here and was 1 in the checkpoint"),
        (dict(sample_fraction=0.5), r"`sample_fraction` is 0\.5 here and was 0\.1 in the checkpoint"),
    ],
)
def test_resume_with_other_arguments_that_shape_the_plan_is_refused(changed: dict, match: str) -> None:
    model = mlp()
    dec = Decorrelator(model, max_overhead=100.0)
    train(model, dec, data(plain_steps() + 1))
    state = copy.deepcopy(dec.state_dict())
    other = mlp()
    dec2 = Decorrelator(other, **{"max_overhead": 100.0, **changed})
    before = {n: t.clone() for n, t in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"Expected the arguments that shaped the checkpoint's plan, but " + match):
        dec2.load_state_dict(state)
    assert all(torch.equal(t, before[n]) for n, t in other.state_dict().items())  # nothing written
    # arguments that do not shape the plan may change
    dec3 = Decorrelator(mlp(), max_overhead=100.0, decor_lr=1e-3, kappa=0.1)
    dec3.load_state_dict(state)
    assert dec3.plan is not None and dec3.plan.layouts() == dec.plan.layouts() and dec3.updates == 1


def test_fold_hands_back_a_plain_model_with_the_same_function() -> None:
    model = mlp()
    dec = Decorrelator(model, decor_lr=LR, max_overhead=None)
    train(model, dec, data(3))
    x = data(1)[0][0]
    with torch.no_grad():
        expected = model(x)
    assert sorted(dec.fold()) == ["0", "2", "4"]
    assert all(type(m) in (nn.Linear, nn.Tanh, nn.Sequential) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


def test_engine_does_not_import_lightning() -> None:
    code = (
        "import sys, torch\n"
        "from lightning_decor import Decorrelator\n"
        "import lightning_decor.functional, lightning_decor.layers, lightning_decor.plan\n"
        "m = torch.nn.Linear(4, 2); d = Decorrelator(m, max_overhead=None)\n"
        "m(torch.randn(8, 4)).sum().backward(); d.step()\n"
        "assert d.updates == 1\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_engine_errors() -> None:
    with pytest.raises(TypeError, match=r"Expected `model` to be a torch.nn.Module, but got str"):
        Decorrelator("net")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Expected `update_every` to be >= 1, but got 0"):
        Decorrelator(nn.Linear(2, 2), update_every=0)
    with pytest.raises(ValueError, match=r"Expected `kappa` in \[0, 1\], but got 2"):
        Decorrelator(nn.Linear(2, 2), kappa=2)
    choices = r"\('none', 'trace', 'spectral', 'layer'\)"
    with pytest.raises(ValueError, match=rf"Expected `normalize` in {choices}, but got 'L2'"):
        Decorrelator(nn.Linear(2, 2), normalize="L2")
    with pytest.raises(TypeError, match=r"Expected `config` to be a DecorConfig, but got dict"):
        Decorrelator.from_config(nn.Linear(2, 2), {"decor_lr": 0.1})  # type: ignore[arg-type]


def test_r_stays_bounded_on_a_rank_deficient_input() -> None:
    """Three equal copies of 4 features (a grayscale image fed as RGB): the rule alone grows R's null-space part
    without bound (tests/test_functional.py measures it); the engine resets it every NULL_RESET_EVERY updates."""
    from lightning_decor.update import NULL_RESET_EVERY

    torch.manual_seed(0)
    layer = nn.Linear(12, 3)
    dec = Decorrelator(layer, decor_lr=3e-2, kappa=0.5, sample_fraction=1.0, max_rows=None, max_overhead=None)
    g = torch.Generator().manual_seed(2)
    mixing = torch.eye(4) + 0.3 * torch.randn(4, 4, generator=g)
    for _ in range(30 * NULL_RESET_EVERY):
        u = torch.randn(256, 4, generator=g) @ mixing
        layer(torch.cat([u, u, u], 1)).sum().backward()
        dec.step()
        layer.zero_grad()
    assert dec.updates == 30 * NULL_RESET_EVERY
    R = layer.decor_R
    assert torch.isfinite(R).all() and R.norm() < 30  # without the reset: 9.4e3 after 600 steps
    # R still decorrelates the input's range: the decorrelated copies' loss is at its floor (unit variance for all
    # twelve is out of reach on a rank-4 input; the rule alone reaches 0.028 there)
    u = torch.randn(2048, 4, generator=g) @ mixing
    assert functional.decorrelation_loss(torch.cat([u, u, u], 1) @ R.T, 0.5).item() < 0.05


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """W @ R of every layer as the model computes with it (a plain layer's own weight)."""
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}


def test_the_function_never_jumps_when_the_plan_is_made_again() -> None:
    # A fake clock on which every decorrelated layer costs 80 ms more than the probe says (30 ms): the check remakes
    # the plan, which drops layers. R is the identity at every plan change, so the effective weights W R move by the
    # optimizer step alone, no more than at any other step.
    model = mlp()
    dec = Decorrelator(model, max_overhead=0.1)
    planner = dec.planner
    assert planner is not None
    clock = {"now": 0.0}
    planner.clock = lambda: clock["now"]
    planner.device_costs = lambda: plan_module.Costs(0.0, 0.0)
    planner.probe = lambda shapes, inputs, estimates, **kw: {
        n: [("fused", 0.03)] * len(e) for n, e in estimates.items()
    }
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    changes, normal, plans = [], [], []
    for x, y in data(plain_steps() + 6):
        before, plan = effective_weights(model), dec.plan
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        clock["now"] += 1.0 + 0.08 * len(dec.layers) * (dec.plan is not None)
        dec.step()
        opt.step()
        after = effective_weights(model)
        moved = max((after[k] - before[k]).abs().max().item() for k in before)
        (changes if dec.plan is not plan else normal).append(moved)
        if dec.plan is not plan:
            plans.append(dec.plan)
    assert len(plans) == 2 and len(dec.layers) < 3 and dec.updates == 6  # planned, made again, and R moved
    assert max(changes) <= max(normal)


def test_a_pinned_plan_file_gives_its_layouts_and_bad_ones_are_refused(tmp_path: Path) -> None:
    model = mlp()
    dec = Decorrelator(model, max_overhead=100.0)
    train(model, dec, data(plain_steps() + 1))
    assert dec.plan is not None
    layouts = {"0": ("fused", 4), "2": ("input", 16), "4": ("plain", 0)}
    pinned = Plan({n: replace(p, form=layouts[n][0], block=layouts[n][1]) for n, p in dec.plan.layers.items()})
    for suffix in (".json", ".yaml"):
        path = tmp_path / f"plan{suffix}"
        pinned.save(path)
        assert Plan.load(path).layouts() == pinned.layouts()
        other = mlp()
        dec2 = Decorrelator(other, plan=path, max_overhead=None)  # pinned: no budget needed
        train(other, dec2, data(plain_steps() + 2))
        assert dec2.plan is not None and dec2.plan.source == "pinned" and dec2.plan.layouts() == pinned.layouts()
        assert other[0].decor_R.shape == (2, 4, 4) and other[2].decor_form == "input" and type(other[4]) is nn.Linear
        assert dec2.updates == 2
    bad = Plan({n: p for n, p in pinned.layers.items() if n != "4"})
    with pytest.raises(ValueError, match=r"Expected `plan` to name exactly the decorrelated layers, but it names \[\] "
                       r"that are not decorrelated and lacks \['4'\]"):  # fmt: skip
        Decorrelator(mlp(), plan=bad)
    with pytest.raises(ValueError, match=r"Expected `plan`'s entry for '0' to fit the layer: Expected `block` to "
                       r"divide d = 8 into equal blocks"):  # fmt: skip
        Decorrelator(mlp(), plan=Plan({**pinned.layers, "0": replace(pinned.layers["0"], block=3)}))
    with pytest.raises(ValueError, match=r"Expected `plan`'s entry for '2' to fit the layer \(d, C_out, groups\) = "
                       r"\(16, 8, 1\), but got \(12, 8, 1\)"):  # fmt: skip
        Decorrelator(mlp(), plan=Plan({**pinned.layers, "2": replace(pinned.layers["2"], d=12)}))
    with pytest.raises(TypeError, match=r"Expected `plan` to be 'auto', a Plan or the path of a plan file, but got "
                       r"int: 3"):  # fmt: skip
        Decorrelator(mlp(), plan=3)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"Expected `plan` to be 'auto', a Plan or a plan file, but '.*nope"
                       r"\.json' is no file"):  # fmt: skip
        Decorrelator(mlp(), plan=tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text('{"layers": 3}')
    with pytest.raises(ValueError, match=r"Expected a plan file written by Plan.save, but '.*junk\.json' is not one"):
        Plan.load(tmp_path / "junk.json")
    with pytest.raises(ValueError, match=r"Expected the arguments that shaped the checkpoint's plan, but `plan` is a "
                       r"pinned plan here and was 'auto' in the checkpoint"):  # fmt: skip
        Decorrelator(mlp(), plan=tmp_path / "plan.json", max_overhead=100.0).load_state_dict(dec.state_dict())


def test_a_plan_that_leaves_every_layer_plain_is_saved_and_restored() -> None:
    model = mlp()
    dec = Decorrelator(model, max_overhead=1e-9)
    with pytest.warns(UserWarning, match="the plan leaves every layer plain"):
        train(model, dec, data(CALIBRATION_STEPS))
    state = dec.state_dict()
    assert state["plan"] is not None and state["R"] == {}
    other = mlp()
    dec2 = Decorrelator(other, max_overhead=1e-9)
    with pytest.warns(UserWarning, match="the plan leaves every layer plain"):  # said again at the resume
        dec2.load_state_dict(state)
    assert dec2.layers == {} and all(type(m) in (nn.Sequential, nn.Linear, nn.Tanh) for m in other.modules())
    assert dec2.plan is not None and dec2.plan.layouts() == dec.plan.layouts()  # type: ignore[union-attr]


def test_measuring_the_device_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    probe_module.measure_costs(torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)


def test_without_a_time_budget_the_memory_budget_still_shapes_r(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_decor import config as config_module

    monkeypatch.setattr(config_module, "MIN_MEMORY", 0)  # no floor: this tiny model's bytes decide
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 2))
    parameters = 4 * (64 * 8 + 8 + 8 * 2 + 2)  # 538 float32 numbers: 2152 bytes
    dec = Decorrelator(model, max_overhead=None, max_memory=12.0)
    budget = 12 * parameters  # 25824 bytes
    assert dec.memory_budget() == budget and dec.plan is not None and dec.plan.memory <= budget
    # R of 64 x 64 takes 16384 bytes, 49152 with the update's workspace; blocks of 32: 4 * 64 * 32 = 8192 bytes,
    # 8192 + 256 (the narrow layer's 8 x 8) + 2 * 8192 = 24832 with the workspace, within the budget
    assert dec.plan.layers["0"].block == 32 and dec.layers["0"].decor_R.shape == (2, 32, 32)
    assert dec.plan.layers["2"].block == 8  # the narrow layer keeps its dense R
    assert dec.plan.memory == 24832
    tight = Decorrelator(nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 2)), max_overhead=None, max_memory=4.0)
    assert tight.plan is not None and tight.plan.layers["0"].form == "plain" and list(tight.layers) == ["2"]
    free = Decorrelator(nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 2)), max_overhead=None, max_memory=None)
    assert free.plan is not None and free.plan.layers["0"].block == 64


def test_the_exchange_between_processes_is_checked() -> None:
    dec = Decorrelator(nn.Linear(4, 4), max_overhead=None)
    assert dec.exchange == "auto" and dec.exchanged is None  # one process: nothing exchanged
    dec.exchange = "moments"
    with pytest.raises(ValueError, match=r"Expected `exchange` in \('auto', 'rows', 'moments'\).* but got 'all'"):
        dec.exchange = "all"
    layered = Decorrelator(nn.Linear(4, 4), max_overhead=None, normalize="layer")
    with pytest.raises(ValueError, match=r"but got 'moments'"):
        layered.exchange = "moments"


def test_a_layer_patched_before_with_blocks_of_one_feature_keeps_them() -> None:
    from lightning_decor import decorrelate

    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2))
    decorrelate(model)
    model[0].decor_set_layout_(1, "fused")  # no ladder starts at 1 (blocks of one feature): its own block stays
    dec = Decorrelator(model, max_overhead=None)
    assert dec.plan is not None and dec.plan.layouts()["0"] == ("fused", 1) and "0" in dec.layers
