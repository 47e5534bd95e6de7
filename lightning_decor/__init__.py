"""lightning_decor: decorrelated backpropagation (DBP) as a PyTorch Lightning callback."""

from lightning_decor.callback import DecorrelationCallback
from lightning_decor.functional import decorrelation_loss, decorrelation_update_
from lightning_decor.layers import decorrelate, decorrelation_matrices, fold
from lightning_decor.metric import DecorrelationLoss

__version__ = "0.1.0"

__all__ = [
    "DecorrelationCallback",
    "DecorrelationLoss",
    "__version__",
    "decorrelate",
    "decorrelation_loss",
    "decorrelation_matrices",
    "decorrelation_update_",
    "fold",
]
