"""``timm`` models, random init (nothing downloaded): which layers are decorrelated (``Conv2dSame`` and the
standardised convolutions exactly; other subclasses plain with the reason), each kind against an explicit formula, a
training step, and ``fold`` exact against the trained model. Skipped when ``timm`` is not installed (``make test``
installs it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.layers import Conv2dSame, StdConv2d  # noqa: E402

from lightning_decor import Decorrelator, decorrelate, fold  # noqa: E402
from lightning_decor.layers import DecorrelatedLayer  # noqa: E402
from lightning_decor.patching import eligible_layers  # noqa: E402

from conftest import collect_rows  # noqa: E402


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
    (buffer,) = collect_rows(layer)
    layer(x)
    rows = buffer.take()  # the padded input's patches: as many as the output has positions
    assert rows is not None and rows.shape == (2 * plain(x).shape[-2] * plain(x).shape[-1], 27)
    fold(layer)
    assert type(layer) is Conv2dSame
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=1e-5)


def _standardised(weight: torch.Tensor, eps: float, gain: torch.Tensor | None = None) -> torch.Tensor:
    """Weight standardisation written out: each output channel's weights to zero mean and unit (biased) variance,
    times ``gain`` (timm's formula, independent of its code)."""
    flat = weight.reshape(weight.shape[0], -1)
    mean, var = flat.mean(1, keepdim=True), flat.var(1, unbiased=False, keepdim=True)
    out = (flat - mean) / torch.sqrt(var + eps)
    return (out if gain is None else out * gain.reshape(-1, 1)).reshape_as(weight)


@pytest.mark.parametrize("name", ["StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"])
def test_standardised_convs_standardise_w_r_and_train_w_through_it(name: str) -> None:
    cls = getattr(timm.layers, name)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = cls(3, 4, 3, stride=2, bias=True)
    assert decorrelate(layer) == [""] and isinstance(layer, cls)
    d = 27
    R = torch.eye(d) + 0.05 * torch.randn(d, d, generator=g)
    with torch.no_grad():
        layer.decor_R.copy_(R)
    x = torch.randn(2, 3, 9, 11, generator=g)
    # The reference: the convolution of std(W R) (TensorFlow "same" padding for the *Same classes), written out.
    A = (layer.weight.detach().reshape(4, -1) @ R).reshape_as(layer.weight).requires_grad_(True)
    gain = None if not name.startswith("Scaled") else (layer.gain * layer.scale).detach()
    xp = x
    if name.endswith("Same"):  # pad_same: total pad max((ceil(n / s) - 1) s + k - n, 0), the larger half after
        pads = []
        for n in reversed(x.shape[-2:]):
            total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
            pads += [total // 2, total - total // 2]
        xp = nn.functional.pad(x, pads)
        padding = 0
    else:
        padding = 1  # timm's symmetric padding for k = 3
    expected = nn.functional.conv2d(xp, _standardised(A, layer.eps, gain), layer.bias.detach(), 2, padding)
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    # W trains through A = W R: dL/dW = dL/dA R^T
    upstream = torch.randn(y.shape, generator=g)
    (y * upstream).sum().backward()
    (expected * upstream).sum().backward()
    grad_w = (A.grad.reshape(4, -1) @ R.T).reshape_as(layer.weight)
    torch.testing.assert_close(layer.weight.grad, grad_w, rtol=1e-5, atol=1e-5)  # measured 2.3e-7 relative (fp32)
    with pytest.raises(ValueError, match=r"Expected `form` 'fused' or 'identity' for Decorrelated" + name):
        layer.decor_set_layout_(None, "input")  # R on the input rows would compute std(W) R x: another function
    (buffer,) = collect_rows(layer)
    layer(x)
    rows = buffer.take()  # the patches the convolution multiplies
    assert rows is not None and rows.shape == (2 * y.shape[-2] * y.shape[-1], d)
    fused = layer.state_dict()["weight"]
    fold(layer)
    assert type(layer) is cls
    torch.testing.assert_close(layer.weight.detach(), fused, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach(), rtol=0, atol=1e-5)


def test_other_subclasses_stay_plain_with_the_reason() -> None:
    from timm.layers.conv2d_same import Conv2dSameExport

    model = nn.Sequential(Conv2dSameExport(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    reasons = eligible_layers(model)
    assert reasons["0"] == (
        "a subclass of nn.Conv2d (timm.layers.conv2d_same.Conv2dSameExport): its forward may compute otherwise than "
        "the plain layer"
    )
    assert reasons["2"] is None


@pytest.mark.parametrize(
    "name",
    ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0", "tf_efficientnet_b0", "resnetv2_50x1_bit"],
)
def test_timm_models_train_decorrelated_and_fold_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **({"img_size": 32} if "vit" in name else {}))
    reasons = eligible_layers(model)
    expected = {n for n, why in reasons.items() if why is None}
    layers = {n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d, Conv2dSame, StdConv2d)}
    assert expected == layers  # every plain conv and linear (and timm's handled kinds) layer, nothing else
    if name.startswith("tf_"):
        assert any(type(model.get_submodule(n)) is Conv2dSame for n in expected)
    if name.startswith("resnetv2"):
        assert sum(type(model.get_submodule(n)) is StdConv2d for n in expected) == 53
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


def test_correlation_picture_rows_of_conv2d_same_are_its_padded_patches() -> None:
    from lightning_decor.pictures import picture_rows

    layer = Conv2dSame(3, 4, 3, stride=2)
    decorrelate(layer)
    x = torch.randn(2, 3, 10, 12)
    # the reference: TensorFlow's "same" padding (0 before, 1 after for 10 and 12 at stride 2), then im2col
    patches = nn.functional.unfold(nn.functional.pad(x, [0, 1, 0, 1]), 3, stride=2)  # (N, d, L)
    expected = patches.transpose(1, 2).reshape(-1, 27)
    torch.testing.assert_close(picture_rows(layer, x), expected, rtol=0, atol=0)
