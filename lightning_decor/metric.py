"""The decorrelation loss as a torchmetrics ``Metric`` (mean over layers and updates)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_decor.functional import decorrelation_loss

__all__ = ["DecorrelationLoss"]


class DecorrelationLoss(Metric):
    """Mean decorrelation loss over every value passed to :meth:`update` since the last reset.

    ``update`` takes either decorrelated rows ``z`` (a 2-D ``(n, d)`` tensor, whose loss is computed with
    :func:`lightning_decor.functional.decorrelation_loss` and this metric's ``kappa``), or loss values already
    computed (a scalar or a 1-D tensor of per-layer losses, as the decorrelation update returns them).
    Non-finite values (a layer that saw no rows, an update skipped for NaN/Inf input) are left out of the mean.
    Synchronises across processes like any torchmetrics ``Metric`` (sum and count states).

    Args:
        kappa: Weight of the unit-variance term used for rows, in ``[0, 1]``.

    Example:
        >>> metric = DecorrelationLoss(kappa=0.0)
        >>> metric.update(torch.tensor([0.5, 1.5]))
        >>> metric.compute()
        tensor(1.)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    total: Tensor
    count: Tensor

    def __init__(self, kappa: float = 0.5, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        decorrelation_loss(torch.ones(1, 1), kappa)  # validates kappa with the functional's message
        self.kappa = kappa
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, value: Tensor) -> None:
        """Add rows ``z`` (2-D) or precomputed loss values (0-D or 1-D)."""
        if not isinstance(value, Tensor):
            raise TypeError(f"Expected `value` to be a tensor, but got {type(value).__name__}.")
        if value.dim() == 2:
            value = decorrelation_loss(value, self.kappa)
        elif value.dim() > 2:
            raise ValueError(f"Expected `value` with at most 2 dimensions, but got shape {tuple(value.shape)}.")
        value = value.detach().reshape(-1).to(self.total.dtype)
        finite = torch.isfinite(value)  # NaN marks "no rows this step" or a skipped update: left out (no host sync)
        self.total += torch.where(finite, value, 0.0).sum()
        self.count += finite.sum()

    def compute(self) -> Tensor:
        """The mean loss (NaN before any update)."""
        return (self.total / self.count).float()
