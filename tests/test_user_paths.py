"""The paths users take that gave silently wrong results (issue 20), each against plain PyTorch or an explicit
reference: old-style weight/spectral norm, layers frozen during training, an EMA kept inside the module, a
sub-network in eval() during training, monitoring ``decor/loss``, the arguments' types, lazy layers, bf16 autocast."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, EarlyStopping, ModelCheckpoint
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lightning_decor import DecorrelationCallback, Decorrelator, decorrelate, decorrelation_matrices, fold
from lightning_decor.functional import decorrelate_rows, fuse_weight
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.patching import eligible_layers

from conftest import TinyModule, quiet_trainer


def callback(**kwargs) -> DecorrelationCallback:
    """R moves from the first step (no plan), every row kept, R readable after fit, a large rate."""
    return DecorrelationCallback(**{"decor_lr": 0.05, "sample_fraction": 1.0, "max_overhead": None,
                                    "fold_on_fit_end": False, **kwargs})  # fmt: skip


def eye_like(R: torch.Tensor) -> torch.Tensor:
    return torch.eye(R.shape[-1]).expand_as(R)


# ------------------------------------------------------------------------------------------ old-style weight norm
class NormedModule(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            torch.nn.utils.weight_norm(nn.Linear(8, 16)), nn.Tanh(), torch.nn.utils.spectral_norm(nn.Linear(16, 16)),
            nn.Tanh(), nn.Linear(16, 2),
        )  # fmt: skip


def test_old_style_weight_and_spectral_norm_layers_stay_plain_with_the_reason(tmp_path) -> None:
    model = NormedModule()
    reasons = eligible_layers(model)
    assert "recomputed before every forward by torch.nn.utils.weight_norm (old-style)" in reasons["net.0"]
    assert "recomputed before every forward by torch.nn.utils.spectral_norm (old-style)" in reasons["net.2"]
    assert reasons["net.4"] is None
    cb = callback()
    with pytest.warns(UserWarning, match=r"leaves these layers plain: .*'net.0': 'its weight is recomputed"):
        quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model)
    assert set(decorrelation_matrices(model)) == {"net.4"}
    g0 = model.net[0].weight_g.detach().clone()
    x = torch.randn(16, 8)
    model.eval()
    with torch.no_grad():
        before = model(x)
    fold(model)  # folding changes nothing for the normed layers (it wrote W R into the tensor the hook overwrites)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    assert torch.equal(model.net[0].weight_g, g0) and isinstance(model.net[0].weight_v, nn.Parameter)


# ------------------------------------------------------------------------------------------ frozen during training
class FreezeAt(pl.Callback):
    """Freezes ``net.0`` at the start of epoch ``freeze`` and unfreezes it at epoch ``thaw``; records its effective
    weight (the state_dict's ``W @ R``) and ``R`` at every epoch end."""

    def __init__(self, freeze: int, thaw: int) -> None:
        self.freeze, self.thaw, self.seen = freeze, thaw, []

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch in (self.freeze, self.thaw):
            pl_module.net[0].requires_grad_(trainer.current_epoch == self.thaw)

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append((pl_module.state_dict()["net.0.weight"].clone(), pl_module.net[0].decor_R.clone()))


def test_a_layer_frozen_during_training_keeps_its_function_and_moves_again_when_unfrozen(tmp_path) -> None:
    freezer = FreezeAt(freeze=1, thaw=3)
    quiet_trainer(tmp_path, max_epochs=4, callbacks=[callback(), freezer]).fit(TinyModule())
    (w0, r0), (w1, r1), (w2, r2), (w3, r3) = freezer.seen
    assert not torch.equal(r0, eye_like(r0))  # R moved while it trained
    assert torch.equal(w1, w0) and torch.equal(w2, w0) and torch.equal(r2, r0)  # frozen: the same function, bitwise
    assert not torch.equal(r3, r2) and not torch.equal(w3, w2)  # unfrozen: it trains, and R moves again


class Finetune(BaseFinetuning):
    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 2:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer)


class FinetunedModule(TinyModule):
    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=self.hparams.lr)


def test_base_finetuning_listed_after_the_callback_freezes_and_thaws_decorrelation(tmp_path) -> None:
    model = FinetunedModule()
    seen = FreezeAt(freeze=-1, thaw=-1)  # records only
    quiet_trainer(tmp_path, max_epochs=4, callbacks=[callback(), Finetune(), seen]).fit(model)
    (w0, r0), (w1, r1), _, (w3, r3) = seen.seen
    assert torch.equal(r0, eye_like(r0)) and torch.equal(r1, r0) and torch.equal(w1, w0)  # frozen from the start
    assert not torch.equal(r3, r1)  # DBP starts when BaseFinetuning unfreezes it
    assert not torch.equal(model.net[2].decor_R, eye_like(model.net[2].decor_R))  # the head trained all along


# ------------------------------------------------------------------------------------------ an EMA inside the module
class EMAModule(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.9))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.update_parameters(self.net)


class ExplicitEMA(pl.Callback):
    """An EMA (decay 0.9) of the fused weights W R the network computes with, written out (after the decorrelation
    callback in the list, so it sees the R of the same step the module's own hook averages)."""

    def __init__(self) -> None:
        self.ema: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        fused = {}
        for name, m in pl_module.net.named_modules():
            if isinstance(m, nn.Linear):
                R = m.decor_R.double() if isinstance(m, DecorrelatedLayer) else torch.eye(m.in_features).double()
                fused[name] = m.weight.detach().double() @ R
        self.ema = fused if self.ema is None else {n: 0.9 * self.ema[n] + 0.1 * fused[n] for n in fused}


def test_an_averaged_model_inside_the_module_averages_the_trained_functions(tmp_path) -> None:
    model, reference = EMAModule(), ExplicitEMA()
    reasons = eligible_layers(model)
    assert reasons["ema.module.0"] == "inside the torch.optim.swa_utils.AveragedModel 'ema' (an average, not trained)"
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback(), reference]).fit(model)
    assert set(decorrelation_matrices(model)) == {"net.0", "net.2"}  # the average's copy is plain
    assert reference.ema is not None and not torch.equal(model.net[0].decor_R, eye_like(model.net[0].decor_R))
    for name in ("0", "2"):
        averaged = model.ema.module.get_submodule(name)
        assert type(averaged) is nn.Linear
        torch.testing.assert_close(averaged.weight.double(), reference.ema[name], rtol=0, atol=1e-6)
    fold(model)  # after fold the plain update is back: the model's weights are W R
    assert "update_parameters" not in vars(model.ema)


# ------------------------------------------------------------------------------------------ eval sub-network
class FrozenStatistics(TinyModule):
    """A BatchNorm backbone kept in eval() during training (frozen statistics), its weights still training."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        self.net[:3].eval()
        return super().training_step(batch, batch_idx)


def test_a_sub_network_in_eval_during_training_is_decorrelated(tmp_path, recwarn) -> None:
    model = FrozenStatistics()
    cb = callback()
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model)
    assert not any("forward was not called" in str(w.message) for w in recwarn)
    assert cb.updates == 16
    R = model.net[0].decor_R
    assert not torch.equal(R, eye_like(R))


# ------------------------------------------------------------------------------------------ monitoring decor/loss
@pytest.mark.parametrize("logger", [False, True], ids=["no-logger", "csv"])
def test_decor_loss_is_monitorable_like_any_logged_metric(tmp_path, logger: bool) -> None:
    stop = EarlyStopping(monitor="decor/loss", patience=100, check_on_train_epoch_end=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="decor/loss", save_top_k=1)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[callback(), stop, ckpt],
        logger=logger,
        log_every_n_steps=50,
        enable_checkpointing=True,
    )  # fmt: skip (50 > 8 steps an epoch)
    trainer.fit(TinyModule())
    value = trainer.callback_metrics["decor/loss"]
    assert torch.isfinite(value) and value > 0
    assert ckpt.best_model_path and math.isfinite(float(ckpt.best_model_score))
    assert float(stop.best_score) == pytest.approx(float(ckpt.best_model_score))


# ------------------------------------------------------------------------------------------ arguments
def test_any_real_number_is_taken_and_bools_are_not() -> None:
    cb = DecorrelationCallback(decor_lr=np.float32(0.01), kappa=np.float64(0.25), max_rows=np.int64(32))
    assert (cb.decor_lr, cb.kappa, cb.max_rows) == (pytest.approx(0.01), 0.25, 32)
    assert type(cb.decor_lr) is float and type(cb.max_rows) is int
    with pytest.raises(TypeError, match=r"Expected `decor_lr` to be a float, but got bool: True"):
        DecorrelationCallback(decor_lr=True)
    with pytest.raises(TypeError, match=r"Expected `max_rows` to be an int or None, but got float: 3.0"):
        Decorrelator(nn.Linear(2, 2), max_rows=3.0)  # type: ignore[arg-type]


def test_an_uninitialised_lazy_layer_is_named(tmp_path) -> None:
    class Lazy(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.Linear(16, 2))

    model = Lazy()
    assert "an uninitialised LazyLinear: its shape is known after its first forward" in eligible_layers(model)["net.0"]
    with pytest.warns(UserWarning, match=r"leaves these layers plain: \{'net.0': 'an uninitialised LazyLinear"):
        quiet_trainer(tmp_path, callbacks=[callback()]).fit(model)


# ------------------------------------------------------------------------------------------ bf16 autocast
def test_under_bf16_autocast_the_fused_weight_and_rows_are_rounded_once() -> None:
    # R moves in steps near bfloat16's resolution at 1: the fused product is formed in float32 and rounded once,
    # which is as close to W R as a bfloat16 weight can be; a bfloat16 product of the rounded W and R misses it
    # by more (measured 1.3-1.8x, BENCHMARKS.md section 6).
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 576, generator=g) / 24
    R = torch.eye(576) + 1e-3 * torch.randn(576, 576, generator=g) / 24
    R += torch.diag(1e-3 * torch.randn(576, generator=g))
    exact = W.double() @ R.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        A = fuse_weight(W, R)
        bf16_product = W @ R  # what autocast alone computes
    assert A.dtype == torch.float32  # the weight's dtype; the layer call casts it
    once = exact.to(torch.bfloat16).double()
    assert torch.equal(A.to(torch.bfloat16).double(), once) or (A.to(torch.bfloat16).double() - exact).norm() <= (
        1.01 * (once - exact).norm()
    )
    assert (bf16_product.double() - exact).norm() > 1.2 * (A.to(torch.bfloat16).double() - exact).norm()
    x = torch.randn(32, 576, generator=g).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = decorrelate_rows(x, R)
    assert z.dtype == torch.bfloat16
    torch.testing.assert_close(z.double(), (x.double() @ R.double().T).to(torch.bfloat16).double(), rtol=0, atol=0.02)
    layer = nn.Linear(576, 64)
    decorrelate(layer)
    with torch.no_grad():
        layer.decor_R.copy_(R)
        layer.weight.copy_(W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    reference = F.linear(x, exact.to(torch.bfloat16), layer.bias.to(torch.bfloat16))
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-2)
