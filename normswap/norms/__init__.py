"""Norm layers that can stand where ``BatchNorm(num_features)`` stood, and weight reparams.

Every layer takes the channel count first, accepts ``(N, C, *S)`` input, returns its output in the
input's memory format (never a view under autograd: an in-place op after a view is replayed by
autograd through copies), honours ``device=``/``dtype=`` and carries a ``normswap_path`` attribute
that the surgery fills so forward-time errors name the layer. Normalization runs through
:func:`normswap.norms.dispatch.group_norm`, which picks the faster CPU kernel for the input's
layout (:func:`set_kernel_dispatch` turns that off). Why each implementation was chosen, with the
measurements: ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

from normswap.norms.act import (
    ACT_VARIANTS,
    AdaLINAct,
    AdaLNAct,
    AfterNorm,
    DerfAct,
    DyTAct,
    FrozenAffineAct,
    GroupNormAct,
    InstanceNormAct,
    LayerNorm2dAct,
    LayerNormAct,
    NormThen,
    RMSNormAct,
    with_after,
)
from normswap.norms.adaptive import AdaLIN, AdaLN, Conditioned, condition
from normswap.norms.blend import BlendNorm
from normswap.norms.common import ChannelAffineNorm
from normswap.norms.dispatch import kernel_dispatch_enabled, set_kernel_dispatch
from normswap.norms.frozen import FrozenAffine
from normswap.norms.group import GROUP_POLICIES, GroupNorm, resolve_groups
from normswap.norms.instance import InstanceNorm
from normswap.norms.layer import LayerNorm, LayerNorm2d
from normswap.norms.pointwise import Derf, DyT, PointwiseNorm
from normswap.norms.rms import RMSNorm
from normswap.norms.weight import (
    Reparam,
    WeightKind,
    WeightStandardization,
    is_weight_parametrized,
    output_channel_dim,
    reparam_problem,
    standardize_weight,
    weight_norm,
)

__all__ = [
    "ACT_VARIANTS",
    "GROUP_POLICIES",
    "AdaLIN",
    "AdaLINAct",
    "AdaLN",
    "AdaLNAct",
    "AfterNorm",
    "BlendNorm",
    "ChannelAffineNorm",
    "Conditioned",
    "Derf",
    "DerfAct",
    "DyT",
    "DyTAct",
    "FrozenAffine",
    "FrozenAffineAct",
    "GroupNorm",
    "GroupNormAct",
    "InstanceNorm",
    "InstanceNormAct",
    "LayerNorm",
    "LayerNorm2d",
    "LayerNorm2dAct",
    "LayerNormAct",
    "NormThen",
    "PointwiseNorm",
    "RMSNorm",
    "RMSNormAct",
    "Reparam",
    "WeightKind",
    "WeightStandardization",
    "condition",
    "is_weight_parametrized",
    "kernel_dispatch_enabled",
    "output_channel_dim",
    "reparam_problem",
    "resolve_groups",
    "set_kernel_dispatch",
    "standardize_weight",
    "weight_norm",
    "with_after",
]
