"""Real torchvision architectures train a few steps with the default callback; fold keeps their outputs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decor import DecorrelationCallback, decorrelation_matrices, fold
from lightning_decor.patching import eligible_layers
from lightning_decor.planner import plain_steps

from conftest import quiet_trainer


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


NETS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=5),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=5),
    "vit": lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    ),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_architecture_trains_and_folds(name: str, tmp_path) -> None:
    module = Classifier(NETS[name]())
    reasons = eligible_layers(module)
    x = torch.randn(16, 3, 32, 32)
    data = DataLoader(TensorDataset(x, torch.randint(0, 5, (16,))), batch_size=8)
    cb = DecorrelationCallback(fold_on_fit_end=False, max_overhead=100.0)  # the plan, with a budget all fits in
    quiet_trainer(tmp_path, max_epochs=10, callbacks=[cb]).fit(module, data)  # 16 samples / batch 8: 20 steps
    assert set(cb.plan.layers) == {n for n, why in reasons.items() if why is None}  # every eligible layer planned
    kept = {n for n, p in cb.plan.layers.items() if p.form != "plain"}
    Rs = decorrelation_matrices(module)
    assert set(Rs) == kept and Rs and cb.updates == 20 - plain_steps()  # after the planning steps
    for layer, R in Rs.items():
        assert torch.isfinite(R).all(), layer
        assert R.shape[-1] == cb.plan.layers[layer].block, layer
        eye = torch.eye(R.shape[-1]).expand_as(R)
        assert not torch.equal(R, eye), f"R of {layer} did not move"
    if name == "vit":  # attention's packed in-projection and out_proj (read directly by PyTorch) are planned too
        assert {
            "net.encoder.layers.encoder_layer_0.self_attention",
            "net.encoder.layers.encoder_layer_0.self_attention.out_proj",
        } <= set(cb.plan.layers)
    if name == "mobilenet_v3_small":  # depthwise convolutions are planned too, with one R per channel
        depthwise = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert depthwise and set(depthwise) <= set(cb.plan.layers)
        for n in set(depthwise) & kept:
            conv = module.get_submodule(n)
            assert Rs[n].shape == (conv.groups, conv.weight[0].numel(), conv.weight[0].numel())
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
