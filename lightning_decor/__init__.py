"""lightning_decor: decorrelated backpropagation (DBP) as a PyTorch Lightning callback.

``DecorrelationCallback`` (the Lightning front-end) is imported lazily, so that the engine, the verbs and the math
(``Decorrelator``, ``decorrelate``, ``fold``, ``lightning_decor.functional``) work without importing Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_decor import attention as _attention  # noqa: F401 (registers nn.MultiheadAttention with the verbs)
from lightning_decor import averaging as _averaging  # noqa: F401 (routes AveragedModel through the fused weights)
from lightning_decor import huggingface as _huggingface  # noqa: F401 (transformers' Conv1D, without importing it)
from lightning_decor import timm_layers as _timm_layers  # noqa: F401 (timm's Conv2dSame, without importing it)
from lightning_decor.engine import Decorrelator
from lightning_decor.functional import decorrelation_loss, decorrelation_update_
from lightning_decor.patching import decorrelate, decorrelation_matrices, fold

if TYPE_CHECKING:
    from lightning_decor.callback import DecorrelationCallback
    from lightning_decor.metric import DecorrelationLoss

__version__ = "0.1.0"

__all__ = [
    "DecorrelationCallback",
    "DecorrelationLoss",
    "Decorrelator",
    "__version__",
    "decorrelate",
    "decorrelation_loss",
    "decorrelation_matrices",
    "decorrelation_update_",
    "fold",
]


def __getattr__(name: str) -> Any:
    if name == "DecorrelationCallback":
        from lightning_decor.callback import DecorrelationCallback

        return DecorrelationCallback
    if name == "DecorrelationLoss":
        from lightning_decor.metric import DecorrelationLoss

        return DecorrelationLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
