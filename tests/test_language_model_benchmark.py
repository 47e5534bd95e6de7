"""The language-model benchmark's pieces (examples/benchmarks/language_model.py): the corpus, the windows, every
projection of its transformer decorrelated, and the time to BP's final loss."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import language_model as lm  # noqa: E402  (its `common` puts examples/ on the path)

from lightning_decor import Decorrelator  # noqa: E402


def test_the_corpus_is_the_standard_librarys_source_in_path_order() -> None:
    text = lm.corpus(0.01)
    assert len(text) == int(0.01 * 2**20) and text.dtype == torch.uint8
    first = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if "site-packages" not in p.parts)[0]
    head = first.read_bytes()[: len(text)]
    assert bytes(text[: len(head)].tolist()) == head


def test_windows_predict_the_next_byte() -> None:
    text = torch.arange(100, dtype=torch.uint8)
    x, y = lm.Windows(text, torch.tensor([5, 40]), context=8)[1]
    assert x.tolist() == list(range(40, 48)) and y.tolist() == list(range(41, 49))


def test_every_projection_of_the_byte_transformer_is_decorrelated() -> None:
    model = lm.ByteLM(1e-3, 10, width=32, layers=2, heads=2, context=16)
    dec = Decorrelator(model, max_overhead=None)
    projections = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))}
    assert set(dec.layers) == projections and len(projections) == 2 * 4 + 1  # in-proj, out_proj, 2 MLP; the head
    x = torch.randint(0, 256, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 256)
    later = x.clone()
    later[:, -1] = (later[:, -1] + 1) % 256
    torch.testing.assert_close(model(later)[:, :-1], logits[:, :-1])  # causal: no position sees a later byte


def test_first_reaching_the_target_loss() -> None:
    history = [(10.0, 50, 3.0), (20.0, 100, 2.5), (30.0, 150, 2.4)]
    assert lm.first_reaching(history, 2.5) == (20.0, 100)
    assert lm.first_reaching(history, 2.0) is None
