"""Norm layers that can stand where ``BatchNorm(num_features)`` stood, and weight reparams.

Every layer takes the channel count first, accepts ``(N, C, *S)`` input, returns its output in the
input's memory format, honours ``device=``/``dtype=`` and carries a ``normswap_path`` attribute that
the surgery fills so forward-time errors name the layer.

Implementation choices measured on CPU (torch 2.14.1, 2 cores, forward+backward):
:class:`LayerNorm2d` uses ``F.layer_norm`` after moving channels last for every layout; a
``torch.var_mean(x, dim=1)`` composition was 1.7-3x slower on contiguous input and 9-18x slower
on channels_last input, from (2, 16, 8, 8) to (8, 64, 56, 56) (``var_mean`` over a non-innermost
dim is a slow kernel on CPU). Contiguous input is first copied to channels_last by the dedicated
kernel, 1.05-1.25x faster than letting ``F.layer_norm`` copy the permuted view. Versus
BatchNorm2d in the same layout the layer costs 1.0-1.2x on channels_last and up to 1.9x on
contiguous input (two layout copies); per resnet18/50 training step 1.02-1.21x contiguous and
0.95-1.02x channels_last (``benchmarks/results/step_time_grid.md``). Under autograd every layer
returns a fresh tensor, never a view: an in-place ReLU after a view is replayed by autograd
through copies (LayerNorm2d's permuted view made resnet50's step 1.32-1.43x BN's).
:func:`weight_norm` computes a channels_last weight on the permuted contiguous view of ``v``
(resnet18, BN removed, channels_last: 1.47x -> 1.09x BN's step time).
"""

from __future__ import annotations

from normswap.norms.adaptive import AdaLIN, AdaLN, condition
from normswap.norms.group import GROUP_POLICIES, GroupNorm, resolve_groups
from normswap.norms.instance import InstanceNorm
from normswap.norms.layer import LayerNorm, LayerNorm2d
from normswap.norms.weight import (
    WeightKind,
    WeightStandardization,
    is_weight_parametrized,
    output_channel_dim,
    standardize_weight,
    weight_norm,
)

#: Every normalization layer class of this library (for isinstance checks).
NORM_LAYERS = (AdaLIN, AdaLN, GroupNorm, InstanceNorm, LayerNorm, LayerNorm2d)

__all__ = [
    "GROUP_POLICIES",
    "NORM_LAYERS",
    "AdaLIN",
    "AdaLN",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LayerNorm2d",
    "WeightKind",
    "WeightStandardization",
    "condition",
    "is_weight_parametrized",
    "output_channel_dim",
    "resolve_groups",
    "standardize_weight",
    "weight_norm",
]
