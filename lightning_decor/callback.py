"""``DecorrelationCallback``: the thin Lightning adapter. It decides *when* R moves and *where* it is logged."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_decor.layers import (
    DecorrelatedLayer,
    _check_patterns,
    _matches,
    decorrelate,
    decorrelated_layers,
    eligible_layers,
    fold,
)
from lightning_decor.metric import DecorrelationLoss

__all__ = ["DecorrelationCallback"]


def _check_float(name: str, value: Any, ok: bool, expected: str) -> float:
    """``value`` as a float; ``ok`` says whether it lies where ``expected`` describes (NaN never does)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a float, but got {type(value).__name__}: {value!r}.")
    if not ok or not math.isfinite(value):
        raise ValueError(f"Expected `{name}` {expected}, but got {value!r}.")
    return float(value)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


class DecorrelationCallback(Callback):
    """Decorrelated backpropagation (Dalm et al., https://arxiv.org/abs/2405.02385) for any LightningModule.

    In ``setup("fit")`` every ``nn.Linear`` and ``nn.Conv2d`` (exact types; see
    :func:`lightning_decor.decorrelate`) is patched to compute with the fused weight ``W @ R``. During training
    each patched layer keeps a sample of its input rows; once per optimizer step (after the backward of the
    micro-batch that steps, so gradient accumulation pools the micro-batches) every ``R`` moves by the
    decorrelation rule of :func:`lightning_decor.functional.decorrelation_update_`. On CUDA the update runs on a
    side stream; the main stream waits for it before the next forward. No host synchronisation happens per layer
    or per step, except when metrics are logged.

    Logged metrics (through the Trainer's loggers, every ``Trainer(log_every_n_steps)`` optimizer steps):

    - ``decor/loss``: the decorrelation loss, mean over the patched layers and over the steps since the last log;
    - ``decor/<layer name>``: that layer's loss at the logged step, when ``log_per_layer=True``;
    - ``decor/skipped``: total number of layer updates skipped because they would have made ``R`` non-finite.

    Args:
        decor_lr: Learning rate ``eta`` of the decorrelation rule (> 0). The rule is stable for
            ``eta * ||C|| << 1``; 1e-3 suits normalised inputs.
        kappa: Weight of the unit-variance term, in ``[0, 1]``: 0 only decorrelates, 1 only normalises the
            variances, 0.5 pulls the second moments towards the identity.
        sample_fraction: Fraction of each batch's samples (images for convolutions, rows for Linear) whose input
            rows feed the statistics, in ``(0, 1]``.
        max_rows: At most this many rows per layer and forward, drawn at random from the sample; ``None`` keeps
            every row (with ``sample_fraction=1.0``: the exact rule on the whole batch).
        include: Glob patterns on qualified module names to patch (``None``: every eligible layer). A plain prefix
            such as ``"layer4"`` also matches the modules below it.
        exclude: Patterns of layers to leave plain (e.g. the classifier head).
        log_per_layer: Also log each layer's loss as ``decor/<layer name>``.
        use_cuda_stream: Run the update on a side CUDA stream when training on a GPU.
        fold_on_fit_end: At the end of ``fit``, fold ``R`` into the weights and restore the plain layers, so the
            model has no inference overhead. With ``False`` the model stays patched (its ``state_dict`` is plain
            either way).

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[DecorrelationCallback(decor_lr=1e-3, exclude=["fc"])])
    """

    def __init__(
        self,
        decor_lr: float = 1e-3,
        kappa: float = 0.5,
        sample_fraction: float = 0.1,
        max_rows: int | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        log_per_layer: bool = False,
        use_cuda_stream: bool = True,
        fold_on_fit_end: bool = True,
    ) -> None:
        self.decor_lr = _check_float("decor_lr", decor_lr, _number(decor_lr) > 0, "to be a finite number > 0")
        self.kappa = _check_float("kappa", kappa, 0 <= _number(kappa) <= 1, "in [0, 1]")
        self.sample_fraction = _check_float(
            "sample_fraction", sample_fraction, 0 < _number(sample_fraction) <= 1, "in (0, 1]"
        )
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int)):
            raise TypeError(f"Expected `max_rows` to be an int or None, but got {type(max_rows).__name__}: {max_rows!r}.")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"Expected `max_rows` to be >= 1 or None, but got {max_rows!r}.")
        self.max_rows = max_rows
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        for name, flag in (
            ("log_per_layer", log_per_layer),
            ("use_cuda_stream", use_cuda_stream),
            ("fold_on_fit_end", fold_on_fit_end),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"Expected `{name}` to be a bool, but got {type(flag).__name__}: {flag!r}.")
        self.log_per_layer = log_per_layer
        self.use_cuda_stream = use_cuda_stream
        self.fold_on_fit_end = fold_on_fit_end
        # Runtime state; no tensors, streams or devices here so the callback pickles for ddp_spawn.
        self._layers: dict[str, DecorrelatedLayer] = {}
        self._stream: torch.cuda.Stream | None = None
        self._generator: torch.Generator | None = None
        self._metric = DecorrelationLoss(kappa=self.kappa)
        self._last_losses: Tensor | None = None
        self._skipped: Tensor | None = None
        self._warned_skips = 0
        self._updated_batch: int | None = None
        self.updates = 0  # number of R updates done (a plain int: no device sync)

    # ------------------------------------------------------------------ setup and teardown
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        eligible = eligible_layers(pl_module)
        for arg, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns or []:
                if not any(_matches(name, [pattern]) for name in eligible):
                    rank_zero_warn(
                        f"DecorrelationCallback: `{arg}` pattern {pattern!r} matches no eligible layer. "
                        f"Eligible layers: {sorted(eligible)}."
                    )
        decorrelate(pl_module, include=self.include, exclude=self.exclude)  # idempotent: patched layers stay
        self._layers = decorrelated_layers(pl_module)
        if not self._layers:
            rank_zero_warn(
                "DecorrelationCallback found no layer to decorrelate (exact nn.Linear / nn.Conv2d, not frozen, "
                "groups == 1, matching `include`/`exclude`); training proceeds as plain backpropagation."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = trainer.strategy.root_device
        if self.use_cuda_stream and device.type == "cuda":
            self._stream = torch.cuda.Stream(device=device)
        if self._generator is None or self._generator.device != device:
            # A private generator: sampling rows must not shift the global RNG (and so the data order).
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(torch.initial_seed() % 2**63)
        self._metric = self._metric.to(device)
        self._skipped = torch.zeros(len(self._layers), dtype=torch.long, device=device)
        for layer in self._layers.values():
            layer.decor_collect = True
            layer.decor_sample_fraction = self.sample_fraction
            layer.decor_max_rows = self.max_rows
            layer.decor_generator = self._generator

    def _release(self, fold_layers: bool) -> None:
        self._wait()
        for layer in self._layers.values():
            if isinstance(layer, DecorrelatedLayer):
                layer.decor_collect = False
                layer.decor_take_rows()
        if fold_layers:
            for layer in self._layers.values():
                fold(layer)  # a no-op on a layer the user folded already
            self._layers = {}

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release(fold_layers=self.fold_on_fit_end)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # teardown/on_fit_end do not run after an exception: leave a usable model (R is always finite).
        self._release(fold_layers=self.fold_on_fit_end)

    # ------------------------------------------------------------------ the update
    def _wait(self) -> None:
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)  # device-side, no host sync

    def _stream_context(self) -> contextlib.AbstractContextManager[Any]:
        if self._stream is None:
            return contextlib.nullcontext()
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))  # rows written on main
        return torch.cuda.stream(self._stream)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._wait()  # the forward reads R

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Fires only when the optimizer steps: after the last micro-batch's backward under accumulation. With
        # several optimizers (manual optimisation) R moves once per training batch, at the first step.
        batch = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        if self._updated_batch == batch or trainer.sanity_checking:
            return
        self._updated_batch = batch
        self.update_(pl_module)

    @torch.no_grad()
    def update_(self, pl_module: LightningModule) -> None:
        """Move every patched layer's ``R`` by one step from the rows collected since the last call.

        Override to customise (e.g. a different schedule); called once per optimizer step.
        """
        losses: list[Tensor] = []
        oks: list[Tensor] = []
        with self._stream_context():
            for layer in self._layers.values():
                rows = layer.decor_take_rows()
                if rows is None:  # layer not used in this step's forward
                    losses.append(torch.full((), math.nan, device=layer.decor_R.device))
                    oks.append(torch.ones((), dtype=torch.bool, device=layer.decor_R.device))
                    continue
                if self._stream is not None:
                    rows.record_stream(self._stream)
                loss, ok = layer.decor_update_(rows, lr=self.decor_lr, kappa=self.kappa)
                losses.append(loss.float())
                oks.append(ok)
            if not losses:
                return
            self._last_losses = torch.stack(losses)
            self._metric.update(self._last_losses)
            if self._skipped is not None:
                self._skipped += (~torch.stack(oks)).long()
        self.updates += 1

    # ------------------------------------------------------------------ logging
    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._last_losses is None or trainer.global_step % max(trainer.log_every_n_steps, 1) != 0:
            return
        if self._updated_batch != trainer.fit_loop.epoch_loop.batch_progress.total.ready:
            return  # no update in this batch (accumulating)
        self._wait()
        metrics = {"decor/loss": self._metric.compute()}
        self._metric.reset()
        if self.log_per_layer:
            metrics.update({f"decor/{name}": loss for name, loss in zip(self._layers, self._last_losses)})
        if self._skipped is not None:
            total = self._skipped.sum()
            metrics["decor/skipped"] = total.float()
            skipped = int(total)  # one host read per log interval, where the logger reads anyway
            if skipped > self._warned_skips:
                names = [n for n, s in zip(self._layers, self._skipped.tolist()) if s > 0]
                rank_zero_warn(
                    f"DecorrelationCallback skipped {skipped - self._warned_skips} decorrelation update(s) that "
                    f"would have made R non-finite (NaN/Inf input or a too large `decor_lr`={self.decor_lr}); "
                    f"R was kept. Layers: {names}."
                )
                self._warned_skips = skipped
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        if not self._layers:
            return {}
        self._wait()
        return {
            "version": 1,
            "R": {name: layer.decor_R.detach().cpu().clone() for name, layer in self._layers.items()},
            # Checkpoints hold the fused W @ R under "weight"; the raw W lets a resumed run continue exactly.
            "raw_weight": {name: layer.weight.detach().cpu().clone() for name, layer in self._layers.items()},
            "generator": self._generator.get_state() if self._generator is not None else None,
            "updates": self.updates,
        }

    @override
    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != 1:
            rank_zero_warn("DecorrelationCallback: unknown checkpoint state; training continues with R = I.")
            return
        for name, layer in self._layers.items():
            if name in state_dict["R"]:
                layer.decor_R.copy_(state_dict["R"][name])
                layer.weight.copy_(state_dict["raw_weight"][name])
        self._pending_generator_state = state_dict.get("generator")
        self.updates = int(state_dict.get("updates", 0))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = getattr(self, "_pending_generator_state", None)
        if state is not None and self._generator is not None:
            self._generator.set_state(state)
            self._pending_generator_state = None

    def layers(self) -> Iterator[tuple[str, DecorrelatedLayer]]:
        """The patched layers by qualified name."""
        return iter(self._layers.items())

