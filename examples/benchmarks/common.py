"""Shared pieces of the benchmarks: the machine stamp, a step timer callback, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (models, data, timing)


def fresh_plan_cache() -> str:
    """Give this benchmark run a plan cache of its own (unless ``$LIGHTNING_DECOR_CACHE`` names one): its first run of
    each model and configuration measures the costs, and the later seeds and repeats replay that plan, as a user's
    later runs on the same machine do, without depending on what earlier benchmark runs kept in ~/.cache."""
    return os.environ.setdefault("LIGHTNING_DECOR_CACHE", tempfile.mkdtemp(prefix="lightning_decor_plan_cache_"))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class StepTimer(pl.Callback):
    """Wall-clock of each training batch, from ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
    backward, the decorrelation update and the optimizer step). Synchronises CUDA at both ends (benchmark only).

    Put it after every other callback: Lightning calls the hooks in list order, and ``DecorrelationCallback`` moves
    ``R`` in its own ``on_train_batch_end``, which a timer listed before it would not count."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def _sync(self, trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._sync(trainer)
        self.times.append(time.perf_counter() - self._t)


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    return out
