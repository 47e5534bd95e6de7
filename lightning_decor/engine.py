"""``Decorrelator``: the Lightning-free engine of decorrelated backpropagation.

It owns the patched layers of one model and their plan, takes their sampled input rows, pools them across
processes (``torch.distributed``, when initialised), moves every ``R`` (computed on a side CUDA stream beside the
optimizer step after :meth:`Decorrelator.launch`), and keeps the losses, skip counts and a ``state_dict``. Plain
PyTorch::

    dec = Decorrelator(model)               # patches the model in place
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        dec.step()                          # once per optimizer step, after its backward
        optimizer.step()
    dec.fold()                              # a plain model again, no inference overhead

``DecorrelationCallback`` is the Lightning front-end of the same engine (when ``step`` runs, where it logs).
Its phases: the plan (:mod:`~lightning_decor.planner`, for the first :func:`~lightning_decor.planner.plain_steps`
steps with ``max_overhead`` or a pinned ``plan``; else every layer at its largest block within the memory budget),
the rows (:mod:`~lightning_decor.rows`), one ``R`` per input (:mod:`~lightning_decor.sharing`), the batched update
(:mod:`~lightning_decor.update`) and the checkpoint (:mod:`~lightning_decor.checkpoint`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_decor.checkpoint import layer_state, misfit_warning, saved_layers, write_layers
from lightning_decor.config import DEFAULTS, Configured, DecorConfig
from lightning_decor.distributed import Pool
from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.memory import parameter_bytes
from lightning_decor.patching import (
    apply_plan,
    current_plan,
    decorrelated_layers,
    fold_layer,
    restore_routing,
)
from lightning_decor.plan import Plan
from lightning_decor.planner import CALIBRATION_STEPS, Planner, plain_steps
from lightning_decor.probe import environment, make_planner
from lightning_decor.reports import SHARDED_NO_PLAN, DirectReads, all_plain_warning, decorrelate_reported
from lightning_decor.rows import RowBuffers
from lightning_decor.sharing import InputSharing
from lightning_decor.update import BatchedUpdate, grad_scale

__all__ = ["CALIBRATION_STEPS", "Decorrelator", "grad_scale", "plain_steps"]

STATE_VERSION = 3


def _identity(R: Tensor) -> bool:
    """Whether ``R`` (dense or a stack of blocks) is the identity (one host read, when an engine is made)."""
    return torch.equal(R, torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R))


def _rank_zero() -> bool:
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


class Decorrelator(Configured):
    """Decorrelated backpropagation (Dalm et al., https://arxiv.org/abs/2405.02385) for a plain ``nn.Module``.

    Patches ``model`` in place (see :func:`lightning_decor.decorrelate`): every ``nn.Linear`` and
    ``nn.Conv1d/2d/3d`` (exact types; grouped and depthwise convolutions get one ``R`` per group) computes with
    ``W @ R``. Call :meth:`step` once per optimizer step, after its backward; :meth:`fold` at the end.

    Warns about layers left plain where a user may expect ``R``, ``include``/``exclude`` patterns that match no layer,
    and a model with no layer to patch (:attr:`report`). **Reproducible**: same seed, arguments and machine give
    bit-identical runs, and a resume from :meth:`state_dict` equals the uninterrupted run (the README's "Reproducible
    runs").

    Args:
        model: The model to decorrelate, patched in place.
        plan: ``"auto"`` (made by the planner), or a plan to pin: a :class:`lightning_decor.plan.Plan` or the path of
            a file written by :meth:`lightning_decor.plan.Plan.save`. A pinned plan must name every patched layer.
        decor_lr, kappa, normalize, sample_fraction, max_rows, include, exclude, max_features, block_size,
            max_overhead, max_memory, update_every, use_cuda_stream, plan_cache: The fields of the engine's
            :attr:`config`, a :class:`lightning_decor.config.DecorConfig`: each is described there.

    Attributes:
        config: The :class:`lightning_decor.config.DecorConfig` of the keywords (also read as ``dec.decor_lr``...).
        plan: The per-layer plan (:class:`lightning_decor.plan.Plan`), ``None`` until it is made.
        overhead: DBP's share of the training step as last measured (the plan's check), ``None`` before.
        planner: The :class:`lightning_decor.planner.Planner` (``None`` without a plan to make).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decor_lr: float = DEFAULTS["decor_lr"],
        kappa: float = DEFAULTS["kappa"],
        normalize: str = DEFAULTS["normalize"],
        sample_fraction: float = DEFAULTS["sample_fraction"],
        max_rows: int | None = DEFAULTS["max_rows"],
        include: Sequence[str] | None = DEFAULTS["include"],
        exclude: Sequence[str] | None = DEFAULTS["exclude"],
        max_features: int | None = DEFAULTS["max_features"],
        block_size: int | None = DEFAULTS["block_size"],
        max_overhead: float | None = DEFAULTS["max_overhead"],
        max_memory: float | None = DEFAULTS["max_memory"],
        update_every: int = DEFAULTS["update_every"],
        use_cuda_stream: bool = DEFAULTS["use_cuda_stream"],
        plan: str | os.PathLike[str] | Plan = "auto",
        plan_cache: bool = DEFAULTS["plan_cache"],
    ) -> None:
        config = DecorConfig(
            decor_lr=decor_lr, kappa=kappa, normalize=normalize, sample_fraction=sample_fraction, max_rows=max_rows,
            include=include, exclude=exclude, max_features=max_features, block_size=block_size,
            max_overhead=max_overhead, max_memory=max_memory, update_every=update_every,
            use_cuda_stream=use_cuda_stream, plan_cache=plan_cache,
        )  # fmt: skip
        self._init(model, config, plan)
        for message in self.report.warnings("Decorrelator") if _rank_zero() else ():
            warnings.warn(message, stacklevel=2)  # the plain front-end's (the callback gives its own)

    @classmethod
    def from_config(
        cls, model: nn.Module, config: DecorConfig, *, plan: str | os.PathLike[str] | Plan = "auto"
    ) -> Decorrelator:
        """The engine of ``config`` (checked when it was made), as ``DecorrelationCallback`` makes it."""
        if not isinstance(config, DecorConfig):
            raise TypeError(f"Expected `config` to be a DecorConfig, but got {type(config).__name__}.")
        engine = cls.__new__(cls)
        engine._init(model, config, plan)
        return engine

    def _init(self, model: nn.Module, config: DecorConfig, plan: str | os.PathLike[str] | Plan) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
        self.config = config
        pinned = Plan.pinned(plan)
        self.model = model
        # What patching left plain, with why, and patterns that matched nothing: as data, for the table and warnings.
        new, self.report = decorrelate_reported(model, config)
        self.layers: dict[str, DecorrelatedLayer] = decorrelated_layers(model)
        # DDP broadcasts rank 0's buffers before every forward; R is kept equal on all ranks by pooling rows instead.
        ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        model._ddp_params_and_buffers_to_ignore = sorted(ignored | {f"{n}.decor_R" for n in self.layers})  # type: ignore[assignment]
        # Layers patched before this engine (a model handed back patched) keep their R and form: only fresh ones,
        # whose R is still the identity, run plain while the step is measured and are planned.
        self._fresh = [name for name in self.layers if name in set(new)]
        if pinned is not None:
            pinned.check_fits({name: self.layers[name] for name in self._fresh})
        self.plan: Plan | None = None
        self.steps = 0  # calls of step()
        self._pinned = pinned
        # the stacks of R, the side stream, an update launched and not yet written, what the last one published
        self._update = BatchedUpdate()
        # A private generator per device: sampling rows must not shift the global RNG (and so the data order).
        self._rows = RowBuffers(self.layers, config.sample_fraction, config.max_rows, torch.initial_seed() % 2**63)
        for name, layer in self.layers.items():
            layer.decor_buffer = self._rows[name]
        # Layers reading the same input share one R, found in the first training step: only while their R is still
        # the identity (fresh, or patched before and never moved: under ModelParallelStrategy the callback patches)
        shareable = set(self._fresh) | {n for n, m in self.layers.items() if n not in new and _identity(m.decor_R)}
        self._sharing = InputSharing(self._rows.sampling, shareable)
        self._pool = Pool()  # the processes rows are pooled over (DDP, FSDP2)
        self._direct_reads: DirectReads | None = None
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.planner: Planner | None = None
        if self._fresh and (config.max_overhead is not None or pinned is not None) and not self._sharded():
            self.planner = make_planner(
                model, {name: self.layers[name] for name in self._fresh}, config, pinned=pinned,
                max_memory=self.memory_budget(),
                device=lambda: self._device, agree=self._pool.agree, leader=_rank_zero(), rows=self._rows,
            )  # fmt: skip
        else:
            self._set_plan(current_plan(self.layers, self.memory_budget(), self._moved()))
        self.start(self._device)

    @property
    def left_plain(self) -> dict[str, str]:
        """Every layer of a known kind (or a subclass of one) left plain, with why: the plan table lists them."""
        return self.report.left_plain

    @property
    def overhead(self) -> float | None:
        return None if self.planner is None else self.planner.overhead

    @property
    def updates(self) -> int:
        """Number of updates of ``R`` so far."""
        return self._update.count

    @property
    def last_losses(self) -> Tensor | None:
        """Each layer's decorrelation loss at the last update, before its step (NaN: no rows), on the model's device
        (published by :meth:`step` with the new ``R``, on the main stream)."""
        return self._update.last_losses

    @property
    def skipped(self) -> Tensor | None:
        """Per layer, the updates skipped because they would have made ``R`` non-finite."""
        return self._update.skipped

    def skipped_layers(self) -> dict[str, int]:
        """The layers with skipped updates and how many (one host read of :attr:`skipped`)."""
        skipped = self._update.skipped
        return {} if skipped is None else {name: k for name, k in zip(self.layers, skipped.tolist()) if k > 0}

    # ------------------------------------------------------------------ life cycle
    def start(self, device: torch.device | None = None) -> None:
        """(Re)start on ``device`` (default: the model's): side stream, process group for pooling rows when
        ``torch.distributed`` is initialised with several processes, and row collection. Until the first plan is
        made, the planner's environment (the plan cache's key, the analytic model's constants) follows the device:
        under Lightning the engine is made while the model is still on the CPU."""
        self._device = (
            device if device is not None else next((p.device for p in self.model.parameters()), torch.device("cpu"))
        )
        self._update.start(self._device, self.config.use_cuda_stream)
        if self.planner is not None and self.planner.plan is None:
            self.planner.environment = environment(self.model, self._device, self.config.normalize)
            self.planner.device_type = self._device.type
        self._pool.start(needed=bool(self.layers))  # collective: every rank has the same layers
        self._update.reset_skipped(len(self.layers))
        self._rows.collect(self._collects_next())
        # Which gradient each weight holds now, to tell at the first step which layers got one without a forward.
        self._direct_reads = DirectReads(self.layers)
        if self.planner is not None:
            self.planner.restart()  # the plain step is measured within one run, never across a pause between two

    def check_direct_weight_reads(self) -> None:
        """Once after :meth:`start` (at the first :meth:`step`, or earlier, right after the first backward): warn
        about layers whose weight got a gradient while their forward was not called (:class:`DirectReads`)."""
        reads, self._direct_reads = self._direct_reads, None
        if reads is None:
            return
        planner = self.planner
        bypassed = reads.found(self.layers, noted=lambda name: (
            self._rows.noted(name) or (planner is not None and planner.forwards_seen(name) > 0)
        ))  # fmt: skip
        if bypassed and _rank_zero():
            warnings.warn(DirectReads.message(bypassed), stacklevel=3)

    def stop(self) -> None:
        """Stop collecting rows and drop the pending ones and an update launched and not written (the model stays
        patched), and release the process group made for pooling."""
        self._update.drop()
        self._rows.collect(False)
        self._rows.drop()
        self._pool.stop()

    def fold(self) -> list[str]:
        """Stop, and turn every patched layer back into its plain class with weight ``W @ R``."""
        self.stop()
        names = []
        for name, layer in self.layers.items():
            if isinstance(layer, DecorrelatedLayer):  # the user may have folded it already
                fold_layer(layer)
                names.append(name)
        restore_routing(self.model)  # transformer layers get their fast paths back, averages their plain update
        self.layers, self._rows.buffers = {}, {}
        self._sharing.followers, self._update.ties = {}, []
        self._update.build(self.layers)
        return names

    def wait(self) -> None:
        """Make the current CUDA stream wait for an update launched on the side stream (on the device, no host
        sync); a no-op otherwise. ``R`` is only ever written on the main stream (by :meth:`step`, after this wait),
        so its readers need not call it; whatever writes ``R`` or frees what the side stream reads does."""
        self._update.wait()

    # ------------------------------------------------------------------ the step
    def step(self, *, skip: Tensor | None = None) -> None:
        """Once per optimizer step, after its backward: the planning steps (see the module docstring), then every
        ``update_every``-th call moves every ``R`` from the rows collected since the last update.

        Without a :meth:`launch` before, the update is computed on the current stream; after one, this writes the
        launched update (on the main stream, once it waits on the device for the side stream). Either way ``R``,
        :attr:`last_losses` and :attr:`skipped` are written on the main stream and nothing is read back to the host.

        Args:
            skip: A boolean tensor (one element, any device, never read on the host): where true, this step's update
                leaves every ``R`` as it is, e.g. when a ``GradScaler`` skipped the optimizer step.
        """
        if not self.layers:
            return
        self._follow_device()
        self.check_direct_weight_reads()
        if not self._update.launched:  # launch() resolved the groups of this step already
            self._share()
        self.steps += 1
        planner = self.planner
        if self._update.launched:  # launched early by launch(): write it now
            self._commit(skip)
        elif planner is not None and not planner.done and self._sharded():  # sharded after the engine was made
            warnings.warn(SHARDED_NO_PLAN, stacklevel=2)
            self.planner = None
            self._rows.end_observing()
            self._set_plan(current_plan(self.layers, self.memory_budget(), self._moved()))
            self.update_(skip=skip)
        elif planner is not None and not planner.done:
            action = planner.step()
            if not planner.observing:  # the observers go once the plan is made
                self._rows.end_observing()
            if action.plan is not None:
                self._set_plan(action.plan)
            if action.dry:
                self.update_(commit=False)  # the update's work for the check; R stays the identity
            else:
                self._rows.drop()  # rows sampled while no update is due (see Planner.collects_next)
        elif self._due(self.steps):
            self.update_(skip=skip)
        self._rows.collect(self._collects_next())

    def launch(self) -> bool:
        """Queue the coming :meth:`step`'s update now, from the rows collected so far: on a GPU with
        ``use_cuda_stream`` it runs on a side stream, beside whatever the main stream does until that :meth:`step`
        (the optimizer step: it reads only ``W`` and its gradient, the update only ``R`` and the rows). ``R`` keeps
        its value until :meth:`step` writes the new one on the main stream; rows of later forwards wait for the next
        update. Only when the coming step moves ``R`` (not during the planning steps)::

            loss.backward()
            dec.launch()        # the update, on the side stream ...
            optimizer.step()    # ... beside the optimizer step
            dec.step()          # the new R, on the main stream

        Returns:
            Whether an update was launched.
        """
        planner = self.planner
        if not self.layers or self._update.launched or (planner is not None and not planner.done):
            return False
        if not self._due(self.steps + 1):
            return False
        self._follow_device()
        self.check_direct_weight_reads()  # before the rows are taken: it asks which layers captured some
        self._share()
        self._launch(side=True)
        return self._update.launched

    def _share(self) -> None:
        """Before an update takes rows: one R for the layers that read the same input (:mod:`~.sharing`)."""
        pool = self._pool
        if self._sharing.resolve(self.layers, self._rows.buffers, pool.agree, pool.any_rank, pooled=pool.active):
            self._tie()

    def _tie(self) -> None:
        """(Re)build the stacks of the updated layers, the layers sharing an ``R`` tied to it."""
        self._update.ties = self._sharing.tie(self.layers, self._rows.buffers, self.plan)
        self._update.build(self._sharing.updated(self.layers))

    @property
    def exchange(self) -> str:
        """What processes exchange before each update: ``"rows"`` (all-gather), ``"moments"`` (all-reduce of each
        block's ``x^T x``: the same ``R`` up to rounding) or ``"auto"`` (:func:`~.distributed.cheaper_exchange`)."""
        return self._update.exchange

    @exchange.setter
    def exchange(self, value: str) -> None:
        self._update.set_exchange(value, self.config.normalize)

    @property
    def exchanged(self) -> str | None:
        """What the last update exchanged between processes (``None``: one process, or no update yet)."""
        return self._update.exchanged

    @property
    def shared(self) -> dict[str, str]:
        """``{layer: the layer whose R it reads}``: layers that read the same input share one ``R``."""
        return dict(self._sharing.followers)

    def memory_budget(self) -> int | None:
        """Bytes every ``R`` and the update's workspace may take (:meth:`DecorConfig.memory_budget` of the bytes of
        the model's parameters in this process: its shards under FSDP2)."""
        return self.config.memory_budget(parameter_bytes(self.model))

    def _moved(self) -> frozenset[str]:
        """Layers patched before this engine: their ``R`` may have moved, so no plan changes their layout."""
        return frozenset(self.layers) - set(self._fresh)

    def _sharded(self) -> bool:
        """Whether FSDP2 shards the layers' weights (``DTensor`` outside the forward)."""
        return any(isinstance(layer.weight, DTensor) for layer in self.layers.values())

    def _follow_device(self) -> None:
        device = next(iter(self.layers.values())).weight.device
        if device != self._device:  # the model moved after the engine was made (e.g. by Fabric's setup)
            self.start(device)

    def _due(self, call: int) -> bool:
        first = 1 if self.planner is None else self.planner.first_moving_call
        return call >= first and (call - first) % self.config.update_every == 0

    def _collects_next(self) -> bool:
        """Whether the coming step samples rows: when the next call updates (or runs a dry update for the check)."""
        planner = self.planner
        if planner is not None and not planner.done:
            return planner.collects_next()
        return self._due(self.steps + 1)

    def waiting_layers(self) -> list[str]:
        """Layers whose rows of more than :data:`lightning_decor.rows.PENDING_FORWARDS` forwards' worth waited for
        an update (only a uniform sample of them is kept): an optimizer that steps outside the engine's sight."""
        return self._rows.waiting()

    def suspend(self) -> None:
        """No rows are taken until :meth:`resume` (forwards outside training steps: validation that enables grad)."""
        self._rows.suspend(True)

    def resume(self) -> None:
        """Take rows again where the coming step needs them."""
        self._rows.suspend(False, collect=self._collects_next())

    def _set_plan(self, plan: Plan) -> None:
        """Apply ``plan`` (:func:`lightning_decor.patching.apply_plan`); warn when it leaves every layer plain."""
        for name in apply_plan(self.model, self.layers, plan):
            del self.layers[name], self._rows.buffers[name]
        if plan.layers and not self.layers and _rank_zero():
            warnings.warn(all_plain_warning(plan), stacklevel=3)
        self.plan = plan
        self._update.reset_skipped(len(self.layers))
        self._tie()

    @torch.no_grad()
    def update_(self, commit: bool = True, *, skip: Tensor | None = None) -> None:
        """Move every ``R`` by one step from the rows collected since the last update (a layer without rows keeps
        its ``R``), on the current stream; no host synchronisation. ``commit=False`` does the same work and leaves
        ``R`` and the counters as they are (the plan's check times it). ``skip``: as in :meth:`step`."""
        self._launch(side=False)
        if commit:
            self._commit(skip)
        else:
            self._update.drop()

    def _launch(self, side: bool) -> None:
        """Take every layer's rows and launch the batched update from them (:meth:`BatchedUpdate.launch`)."""
        # A layer whose weight does not train now (frozen during training, e.g. by BaseFinetuning) keeps its R, so
        # that it keeps its function W @ R; unfrozen, it moves again.
        updated = self._sharing.updated(self.layers)
        rows = [(taken if layer.weight.requires_grad else None) for name, layer in updated.items()
                for taken in (self._rows[name].take(),)]  # fmt: skip
        self._update.launch(updated, rows, self.config, side=side, pool=self._pool)

    def _commit(self, skip: Tensor | None) -> None:  # on the main stream; per-layer results for every layer
        self._update.commit(skip, expand=lambda results: self._sharing.expand(results, self.layers))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``R`` and the raw weight of every layer (checkpoints of the module hold ``W @ R``), the plan and the
        planner's state, the arguments that shaped them, the sampling generator and counters: enough to continue
        exactly, also when the plan left every layer plain."""
        return {
            "version": STATE_VERSION,
            "arguments": self.config.plan_arguments(None if self._pinned is None else self._pinned.layouts()),
            "plan": None if self.plan is None else self.plan.state_dict(),
            "planner": None if self.planner is None else self.planner.state_dict(),
            **layer_state(self.layers, self._sharing.updated(self.layers)),
            "generator": self._rows.generators.state_dict(),
            "sharing": self._sharing.state_dict(),
            "updates": self.updates,
            "steps": self.steps,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. The arguments that shape a plan must be those of the saved state
        (``ValueError`` naming the first that differs); the saved plan is applied first (its layouts and forms),
        then every layer whose saved ``R`` fits its layout gets its ``R`` and raw weight; a layer that does not fit
        (a layer patched now but not then) keeps its state and is named in a warning. Nothing is written before
        everything is checked, so a failed restore leaves the model as it was."""
        if state.get("version") != STATE_VERSION:
            warnings.warn("Decorrelator: unknown saved state; training continues with R = I.", stacklevel=2)
            return
        self._update.drop()  # an update launched on the side stream still reads R: dropped, R restored below
        self.config.check_resume(state["arguments"], None if self._pinned is None else self._pinned.layouts())
        plan = Plan.from_state_dict(state["plan"]) if state.get("plan") is not None else None
        # a state saved before groups existed: each layer keeps its own R (theirs may differ)
        self._sharing.load_state_dict(state.get("sharing") or {"followers": {}, "formed": True}, self._rows.buffers)
        restorable, skipped = saved_layers(self.layers, state["R"], state["raw_weight"], plan, self._sharing.followers)
        if skipped:
            warnings.warn(misfit_warning(skipped), stacklevel=2)
        if self.planner is not None and state.get("planner") is not None:
            self.planner.load_state_dict(state["planner"])
        if plan is not None:
            for name in skipped:  # keep their current layout out of the saved plan
                plan.layers.pop(name, None)
            self._set_plan(plan)
            if self.planner is not None:
                self.planner.plan = self.plan
        if self.planner is None or not self.planner.observing:
            self._rows.end_observing()
        if plan is None:  # applying a plan ties the restored groups
            self._tie()
        write_layers(self.layers, restorable)
        if state.get("generator") is not None:
            self._rows.generators.load_state_dict(state["generator"])
        self._update.count = int(state["updates"])
        self.steps = int(state["steps"])
        self.start(self._device)
