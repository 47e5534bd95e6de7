"""The sampling state kept off the layers (lightning_decor.rows): one Sampling shared by an engine's layers, one
RowBuffer per layer. The row geometry itself is tested in test_layers.py and test_functional.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_decor import decorrelate, fold
from lightning_decor.rows import INDEX_TABLES, RowBuffer, Sampling


def test_one_sampling_serves_every_layer_and_flips_collection_for_all() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    decorrelate(net)
    sampling = Sampling(collect=False)
    buffers = [RowBuffer(sampling) for _ in range(2)]
    net[0].decor_buffer, net[2].decor_buffer = buffers
    x = torch.randn(5, 4)
    net(x)
    assert [b.pending_count for b in buffers] == [0, 0] and not any(b.wanted for b in buffers)
    sampling.collect = True
    net(x)
    assert [b.pending_count for b in buffers] == [5, 5]
    rows = buffers[0].take()
    assert rows is not None and torch.equal(rows, x) and rows.data_ptr() != x.data_ptr()  # a copy of the input's rows
    assert buffers[0].take() is None and buffers[1].seen_count == 5


def test_an_observer_sees_every_training_forward_without_keeping_rows() -> None:
    lin = nn.Linear(3, 2)
    decorrelate(lin)
    seen = []
    buffer = RowBuffer(Sampling(), observer=lambda layer, input: seen.append((layer, tuple(input.shape))))
    lin.decor_buffer = buffer
    lin(torch.randn(4, 7, 3))
    with torch.no_grad():
        lin(torch.randn(2, 3))  # not a training forward
    assert seen == [(lin, (4, 7, 3))] and buffer.pending_count == 0
    assert lin.decor_row_count(torch.randn(4, 7, 3)) == 28
    assert lin.decor_drawn_count(torch.randn(4, 7, 3), 0.1, None) == 3  # ceil(0.1 * 28)
    assert lin.decor_drawn_count(torch.randn(4, 7, 3), 0.5, 10) == 10  # the cap


def test_patch_index_tables_are_kept_per_input_shape_and_bounded() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    decorrelate(conv)
    sampling = Sampling(max_rows=5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 2, 6, 6)
    rows = sampling.rows(conv, x)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)  # every patch row, written out
    assert rows.shape == (5, 18) and all((patches == r).all(dim=1).any() for r in rows)
    assert sampling.tables_kept == 1
    sampling.rows(conv, x)
    assert sampling.tables_kept == 1  # the same shape: the same tables
    for size in range(7, 7 + INDEX_TABLES):  # many input shapes (variable resolution)
        sampling.rows(conv, torch.randn(1, 2, size, size))
    assert sampling.tables_kept == 1  # the 257th geometry found the limit reached: kept afresh


def test_fold_removes_every_decor_attribute() -> None:
    lin = nn.Linear(3, 2)
    decorrelate(lin)
    lin.decor_buffer = RowBuffer(Sampling(collect=True))
    lin(torch.randn(4, 3))
    fold(lin)
    assert type(lin) is nn.Linear
    assert not [name for name in vars(lin) if "decor" in name] and "decor_R" not in lin._buffers
