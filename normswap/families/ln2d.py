"""The ``ln2d`` family: BatchNorm → :class:`normswap.LayerNorm2d`, channels-only LayerNorm at
every position (ConvNeXt style)."""

from __future__ import annotations

from dataclasses import dataclass

from normswap.families.base import Family, register_family
from normswap.families.simple import ChannelNormTarget
from normswap.norms import LayerNorm2d
from normswap.pretrained.fitters import AffineFitter
from normswap.specs import NormSpec

__all__ = ["LayerNorm2dSpec"]


@dataclass(frozen=True)
class LayerNorm2dSpec(NormSpec):
    """Channels-only LayerNorm at every position (ConvNeXt style).

    Example:
        >>> LayerNorm2dSpec().name
        'ln2d'
    """


def _torchvision_layer_norm_2d() -> tuple[type, ...]:
    try:
        from torchvision.models.convnext import LayerNorm2d as TVLayerNorm2d
    except ImportError:  # torchvision is a dependency, but the core works without it
        return ()
    return (TVLayerNorm2d,)


FAMILY = register_family(
    Family(
        "ln2d",
        LayerNorm2dSpec,
        ChannelNormTarget(LayerNorm2d, "channels"),
        layers=(LayerNorm2d,),
        fitter=AffineFitter(),
        also_monitor=_torchvision_layer_norm_2d(),  # ConvNeXt's, a subclass of nn.LayerNorm
    )
)
