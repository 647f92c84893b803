"""The ``ln`` family: BatchNorm → :class:`normswap.LayerNorm`, statistics over ``(C, *S)`` per
sample with a per-channel affine (the Group Normalization paper's LN; ``GroupNorm(1, C)``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from normswap.families.base import Family, register_family
from normswap.families.simple import ChannelNormTarget
from normswap.norms import LayerNorm
from normswap.pretrained.fitters import AffineFitter
from normswap.specs import NormSpec

__all__ = ["LayerNormSpec"]


@dataclass(frozen=True)
class LayerNormSpec(NormSpec):
    """LayerNorm over (C, *S) per sample with a per-channel affine (the GN paper's LN).

    Example:
        >>> LayerNormSpec(eps=1e-6).eps
        1e-06
    """


FAMILY = register_family(
    Family(
        "ln",
        LayerNormSpec,
        ChannelNormTarget(LayerNorm, "layer"),
        layers=(LayerNorm,),
        fitter=AffineFitter(),
        also_monitor=(nn.LayerNorm,),  # a transformer's LN normalizes each token: also "ln"
    )
)
