"""What ``DecorrelationCallback`` reads of Lightning's ``Trainer``, in one place: the strategies and callbacks it
refuses, building the layers of ``configure_model`` early, the batch counters Lightning's logging uses, the
``GradScaler``, and writing a metric straight to the loggers. A Lightning release that moves one of these changes
this file only."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

__all__ = [
    "batch_index",
    "build_configured_layers",
    "grad_scaler",
    "lightning_writes",
    "log_straight",
    "model_parallel",
    "stepping_batches",
]

# Strategies that shard parameters in their own wrappers (by class name, so subclasses and other namespaces are caught
# too); ModelParallelStrategy (the user's fully_shard, FSDP2) is supported.
_SHARDED_STRATEGIES = {"FSDPStrategy", "XLAFSDPStrategy", "DeepSpeedStrategy"}
# Callbacks that average parameters (by class name: WeightAveraging is new in Lightning 2.6; EMAWeightAveraging is
# one). They average the raw W and R apart, not the fused W @ R the model computes with.
_AVERAGING_CALLBACKS = {"WeightAveraging", "StochasticWeightAveraging"}


def model_parallel(trainer: Trainer) -> bool:
    """Whether ``trainer`` trains with ``ModelParallelStrategy`` (FSDP2); ``ValueError`` for what DBP cannot train
    with: a strategy that shards in its own wrappers, a weight-averaging callback, tensor parallelism."""
    strategies = {cls.__name__ for cls in type(trainer.strategy).__mro__}
    if strategies & _SHARDED_STRATEGIES:
        raise ValueError(
            f"DecorrelationCallback does not support `strategy`={type(trainer.strategy).__name__}: its wrappers "
            "shard the weights where R cannot be fused into them. For sharded training use ModelParallelStrategy "
            "(FSDP2: `fully_shard` in `configure_model`); otherwise a single device, 'ddp' or 'ddp_spawn'."
        )
    averaging = [
        type(cb).__name__
        for cb in trainer.callbacks
        if _AVERAGING_CALLBACKS & {cls.__name__ for cls in type(cb).__mro__}
    ]
    if averaging:
        raise ValueError(
            f"DecorrelationCallback does not support {', '.join(averaging)} in the Trainer's callbacks: weight "
            "averaging averages the raw weights W apart from each layer's R, so the averaged model would not be "
            "an average of the trained functions W @ R. Remove one of the two; to average a DBP run, average the "
            "weights its checkpoints hold (their state_dict holds the fused W @ R)."
        )
    if "ModelParallelStrategy" not in strategies:
        return False
    tensor_parallel = trainer.strategy.device_mesh["tensor_parallel"].size()
    if tensor_parallel > 1:  # a layer's input rows would be split or repeated across the TP ranks
        raise ValueError(
            "DecorrelationCallback supports ModelParallelStrategy for data parallelism (FSDP2) only: expected "
            f"`tensor_parallel_size=1`, but got {tensor_parallel}."
        )
    return True


def build_configured_layers(trainer: Trainer, pl_module: LightningModule) -> None:
    """Call ``pl_module.configure_model()`` now, in the contexts Lightning uses, so that the layers it builds exist
    (and are patched) before the checkpoint restore, the DDP wrap, the optimizers and the first compiled call (as
    Lightning's ``WeightAveraging`` does). Lightning's own call follows: the hook must be idempotent."""
    with (
        trainer.strategy.tensor_init_context(),
        trainer.strategy.model_sharded_context(),
        trainer.precision_plugin.module_init_context(),
    ):
        pl_module.configure_model()


def batch_index(trainer: Trainer) -> int:
    """The running index of the current training batch over the whole fit (restored on resume)."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.ready


def stepping_batches(trainer: Trainer) -> int:
    """Training batches that stepped so far (the current one not yet counted): Lightning's own count for its logging
    interval (as its LearningRateMonitor uses; under manual optimisation every batch counts), restored on resume.
    ``trainer.global_step`` counts optimizer steps instead, two per batch with two optimizers."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def lightning_writes(trainer: Trainer) -> bool:
    """Whether Lightning writes step metrics after this batch: after every ``log_every_n_steps``-th stepping batch,
    and when the training stops (as its logger connector decides)."""
    every = trainer.log_every_n_steps
    return every > 0 and ((stepping_batches(trainer) + 1) % every == 0 or trainer.should_stop)


def grad_scaler(trainer: Trainer) -> Any:
    """The ``GradScaler`` of ``16-mixed`` precision, ``None`` otherwise."""
    return getattr(trainer.precision_plugin, "scaler", None)


def log_straight(trainer: Trainer, name: str, value: float) -> None:
    """``name`` at the current step, straight to the loggers (on rank zero, whatever ``log_every_n_steps``) and into
    ``trainer.callback_metrics``: for a value measured once or twice per fit, rarely at a step where Lightning
    writes."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({name: value}, step=trainer.global_step)
    trainer.callback_metrics[name] = torch.tensor(value)
