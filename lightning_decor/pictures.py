"""The opt-in TensorBoard pictures of ``DecorrelationCallback``: histograms of each ``R`` and an image of one
layer's input correlations before and after decorrelation, written at the end of a training epoch.

Only through a Lightning ``TensorBoardLogger``, on rank zero. The picture math (``abs_correlation``,
``correlation_picture``, ``off_diagonal``) is here too: pure functions on tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_decor.layers import DecorrelatedLayer
from lightning_decor.rows import Sampling

__all__ = [
    "TensorBoardPictures",
    "abs_correlation",
    "correlation_picture",
    "dense_matrix",
    "histogram",
    "off_diagonal",
    "picture_rows",
]

_PICTURE_ROWS = 8192  # rows behind a correlation picture: entries then carry ~1/sqrt(8192) ~ 0.01 sampling noise
_HISTOGRAM_BINS = 64


_PICTURE_SIDE = 256  # larger matrices are average-pooled to this side, so pictures stay small in the event file


def abs_correlation(rows: Tensor) -> Tensor:
    """``|C_ij| / sqrt(C_ii * C_jj)`` for ``C = rows.T @ rows / n``: the normalised second moments that DBP drives
    towards a diagonal (no mean removal, as in the update). A feature that is always zero gets a zero row."""
    c = rows.T @ rows / rows.shape[0]  # (d, d)
    s = c.diagonal().clamp_min(torch.finfo(c.dtype).tiny).sqrt()
    return (c / s[:, None] / s[None, :]).abs().clamp_(max=1.0)


def dense_matrix(R: Tensor) -> Tensor:
    """``R`` as one ``(d, d)`` matrix (a stack of diagonal blocks ``(G, b, b)`` becomes block-diagonal)."""
    return R if R.dim() == 2 else torch.block_diag(*R.unbind(0))


def off_diagonal(R: Tensor) -> Tensor:
    """The off-diagonal entries of ``R`` (of each diagonal block, for a stack of blocks), flattened."""
    b = R.shape[-1]
    return R.reshape(-1, b, b)[:, ~torch.eye(b, dtype=torch.bool, device=R.device)].flatten()


def correlation_picture(x: Tensor, R: Tensor) -> Tensor:
    """A ``(1, h, 2 * w + 2)`` grey image in [0, 1]: ``|corr|`` of the raw rows ``x`` (left) and of the
    decorrelated rows ``z = x @ R.T`` (right), separated by a mid-grey bar; ``h = w = min(d, 256)``."""
    R = dense_matrix(R)
    x = x.to(R.dtype)
    pictures = [abs_correlation(x), abs_correlation(x @ R.T)]
    if R.shape[0] > _PICTURE_SIDE:  # mean |corr| over blocks of features
        pictures = [F.adaptive_avg_pool2d(p[None, None], _PICTURE_SIDE)[0, 0] for p in pictures]
    bar = torch.full((pictures[0].shape[0], 2), 0.5, dtype=R.dtype, device=R.device)
    return torch.cat([pictures[0], bar, pictures[1]], dim=1)[None].float()


def histogram(values: Tensor, bins: int = _HISTOGRAM_BINS) -> dict[str, Any]:
    """The arguments of ``SummaryWriter.add_histogram_raw`` for ``values``, counted on their device (sort and
    search are deterministic, unlike ``histc`` on CUDA), so only ``bins`` numbers reach the host."""
    v = values.detach().flatten().float().sort().values
    lo, hi, total, total_sq = torch.stack([v[0], v[-1], v.sum(), v.square().sum()]).tolist()
    top = hi if hi > lo else lo + 1.0  # all equal (R = I has only zeros off the diagonal): one visible bin
    limits = torch.linspace(lo, top, bins + 1, device=v.device, dtype=v.dtype)[1:]
    below = torch.searchsorted(v, limits, right=True)  # values <= each upper limit
    below[-1] = v.numel()
    counts = torch.diff(below, prepend=below.new_zeros(1))
    return dict(
        min=lo, max=hi, num=v.numel(), sum=total, sum_squares=total_sq,
        bucket_limits=limits.tolist(), bucket_counts=counts.tolist(),
    )  # fmt: skip


def picture_rows(layer: DecorrelatedLayer, x: Tensor) -> Tensor:
    """The raw input rows behind the correlation picture: at most 8192 of the rows ``R`` acts on in a forward of
    ``x`` (the layer kind's own rows: im2col patches for a convolution, all groups side by side), drawn with a fixed
    seed so that pictures do not move the training RNG."""
    generator = torch.Generator(device=x.device).manual_seed(0)
    return layer.decor_rows(x, Sampling(1.0, _PICTURE_ROWS, generator))


class TensorBoardPictures:
    """What ``DecorrelationCallback``'s picture arguments ask for, at the end of every N-th training epoch.

    Args:
        histograms_every: Every this many epochs, ``decor/R_offdiag/<layer>``: a histogram of the off-diagonal
            entries of each layer's ``R`` (``None``: never).
        image_layer: The layer whose input correlations become ``decor/correlation/<layer>`` (``None``: none).
        image_every: Every this many epochs, that image, from the layer's last training input of the epoch (a copy
            kept by a forward hook during due epochs, replaced at every training forward; no device sync per step).
    """

    def __init__(self, histograms_every: int | None, image_layer: str | None, image_every: int) -> None:
        self.histograms_every = histograms_every
        self.image_layer = image_layer
        self.image_every = image_every
        self.input: Tensor | None = None  # a copy of the image layer's latest training input, during due epochs
        self.rows: Tensor | None = None  # or the picture's rows drawn from it, when they are fewer numbers
        self._hook: RemovableHandle | None = None
        self._warned_plain = False

    def check(self, layers: dict[str, DecorrelatedLayer]) -> None:
        """Refuse an image layer that is not decorrelated, or an attention in-projection (three ``R``)."""
        name = self.image_layer
        if name is not None and name not in layers:
            raise ValueError(
                f"Expected `log_correlation_image` to name a decorrelated layer, one of {sorted(layers)}, "
                f"but got {name!r}."
            )
        if name is not None and isinstance(layers[name], nn.MultiheadAttention):
            raise ValueError(
                "Expected `log_correlation_image` to name a Linear or convolution, but got "
                f"{name!r}, an attention in-projection (one R per input); its out_proj can be drawn."
            )

    @staticmethod
    def _due(trainer: Trainer, every: int | None) -> bool:
        return every is not None and (trainer.current_epoch + 1) % every == 0

    @staticmethod
    def _writers(trainer: Trainer) -> list[Any]:
        """The ``SummaryWriter`` of every ``TensorBoardLogger`` on rank zero (other loggers have no pictures)."""
        if not trainer.is_global_zero:
            return []
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _image_layer_kept(self, layers: dict[str, DecorrelatedLayer]) -> bool:
        """Whether the image layer is still decorrelated; warns once when the cost plan left it plain."""
        if self.image_layer in layers:
            return True
        if not self._warned_plain:
            self._warned_plain = True
            rank_zero_warn(
                f"DecorrelationCallback: the plan left {self.image_layer!r} plain (over the `max_overhead` budget), "
                "so it has no correlation picture. Raise `max_overhead` or pick another layer."
            )
        return False

    @torch.compiler.disable  # eager even in a compiled model, as the layers' own row capture
    def keep_input(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """The forward hook on the image layer: keep what the picture needs of a training forward's input."""
        if args and module.training and torch.is_grad_enabled():
            # A copy, not a reference: the input may be an output of a CUDA graph (`torch.compile(mode=
            # "reduce-overhead")`), which its next replay overwrites before the epoch ends. The input itself, or the
            # picture's rows drawn now when they are fewer numbers (wide late layers).
            x = args[0].detach()
            if isinstance(module, DecorrelatedLayer) and x.numel() > _PICTURE_ROWS * module.decor_features:
                self.input, self.rows = None, picture_rows(module, x)
            else:
                self.input, self.rows = x.clone(), None

    def stop(self) -> None:
        """Remove the input hook and drop the kept input."""
        if self._hook is not None:
            self._hook.remove()
        self._hook, self.input, self.rows = None, None, None

    def epoch_start(self, trainer: Trainer, layers: dict[str, DecorrelatedLayer]) -> None:
        """Hook the image layer's input in a due epoch; warn once when the pictures have no TensorBoard to go to."""
        wanted = self.image_layer is not None and self._due(trainer, self.image_every)
        if wanted and self._hook is None and self._writers(trainer) and self._image_layer_kept(layers):
            self._hook = layers[self.image_layer].register_forward_hook(self.keep_input)  # type: ignore[index]
        if trainer.current_epoch == 0 and not getattr(trainer, "fast_dev_run", False) and trainer.is_global_zero:
            pictures = self.histograms_every is not None or self.image_layer is not None
            if pictures and not self._writers(trainer):
                rank_zero_warn(
                    "DecorrelationCallback: `log_histograms_every_n_epochs`/`log_correlation_image` log only through "
                    "a TensorBoardLogger, and the Trainer has none; nothing will be drawn."
                )

    @torch.no_grad()
    def epoch_end(self, trainer: Trainer, layers: dict[str, DecorrelatedLayer]) -> None:
        """Write the due pictures (the step axis is ``trainer.global_step``); ``R`` must be settled (no update in
        flight on a side stream)."""
        writers = self._writers(trainer)
        if not writers or not layers:
            self.stop()
            return
        step = trainer.global_step
        if self._due(trainer, self.histograms_every):
            for name, layer in layers.items():
                entries = off_diagonal(layer.decor_R)
                if entries.numel() == 0:  # d = 1
                    continue
                counted = histogram(entries)
                for writer in writers:
                    writer.add_histogram_raw(f"decor/R_offdiag/{name}", global_step=step, **counted)
        x, rows = self.input, self.rows
        if self.image_layer is not None and (x is not None or rows is not None) and self._image_layer_kept(layers):
            layer = layers[self.image_layer]
            rows = rows if rows is not None else picture_rows(layer, x)  # type: ignore[arg-type]
            picture = correlation_picture(rows, layer.decor_R).cpu()
            for writer in writers:
                writer.add_image(f"decor/correlation/{self.image_layer}", picture, step, dataformats="CHW")
        self.stop()
