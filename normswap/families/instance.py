"""The ``in`` family: BatchNorm → :class:`normswap.InstanceNorm` (affine; optional running
statistics initialized from the BatchNorm's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normswap.errors import SpecError
from normswap.families.base import Decision, Family, register_family
from normswap.families.simple import ChannelNormTarget
from normswap.norms import InstanceNorm
from normswap.pretrained.fitters import AffineFitter
from normswap.sources import SourceNorm
from normswap.specs import NormSpec

__all__ = ["InstanceNormSpec", "InstanceNormTarget"]


@dataclass(frozen=True)
class InstanceNormSpec(NormSpec):
    """InstanceNorm with affine; optionally tracking running statistics.

    Attributes:
        track_running_stats: keep running mean/var for eval (initialised from the BN's).
        momentum: running-statistics momentum when tracking.

    Example:
        >>> InstanceNormSpec(track_running_stats=True).track_running_stats
        True
    """

    track_running_stats: bool = False
    momentum: float | None = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.momentum is not None and not 0.0 <= self.momentum <= 1.0:
            raise SpecError(f"momentum must be in [0, 1] or None, got {self.momentum!r}")


class InstanceNormTarget(ChannelNormTarget):
    """BatchNorm → :class:`normswap.InstanceNorm`; refuses norms without spatial positions.

    Example:
        >>> InstanceNormTarget().layer.__name__
        'InstanceNorm'
    """

    def __init__(self) -> None:
        super().__init__(InstanceNorm, "instance")

    def extra_kwargs(self, src: SourceNorm, spec: NormSpec) -> dict[str, Any]:
        """``momentum`` and ``track_running_stats`` from the spec."""
        assert isinstance(spec, InstanceNormSpec)
        return {"momentum": spec.momentum, "track_running_stats": spec.track_running_stats}

    def build(self, src: SourceNorm, spec: NormSpec, decision: Decision) -> nn.Module:
        """The new layer; running statistics start from the BatchNorm's."""
        new = super().build(src, spec, decision)
        if getattr(new, "track_running_stats", False) and src.running_mean is not None:
            # A starting point: E[instance mean] equals the BN mean; the BN variance is an
            # upper bound of the mean instance variance. Training refines both.
            with torch.no_grad():
                new.running_mean.copy_(src.running_mean)
                new.running_var.copy_(src.running_var)
        return new


FAMILY = register_family(
    Family(
        "in",
        InstanceNormSpec,
        InstanceNormTarget(),
        layers=(InstanceNorm,),
        fitter=AffineFitter(),
        also_monitor=(nn.modules.instancenorm._InstanceNorm,),
    )
)
