"""``timm`` models, random init (nothing downloaded): which layers are decorrelated (``Conv2dSame`` exactly; other
subclasses, such as ``StdConv2d``, plain with the reason), ``Conv2dSame`` against the plain layer, a training step,
and ``fold`` exact against the trained model. Skipped when ``timm`` is not installed (``make test`` installs it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.layers import Conv2dSame, StdConv2d  # noqa: E402

from lightning_decor import Decorrelator, decorrelate, fold  # noqa: E402
from lightning_decor.layers import DecorrelatedLayer, eligible_layers  # noqa: E402


@pytest.mark.parametrize("form", ["fused", "input"])
def test_conv2d_same_pads_as_timm_and_computes_with_w_r(form: str) -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = Conv2dSame(3, 4, 3, stride=2)  # an odd input: the "same" padding is asymmetric
    plain = Conv2dSame(3, 4, 3, stride=2)
    decorrelate(layer)
    assert isinstance(layer, DecorrelatedLayer) and isinstance(layer, Conv2dSame)
    R = torch.eye(27) + 0.05 * torch.randn(27, 27, generator=g)
    with torch.no_grad():
        layer.decor_R.copy_(R)
        plain.weight.copy_((layer.weight.reshape(4, -1) @ R).reshape_as(layer.weight))  # W R, written out
        plain.bias.copy_(layer.bias)
    layer.decor_form = form
    x = torch.randn(2, 3, 9, 11, generator=g)
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=1e-5)
    layer.decor_collect, layer.decor_sample_fraction = True, 1.0
    layer(x)
    rows = layer.decor_take_rows()  # the padded input's patches: as many as the output has positions
    assert rows is not None and rows.shape == (2 * plain(x).shape[-2] * plain(x).shape[-1], 27)
    fold(layer)
    assert type(layer) is Conv2dSame
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=1e-5)


def test_std_conv2d_and_other_subclasses_stay_plain_with_the_reason() -> None:
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=5)
    reasons = eligible_layers(model)
    std = [n for n, m in model.named_modules() if isinstance(m, StdConv2d)]
    assert std and all(
        reasons[n] == "a subclass of nn.Conv2d (timm.layers.std_conv.StdConv2d): its forward may compute otherwise "
        "than the plain layer" for n in std
    )
    assert reasons["head.fc"] is None  # its plain head is decorrelated


@pytest.mark.parametrize(
    "name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0", "tf_efficientnet_b0"]
)
def test_timm_models_train_decorrelated_and_fold_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **({"img_size": 32} if "vit" in name else {}))
    reasons = eligible_layers(model)
    expected = {n for n, why in reasons.items() if why is None}
    layers = {n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d, Conv2dSame)}
    assert expected == layers  # every plain conv and linear (and Conv2dSame) layer, nothing else
    if name.startswith("tf_"):
        assert any(type(model.get_submodule(n)) is Conv2dSame for n in expected)
    dec = Decorrelator(model, max_overhead=None, decor_lr=0.05)
    assert set(dec.layers) == expected
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        dec.step()
        optimizer.step()
    assert dec.updates == 2 and torch.isfinite(dec.last_losses).all()  # every layer's forward was called
    model.eval()
    with torch.no_grad():
        before = model(x)
    dec.fold()
    assert not any(isinstance(m, DecorrelatedLayer) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
