"""A target for layers built as ``Layer(C, eps=, affine=, device=, dtype=)``: shared by the
``ln``, ``ln2d``, ``in``, ``adalin`` and ``adaln`` families."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from normswap.families.base import (
    REPLACE,
    Decision,
    NormContext,
    Target,
    carry_over,
    factory,
    new_eps,
)
from normswap.graph.rules import statistics_problem
from normswap.sources import SourceNorm
from normswap.specs import NormSpec

__all__ = ["ChannelNormTarget"]


class ChannelNormTarget(Target):
    """A target whose layer takes ``(C, eps=, affine=, device=, dtype=)`` plus
    :meth:`extra_kwargs`, refusing norms where the layer's statistics would span one value.

    ``statistics`` says what they span: ``"instance"`` the positions of one channel (IN,
    AdaLIN), ``"layer"`` every channel and position (LN, AdaLN), ``"channels"`` every channel at
    one position (LayerNorm2d).

    Example:
        >>> from normswap.sources import describe_source
        >>> from normswap.norms import LayerNorm
        >>> target = ChannelNormTarget(LayerNorm, "layer")
        >>> target.decide(describe_source(nn.BatchNorm2d(4)), normswap.get_spec("ln"),
        ...               NormContext("bn", 4)).target
        'LayerNorm'
    """

    def __init__(
        self, layer: type[nn.Module], statistics: Literal["instance", "layer", "channels"]
    ) -> None:
        self.layer = layer
        self.statistics = statistics

    def decide(self, src: SourceNorm, spec: NormSpec, ctx: NormContext) -> Decision:
        """Replace ``src`` (keeping its eps unless the spec sets one), or refuse a rank."""
        problem, note = statistics_problem(
            self.layer.__name__,
            src,
            ctx.rank,
            ctx.spatial,
            channels=None if self.statistics == "instance" else src.num_channels,
            positions=self.statistics != "channels",
        )
        if problem:
            return Decision(REPLACE, self.layer.__name__, problem=problem)
        return Decision(REPLACE, self.layer.__name__, eps=new_eps(src, spec), note=note)

    def extra_kwargs(self, src: SourceNorm, spec: NormSpec) -> dict[str, Any]:
        """Constructor arguments beyond ``(C, eps, affine)`` taken from the spec."""
        return {}

    def build(self, src: SourceNorm, spec: NormSpec, decision: Decision) -> nn.Module:
        """The new layer holding ``src``'s γ/β."""
        new = self.layer(
            src.num_channels,
            eps=decision.eps,
            affine=src.affine,
            **self.extra_kwargs(src, spec),
            **factory(src),
        )
        return carry_over(src, new, spec)
