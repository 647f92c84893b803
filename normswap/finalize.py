"""The inference form of a converted model: plain PyTorch modules wherever one computes the same.

A converted model trains with normswap's layers; to ship it, :func:`finalize` replaces each
layer that a plain ``torch.nn`` module computes exactly — weight norm and weight
standardization baked into ordinary weights, normswap's ``GroupNorm``, the GN paper's
``LayerNorm`` and ``InstanceNorm`` without running statistics as :class:`torch.nn.GroupNorm`,
``frozen`` as an eval-mode :class:`torch.nn.BatchNorm2d` (1d/3d) whose statistics are the
identity, a channels-last ``LayerNorm2d`` as :class:`torch.nn.LayerNorm` and a channels-last
``RMSNorm`` without bias as :class:`torch.nn.RMSNorm` — and reports what it kept and why (AdaLN
needs its condition as an input, LayerNorm2d normalizes over channels at each position, which no
plain module does for ``(N, C, H, W)`` input, DyT has no plain module, ...). The result scripts,
traces, exports and pickles like a torchvision model, and where every layer is plain it needs
nothing but torch.

How to finalize a class is a registry (:data:`FINALIZERS`, looked up along the class
hierarchy): :func:`register_finalizer` adds one for a custom layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from normswap.errors import NormSwapError
from normswap.modules import module_paths, set_module, take_hooks
from normswap.norms import (
    ACT_VARIANTS,
    AdaLIN,
    AdaLN,
    BlendNorm,
    Derf,
    DyT,
    FrozenAffine,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    NormThen,
    RMSNorm,
    WeightStandardization,
)
from normswap.norms.reparam import remove_parametrizations
from normswap.norms.weight import _legacy_weight_norm_keys, _WeightNorm
from normswap.registry import TypeRegistry

__all__ = ["FINALIZERS", "FinalizeRecord", "FinalizeReport", "finalize", "register_finalizer"]

#: ``finalizer(module) -> plain module``, or a string saying why the module stays as it is.
Finalizer = Callable[[nn.Module], "nn.Module | str"]

#: How each class becomes plain, looked up along the class hierarchy (most specific wins).
FINALIZERS: TypeRegistry[Finalizer] = TypeRegistry("finalizer")

#: Parametrizations that :func:`finalize` bakes into plain weights.
BAKED: tuple[type, ...] = (_WeightNorm, WeightStandardization)


def register_finalizer(cls: type, finalizer: Finalizer) -> Finalizer:
    """Teach :func:`finalize` how to make ``cls`` plain (or why it cannot).

    Example:
        >>> class Scale(nn.Module):
        ...     def forward(self, x): return 2 * x
        >>> _ = register_finalizer(Scale, lambda m: "no plain module doubles its input")
        >>> finalize(nn.Sequential(Scale())).kept()
        {'0': 'no plain module doubles its input'}
        >>> _ = FINALIZERS.unregister(Scale)
    """
    return FINALIZERS.register(cls, finalizer)


@dataclass(frozen=True)
class FinalizeRecord:
    """One module :func:`finalize` looked at.

    Attributes:
        path: the module's path (the first one of a shared module).
        before: its class name.
        after: the plain class it became (``None``: kept).
        note: why it was kept, or what was done.
    """

    path: str
    before: str
    after: str | None
    note: str = ""


@dataclass(frozen=True)
class FinalizeReport:
    """What :func:`finalize` made plain and what it kept.

    Example:
        >>> r = FinalizeReport((FinalizeRecord("bn1", "GroupNorm", "GroupNorm"),))
        >>> r.counts(), r.plain
        ({'GroupNorm -> torch.nn.GroupNorm': 1}, True)
    """

    records: tuple[FinalizeRecord, ...]

    @property
    def plain(self) -> bool:
        """Whether nothing was kept: the model needs nothing but torch to run."""
        return all(r.after is not None for r in self.records)

    def counts(self) -> dict[str, int]:
        """How many of each change (``kept`` ones by class)."""
        out: dict[str, int] = {}
        for r in self.records:
            key = f"{r.before} -> torch.nn.{r.after}" if r.after else f"{r.before} kept"
            out[key] = out.get(key, 0) + 1
        return out

    def kept(self) -> dict[str, str]:
        """Path -> why, for every module that is not plain."""
        return {r.path: r.note for r in self.records if r.after is None}

    def __len__(self) -> int:
        return len(self.records)

    def __str__(self) -> str:
        if not self.records:
            return "normswap finalize: nothing to finalize (no normswap layer or reparametrization)"
        lines = ["normswap finalize:"]
        for r in self.records:
            after = f"torch.nn.{r.after}" if r.after else "kept"
            note = f"  ({r.note})" if r.note else ""
            lines.append(f"  {r.path or '<model>'}: {r.before} -> {after}{note}")
        verdict = "plain torch only" if self.plain else f"{len(self.kept())} module(s) kept"
        lines.append(f"summary: {self.counts()}; {verdict}")
        return "\n".join(lines)


def _share_affine(new: nn.Module, old: nn.Module) -> nn.Module:
    if getattr(old, "weight", None) is not None:
        new.weight = old.weight
        new.bias = old.bias
    return new.train(old.training)


#: Why a channels-last layer whose statistics span positions stays as it is.
_CHANNELS_LAST = (
    "channels last ((N, *S, C) input): torch's GroupNorm/InstanceNorm take channels in dim 1 "
    "(it exports and scripts as it is)"
)


def _group(groups: Callable[[nn.Module], int]) -> Finalizer:
    def make(module: nn.Module) -> nn.Module | str:
        if getattr(module, "channels_last", False):
            return _CHANNELS_LAST
        new = nn.GroupNorm(
            groups(module),
            module.num_channels,
            eps=module.eps,
            affine=getattr(module, "weight", None) is not None,
            device="meta",
        )
        return _share_affine(new, module)

    return make


def _instance(module: nn.Module) -> nn.Module | str:
    if module.channels_last:
        return _CHANNELS_LAST
    if module.track_running_stats:
        return (
            "InstanceNorm with running statistics: torch's InstanceNormNd computes it only "
            "for one input rank and differs in training mode"
        )
    return _group(lambda m: m.num_channels)(module)


#: The BatchNorm class that accepts exactly the input ranks a FrozenAffine's source accepted.
_BATCHNORMS = {(2, 3): nn.BatchNorm1d, (4,): nn.BatchNorm2d, (5,): nn.BatchNorm3d}


def _frozen(module: nn.Module) -> nn.Module | str:
    if module.center or module.channels_last:
        return (
            "a frozen LayerNorm (centred per position, or channels last): no plain torch module "
            "computes it (it exports and scripts as it is)"
        )
    cls = _BATCHNORMS.get(tuple(getattr(module, "input_ranks", None) or ()))
    if cls is None:
        return (
            "the input rank of this FrozenAffine is not known (it was not built from a "
            "BatchNorm1d/2d/3d), so no BatchNormNd can stand for it"
        )
    # An eval-mode BatchNorm with mean 0, variance 1 and eps 0 computes weight * x + bias.
    new = cls(module.num_channels, eps=0.0, momentum=0.0, device=module.weight.device)
    new = new.to(module.weight.dtype)
    new.weight, new.bias = module.weight, module.bias
    return new.eval()


def _kept(reason: str) -> Finalizer:
    return lambda module: reason


def _layer_norm_2d(module: nn.Module) -> nn.Module | str:
    if not module.channels_last:
        return (
            "LayerNorm2d normalizes over channels at each position; no plain torch module does "
            "that for (N, C, *S) input (it exports and scripts as it is)"
        )
    new = nn.LayerNorm(module.num_channels, eps=module.eps, elementwise_affine=module.affine)
    return _share_affine(new, module)


def _rms(module: nn.Module) -> nn.Module | str:
    if module.bias is not None:
        return "an RMSNorm with a bias (a LayerNorm's β kept there): torch's RMSNorm has none"
    if not module.channels_last:
        return (
            "RMSNorm over the channels in dim 1 at each position: torch's RMSNorm normalizes the "
            "last dims (it exports and scripts as it is)"
        )
    new = nn.RMSNorm(module.num_channels, eps=module.eps, elementwise_affine=module.affine)
    if module.weight is not None:
        new.weight = module.weight
    return new.train(module.training)


register_finalizer(GroupNorm, _group(lambda m: m.num_groups))
register_finalizer(LayerNorm, _group(lambda m: 1))
register_finalizer(InstanceNorm, _instance)
register_finalizer(FrozenAffine, _frozen)
register_finalizer(LayerNorm2d, _layer_norm_2d)
register_finalizer(RMSNorm, _rms)
for _pointwise in (DyT, Derf):
    register_finalizer(
        _pointwise,
        _kept(f"{_pointwise.__name__} has no plain torch module (it exports and scripts as it is)"),
    )
register_finalizer(AdaLIN, _kept("AdaLIN mixes instance and layer statistics (learned rho)"))
register_finalizer(
    AdaLN,
    _kept(
        "AdaLN needs its condition: export normswap.Conditioned(model), which takes the "
        "condition as an explicit input"
    ),
)
for _act in ACT_VARIANTS.values():
    register_finalizer(_act, _kept("a norm + activation layer (timm's layout) is kept whole"))
register_finalizer(NormThen, _kept("a norm + activation layer is kept whole"))


def _drop_legacy_key_hook(module: nn.Module) -> None:
    """The weight-norm key-renaming load hook has nothing to rename once the weight is plain
    (and would make the pickled module need normswap)."""
    hooks = module._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is _legacy_weight_norm_keys]:
        del hooks[key]


def finalize(model: nn.Module) -> FinalizeReport:
    """Replace normswap layers by plain ``torch.nn`` modules where they compute the same.

    Weight norm and weight standardization are baked into ordinary ``weight`` Parameters; each
    layer with a rule in :data:`FINALIZERS` becomes its plain module (sharing its Parameters;
    hooks move along). Outputs are unchanged (up to float rounding of a different kernel).
    Everything is checked before anything is modified.

    Args:
        model: a converted model (after :func:`normswap.swap` and training), modified in place.

    Returns:
        A :class:`FinalizeReport`: what became plain and what was kept, and why. A model with
        nothing to finalize gets an empty report, not an error.

    Raises:
        NormSwapError: the model holds blends (finish the progressive conversion first), or is
            in training mode while it has a layer whose plain form behaves differently in
            training (``frozen`` → BatchNorm: call ``model.eval()`` first); nothing modified.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18().eval()
        >>> _ = normswap.swap(model, "gn")
        >>> report = finalize(model)
        >>> report.plain, type(model.bn1)
        (True, <class 'torch.nn.modules.normalization.GroupNorm'>)
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise NormSwapError("finalize: convert and finalize the eager model, then script it")
    found = list(module_paths(model).values())
    blends = [paths[0] for module, paths in found if isinstance(module, BlendNorm)]
    if blends:
        raise NormSwapError(
            f"finalize: {len(blends)} blend(s) of a progressive conversion remain (e.g. "
            f"{blends[0]!r}); finish it first: normswap.set_blend(model, 1.0); "
            "normswap.finish_blend(model)"
        )
    plans: list[tuple[nn.Module, list[str], nn.Module | str]] = []
    for module, paths in found:
        rule = FINALIZERS.lookup(module)
        if rule is None:
            continue
        result = rule(module)
        if "" in paths and not isinstance(result, str):
            result = "the model itself: finalize the container that holds it"
        plans.append((module, paths, result))
    training = [
        paths[0]
        for module, paths, result in plans
        if isinstance(module, FrozenAffine) and not isinstance(result, str) and module.training
    ]
    if training:
        raise NormSwapError(
            f"finalize: {training[0]!r} is in training mode; its plain form (an eval-mode "
            "BatchNorm) computes the same only in eval mode: call model.eval() first"
        )
    baked = [
        (module, paths[0])
        for module, paths in found
        if parametrize.is_parametrized(module, "weight")
        and all(isinstance(p, BAKED) for p in module.parametrizations["weight"])
    ]
    records: list[FinalizeRecord] = []
    for module, path in baked:
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])
        remove_parametrizations(module, "weight", leave_parametrized=True)
        _drop_legacy_key_hook(module)
        name = type(module).__name__
        records.append(FinalizeRecord(path, name, name, f"{kinds} baked into weight"))
    for module, paths, result in plans:
        if isinstance(result, str):
            records.append(FinalizeRecord(paths[0], type(module).__name__, None, result))
            continue
        take_hooks(module, result)
        for path in paths:
            set_module(model, path, result)
        records.append(FinalizeRecord(paths[0], type(module).__name__, type(result).__name__))
    return FinalizeReport(tuple(sorted(records, key=lambda r: r.path)))
