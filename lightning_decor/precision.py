"""Float32 matrix products in full float32 for the rule, whatever TF32 setting the user chose: the statistics and
steps of :mod:`lightning_decor.functional` run under :func:`float32_matmul` (re-exported there)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["float32_matmul", "matmul_precision"]


def _matmul_backends() -> list[object]:
    """The per-backend float32 matmul settings of this torch (``torch.backends.cuda.matmul``, ``...mkldnn.matmul``:
    ``fp32_precision``), or none on a torch before them."""
    found = [getattr(torch.backends.cuda, "matmul", None), getattr(getattr(torch.backends, "mkldnn", None), "matmul",
                                                                    None)]  # fmt: skip
    return [b for b in found if b is not None and hasattr(b, "fp32_precision")]


def matmul_precision() -> str:
    """How float32 matrix products are computed now, e.g. ``"cuda=tf32 mkldnn=none"`` (part of the plan cache's key:
    it changes the cost of the fused weight). Read per backend: ``torch.get_float32_matmul_precision()`` raises once
    a backend's ``fp32_precision`` was set."""
    backends = _matmul_backends()
    if not backends:
        return torch.get_float32_matmul_precision()
    return " ".join(f"{n}={b.fp32_precision}" for n, b in zip(("cuda", "mkldnn"), backends))  # type: ignore[attr-defined]


@contextlib.contextmanager
def float32_matmul() -> Iterator[None]:
    """Float32 matrix products in full float32 (IEEE) within the block, whatever ``torch.set_float32_matmul_precision``
    or ``torch.backends.*.matmul.fp32_precision`` say (Lightning recommends ``"high"``, TF32 on NVIDIA GPUs since
    Ampere: a 10-bit mantissa, about 1e-3 relative, the size of one step of the rule). The statistics and steps of
    the rule run in it; the fused weight ``W @ R`` takes the user's setting, like the layer's own product. The
    setting is the process's (torch has no per-thread one), restored on exit."""
    backends = _matmul_backends()
    if not backends:  # a torch before the per-backend settings
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    saved = [b.fp32_precision for b in backends]  # type: ignore[attr-defined]
    try:
        for b in backends:
            b.fp32_precision = "ieee"  # type: ignore[attr-defined]
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value  # type: ignore[attr-defined]
