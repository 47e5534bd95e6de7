from __future__ import annotations

import pytest
import torch

from lightning_decor import DecorrelationLoss


def test_mean_of_losses_and_rows() -> None:
    metric = DecorrelationLoss(kappa=0.0)
    metric.update(torch.tensor([0.5, 1.5]))
    metric.update(torch.tensor(4.0))
    metric.update(torch.tensor([float("nan"), float("inf")]))  # no rows / skipped: left out of the mean
    assert metric.compute().item() == pytest.approx(2.0)  # (0.5 + 1.5 + 4) / 3: exact in float32
    metric.reset()
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [2.0, 0.0]])  # C = [[2, 0], [0, 2/3]]: no off-diagonal
    metric.update(z)
    assert metric.compute().item() == pytest.approx(0.0)  # (1 - 1 + 0) / 3: exact
    metric = DecorrelationLoss(kappa=1.0)
    metric.update(z)
    # float32 against Python's float64: measured relative error 6e-8, pytest's default rel=1e-6 leaves 17x
    assert metric.compute().item() == pytest.approx(((2 - 1) ** 2 + (2 / 3 - 1) ** 2) / 4)


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"Expected `kappa` in \[0, 1\], but got -1"):
        DecorrelationLoss(kappa=-1)
    with pytest.raises(TypeError, match=r"Expected `value` to be a tensor, but got float"):
        DecorrelationLoss().update(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Expected `value` with at most 2 dimensions, but got shape \(1, 1, 1\)"):
        DecorrelationLoss().update(torch.zeros(1, 1, 1))
