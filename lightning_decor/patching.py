"""The verbs on a model and the registry of layer kinds: :func:`decorrelate` patches, :func:`fold` gives the plain
layers back, :func:`decorrelation_matrices` returns the live ``R``; :func:`layer_kind` is the one place a module's
kind is chosen (:class:`LayerKind`, registered by the kinds' own modules: attention, Hugging Face, timm), and
:class:`Routing` lets containers and averages route around patched layers.
"""

from __future__ import annotations

import fnmatch
import math
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from lightning_decor.checks import check_patterns, check_positive_int
from lightning_decor.layers import (
    DecorrelatedConv1d,
    DecorrelatedConv2d,
    DecorrelatedConv3d,
    DecorrelatedLayer,
    DecorrelatedLinear,
)
from lightning_decor.memory import fit_memory, r_bytes
from lightning_decor.plan import LayerPlan, Plan, block_ladder

__all__ = [
    "AVERAGED",
    "FROZEN",
    "LEFT_OUT",
    "SHARDED",
    "LayerKind",
    "Routing",
    "apply_plan",
    "apply_routing",
    "current_plan",
    "decorrelate",
    "decorrelated_layers",
    "decorrelation_matrices",
    "eligible_layers",
    "fold",
    "fold_layer",
    "layer_kind",
    "matches",
    "patched_subclass",
    "register_kind",
    "register_routing",
    "restore_routing",
]


# Why a layer stays plain where a user expects it to (reports.PatchReport.unexpected leaves these out).
FROZEN = "frozen (weight.requires_grad is False)"
AVERAGED = "inside the torch.optim.swa_utils.AveragedModel"
LEFT_OUT = "left out by `include` / `exclude`"
SHARDED = "sharded by torch.distributed.fsdp.fully_shard before it was patched"
_LAZY = (nn.LazyLinear, nn.LazyConv1d, nn.LazyConv2d, nn.LazyConv3d)
_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # their subclasses are plain unless a kind names them


@dataclass(frozen=True)
class LayerKind:
    """The adapter of one kind of layer: how the verbs recognise it, patch it and read its weight. Its patched class
    holds the rest: how its input rows are taken (:meth:`DecorrelatedLayer.decor_rows`), how ``W @ R`` is formed
    (:meth:`DecorrelatedLayer.decor_fuse`) and what it folds back to (``_decor_base``, with the fused weight).

    :func:`layer_kind` is the one place that chooses a module's kind: :func:`eligible_layers`, :func:`decorrelate`
    and everything after them ask it (or the patched layer) rather than testing classes.

    Attributes:
        matches: ``module -> bool``: whether ``module`` is of this kind. Exact classes, not subclasses (a
            subclass's forward may compute otherwise); a kind from a package this one does not import (``timm``,
            ``transformers``) is told by its class's module and name.
        patched: ``module -> patched class`` (the class swapped in; made on first use for kinds known by name).
        weight: The name of the parameter ``R`` multiplies (``"in_proj_weight"`` for attention).
        transposed: The weight is stored ``(d, C_out)`` (Hugging Face's ``Conv1D``) rather than ``(C_out, d)``.
        reason: ``module -> why it stays plain, or None``, for reasons of the kind itself (checked before the common
            ones: tied, recomputed, not a Parameter, too wide, frozen).
    """

    matches: Callable[[nn.Module], bool]
    patched: Callable[[nn.Module], type[DecorrelatedLayer]]
    weight: str = "weight"
    transposed: bool = False
    reason: Callable[[nn.Module], str | None] | None = None

    def matrix(self, module: nn.Module) -> Tensor:
        """The weight ``R`` multiplies, as ``(C_out, d)`` (for grouped convolutions ``(C_out, d / groups, k...)``)."""
        w = getattr(module, self.weight)
        return w.t() if self.transposed else w


@dataclass(frozen=True)
class Routing:
    """What a module built on this one routes around patched layers (so that this module imports none of them):
    containers whose fast paths would bypass ``W @ R`` (:mod:`lightning_decor.attention`), averages that must see
    the fused weights (:mod:`lightning_decor.averaging`).

    Attributes:
        route: Called on the model after patching (idempotent).
        restore: Called on the model after folding (gives back what no longer holds a patched layer).
    """

    route: Callable[[nn.Module], None]
    restore: Callable[[nn.Module], None]


_PATCHED: dict[type[nn.Module], type[DecorrelatedLayer]] = {
    nn.Linear: DecorrelatedLinear, nn.Conv1d: DecorrelatedConv1d, nn.Conv2d: DecorrelatedConv2d,
    nn.Conv3d: DecorrelatedConv3d,
}  # fmt: skip
_KINDS: list[LayerKind] = [LayerKind(lambda module: type(module) in _PATCHED, lambda module: _PATCHED[type(module)])]
_ROUTINGS: list[Routing] = []


def register_kind(kind: LayerKind) -> None:
    """Teach :func:`decorrelate`, :func:`eligible_layers` and :func:`fold` another layer kind (idempotent)."""
    if kind not in _KINDS:
        _KINDS.append(kind)


def register_routing(routing: Routing) -> None:
    """Route containers or averages around patched layers after every :func:`decorrelate` (idempotent)."""
    if routing not in _ROUTINGS:
        _ROUTINGS.append(routing)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a plain ``module`` (``None``: not a kind that is decorrelated, or patched already)."""
    if isinstance(module, DecorrelatedLayer):
        return None
    return next((kind for kind in _KINDS if kind.matches(module)), None)


_SUBCLASSES: dict[tuple[type, type], type[DecorrelatedLayer]] = {}


def patched_subclass(mixin: type[DecorrelatedLayer], base: type[nn.Module], name: str) -> type[DecorrelatedLayer]:
    """The patched class of ``base`` (a class of a package this one does not import): ``mixin`` before ``base``,
    made once per pair and folding back to ``base``."""
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = types.new_class(
            name, (mixin, base), {}, lambda ns: ns.update({"_decor_base": base, "__module__": mixin.__module__})
        )
    return _SUBCLASSES[key]


def largest_block(module: Any, max_features: int | None = None, block_size: int | None = None) -> int | None:
    """The largest block of ``R`` a layer may have: its per-group ``d`` (a dense ``R``), or with ``block_size``
    (and ``max_features`` for layers wider than it) the largest equal split into whole input channels of at most
    that many features. ``None`` when no such block exists and a dense ``R`` is not allowed either."""
    d = math.prod(module.weight.shape[1:])  # per group: in_features, or C_in / groups * prod(kernel_size)
    unit = math.prod(module.weight.shape[2:])  # 1 for Linear
    wide = max_features is not None and d > max_features
    cap = min(c for c in (block_size, max_features if wide else None, d) if c is not None)
    ladder = block_ladder(d, unit, cap, min_block=1)
    if ladder:
        return ladder[0]
    if unit > 1:  # a convolution keeps at least one block per input channel (its k_h * k_w patch)
        return unit
    if not wide:  # a Linear with no equal split (a prime d): blocks of one feature would not decorrelate at all
        warnings.warn(
            f"block_size={block_size}: {d} features have no equal split into blocks of at most {cap}; "
            "this layer keeps a dense R.",
            stacklevel=3,
        )
        return d
    return None


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a qualified module name matches one of ``patterns``: by glob, or as a module below a matching prefix
    (``"layer4"`` matches ``"layer4.0.conv1"``)."""
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p.rstrip(".") + ".") for p in patterns)


def _recomputed_weight(module: Any) -> str | None:
    """Which old-style hook recomputes ``module.weight`` before every forward (``weight_norm``, ``spectral_norm``),
    or ``None``: ``W @ R`` would be overwritten, and ``W`` is no leaf to train."""
    for hook in getattr(module, "_forward_pre_hooks", {}).values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            return "torch.nn.utils.weight_norm"
        if isinstance(hook, SpectralNorm) and hook.name == "weight":
            return "torch.nn.utils.spectral_norm"
    return None


def _skip_reason(
    module: nn.Module, kind: LayerKind, tied: bool, max_features: int | None, block_size: int | None
) -> str | None:
    """Why a layer of ``kind`` is not patched, or ``None``: the kind's own reason, then the common checks on the
    weight ``R`` would multiply (``tied``: another module holds it too)."""
    reason = kind.reason(module) if kind.reason is not None else None
    if reason is not None:
        return reason
    if tied:
        return "weight shared with another module (tied weights)"
    hook = _recomputed_weight(module)
    if hook is not None:
        return (
            f"its weight is recomputed before every forward by {hook} (old-style), which would overwrite W @ R; "
            "the parametrizations in torch.nn.utils.parametrizations are left plain too"
        )
    if not isinstance(getattr(module, kind.weight, None), nn.Parameter):
        return "its weight is not a Parameter (computed elsewhere)"
    weight = kind.matrix(module)
    d = math.prod(weight.shape[1:])
    if max_features is not None and d > max_features and (block_size is None or block_size > max_features):
        mib = d * d * 4 / 2**20
        return (
            f"d = {d} > max_features = {max_features} (R would take {mib:.0f} MiB); raise `max_features` to include it"
        )
    if not weight.requires_grad:
        return FROZEN
    if largest_block(types.SimpleNamespace(weight=weight), max_features, block_size) is None:
        return f"d = {d} > max_features = {max_features}, and no equal split into blocks of at most {block_size} fits"
    return None


def eligible_layers(
    model: nn.Module, max_features: int | None = None, block_size: int | None = None
) -> dict[str, str | None]:
    """Qualified names of every layer of a known kind (:func:`layer_kind`: exact ``nn.Linear``/``nn.Conv1d/2d/3d``,
    attention's packed in-projection by the attention module's name and its ``out_proj``, and the kinds of
    ``transformers`` and ``timm``), and of every other subclass of those layers and every uninitialised lazy layer,
    mapped to why it would be skipped.

    ``None`` means the layer would be patched.
    """
    # A weight read by another module too (weight tying) would see the raw W there but W @ R here, and fold
    # would change the other module: such layers stay plain.
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    reasons: dict[str, str | None] = {}
    averaged = [name for name, m in model.named_modules() if isinstance(m, torch.optim.swa_utils.AveragedModel)]
    for name, m in model.named_modules():
        kind = layer_kind(m)
        if kind is not None:
            tied = owners.get(id(getattr(m, kind.weight, None)), 0) > 1
            reasons[name] = _skip_reason(m, kind, tied, max_features, block_size)
        elif isinstance(m, _LAZY) and m.has_uninitialized_params():
            reasons[name] = (
                f"an uninitialised {type(m).__name__}: its shape is known after its first forward; call the model "
                "once on an example batch before fit"
            )
        elif isinstance(m, _BASES) and isinstance(m, FSDPModule) and not isinstance(m, DecorrelatedLayer):
            reasons[name] = SHARDED
        elif isinstance(m, _BASES) and not isinstance(m, DecorrelatedLayer):
            base = next(b for b in _BASES if isinstance(m, b))
            reasons[name] = (
                f"a subclass of nn.{base.__name__} ({type(m).__module__}.{type(m).__qualname__}): its forward may "
                "compute otherwise than the plain layer"
            )
        owner = next((a for a in averaged if matches(name, [a])), None)
        if name in reasons and owner is not None:  # lightning_decor.averaging averages W @ R into it
            reasons[name] = f"{AVERAGED} {owner!r} (an average, not trained)"
    return reasons


def decorrelate(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    max_features: int | None = None,
    block_size: int | None = None,
) -> list[str]:
    """Patch, in place, every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of ``model`` for decorrelated backpropagation.

    Only exact types are patched (``type(m) is nn.Linear``). The projections of ``nn.MultiheadAttention``, whose
    weights PyTorch reads directly, are patched too: the packed in-projection (one ``R`` per query, key and value
    input, named by the attention module) and ``out_proj`` (see :mod:`lightning_decor.attention`). A grouped or
    depthwise convolution gets one ``R`` per group. Frozen layers are skipped. Layers already patched are left as
    they are, so calling this twice is harmless. The parameters are kept (same objects), ``R`` starts as the identity
    on the weight's device, and outputs are unchanged until ``R`` moves. An ``nn.TransformerEncoderLayer`` holding a
    patched layer always takes PyTorch's slow path (its fused eval fast path would read the raw weights; see
    :mod:`lightning_decor.attention`); :func:`fold` gives it back.

    Args:
        model: The model to patch.
        include: Glob patterns on qualified module names (``"features.*"``; a plain prefix such as ``"layer4"``
            also matches the modules below it). ``None`` includes every eligible layer.
        exclude: Patterns of layers to leave plain, applied after ``include``.
        max_features: Leave plain every layer whose ``d`` exceeds this (a dense ``R`` takes ``4 d^2`` bytes and
            its update ``O(d^2)`` to ``O(d^3)`` flops), unless ``block_size <= max_features`` gives it a
            block-diagonal ``R``; ``None`` for no limit.
        block_size: Give layers with ``d > block_size`` a block-diagonal ``R`` of equal blocks of at most this many
            features (whole input channels for convolutions), stored as ``(G, b, b)``: fusing costs
            ``2 C_out d b`` instead of ``2 C_out d^2`` flops and ``R`` takes ``d b`` instead of ``d^2`` floats;
            only correlations within a block are removed. ``None``: dense ``R`` everywhere.

    Returns:
        The qualified names of the layers patched by this call.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> decorrelate(net, exclude=["2"])
        ['0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    inc = check_patterns("include", include)
    exc = check_patterns("exclude", exclude)
    max_features = check_positive_int("max_features", max_features)
    block_size = check_positive_int("block_size", block_size)
    patched: list[str] = []
    eligible = eligible_layers(model, max_features, block_size)
    sharded = [  # what would be patched but was sharded first (not what include/exclude leave out, nor frozen ones)
        name for name, reason in eligible.items()
        if reason == SHARDED and (inc is None or matches(name, inc)) and not (exc and matches(name, exc))
        and model.get_submodule(name).weight.requires_grad
    ]  # fmt: skip
    if sharded:
        raise ValueError(
            f"Expected the layers patched before `fully_shard`, but {sharded} are sharded already (FSDP's subclass of "
            "their class; R could not be fused into their weight). Patch the model first, then shard it: "
            "`Decorrelator(model)` (or `lightning_decor.decorrelate(model)`), then `fully_shard`; under Lightning's "
            "ModelParallelStrategy build the layers in `__init__` (the callback patches them before "
            "`configure_model`), or call `lightning_decor.decorrelate` in `configure_model` before `fully_shard`."
        )
    for name, reason in eligible.items():
        if reason is not None or (inc is not None and not matches(name, inc)) or (exc and matches(name, exc)):
            continue
        module = model.get_submodule(name)
        kind = layer_kind(module)
        assert kind is not None  # eligible_layers passes only layers of a kind
        block = largest_block(types.SimpleNamespace(weight=kind.matrix(module)), max_features, block_size)
        module.__class__ = kind.patched(module)  # the class swap torch.nn.utils.parametrize also uses
        module._decor_init(block)  # type: ignore[operator]
        patched.append(name)
    apply_routing(model)  # e.g. transformer fast paths that would bypass W @ R
    return patched


def decorrelated_layers(model: nn.Module) -> dict[str, DecorrelatedLayer]:
    """The patched layers of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DecorrelatedLayer)}


def decorrelation_matrices(model: nn.Module) -> dict[str, Tensor]:
    """The live ``R`` tensors of ``model``'s patched layers by qualified name (no copies)."""
    return {name: m.decor_R for name, m in decorrelated_layers(model).items()}


@torch.no_grad()
def fold(model: nn.Module) -> list[str]:
    """Turn every patched layer back into its plain class with weight ``W @ R``; eval outputs are unchanged.

    The weight ``Parameter`` objects are kept (their values become the fused weights). A no-op on a plain model.

    Returns:
        The qualified names of the layers folded.
    """
    folded = []
    for name, m in decorrelated_layers(model).items():
        fold_layer(m)
        folded.append(name)
    restore_routing(model)
    return folded


def apply_routing(model: nn.Module) -> None:
    """What the registered kinds route around their layers, on ``model`` as it is now (idempotent)."""
    for routing in _ROUTINGS:
        routing.route(model)


def restore_routing(model: nn.Module) -> None:
    """What the registered layer kinds routed around their layers, back where no patched layer needs it."""
    for routing in _ROUTINGS:
        routing.restore(model)


@torch.no_grad()
def fold_layer(layer: DecorrelatedLayer) -> None:
    """Fold one patched layer (not the layers inside it, such as an attention's ``out_proj``): weight ``W @ R``,
    its plain class again. Containers around it keep their routing; :func:`fold` restores those."""
    if layer.decor_form != "identity":  # "identity": R = I computed as the plain layer, W is the function already
        layer.weight.copy_(layer.decor_fused_weight())
    layer.decor_unpatch_()


# ---------------------------------------------------------------------------------------------- plans on layers
def current_plan(
    layers: dict[str, DecorrelatedLayer], max_memory: int | None = None, fixed: frozenset[str] = frozenset()
) -> Plan:
    """The plan of ``layers`` as they are now (as :func:`decorrelate` made them: largest allowed block, fused; a
    layer still computing its plain function, ``R = I`` before a plan, counts as fused), with smaller blocks (or
    plain) where ``R`` and the update's workspace would take more than ``max_memory`` bytes
    (:func:`lightning_decor.memory.fit_memory`; ``fixed``: layers whose ``R`` has moved, counted but kept)."""
    ladders = {  # the layer's own block first, also where no ladder starts there (blocks of one feature)
        n: block_ladder(m.decor_group_features, m.decor_unit, m.decor_block_size) or [m.decor_block_size]
        for n, m in layers.items()
    }
    choice = {name: 0 for name in layers}
    if max_memory is not None:
        shapes = {name: (m.decor_group_features, m.decor_groups) for name, m in layers.items()}
        choice = fit_memory(choice, ladders, shapes, max_memory, fixed)
    plan = Plan({}, max_memory=max_memory)
    for name, layer in layers.items():
        ladder, k = ladders[name], choice[name]
        block = ladder[k] if k < len(ladder) else 0
        form = "plain" if not block else "fused" if layer.decor_form == "identity" else layer.decor_form
        plan.layers[name] = LayerPlan(
            name=name, form=form, block=block, d=layer.decor_group_features, rows=0, c_out=layer.decor_out_features,
            groups=layer.decor_groups, cost=0.0, note="over the memory budget" if not block else "",
            memory=r_bytes(layer.decor_group_features, layer.decor_groups, block),
        )  # fmt: skip
    return plan


@torch.no_grad()
def apply_plan(model: nn.Module, layers: dict[str, DecorrelatedLayer], plan: Plan) -> list[str]:
    """Give every layer of ``model`` in ``plan`` its planned form with ``R`` the identity in the planned layout (so
    only while ``R`` has not moved, or before a saved ``R`` is written); fold the ones planned plain. ``plan.layers``
    becomes the plan of every layer in model order (layers it does not name keep :func:`current_plan`'s entry, a
    layer still computing plainly is fused). Returns the names folded."""
    order = [n for n, _ in model.named_modules() if n in layers or n in plan.layers]
    current = current_plan(layers).layers
    folded = []
    for name, p in plan.layers.items():
        layer = layers.get(name)
        if layer is None:
            continue
        if p.form == "plain":
            fold_layer(layer)
            folded.append(name)
        elif (p.block, p.form) != (layer.decor_block_size, layer.decor_form):
            layer.decor_set_layout_(p.block, p.form)
    plan.layers = {name: plan.layers.get(name) or current[name] for name in order}
    for name, layer in layers.items():
        if name not in folded and layer.decor_form == "identity":  # not in the plan (a plan from fewer layers)
            layer.decor_form = "fused"
    apply_routing(model)  # e.g. an attention whose in-projection is plain now and out_proj is not
    restore_routing(model)  # containers left without a patched layer
    return folded
