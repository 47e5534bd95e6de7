"""Real torchvision architectures train a few steps with the default callback; fold keeps their outputs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from conftest import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decor import DecorrelationCallback, decorrelation_matrices, fold
from lightning_decor.layers import eligible_layers


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=1e-3)


NETS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=5),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=5),
    "vit": lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    ),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_architecture_trains_and_folds(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    module = Classifier(NETS[name]())
    reasons = eligible_layers(module)
    x = torch.randn(16, 3, 32, 32)
    data = DataLoader(TensorDataset(x, torch.randint(0, 5, (16,))), batch_size=8)
    cb = DecorrelationCallback(fold_on_fit_end=False)
    quiet_trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(module, data)
    Rs = decorrelation_matrices(module)
    assert set(Rs) == {n for n, why in reasons.items() if why is None} and Rs
    for layer, R in Rs.items():
        assert torch.isfinite(R).all(), layer
        assert not torch.equal(R, torch.eye(R.shape[0])), f"R of {layer} did not move"
    if name == "vit":  # attention's out_proj (a Linear subclass read directly) is left intact
        assert not any(n.endswith("out_proj") for n in Rs)
    if name == "mobilenet_v3_small":  # depthwise convolutions are skipped with their reason
        assert any(why and "groups=" in why for why in reasons.values())
    module.eval()
    with torch.no_grad():
        before = module(x)
    assert torch.isfinite(before).all()
    fold(module)
    assert not decorrelation_matrices(module)
    with torch.no_grad():
        # fold writes the very fused weight the patched layers computed with: equal bitwise in every setting measured
        # (1, 2 and 4 threads, MKL's SSE4.2 path); the tolerance allows a convolution algorithm picked anew
        torch.testing.assert_close(module(x), before, rtol=1e-4, atol=1e-5)
