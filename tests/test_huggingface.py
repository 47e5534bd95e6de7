"""Hugging Face ``transformers`` models, random-init tiny configs (nothing downloaded): which projections are
decorrelated, ``Conv1D`` (GPT-2) against an explicit reference, a few training steps, and ``fold`` exact against the
trained model. Skipped when ``transformers`` is not installed (``make test`` installs it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from lightning_decor import Decorrelator, decorrelate, decorrelation_matrices, fold  # noqa: E402
from lightning_decor.layers import DecorrelatedLayer  # noqa: E402
from lightning_decor.patching import eligible_layers  # noqa: E402

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, bos_token_id=0,
                                     eos_token_id=0, **NO_DROPOUT)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def test_conv1d_computes_x_rt_w_in_every_form() -> None:
    g = torch.Generator().manual_seed(0)
    layer = Conv1D(12, 8)  # nf = 12 outputs, nx = 8 inputs: weight (8, 12)
    decorrelate(layer)
    assert isinstance(layer, DecorrelatedLayer) and isinstance(layer, Conv1D)
    R = torch.eye(8) + 0.1 * torch.randn(8, 8, generator=g)
    with torch.no_grad():
        layer.decor_R.copy_(R)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float32)
    reference = (x.double() @ R.double().T) @ layer.weight.double() + layer.bias.double()  # y = (x R^T) W + b
    for form in ("fused", "input"):
        layer.decor_form = form
        torch.testing.assert_close(layer(x).double(), reference, rtol=0, atol=1e-5)
    state = layer.state_dict()  # a plain Conv1D's: weight R^T W of shape (in, out)
    plain = Conv1D(12, 8)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x).double(), reference, rtol=0, atol=1e-5)
    fold(layer)
    assert type(layer) is Conv1D
    torch.testing.assert_close(layer(x).double(), reference, rtol=0, atol=1e-5)


def test_gpt2_trains_with_its_conv1d_projections_decorrelated_and_folds_exactly() -> None:
    model = gpt2()
    reasons = eligible_layers(model)
    projections = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(projections) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj in each of the 2 blocks
    assert all(reasons[n] is None for n in projections)
    assert reasons["lm_head"] == "weight shared with another module (tied weights)"  # tied to the embedding
    dec = Decorrelator(model, max_overhead=None, decor_lr=0.05)
    assert sorted(dec.layers) == sorted(projections)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randint(0, 64, (4, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        dec.step()
        optimizer.step()
    assert dec.updates == 4 and torch.isfinite(loss)
    for name, R in decorrelation_matrices(model).items():
        assert not torch.equal(R, torch.eye(R.shape[-1])), name
    model.eval()
    ids = torch.randint(0, 64, (2, 16), generator=g)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    dec.fold()
    assert all(type(model.get_submodule(n)) is Conv1D for n in projections)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "llama", "vit"])
def test_every_linear_projection_of_bert_llama_and_vit_is_decorrelated(name: str) -> None:
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32)  # fmt: skip
        model, inputs = transformers.BertForMaskedLM(config), {"input_ids": torch.randint(0, 64, (2, 12))}
    elif name == "llama":
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=1, intermediate_size=64,
                                          max_position_embeddings=32)  # fmt: skip
        model, inputs = transformers.LlamaForCausalLM(config), {"input_ids": torch.randint(0, 64, (2, 12))}
    else:
        config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, num_labels=3)  # fmt: skip
        model, inputs = transformers.ViTForImageClassification(config), {"pixel_values": torch.randn(2, 3, 16, 16)}
    linears = {n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    reasons = eligible_layers(model)
    tied = {n for n in linears if reasons[n] == "weight shared with another module (tied weights)"}
    dec = Decorrelator(model, max_overhead=None)
    assert set(dec.layers) == linears - tied and dec.layers  # every projection, the tied heads aside
    model.train()
    out = model(**inputs)
    logits = out.logits
    logits.float().pow(2).mean().backward()
    dec.step()
    assert dec.updates == 1 and all(layer.decor_buffer.seen_count == 0 for layer in dec.layers.values())  # all taken
    assert torch.isfinite(dec.last_losses).all()  # every layer saw rows: each one's forward is called
    # the projections that read one tensor share one R: q, k, v of every attention (and gate, up of Llama's MLP)
    blocks = {"bert": "bert.encoder.layer.{}.attention.self.", "llama": "model.layers.{}.self_attn.",
              "vit": "vit.layers.{}.attention."}[name]  # fmt: skip
    q, k, v = ("query", "key", "value") if name == "bert" else ("q_proj", "k_proj", "v_proj")
    expected = {blocks.format(i) + p: blocks.format(i) + q for i in range(2) for p in (k, v)}
    if name == "llama":
        expected |= {f"model.layers.{i}.mlp.up_proj": f"model.layers.{i}.mlp.gate_proj" for i in range(2)}
    assert dec.shared == expected
    assert all(dec.layers[f].decor_R is dec.layers[leader].decor_R for f, leader in expected.items())


def test_correlation_picture_rows_of_conv1d_are_its_input_vectors() -> None:
    from lightning_decor.pictures import picture_rows

    layer = Conv1D(6, 4)  # in 4, out 6
    decorrelate(layer)
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(picture_rows(layer, x), x.reshape(-1, 4), rtol=0, atol=0)  # every row, in order
