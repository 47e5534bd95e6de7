"""DecorrelationCallback inside a real Trainer.fit."""

from __future__ import annotations

import csv
import glob
import math
import warnings

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_decor import DecorrelationCallback, decorrelation_loss, decorrelation_matrices
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.planner import CALIBRATION_STEPS, plain_steps

from conftest import TinyConvModule, TinyModule, correlated_data, quiet_trainer


def first_layer_loss(model: TinyModule, R: torch.Tensor | None = None) -> float:
    x = correlated_data().tensors[0]
    R = torch.eye(x.shape[1]) if R is None else R
    return decorrelation_loss(x @ R.T, kappa=0.5).item()


def test_fit_moves_r_and_lowers_the_decorrelation_loss(tmp_path) -> None:
    model = TinyModule()
    cb = DecorrelationCallback(decor_lr=0.02, sample_fraction=1.0, fold_on_fit_end=False, max_overhead=None)
    quiet_trainer(tmp_path, max_epochs=5, callbacks=[cb]).fit(model)
    Rs = decorrelation_matrices(model)
    assert set(Rs) == {"net.0", "net.2"}
    assert cb.updates == 5 * 8  # 256 samples / batch 32, 5 epochs: once per optimizer step
    R = Rs["net.0"]
    assert (R - torch.eye(8)).abs().max() > 0.05  # measured 0.29
    assert first_layer_loss(model, R) < 0.5 * first_layer_loss(model)  # measured 0.024 against 7.7


def test_conv_model_trains_and_is_folded_at_fit_end(tmp_path) -> None:
    model = TinyConvModule()
    # A budget everything fits in (the plan of a tiny model otherwise depends on the machine's timing).
    cb = DecorrelationCallback(decor_lr=0.01, sample_fraction=0.5, max_overhead=100.0)
    quiet_trainer(tmp_path, max_epochs=6, callbacks=[cb]).fit(model)
    assert cb.updates == 24 - plain_steps()  # R moves after the planning steps
    assert not any(isinstance(m, DecorrelatedLayer) for m in model.modules())  # plain model handed back
    assert type(model.net[0]) is nn.Conv2d
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_decor_loss_reaches_csv_and_tensorboard(tmp_path) -> None:
    model = TinyModule()
    cb = DecorrelationCallback(log_per_layer=True, max_overhead=None)  # no plan: R moves from the first step
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb], logger=loggers, log_every_n_steps=2).fit(model)
    text = open(glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))[0]).read()
    header = text.splitlines()[0].split(",")
    assert {"decor/loss", "decor/net.0", "decor/net.2", "decor/skipped"} <= set(header)
    col = header.index("decor/loss")
    values = [float(r.split(",")[col]) for r in text.splitlines()[1:] if r.split(",")[col]]
    assert len(values) == 8 and all(math.isfinite(v) and v > 0 for v in values)  # 16 steps, every 2nd

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(str(tmp_path / "tb" / "*"))[0])
    acc.Reload()
    assert {"decor/loss", "decor/net.0"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("decor/loss")) == 8


def test_gradient_accumulation_updates_once_per_optimizer_step(tmp_path) -> None:
    model = TinyModule()
    seen: list[int] = []

    class Spy(DecorrelationCallback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            # the rows waiting when the update is queued from them (on a GPU, beside the optimizer step)
            seen.append(self.engine.layers["net.0"].decor_buffer.pending_count)
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    cb = Spy(sample_fraction=1.0, fold_on_fit_end=False, max_overhead=None)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[cb], accumulate_grad_batches=4)
    trainer.fit(model)
    assert trainer.global_step == 2 and cb.updates == 2
    assert seen == [4 * 32, 4 * 32]  # rows of all four micro-batches pooled into each update
    assert cb.engine.layers["net.0"].decor_buffer.pending_count == 0  # and taken by it


def test_setup_twice_and_fit_twice_are_harmless(tmp_path) -> None:
    model = TinyModule()
    cb = DecorrelationCallback(fold_on_fit_end=False, max_overhead=None)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[cb])
    cb.setup(trainer, model, "fit")
    cb.setup(trainer, model, "fit")
    assert sorted(n for n, _ in cb.layers()) == ["net.0", "net.2"]
    layer, engine = model.net[0], cb.engine
    trainer.fit(model)
    assert model.net[0] is layer and cb.engine is engine  # not re-patched, one engine
    R_after_first = decorrelation_matrices(model)["net.0"].clone()
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(model)
    assert cb.updates == 16
    assert not torch.equal(decorrelation_matrices(model)["net.0"], R_after_first)  # R continued from its state
    trainer.validate(model, verbose=False)


def test_checkpoint_loads_into_plain_module(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = TinyModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = DecorrelationCallback(decor_lr=0.02, fold_on_fit_end=False)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb, ckpt], enable_checkpointing=True)
    trainer.fit(model)
    model.eval()
    x = correlated_data(16, seed=3).tensors[0]
    expected = model(x).detach()
    plain = TinyModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # strict, plain nn.Linear
    assert type(plain.net[0]) is nn.Linear
    plain.eval()
    # the saved fused weight is the one the patched layer computes with, in the same float32 kernels: equal bitwise in
    # every setting measured (1, 2 and 4 threads, MKL's SSE4.2 path)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)
    torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)


def test_no_eligible_layer_warns_and_trains(tmp_path) -> None:
    model = TinyModule()
    cb = DecorrelationCallback(include=["nothing"])
    with pytest.warns(
        UserWarning,
        match=r"`include` pattern 'nothing' matches no eligible layer\. Eligible layers: "
        r"\['net.0', 'net.2'\]",
    ):
        with pytest.warns(UserWarning, match="found no layer to decorrelate"):
            quiet_trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(model)
    assert cb.updates == 0


def test_nan_batch_is_skipped_with_a_warning(tmp_path) -> None:
    class NanModule(TinyModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:  # a forward on a corrupted copy: its rows reach the statistics, not the loss
                x = batch[0].clone()
                x[:, 0] = float("nan")  # every row: whichever rows are drawn, the statistics see a NaN
                self(x)
            return super().training_step(batch, batch_idx)

    model = NanModule()
    cb = DecorrelationCallback(fold_on_fit_end=False, max_overhead=None)  # R moves from the first step
    with pytest.warns(
        UserWarning,
        match=r"skipped 2 decorrelation update\(s\) that would have made R non-finite .*Layers: \[.net.0., .net.2.\]",
    ):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[cb], log_every_n_steps=1).fit(model)
    for R in decorrelation_matrices(model).values():
        assert torch.isfinite(R).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"decor_lr": 0.0}, ValueError, r"Expected `decor_lr` to be a finite number > 0, but got 0.0"),
        ({"decor_lr": float("nan")}, ValueError, r"Expected `decor_lr` to be a finite number > 0, but got nan"),
        ({"decor_lr": float("inf")}, ValueError, r"Expected `decor_lr` to be a finite number > 0, but got inf"),
        ({"decor_lr": "1e-3"}, TypeError, r"Expected `decor_lr` to be a float, but got str: '1e-3'"),
        ({"kappa": 1.5}, ValueError, r"Expected `kappa` in \[0, 1\], but got 1.5"),
        ({"kappa": float("nan")}, ValueError, r"Expected `kappa` in \[0, 1\], but got nan"),
        ({"kappa": [0.5]}, TypeError, r"Expected `kappa` to be a float, but got list: \[0.5\]"),
        (
            {"normalize": "l2"},
            ValueError,
            r"Expected `normalize` in \('none', 'trace', 'spectral', 'layer'\), but got 'l2'",
        ),
        (
            {"normalize": None},
            ValueError,
            r"Expected `normalize` in \('none', 'trace', 'spectral', 'layer'\), but got None",
        ),
        ({"sample_fraction": 0.0}, ValueError, r"Expected `sample_fraction` in \(0, 1\], but got 0.0"),
        ({"sample_fraction": 1.2}, ValueError, r"Expected `sample_fraction` in \(0, 1\], but got 1.2"),
        ({"max_rows": 0}, ValueError, r"Expected `max_rows` to be >= 1 or None, but got 0"),
        ({"max_rows": 2.5}, TypeError, r"Expected `max_rows` to be an int or None, but got float: 2.5"),
        ({"include": "fc"}, TypeError, r"Expected `include` to be a list of name patterns \(str\), but got 'fc'"),
        ({"exclude": [3]}, TypeError, r"Expected `exclude` to be a list of name patterns \(str\), but got \[3\]"),
        ({"log_per_layer": 1}, TypeError, r"Expected `log_per_layer` to be a bool, but got int: 1"),
        ({"use_cuda_stream": "yes"}, TypeError, r"Expected `use_cuda_stream` to be a bool, but got str: 'yes'"),
        ({"fold_on_fit_end": None}, TypeError, r"Expected `fold_on_fit_end` to be a bool, but got NoneType: None"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DecorrelationCallback(**kwargs)


def test_max_features_leaves_wide_layers_plain_with_a_warning(tmp_path) -> None:
    model = TinyModule(hidden=16)
    cb = DecorrelationCallback(max_features=10, fold_on_fit_end=False, max_overhead=None)
    with pytest.warns(
        UserWarning,
        match=r"leaves these layers plain: \{'net.2': 'd = 16 > max_features = 10 .*"
        r"raise `max_features` to include it'\}",
    ):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(model)
    assert sorted(decorrelation_matrices(model)) == ["net.0"]
    with pytest.raises(ValueError, match=r"Expected `max_features` to be >= 1 or None, but got -3"):
        DecorrelationCallback(max_features=-3)
    with pytest.raises(TypeError, match=r"Expected `max_features` to be an int or None, but got str: '8'"):
        DecorrelationCallback(max_features="8")  # type: ignore[arg-type]


def test_update_every_k_steps_samples_and_updates_only_those_steps(tmp_path) -> None:
    seen: list[tuple[int, int, int]] = []

    class Spy(DecorrelationCallback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.rows = self.engine.layers["net.0"].decor_buffer.pending_count  # before the update is queued from them
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

        def update_(self, pl_module):
            before = self.updates
            super().update_(pl_module)
            seen.append((pl_module.trainer.global_step, self.rows, self.updates - before))

    model = TinyModule()
    cb = Spy(update_every=3, sample_fraction=1.0, fold_on_fit_end=False, max_overhead=None)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[cb])
    trainer.fit(model)
    assert trainer.global_step == 8
    # R moves at the end of steps 1, 4, 7 (global_step counts the step just taken), from the rows of that step's
    # batch only; no rows are sampled on the other steps
    assert seen == [(step, 32, 1) if step % 3 == 1 else (step, 0, 0) for step in range(1, 9)]
    with pytest.raises(ValueError, match=r"Expected `update_every` to be >= 1, but got 0"):
        DecorrelationCallback(update_every=0)
    with pytest.raises(TypeError, match=r"Expected `update_every` to be an int, but got NoneType: None"):
        DecorrelationCallback(update_every=None)  # type: ignore[arg-type]


def test_block_size_gives_block_diagonal_r(tmp_path) -> None:
    model = TinyModule(d=8, hidden=16)
    cb = DecorrelationCallback(block_size=4, decor_lr=0.02, fold_on_fit_end=False, max_overhead=None)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model)
    Rs = decorrelation_matrices(model)
    assert Rs["net.0"].shape == (2, 4, 4) and Rs["net.2"].shape == (4, 4, 4)
    assert not torch.equal(Rs["net.0"][0], torch.eye(4))
    with pytest.raises(ValueError, match=r"Expected `block_size` to be >= 1 or None, but got 0"):
        DecorrelationCallback(block_size=0)


class AuxModule(TinyModule):
    """An auxiliary head used on even batches only: its layer has no rows on odd steps."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(8, 2)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx % 2 == 0:
            loss = loss + self.aux(batch[0]).pow(2).mean()
        return loss


def read_csv_metric(tmp_path, key: str) -> list[float]:
    import csv

    (path,) = glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))
    with open(path) as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def test_decor_loss_is_the_mean_over_layers_with_rows_and_steps(tmp_path) -> None:
    per_step: list[torch.Tensor] = []

    class Spy(DecorrelationCallback):
        def update_(self, pl_module):
            super().update_(pl_module)
            per_step.append(self.engine.last_losses.clone())

    cb = Spy(log_per_layer=True, fold_on_fit_end=False, max_overhead=None)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[cb], logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=2
                  ).fit(AuxModule())  # fmt: skip
    assert all(torch.isnan(v[2]) for v in per_step[1::2])  # the aux layer had no rows on odd steps
    logged = read_csv_metric(tmp_path, "decor/loss")
    assert len(logged) == 4
    # independent reference: mean of the finite per-layer losses of 2 steps, in float32 summed in another order than
    # the metric's: measured relative error 1e-7 (1e-5 leaves 100x)
    for i, value in enumerate(logged):
        window = torch.cat(per_step[2 * i : 2 * i + 2])
        assert value == pytest.approx(window[torch.isfinite(window)].mean().item(), rel=1e-5)


def test_update_every_still_logs(tmp_path) -> None:
    cb = DecorrelationCallback(update_every=2, fold_on_fit_end=False, max_overhead=None)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb], logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=2
                  ).fit(TinyModule())  # fmt: skip
    assert cb.updates == 8 and len(read_csv_metric(tmp_path, "decor/loss")) == 8


class RawOptimizerSteps(TinyModule):
    """Manual optimisation stepping the raw torch optimizer, which Lightning (and so the callback) never sees."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.pending: list[int] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers().optimizer  # type: ignore[union-attr]  # the plain torch.optim.SGD
        opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(batch[0]), batch[1]))
        opt.step()
        self.pending.append(self.net[0].decor_buffer.pending_count)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(correlated_data(), batch_size=4, shuffle=True)  # 64 batches of 4 rows per epoch


def test_rows_waiting_for_steps_that_bypass_lightning_stay_bounded(tmp_path) -> None:
    model = RawOptimizerSteps()
    cb = DecorrelationCallback(sample_fraction=1.0, max_rows=None, fold_on_fit_end=False, max_overhead=None)
    with pytest.warns(UserWarning, match=r"layers \['net.0', 'net.2'\] captured more than 64 forwards' worth"):
        quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model)
    assert cb.updates == 0  # R never moves: no step went through Lightning
    assert len(model.pending) == 128 and max(model.pending) == 64 * 4  # 512 rows captured, at most 256 kept
    assert model.pending[:64] == [4 * (i + 1) for i in range(64)]  # every row kept up to 64 forwards' worth
    assert model.net[0].decor_buffer.pending_count == 0  # released at fit end


class TwoOptimizersManual(TinyModule):
    """Manual optimisation with two optimizers stepping through Lightning each batch: `trainer.global_step` advances
    twice per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.critic = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        opt_net, opt_critic = self.optimizers()  # type: ignore[misc]
        x, y = batch
        opt_net.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        opt_net.step()
        opt_critic.zero_grad()
        self.manual_backward(self.critic(self(x).detach()).pow(2).mean())
        opt_critic.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05), torch.optim.SGD(self.critic.parameters(), lr=0.05)


def test_update_every_and_logging_count_batches_not_optimizer_steps(tmp_path) -> None:
    updated: list[int] = []
    losses: list[torch.Tensor] = []

    class Spy(DecorrelationCallback):
        def update_(self, pl_module):
            before = self.updates
            super().update_(pl_module)
            if self.updates > before:
                updated.append(pl_module.trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1)  # batch index
                losses.append(self.engine.last_losses.clone())

    cb = Spy(update_every=2, fold_on_fit_end=False, max_overhead=None)
    trainer = quiet_trainer(tmp_path, callbacks=[cb], logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=4)
    trainer.fit(TwoOptimizersManual())
    assert trainer.global_step == 16  # two optimizer steps in each of the 8 batches
    assert updated == [0, 2, 4, 6] and cb.updates == 4  # every 2nd batch, not every 2nd optimizer step
    # Lightning writes step metrics after every 4th batch (steps 3 and 7): each written decor/loss is the mean over the
    # updates since the last write, here two, of the finite per-layer losses (float32 means in another order: 1e-7)
    import csv

    (path,) = glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))
    with open(path) as f:
        written = [(int(r["step"]), float(r["decor/loss"])) for r in csv.DictReader(f) if r.get("decor/loss")]
    assert [step for step, _ in written] == [3, 7]
    for (_, value), pair in zip(written, (losses[:2], losses[2:]), strict=True):
        window = torch.cat(pair)
        assert value == pytest.approx(window[torch.isfinite(window)].mean().item(), rel=1e-5)


class DirectWeight(TinyModule):
    """Reads a layer's `.weight` directly (as some attention code does) besides calling its MLP normally, and has an
    auxiliary head unused in the first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.aux = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.tanh(nn.functional.linear(x, self.proj.weight, self.proj.bias)))

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + (self.aux(batch[0]).pow(2).mean() if batch_idx > 0 else 0.0)


def test_a_weight_read_directly_is_named_in_a_warning(tmp_path) -> None:
    match = r"the weights of \['proj'\] received a gradient in the first training batch, but their forward was not"
    with pytest.warns(UserWarning, match=match):  # with the cost plan: the first batch is a measured plain one
        quiet_trainer(tmp_path, callbacks=[DecorrelationCallback()]).fit(DirectWeight())
    cb = DecorrelationCallback(fold_on_fit_end=False, max_overhead=None)
    with pytest.warns(UserWarning, match=match) as record:
        quiet_trainer(tmp_path, callbacks=[cb]).fit(DirectWeight())
    assert sum("received a gradient" in str(w.message) for w in record) == 1  # once, naming only that layer
    assert sorted(n for n, _ in cb.layers()) == ["aux", "net.0", "net.2", "proj"]  # all patched; proj is misused
    with warnings.catch_warnings():  # a model that calls its layers, fitted again with stale gradients: no warning
        warnings.filterwarnings("error", message=".*received a gradient")
        model = TinyModule()
        quiet_trainer(tmp_path, callbacks=[cb]).fit(model)
        quiet_trainer(tmp_path, callbacks=[cb]).fit(model)


def test_overhead_is_logged_at_the_check_and_shown_in_the_plan_table(tmp_path, caplog) -> None:
    cb = DecorrelationCallback(max_overhead=100.0)  # a budget everything fits in: one check, the plan kept
    logger = CSVLogger(tmp_path, name="csv")
    with caplog.at_level("INFO"):
        quiet_trainer(tmp_path, max_epochs=3, callbacks=[cb], logger=logger, log_every_n_steps=50).fit(TinyModule())
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "csv" / "*" / "metrics.csv"))[0])))
    overhead = [(int(r["step"]), float(r["decor/overhead"])) for r in rows if r.get("decor/overhead")]
    assert len(overhead) == 1  # measured once (the check kept the plan), at that step, whatever log_every_n_steps
    step, share = overhead[0]
    assert step == 11 and share == pytest.approx(cb.engine.overhead) and share == cb.plan.measured_overhead
    assert f"measured DBP cost {share:.1%} of the plain step" in caplog.text
    assert caplog.text.count("Decorrelation plan (") == 2  # the table at the plan, its head line after the check


class ScaledLinear(nn.Linear):
    """A subclass with a forward of its own: left plain."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class MixedModule(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), ScaledLinear(16, 16), nn.Tanh(), nn.Linear(16, 16),
                                 nn.Tanh(), nn.Linear(16, 2))  # fmt: skip
        self.net[4].requires_grad_(False)


def test_the_plan_table_lists_the_layers_left_plain_with_why(tmp_path, caplog) -> None:
    cb = DecorrelationCallback(max_overhead=100.0, exclude=["net.6"])
    with caplog.at_level("INFO"), pytest.warns(UserWarning, match="leaves these layers plain"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(MixedModule())
    table = caplog.text[caplog.text.index("Decorrelation plan (") :]
    rows = {line.split()[0]: line for line in table.splitlines()[2:6]}
    assert set(rows) == {"net.0", "net.2", "net.4", "net.6"}
    assert "(a subclass of nn.Linear (test_callback.ScaledLinear): its forward may compute otherwise" in rows["net.2"]
    assert "plain" in rows["net.4"] and "(frozen (weight.requires_grad is False))" in rows["net.4"]
    assert rows["net.6"].endswith("(left out by `include` / `exclude`)")
    assert cb.engine is not None and set(cb.engine.left_plain) == {"net.2", "net.4", "net.6"}


def test_a_pinned_plan_file_from_an_earlier_run(tmp_path) -> None:
    cb = DecorrelationCallback(max_overhead=100.0, fold_on_fit_end=False)
    quiet_trainer(tmp_path, max_epochs=3, callbacks=[cb]).fit(TinyModule())
    path = tmp_path / "plan.yaml"
    cb.plan.save(path)
    pinned = DecorrelationCallback(plan=str(path), fold_on_fit_end=False)
    assert pinned.plan is not None and pinned.plan.layouts() == cb.plan.layouts()  # read at once
    model = TinyModule()
    quiet_trainer(tmp_path, max_epochs=3, callbacks=[pinned]).fit(model)
    assert pinned.plan.source == "pinned" and pinned.plan.layouts() == cb.plan.layouts()
    assert pinned.updates == 24 - plain_steps()
    with pytest.raises(FileNotFoundError, match=r"Expected `plan` to be 'auto', a Plan or a plan file"):
        DecorrelationCallback(plan=str(tmp_path / "missing.yaml"))


def test_a_checkpoint_of_an_all_plain_plan_resumes_without_planning_again(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = DecorrelationCallback(max_overhead=1e-9)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.warns(UserWarning, match="the plan leaves every layer plain"):
        quiet_trainer(tmp_path, callbacks=[cb, ckpt], enable_checkpointing=True).fit(TinyModule())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]["DecorrelationCallback"]
    assert state["plan"] is not None and state["R"] == {}
    resumed = DecorrelationCallback(max_overhead=1e-9)
    with pytest.warns(UserWarning, match="the plan leaves every layer plain"):
        trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[resumed])
        trainer.fit(TinyModule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.plan is not None and resumed.plan.layouts() == cb.plan.layouts() and resumed.updates == 0
    assert resumed.engine is not None and resumed.engine.planner is not None
    assert resumed.engine.planner.calls == CALIBRATION_STEPS  # restored: it did not measure again
