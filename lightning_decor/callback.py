"""``DecorrelationCallback``: the thin Lightning adapter. It decides *when* R moves and *where* it is logged."""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_decor.distributed import all_gather_rows, count_group, destroy_count_group
from lightning_decor.functional import conv_patch_rows, correlation_picture, off_diagonal, sample_conv_patch_rows
from lightning_decor.layers import (
    PENDING_FORWARDS,
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


def _grad_mark(param: Tensor) -> tuple[weakref.ref[Tensor] | None, int]:
    """Which ``.grad`` tensor ``param`` holds (weakly: a stale gradient may still be freed) and its version."""
    grad = param.grad
    return (None, 0) if grad is None else (weakref.ref(grad), grad._version)


def _got_grad(param: Tensor, mark: tuple[weakref.ref[Tensor] | None, int]) -> bool:
    """Whether a backward reached ``param`` since ``mark``: a new ``.grad`` tensor, or the old one accumulated into."""
    grad, (old, version) = param.grad, mark
    return grad is not None and (old is None or old() is not grad or grad._version != version)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _check_positive_int(name: str, value: Any, optional: bool = True) -> int | None:
    """``value`` as an int >= 1 (a count or an interval; ``None`` too when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"Expected `{name}` to be {kind}, but got {type(value).__name__}: {value!r}.")
    if value < 1:
        raise ValueError(f"Expected `{name}` to be >= 1{' or None' if optional else ''}, but got {value!r}.")
    return value


_PICTURE_ROWS = 8192  # rows behind a correlation picture: entries then carry ~1/sqrt(8192) ~ 0.01 sampling noise
_HISTOGRAM_BINS = 64


def _histogram(values: Tensor, bins: int = _HISTOGRAM_BINS) -> dict[str, Any]:
    """The arguments of ``SummaryWriter.add_histogram_raw`` for ``values``, counted on their device (sort and
    search are deterministic, unlike ``histc`` on CUDA), so only ``bins`` numbers reach the host."""
    v = values.detach().flatten().float().sort().values
    lo, hi, total, total_sq = torch.stack([v[0], v[-1], v.sum(), v.square().sum()]).tolist()
    top = hi if hi > lo else lo + 1.0  # all equal (R = I has only zeros off the diagonal): one visible bin
    limits = torch.linspace(lo, top, bins + 1, device=v.device, dtype=v.dtype)[1:]
    below = torch.searchsorted(v, limits, right=True)  # values <= each upper limit
    below[-1] = v.numel()
    counts = torch.diff(below, prepend=below.new_zeros(1))
    return dict(
        min=lo, max=hi, num=v.numel(), sum=total, sum_squares=total_sq,
        bucket_limits=limits.tolist(), bucket_counts=counts.tolist(),
    )  # fmt: skip


# Strategies that shard parameters (by class name, so subclasses and other namespaces are caught too).
_SHARDED_STRATEGIES = {"FSDPStrategy", "XLAFSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"}


class DecorrelationCallback(Callback):
    """Decorrelated backpropagation (Dalm et al., https://arxiv.org/abs/2405.02385) for any LightningModule.

    In ``setup("fit")`` every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (exact types; see
    :func:`lightning_decor.decorrelate`) is patched to compute with the fused weight ``W @ R``. During training
    each patched layer keeps a sample of its input rows; once per optimizer step (after the backward of the
    micro-batch that steps, so gradient accumulation pools the micro-batches) every ``R`` moves by the
    decorrelation rule of :func:`lightning_decor.functional.decorrelation_update_`. On CUDA the update runs on a
    side stream; the main stream waits for it before the next forward. No host synchronisation happens per layer
    or per step, except when metrics are logged.

    With the rest of the Trainer:

    - **Optimizer steps**: ``R`` moves in ``on_before_optimizer_step``, at most once per training batch. Under
      gradient accumulation (``accumulate_grad_batches``, ``GradientAccumulationScheduler``) that is the micro-batch
      that steps, from the rows of the whole window. Under manual optimisation it is the batch's first
      ``optimizer.step()`` (several optimizers still give one update per batch); rows of forwards after it count
      towards the next update. A batch whose optimizers never step through Lightning leaves ``R`` unchanged.
    - **DDP** (``"ddp"``, ``"ddp_spawn"``, ...): before each update the sampled rows of all layers of all ranks are
      pooled by one ``all_gather`` of a single flat buffer (after a small exchange of the row counts over a CPU
      group), so every rank applies the same update and holds the same ``R``. The ``decor_R`` buffers are excluded
      from DDP's per-forward buffer broadcast. After ``ddp_spawn`` the launching process receives the trained weights
      (``W @ R``) in its plain model; the callback there has not run. Sharded strategies (FSDP, DeepSpeed,
      ModelParallel) are refused in ``setup``.
    - **Precision**: statistics and ``R`` are float32 (float64 for float64 models) under every precision; with
      ``"16-true"``/``"bf16-true"`` ``R`` stays float32 while the weights are cast.
    - **torch.compile**: ``trainer.fit(torch.compile(model))`` works; the row capture runs eagerly (one graph break
      per patched layer in training), so the graph does not recompile as rows accumulate.
    - **Checkpoints**: the module's ``state_dict`` holds the fused weights (plain-loadable, also with
      ``save_weights_only=True``); the callback's state (``R``, raw weights, sampling RNG) makes
      ``fit(ckpt_path=...)`` continue exactly.
    - **configure_model**: layers built there are created early, in Lightning's init contexts, and patched in
      ``setup``; the hook must be idempotent, as Lightning requires.

    Logged metrics (through the Trainer's loggers, where Lightning writes step metrics: after every
    ``Trainer(log_every_n_steps)``-th training batch that steps, however many optimizers step in it):

    - ``decor/loss``: the decorrelation loss, mean over the patched layers and over the steps since the last log;
    - ``decor/<layer name>``: that layer's loss at the logged step, when ``log_per_layer=True``;
    - ``decor/skipped``: total number of layer updates skipped because they would have made ``R`` non-finite.

    Pictures, opt-in, written only through a ``TensorBoardLogger`` (``add_histogram_raw``/``add_image``), on rank zero,
    at the end of every N-th training epoch (the step axis is ``trainer.global_step``):

    - ``decor/R_offdiag/<layer name>``: histogram of the off-diagonal entries of each layer's ``R``, with
      ``log_histograms_every_n_epochs``;
    - ``decor/correlation/<layer name>``: with ``log_correlation_image``, an image of that layer's input correlations
      ``|C_ij| / sqrt(C_ii C_jj)`` (white = 1) on its last training batch of the epoch: raw input ``x`` on the left,
      decorrelated ``z = x R^T`` on the right.

    Args:
        decor_lr: Learning rate ``eta`` of the decorrelation rule (> 0). The rule is stable for
            ``eta * ||C|| << 1``; the default 3e-3 was the best of 3e-4, 1e-3, 3e-3 and 1e-2 on the benchmark
            CNN (docs/TUNING.md).
        kappa: Weight of the unit-variance term, in ``[0, 1]``: 0 only decorrelates, 1 only normalises the
            variances, 0.5 pulls the second moments towards the identity.
        sample_fraction: Fraction of each batch's samples (images for convolutions, rows for Linear) whose input
            rows feed the statistics, in ``(0, 1]``. A Linear draws its rows uniformly over all leading dimensions
            (samples and sequence positions).
        max_rows: At most this many rows per layer and forward, drawn at random from the sample; ``None`` keeps
            every row (with ``sample_fraction=1.0``: the exact rule on the whole batch).
        include: Glob patterns on qualified module names to patch (``None``: every eligible layer). A plain prefix
            such as ``"layer4"`` also matches the modules below it.
        exclude: Patterns of layers to leave plain (e.g. the classifier head).
        max_features: Layers whose ``d`` exceeds this stay plain, with a warning (``R`` takes ``4 d^2`` bytes: a
            VGG classifier's ``d = 25088`` would need 2.4 GiB). ``None`` for no limit.
        block_size: Layers with ``d > block_size`` get a block-diagonal ``R`` of equal blocks of at most this many
            features (whole input channels for convolutions): fusing ``W @ R`` then costs ``2 C_out d b`` instead of
            ``2 C_out d^2`` flops and only correlations within a block are removed. ``None``: dense ``R``.
        update_every: Update ``R`` on every k-th training batch that steps only (several optimizers stepping in one
            batch count once; rows are sampled only for those batches), which divides the sampling and update cost
            by k; fusing ``W @ R`` still happens every step.
        log_per_layer: Also log each layer's loss as ``decor/<layer name>``.
        use_cuda_stream: Run the update on a side CUDA stream when training on a GPU.
        fold_on_fit_end: At the end of ``fit``, fold ``R`` into the weights and restore the plain layers, so the
            model has no inference overhead. With ``False`` the model stays patched (its ``state_dict`` is plain
            either way).
        log_histograms_every_n_epochs: Every this many training epochs, log a TensorBoard histogram of each
            layer's off-diagonal ``R`` entries (``None``: never).
        log_correlation_image: Qualified name of one patched layer (e.g. ``"net.0"``) whose input correlation
            matrix, before and after decorrelation, is logged as a TensorBoard image (``None``: none). The callback
            keeps a reference to that layer's latest training input (no copy, no device sync per step) and computes
            the picture from at most 8192 of its rows at epoch end.
        log_image_every_n_epochs: Every this many training epochs, log the ``log_correlation_image`` picture.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[DecorrelationCallback(decor_lr=1e-3, exclude=["fc"])])
    """

    def __init__(
        self,
        decor_lr: float = 3e-3,
        kappa: float = 0.5,
        sample_fraction: float = 0.1,
        max_rows: int | None = 64,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        max_features: int | None = 8192,
        block_size: int | None = None,
        update_every: int = 1,
        log_per_layer: bool = False,
        use_cuda_stream: bool = True,
        fold_on_fit_end: bool = True,
        log_histograms_every_n_epochs: int | None = None,
        log_correlation_image: str | None = None,
        log_image_every_n_epochs: int = 1,
    ) -> None:
        self.decor_lr = _check_float("decor_lr", decor_lr, _number(decor_lr) > 0, "to be a finite number > 0")
        self.kappa = _check_float("kappa", kappa, 0 <= _number(kappa) <= 1, "in [0, 1]")
        self.sample_fraction = _check_float(
            "sample_fraction", sample_fraction, 0 < _number(sample_fraction) <= 1, "in (0, 1]"
        )
        self.max_rows = _check_positive_int("max_rows", max_rows)
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        self.max_features = _check_positive_int("max_features", max_features)
        self.block_size = _check_positive_int("block_size", block_size)
        self.update_every: int = _check_positive_int("update_every", update_every, optional=False)  # type: ignore[assignment]
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
        every = _check_positive_int("log_histograms_every_n_epochs", log_histograms_every_n_epochs)
        self.log_histograms_every_n_epochs = every
        if log_correlation_image is not None and not isinstance(log_correlation_image, str):
            raise TypeError(
                "Expected `log_correlation_image` to be a layer name (str) or None, but got "
                f"{type(log_correlation_image).__name__}: {log_correlation_image!r}."
            )
        self.log_correlation_image = log_correlation_image
        _check_positive_int("log_image_every_n_epochs", log_image_every_n_epochs, optional=False)
        self.log_image_every_n_epochs = log_image_every_n_epochs
        # Runtime state; no tensors, streams or devices here so the callback pickles for ddp_spawn.
        self._layers: dict[str, DecorrelatedLayer] = {}
        self._stream: torch.cuda.Stream | None = None
        self._generator: torch.Generator | None = None
        # Every rank computes the same losses from the same pooled rows, so the metric needs no sync of its own.
        self._metric = DecorrelationLoss(kappa=self.kappa, sync_on_compute=False)
        self._last_losses: Tensor | None = None
        self._skipped: Tensor | None = None
        self._warned_skips = 0
        self._warned_waiting = False  # rows of PENDING_FORWARDS forwards waited for an update: warned once
        self._weight_grads: dict[str, Any] | None = None  # gradient marks, armed until the fit's first backward
        self._fresh = False  # an update happened since the last log
        self._stepped_batch: int | None = None
        self._picture_hook: RemovableHandle | None = None
        self._picture_input: Tensor | None = None
        self._pool_ranks = False  # DDP: pool the rows of every rank before each update
        self._counts_group: Any = None  # a process group, created in on_fit_start (not picklable)
        self.updates = 0  # number of R updates done (a plain int: no device sync)

    # ------------------------------------------------------------------ setup and teardown
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategies = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        if strategies & _SHARDED_STRATEGIES:
            raise ValueError(
                f"DecorrelationCallback does not support `strategy`={type(trainer.strategy).__name__}: it shards the "
                "weights, while each R needs its layer's whole weight and input rows. Use a single device, "
                "'ddp' or 'ddp_spawn'."
            )
        if is_overridden("configure_model", pl_module):
            # Layers built there do not exist yet: build them now, in the contexts Lightning uses, so that they are
            # patched before the checkpoint restore, the DDP wrap, the optimizers and the first compiled call (as
            # Lightning's WeightAveraging does). Lightning's own call follows; the hook must be idempotent.
            with (
                trainer.strategy.tensor_init_context(),
                trainer.strategy.model_sharded_context(),
                trainer.precision_plugin.module_init_context(),
            ):
                pl_module.configure_model()
        eligible = eligible_layers(pl_module, self.max_features, self.block_size)
        wide = {name: why for name, why in eligible.items() if why is not None and why.startswith("d = ")}
        if wide:
            rank_zero_warn(f"DecorrelationCallback leaves these layers plain: {wide}.")
        for arg, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns or []:
                if not any(_matches(name, [pattern]) for name in eligible):
                    rank_zero_warn(
                        f"DecorrelationCallback: `{arg}` pattern {pattern!r} matches no eligible layer. "
                        f"Eligible layers: {sorted(eligible)}."
                    )
        decorrelate(
            pl_module,
            include=self.include,
            exclude=self.exclude,
            max_features=self.max_features,
            block_size=self.block_size,
        )  # idempotent: patched layers stay
        self._layers = decorrelated_layers(pl_module)
        # DDP broadcasts rank 0's buffers before every forward; R is kept equal on all ranks by `update_` instead.
        ignored = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))
        R_names = {f"{name}.decor_R" for name in self._layers}
        pl_module._ddp_params_and_buffers_to_ignore = sorted(ignored | R_names)  # type: ignore[assignment]
        if not self._layers:
            rank_zero_warn(
                "DecorrelationCallback found no layer to decorrelate (exact nn.Linear / nn.Conv1d/2d/3d, not frozen, "
                "groups == 1, matching `include`/`exclude`); training proceeds as plain backpropagation."
            )
        self._check_picture_layer()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        modules = dict(pl_module.named_modules())
        replaced = sorted(name for name, layer in self._layers.items() if modules.get(name) is not layer)
        if replaced:
            raise RuntimeError(
                f"DecorrelationCallback patched {replaced} in `setup`, but `configure_model` built them anew "
                "afterwards. Expected `configure_model` to be idempotent (Lightning calls it again), e.g. return "
                "early when the layers exist."
            )
        self._stepped_batch = None  # batch counters restart with a new Trainer
        self._fresh, self._warned_skips, self._last_losses = False, 0, None
        self._metric.reset()
        self._stream = None
        dist = torch.distributed
        self._pool_ranks = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        if self._pool_ranks and self._layers:
            self._counts_group = count_group()  # collective: every rank has the same layers
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
        self._stop_picture_input()
        for layer in self._layers.values():
            if isinstance(layer, DecorrelatedLayer):
                layer.decor_collect = False
                layer.decor_take_rows()
        destroy_count_group(self._counts_group)  # one group per fit otherwise, never freed
        self._counts_group = None
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
        if self.update_every > 1:  # sample rows only for the batches that update R
            collect = self._due_step(trainer)
            for layer in self._layers.values():
                layer.decor_collect = collect

    @staticmethod
    def _stepping_batches(trainer: Trainer) -> int:
        """Training batches that stepped so far (the current one not yet counted): Lightning's own count for its logging
        interval (as its LearningRateMonitor uses; under manual optimisation every batch counts), restored on resume.
        ``trainer.global_step`` counts optimizer steps instead, two per batch with two optimizers."""
        return trainer.fit_loop.epoch_loop._batches_that_stepped

    def _due_step(self, trainer: Trainer) -> bool:
        """Whether the current (or coming) stepping batch updates ``R``: every ``update_every``-th one."""
        return self._stepping_batches(trainer) % self.update_every == 0

    def _lightning_writes(self, trainer: Trainer) -> bool:
        """Whether Lightning writes step metrics after this batch: after every ``log_every_n_steps``-th stepping
        batch, and when the training stops (as its logger connector decides)."""
        every = trainer.log_every_n_steps
        return every > 0 and ((self._stepping_batches(trainer) + 1) % every == 0 or trainer.should_stop)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Fires only when the optimizer steps: after the last micro-batch's backward under accumulation. With
        # several optimizers (manual optimisation) R moves once per training batch, at the first step.
        batch = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        if self._stepped_batch == batch or trainer.sanity_checking:
            return
        self._stepped_batch = batch
        if self._due_step(trainer):
            self.update_(pl_module)

    @torch.no_grad()
    def update_(self, pl_module: LightningModule) -> None:
        """Move every patched layer's ``R`` by one step from the rows collected since the last call.

        Override to customise (e.g. a different schedule); called once per optimizer step.
        """
        losses: list[Tensor] = []
        oks: list[Tensor] = []
        layers = list(self._layers.values())
        taken = [layer.decor_take_rows() for layer in layers]  # on the main stream, where the rows were written
        with self._stream_context():
            if self._stream is not None:
                for rows in taken:
                    if rows is not None:
                        rows.record_stream(self._stream)  # freed after the side stream is done with it
            if self._pool_ranks and layers:  # DDP: every rank updates from the rows of all ranks, so R stays equal
                taken = all_gather_rows(
                    taken,
                    [layer.decor_features for layer in layers],
                    dtype=functools.reduce(torch.promote_types, [layer.decor_R.dtype for layer in layers]),
                    device=layers[0].decor_R.device,
                    counts_group=self._counts_group,
                )
            for layer, rows in zip(layers, taken, strict=True):
                if rows is None:  # layer not used in this step's forward
                    losses.append(torch.full((), math.nan, device=layer.decor_R.device))
                    oks.append(torch.ones((), dtype=torch.bool, device=layer.decor_R.device))
                    continue
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
        self._fresh = True

    # ------------------------------------------------------------------ logging
    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._wait()  # validation and checkpoints may follow this hook and read R
        self._warn_waiting_rows()
        stepped = self._stepped_batch == trainer.fit_loop.epoch_loop.batch_progress.total.ready
        # Log only where Lightning writes, so that the mean covers every update since the last written value.
        if not self._fresh or not stepped or not self._lightning_writes(trainer):
            return
        self._fresh = False
        metrics = {"decor/loss": self._metric.compute()}
        self._metric.reset()
        if self.log_per_layer and self._last_losses is not None:
            metrics.update({f"decor/{name}": loss for name, loss in zip(self._layers, self._last_losses)})
        skipped = self._check_skipped()
        if skipped is not None:
            metrics["decor/skipped"] = skipped
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def _warn_waiting_rows(self) -> None:
        """Warn once when a layer's rows waited so long that only a sample is kept (host integers, no sync)."""
        if self._warned_waiting:
            return
        waiting = [name for name, layer in self._layers.items() if layer.decor_rows_seen() > layer.decor_pending_rows()]
        if waiting:
            self._warned_waiting = True
            rank_zero_warn(
                f"DecorrelationCallback: layers {waiting} captured more than {PENDING_FORWARDS} forwards' worth of "
                "input rows without an update of R; a uniform sample of that many is kept. R moves on optimizer steps "
                "that go through Lightning (automatic optimisation, or `self.optimizers()` under manual "
                "optimisation): steps of a raw optimizer, or an optimizer that never steps, do not move it."
            )

    def _check_skipped(self) -> Tensor | None:
        """The total of skipped layer updates; warns (once per new skip) naming the layers. One host read."""
        if self._skipped is None:
            return None
        total = self._skipped.sum()
        skipped = int(total)  # at log intervals and epoch ends only, where the logger reads anyway
        if skipped > self._warned_skips:
            names = [n for n, k in zip(self._layers, self._skipped.tolist()) if k > 0]
            rank_zero_warn(
                f"DecorrelationCallback skipped {skipped - self._warned_skips} decorrelation update(s) that "
                f"would have made R non-finite (NaN/Inf input or a too large `decor_lr`={self.decor_lr}); "
                f"R was kept. Layers: {names}."
            )
            self._warned_skips = skipped
        return total.float()

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._wait()

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._wait()

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
        self._pending_generator_state = None
        if state is not None and self._generator is not None:
            try:
                self._generator.set_state(state)
            except RuntimeError:  # a checkpoint from another device type: rows are sampled afresh
                rank_zero_warn("DecorrelationCallback: the checkpoint's row-sampling state does not fit this device.")
        self._weight_grads = {name: _grad_mark(layer.weight) for name, layer in self._layers.items()}

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Once per fit, after its first backward: a layer whose weight received a gradient but whose forward captured
        # no rows was used through its `.weight` (e.g. `F.linear(x, layer.weight)`), which holds the raw W, not W R.
        marks, self._weight_grads = self._weight_grads, None
        if not marks:
            return
        bypassed = [
            name
            for name, layer in self._layers.items()
            if layer.decor_collect and layer.decor_rows_seen() == 0 and _got_grad(layer.weight, marks[name])
        ]
        if bypassed:
            rank_zero_warn(
                f"DecorrelationCallback: the weights of {bypassed} received a gradient in the first training batch, "
                "but their forward was not called: code that reads `.weight` directly (e.g. "
                "`F.linear(x, layer.weight)`) computes with the raw W instead of W @ R, and R does not move. Call the "
                "layer instead, or leave it out with `exclude`. (A penalty on the weights of a layer that this batch "
                "did not use gives such a gradient too; then there is nothing to fix.)"
            )

    def layers(self) -> Iterator[tuple[str, DecorrelatedLayer]]:
        """The patched layers by qualified name."""
        return iter(self._layers.items())

    # ------------------------------------------------------------------ TensorBoard pictures (opt-in, epoch end)
    def _check_picture_layer(self) -> None:
        name = self.log_correlation_image
        if name is not None and name not in self._layers:
            raise ValueError(
                f"Expected `log_correlation_image` to name a decorrelated layer, one of {sorted(self._layers)}, "
                f"but got {name!r}."
            )

    @staticmethod
    def _due(trainer: Trainer, every: int | None) -> bool:
        return every is not None and (trainer.current_epoch + 1) % every == 0

    def _tensorboards(self, trainer: Trainer) -> list[Any]:
        """The ``SummaryWriter`` of every ``TensorBoardLogger`` on rank zero (other loggers have no pictures)."""
        if not trainer.is_global_zero:
            return []
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    @torch.compiler.disable  # eager even in a compiled model, as the layers' own row capture
    def _keep_picture_input(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if args and module.training and torch.is_grad_enabled():
            self._picture_input = args[0].detach()  # a reference, no copy: replaced by the next training forward

    def _stop_picture_input(self) -> None:
        if self._picture_hook is not None:
            self._picture_hook.remove()
        self._picture_hook, self._picture_input = None, None

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        wanted = self.log_correlation_image is not None and self._due(trainer, self.log_image_every_n_epochs)
        if wanted and self._picture_hook is None and self._tensorboards(trainer):
            layer = self._layers[self.log_correlation_image]  # type: ignore[index]
            self._picture_hook = layer.register_forward_hook(self._keep_picture_input)
        if trainer.current_epoch == 0 and not getattr(trainer, "fast_dev_run", False) and trainer.is_global_zero:
            pictures = self.log_histograms_every_n_epochs is not None or self.log_correlation_image is not None
            if pictures and not self._tensorboards(trainer):
                rank_zero_warn(
                    "DecorrelationCallback: `log_histograms_every_n_epochs`/`log_correlation_image` log only through "
                    "a TensorBoardLogger, and the Trainer has none; nothing will be drawn."
                )

    @override
    @torch.no_grad()
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.log_every_n_steps <= 0:  # no step logging: still warn about skipped updates once an epoch
            self._check_skipped()
        writers = self._tensorboards(trainer)
        if not writers or not self._layers:
            return
        self._wait()  # R may still be moving on the side stream
        step = trainer.global_step
        if self._due(trainer, self.log_histograms_every_n_epochs):
            for name, layer in self._layers.items():
                entries = off_diagonal(layer.decor_R)
                if entries.numel() == 0:  # d = 1
                    continue
                histogram = _histogram(entries)
                for writer in writers:
                    writer.add_histogram_raw(f"decor/R_offdiag/{name}", global_step=step, **histogram)
        x = self._picture_input
        if self.log_correlation_image is not None and x is not None:
            layer = self._layers[self.log_correlation_image]
            picture = correlation_picture(self._picture_rows(layer, x), layer.decor_R).cpu()
            for writer in writers:
                writer.add_image(f"decor/correlation/{self.log_correlation_image}", picture, step, dataformats="CHW")
        self._stop_picture_input()

    @staticmethod
    def _picture_rows(layer: DecorrelatedLayer, x: Tensor) -> Tensor:
        """The raw input rows behind the correlation picture: at most 8192 rows of the layer's input ``x``
        (im2col patches for a convolution), drawn with a fixed seed so that pictures do not move the training RNG."""
        generator = torch.Generator(device=x.device).manual_seed(0)
        if isinstance(layer, nn.Linear):
            rows = x.reshape(-1, x.shape[-1])  # (N * T, in_features)
            if rows.shape[0] > _PICTURE_ROWS:
                rows = rows[torch.randperm(rows.shape[0], device=rows.device, generator=generator)[:_PICTURE_ROWS]]
            return rows
        conv: Any = layer  # a Conv1d/2d/3d with groups == 1
        x = x if x.dim() == conv.weight.dim() else x.unsqueeze(0)  # unbatched input
        geometry: dict[str, Any] = dict(
            stride=conv.stride,
            padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
        )
        if x[:, 0].numel() > _PICTURE_ROWS:  # more patches (for stride 1) than needed
            return sample_conv_patch_rows(x, _PICTURE_ROWS, conv.kernel_size, generator=generator, **geometry)
        return conv_patch_rows(x, conv.kernel_size, **geometry)  # (N * positions, d)
