"""``DecorrelationCallback``: the thin Lightning adapter. It decides *when* R moves and *where* it is logged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_decor.checks import check_bool, check_positive_int
from lightning_decor.config import DEFAULTS, Configured, DecorConfig
from lightning_decor.engine import Decorrelator
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.metric import DecorrelationLoss
from lightning_decor.pictures import TensorBoardPictures
from lightning_decor.plan import Plan
from lightning_decor.reports import SHARDED_NO_PLAN, decorrelate_reported
from lightning_decor.rows import PENDING_FORWARDS
from lightning_decor.trainer import (
    batch_index,
    build_configured_layers,
    grad_scaler,
    lightning_writes,
    log_straight,
    model_parallel,
)
from lightning_decor.update import SkipWatch

__all__ = ["DecorrelationCallback"]


class DecorrelationCallback(Configured, Callback):
    """Decorrelated backpropagation (Dalm et al., https://arxiv.org/abs/2405.02385) for any LightningModule.

    In ``setup("fit")`` every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (exact types; grouped and depthwise convolutions
    get one ``R`` per group) and the projections of every ``nn.MultiheadAttention`` (see
    :func:`lightning_decor.decorrelate` and :mod:`lightning_decor.attention`) are patched to compute ``W (R x)``.
    The work is done by a :class:`lightning_decor.Decorrelator` (``callback.engine``); the callback decides when it
    runs and where its numbers are logged.

    **The cost plan** (``max_overhead``, default 0.1): the first five optimizer steps run plain and measure the
    training step and each layer's shapes; then every layer gets the cheapest form that fits the budget (``R`` fused
    into the weight or applied to the input rows, dense or block-diagonal, or plain), printed as a table
    (``callback.plan``) and saved in checkpoints; the next steps check it against the real step (``decor/overhead``),
    and ``R`` moves from step 18 on (:func:`lightning_decor.planner.plain_steps`). Measured costs are kept in the
    plan cache, so later runs plan identically without timing. ``plan=`` pins a plan file; ``max_overhead=None``
    skips the plan (every layer fused, dense or in blocks of ``block_size``, from the first step). docs/TUNING.md
    says how the plan decides.

    **When ``R`` moves**: once per optimizer step, at the end of the training batch that steps (gradient accumulation
    pools the micro-batches; every optimizer of a GAN has stepped), from the rows each patched layer kept, by the rule
    of :func:`lightning_decor.functional.decorrelation_update_`, layers with equal block sizes in one batched step.
    Under automatic optimisation the update is queued in ``on_before_optimizer_step`` (on CUDA on a side stream,
    beside the optimizer step) and written into ``R`` at the batch end on the main stream. A step the ``GradScaler``
    skips leaves ``R`` as it is. Nothing is read back to the host per step, except when metrics are logged. How it
    works with DDP, precision, ``torch.compile``, checkpoints and ``configure_model``: the README's "Works with".

    Logged metrics (through the Trainer's loggers, where Lightning writes step metrics: after every
    ``Trainer(log_every_n_steps)``-th training batch that steps, however many optimizers step in it):

    - ``decor/loss``: the decorrelation loss, mean over the patched layers and over the steps since the last log;
    - ``decor/<layer name>``: that layer's loss at the logged step, when ``log_per_layer=True``;
    - ``decor/skipped``: total number of layer updates skipped because they would have made ``R`` non-finite.
    - ``decor/overhead``: DBP's measured share of the step, at the step the plan's check measures it (written
      straight to the loggers, whatever ``log_every_n_steps``).

    Pictures, opt-in, written only through a ``TensorBoardLogger`` (``add_histogram_raw``/``add_image``), on rank zero,
    at the end of every N-th training epoch (the step axis is ``trainer.global_step``):

    - ``decor/R_offdiag/<layer name>``: histogram of the off-diagonal entries of each layer's ``R``, with
      ``log_histograms_every_n_epochs``;
    - ``decor/correlation/<layer name>``: with ``log_correlation_image``, an image of that layer's input correlations
      ``|C_ij| / sqrt(C_ii C_jj)`` (white = 1) on its last training batch of the epoch: raw input ``x`` on the left,
      decorrelated ``z = x R^T`` on the right.

    Args:
        decor_lr: Learning rate ``eta`` of the decorrelation rule (> 0). With the default ``normalize="spectral"``
            each step is ``eta`` divided by ``||C||_F^2 / tr C`` of its ``R`` block, at least 10, so one value suits
            inputs of any scale, width and correlation and no step exceeds ``eta / 10`` (3e-3, the authors' own, at
            the default 3e-2, chosen on the five-model suite: docs/TUNING.md). For the authors' rule
            (``normalize="none"``) values near 3e-3 and below are stable.
        kappa: Weight of the unit-variance term, in ``[0, 1]``: 0 only decorrelates, 1 only normalises the
            variances, 0.5 pulls the second moments towards the identity.
        normalize: How each step of the rule is scaled: ``"none"`` is the authors' rule (step ``decor_lr``);
            ``"trace"`` divides the step by the mean of ``diag C``; ``"spectral"`` by ``||C||_F^2 / tr C`` (a mean of
            ``C``'s eigenvalues weighted by themselves: 1 at the fixed point, large for wide correlated inputs; every
            divisor counts as at least :data:`lightning_decor.functional.MIN_DIVISOR`, 10),
            so that one ``decor_lr`` suits inputs of any scale, width and correlation (docs/TUNING.md), each ``R``
            block its own; ``"layer"`` divides every block of a layer by the whole layer's ``||C||_F^2 / tr C``
            (estimated from pairs of 64 rows), the step a dense ``R`` would take, whatever blocks the plan chose.
        sample_fraction: Fraction of each batch's samples (images for convolutions, rows for Linear) whose input
            rows feed the statistics, in ``(0, 1]``. A Linear draws its rows uniformly over all leading dimensions
            (samples and sequence positions).
        max_rows: At most this many rows per layer and forward, drawn at random from the sample; ``None`` keeps
            every row (with ``sample_fraction=1.0``: the exact rule on the whole batch).
        include: Glob patterns on qualified module names to patch (``None``: every eligible layer). A plain prefix
            such as ``"layer4"`` also matches the modules below it.
        exclude: Patterns of layers to leave plain (e.g. the classifier head).
        max_features: Layers whose ``d`` exceeds this stay plain, with a warning (``R`` takes ``4 d^2`` bytes: a
            VGG classifier's ``d = 25088`` would need 2.4 GiB), unless ``block_size <= max_features`` gives them
            blocks. ``None`` for no limit.
        block_size: Layers with ``d > block_size`` get a block-diagonal ``R`` of equal blocks of at most this many
            features (whole input channels for convolutions): fusing ``W @ R`` then costs ``2 C_out d b`` instead of
            ``2 C_out d^2`` flops and only correlations within a block are removed. ``None``: dense ``R`` allowed.
            The plan never makes a block larger than this.
        max_overhead: The cost plan's budget: the estimated extra time of all DBP parts (forming or applying ``R``,
            sampling rows, the update) as a fraction of the measured plain training step, > 0. ``None``: no plan,
            every layer at its largest allowed block, fused into the weight, from the first step.
        max_memory: The plan's memory budget: every ``R`` and the update's workspace (its second moments and new
            ``R``, of the largest set of layers sharing a block size) take at most this many times the bytes of the
            model's parameters in one process (its shard under FSDP2), and are always allowed 1 GiB; layers that do
            not fit get smaller blocks (the ones that save the most bytes per decorrelation lost first), or stay
            plain. The plan table shows each layer's bytes and the total. ``None``: no limit.
        update_every: Update ``R`` on every k-th training batch that steps only (several optimizers stepping in one
            batch count once; rows are sampled only for those batches), which divides the sampling and update cost
            by k; fusing ``W @ R`` still happens every step.
        log_per_layer: Also log each layer's loss as ``decor/<layer name>``.
        use_cuda_stream: On a GPU, compute the update on a side CUDA stream, beside the optimizer step (automatic
            optimisation); ``R`` is written on the main stream at the end of the batch either way.
        fold_on_fit_end: At the end of ``fit``, fold ``R`` into the weights and restore the plain layers, so the
            model has no inference overhead. With ``False`` the model stays patched (its ``state_dict`` is plain
            either way).
        log_histograms_every_n_epochs: Every this many training epochs, log a TensorBoard histogram of each
            layer's off-diagonal ``R`` entries (``None``: never).
        log_correlation_image: Qualified name of one patched layer (e.g. ``"net.0"``) whose input correlation
            matrix, before and after decorrelation, is logged as a TensorBoard image (``None``: none). The callback
            keeps a copy of that layer's latest training input (no device sync per step) and computes
            the picture from at most 8192 of its rows at epoch end.
        log_image_every_n_epochs: Every this many training epochs, log the ``log_correlation_image`` picture.
        plan: ``"auto"``: the cost plan is made by the planner (measured, or taken from the plan cache). Or the path
            of a plan file written by ``callback.plan.save(path)`` (JSON or YAML), or a ``Plan``, to pin: every run,
            on any machine, gets its layouts. The file must name every decorrelated layer.
        plan_cache: Keep the costs a run measures on disk (``~/.cache/lightning_decor``, or
            ``$LIGHTNING_DECOR_CACHE``; ``LIGHTNING_DECOR_CACHE=off`` turns it off too), so that later runs with the
            same model, shapes, budget and machine plan identically without timing anything.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[DecorrelationCallback(decor_lr=1e-3, exclude=["fc"])])
    """

    def __init__(
        self,
        decor_lr: float = DEFAULTS["decor_lr"],
        kappa: float = DEFAULTS["kappa"],
        normalize: str = DEFAULTS["normalize"],
        sample_fraction: float = DEFAULTS["sample_fraction"],
        max_rows: int | None = DEFAULTS["max_rows"],
        include: list[str] | None = DEFAULTS["include"],
        exclude: list[str] | None = DEFAULTS["exclude"],
        max_features: int | None = DEFAULTS["max_features"],
        block_size: int | None = DEFAULTS["block_size"],
        max_overhead: float | None = DEFAULTS["max_overhead"],
        max_memory: float | None = DEFAULTS["max_memory"],
        update_every: int = DEFAULTS["update_every"],
        log_per_layer: bool = False,
        use_cuda_stream: bool = DEFAULTS["use_cuda_stream"],
        fold_on_fit_end: bool = True,
        log_histograms_every_n_epochs: int | None = None,
        log_correlation_image: str | None = None,
        log_image_every_n_epochs: int = 1,
        plan: str | Plan = "auto",
        plan_cache: bool = DEFAULTS["plan_cache"],
    ) -> None:
        self.config = DecorConfig(
            decor_lr=decor_lr, kappa=kappa, normalize=normalize, sample_fraction=sample_fraction, max_rows=max_rows,
            include=include, exclude=exclude, max_features=max_features, block_size=block_size,
            max_overhead=max_overhead, max_memory=max_memory, update_every=update_every,
            use_cuda_stream=use_cuda_stream, plan_cache=plan_cache,
        )  # fmt: skip
        self.log_per_layer = check_bool("log_per_layer", log_per_layer)
        self.fold_on_fit_end = check_bool("fold_on_fit_end", fold_on_fit_end)
        every = check_positive_int("log_histograms_every_n_epochs", log_histograms_every_n_epochs)
        self.log_histograms_every_n_epochs = every
        if log_correlation_image is not None and not isinstance(log_correlation_image, str):
            raise TypeError(
                "Expected `log_correlation_image` to be a layer name (str) or None, but got "
                f"{type(log_correlation_image).__name__}: {log_correlation_image!r}."
            )
        self.log_correlation_image = log_correlation_image
        check_positive_int("log_image_every_n_epochs", log_image_every_n_epochs, optional=False)
        self.log_image_every_n_epochs = log_image_every_n_epochs
        self._pinned = Plan.pinned(plan)  # read and checked now: a bad file fails before the Trainer starts
        # Runtime state; no tensors, streams or devices here so the callback pickles for ddp_spawn.
        self._engine: Decorrelator | None = None
        self._sharded = False  # ModelParallelStrategy: the engine is made once the model is sharded
        self._past_updates = 0  # updates of engines of earlier fits (a fit after folding makes a new engine)
        # Every rank computes the same losses from the same pooled rows, so the metric needs no sync of its own.
        self._metric = DecorrelationLoss(kappa=self.config.kappa, sync_on_compute=False)
        self._warned_skips = 0
        self._warned_waiting = False  # rows of PENDING_FORWARDS forwards waited for an update: warned once
        self._fresh = False  # an update happened since the last log
        self._stepped_batch: int | None = None
        self._plan_shown: Any = None
        self._update_due = False  # the stepping batch updates R at its end
        self._skips = SkipWatch()  # whether the GradScaler skipped an optimizer step of the batch (on the device)
        self._pictures = TensorBoardPictures(every, log_correlation_image, log_image_every_n_epochs)

    @property
    def engine(self) -> Decorrelator | None:
        """The :class:`lightning_decor.Decorrelator` doing the work (made in ``setup("fit")``)."""
        return self._engine

    @property
    def updates(self) -> int:
        """Number of ``R`` updates done."""
        return self._past_updates + (0 if self._engine is None else self._engine.updates)

    @property
    def plan(self) -> Plan | None:
        """The per-layer plan (:class:`lightning_decor.plan.Plan`): the pinned one until ``fit`` makes or applies
        it, ``None`` until it is made otherwise."""
        if self._engine is not None and self._engine.plan is not None:
            return self._engine.plan
        return self._pinned

    @property
    def pictures(self) -> TensorBoardPictures:
        """The opt-in TensorBoard pictures and what they keep of the current epoch."""
        return self._pictures

    @property
    def _layers(self) -> dict[str, DecorrelatedLayer]:
        return {} if self._engine is None else self._engine.layers

    # ------------------------------------------------------------------ setup and teardown
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._sharded = False
        if model_parallel(trainer):  # refuses what DBP cannot train with
            # `configure_model` shards the layers (fully_shard): patch the ones built in `__init__` before it, make
            # the engine in on_fit_start, once the model is sharded (it adopts layers patched in `configure_model`;
            # its report, and the warnings from it, count the layers patched here).
            decorrelate_reported(pl_module, self.config)
            self._sharded = True
            return
        if is_overridden("configure_model", pl_module):  # its layers do not exist yet: patched before everything
            build_configured_layers(trainer, pl_module)
        self._make_engine(pl_module)

    def _make_engine(self, pl_module: LightningModule) -> None:
        """The engine of ``pl_module`` (patched in place; layers patched before keep their ``R``), and the warnings
        from its report."""
        if self._engine is None or not self._engine.layers or self._engine.model is not pl_module:
            self._past_updates += 0 if self._engine is None else self._engine.updates
            # patches in place; layers patched before (a refit without folding) keep their R
            pinned = self._pinned if self._pinned is not None else "auto"
            self._engine = Decorrelator.from_config(pl_module, self.config, plan=pinned)
        for message in self._engine.report.warnings("DecorrelationCallback"):
            rank_zero_warn(message)
        self._pictures.check(self._layers)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sharded and (self._engine is None or self._engine.model is not pl_module):
            self._make_engine(pl_module)  # refuses layers sharded before they were patched
            if self.config.max_overhead is not None:
                rank_zero_info(SHARDED_NO_PLAN)
        modules = dict(pl_module.named_modules())
        replaced = sorted(name for name, layer in self._layers.items() if modules.get(name) is not layer)
        if replaced:
            raise RuntimeError(
                f"DecorrelationCallback patched {replaced} in `setup`, but `configure_model` built them anew "
                "afterwards. Expected `configure_model` to be idempotent (Lightning calls it again), e.g. return "
                "early when the layers exist."
            )
        self._stepped_batch, self._update_due = None, False  # batch counters restart with a new Trainer
        self._fresh, self._warned_skips = False, 0
        self._metric.reset()
        device = trainer.strategy.root_device
        if self._engine is not None:
            self._engine.start(device)
        self._metric = self._metric.to(device)

    def _release(self, fold_layers: bool) -> None:
        self._pictures.stop()
        if self._engine is None:
            return
        if fold_layers:
            self._engine.fold()  # a no-op on layers the user folded already
        else:
            self._engine.stop()

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release(fold_layers=self.fold_on_fit_end)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # teardown/on_fit_end do not run after an exception: leave a usable model (R is always finite).
        self._release(fold_layers=self.fold_on_fit_end)

    # ------------------------------------------------------------------ the update
    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Notes that this batch steps (under accumulation: the micro-batch that steps). R moves at the end of the
        # batch: a graph built before a step and backpropagated after it (GANs, several optimizers) and every
        # closure evaluation of an LBFGS step still find the R they were built with.
        batch = batch_index(trainer)
        if trainer.sanity_checking:
            return
        self._skips.note(grad_scaler(trainer))  # before each optimizer step: did the previous one of the batch skip?
        if self._stepped_batch == batch:
            return
        self._stepped_batch = batch
        self._update_due = True
        if (
            self._engine is not None
            and pl_module.automatic_optimization
            and not isinstance(optimizer, torch.optim.LBFGS)
        ):
            # One optimizer step and nothing after it that reads R (no later forward of this batch, no closure
            # evaluated again): the update is queued now, on the side stream beside the optimizer step (which reads
            # only W and its gradient), and written into R at the end of the batch.
            self._engine.launch()

    @torch.no_grad()
    def update_(self, pl_module: LightningModule) -> None:
        """One step of the engine (:meth:`lightning_decor.Decorrelator.step`): measure and plan during the first
        steps, then move every patched layer's ``R`` from the rows collected since the last update (every
        ``update_every``-th call), unless a ``GradScaler`` skipped the optimizer step. Override to customise; called
        once per stepping training batch, in ``on_train_batch_end``."""
        engine = self._engine
        if engine is None:
            return
        before, overhead = engine.updates, engine.overhead
        engine.step(skip=self._skips.take(grad_scaler(pl_module.trainer)))
        if engine.plan is not None and self._plan_shown is not engine.plan:  # after every (re)plan
            self._plan_shown = engine.plan
            rank_zero_info(engine.plan.table(engine.left_plain))
        elif engine.overhead is not overhead and engine.plan is not None:  # a check kept the plan
            rank_zero_info(engine.plan.table().splitlines()[0])
        if engine.overhead is not overhead and engine.overhead is not None:
            log_straight(pl_module.trainer, "decor/overhead", engine.overhead)
        if engine.updates > before and engine.last_losses is not None:
            self._metric.update(engine.last_losses)
            self._fresh = True

    # ------------------------------------------------------------------ logging
    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = self._stepped_batch == batch_index(trainer)
        if stepped and self._update_due:
            self._update_due = False
            self.update_(pl_module)  # R written on the main stream: every later reader sees the new R
        self._warn_waiting_rows()
        if not self._fresh or not stepped:
            return
        # Every batch that updated logs the mean over the updates since the last value Lightning wrote (a tensor:
        # no host sync), so `decor/loss` is in `callback_metrics` like any metric a module logs (EarlyStopping,
        # ModelCheckpoint(monitor=...), logger=False); where Lightning writes, the mean starts anew.
        metrics = {"decor/loss": self._metric.compute()}
        if lightning_writes(trainer):
            self._fresh = False
            self._metric.reset()
            engine = self._engine
            if self.log_per_layer and engine is not None and engine.last_losses is not None:
                metrics.update({f"decor/{name}": loss for name, loss in zip(engine.layers, engine.last_losses)})
            skipped = self._check_skipped()
            if skipped is not None:
                metrics["decor/skipped"] = skipped
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def _warn_waiting_rows(self) -> None:
        """Warn once when a layer's rows waited so long that only a sample is kept (host integers, no sync)."""
        if self._warned_waiting:
            return
        waiting = self._engine.waiting_layers() if self._engine is not None else []
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
        engine = self._engine
        if engine is None or engine.skipped is None:
            return None
        layers = engine.skipped_layers()  # at log intervals and epoch ends only, where the logger reads anyway
        skipped = sum(layers.values())
        if skipped > self._warned_skips:
            names = list(layers)
            rank_zero_warn(
                f"DecorrelationCallback skipped {skipped - self._warned_skips} decorrelation update(s) that "
                f"would have made R non-finite (NaN/Inf input or a too large `decor_lr`={self.config.decor_lr}); "
                f"R was kept. Layers: {names}."
            )
            self._warned_skips = skipped
        return torch.tensor(float(skipped), device=engine.skipped.device)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._engine is not None:
            self._engine.suspend()  # validation's forwards are not training rows, even with grad enabled

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._engine is not None:
            self._engine.resume()

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._engine is None:
            return {}
        return self._engine.state_dict()  # also when the plan left every layer plain

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._engine is not None and state_dict:
            self._engine.load_state_dict(state_dict)

    @override
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._engine is not None:  # once per fit, right after its first backward
            self._engine.check_direct_weight_reads()

    def layers(self) -> Iterator[tuple[str, DecorrelatedLayer]]:
        """The patched layers by qualified name."""
        return iter(self._layers.items())

    # ------------------------------------------------------------------ TensorBoard pictures (opt-in, epoch end)
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pictures.epoch_start(trainer, self._layers)

    @override
    @torch.no_grad()
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.log_every_n_steps <= 0:  # no step logging: still warn about skipped updates once an epoch
            self._check_skipped()
        self._pictures.epoch_end(trainer, self._layers)
