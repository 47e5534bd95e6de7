"""A clock for time-to-accuracy runs: training wall-clock with evaluation excluded (a Lightning Callback)."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


class TrainClock(pl.Callback):
    """Records ``(train_seconds, global_step, metric)`` after every validation run during ``fit``.

    ``train_seconds`` counts from ``on_train_start`` and leaves out the time spent in validation, so two methods
    are compared on training compute only. Use ``num_sanity_val_steps=0``.
    """

    def __init__(self, monitor: str = "val/acc") -> None:
        self.monitor = monitor
        self.history: list[tuple[float, int, float]] = []
        self.train_seconds = 0.0
        self._start = 0.0
        self._excluded = 0.0
        self._val_start = 0.0

    def _now(self) -> float:
        return time.perf_counter() - self._start - self._excluded

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._excluded, self.history = time.perf_counter(), 0.0, []

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.training and trainer.state.fn != "fit":
            return
        value: Any = trainer.callback_metrics.get(self.monitor)
        seconds = self._val_start - self._start - self._excluded
        self._excluded += time.perf_counter() - self._val_start
        if value is not None:
            self.history.append((seconds, trainer.global_step, float(value)))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_seconds = self._now()


def record(clock: TrainClock, trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any) -> dict[str, Any]:
    """After ``trainer.fit``: the run's ``history`` (with the final model evaluated too, when the last evaluation
    was before the last step), ``train_seconds``, ``final_acc`` and ``best_acc``."""
    hist = clock.history
    if not hist or hist[-1][1] != trainer.global_step:
        value = trainer.validate(module, datamodule=datamodule, verbose=False)[0][clock.monitor]
        hist.append((clock.train_seconds, trainer.global_step, float(value)))
    return {
        "history": hist,
        "train_seconds": clock.train_seconds,
        "final_acc": hist[-1][2],
        "best_acc": max(h[2] for h in hist),
    }


def first_time_reaching(history: list[tuple[float, int, float]], target: float) -> tuple[float, int] | None:
    """``(seconds, step)`` of the first evaluation with metric >= ``target``, or ``None``."""
    for seconds, step, value in history:
        if value >= target:
            return seconds, step
    return None
