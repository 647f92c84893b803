"""A target for layers built as ``Layer(C, eps=, affine=, device=, dtype=[, channels_last=])``:
shared by the ``ln``, ``ln2d``, ``in``, ``adalin`` and ``adaln`` families."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from normswap.families.base import (
    REPLACE,
    Decision,
    NormContext,
    Target,
    carry_over,
    exact_note,
    factory,
    layout_kwargs,
    layout_problem,
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
    one position (LayerNorm2d). ``channels_last`` says whether the layer also takes channels-last
    input (``channels_last=True``), so that it can replace an ``nn.LayerNorm`` of a
    channels-last map.

    Example:
        >>> from normswap.sources import describe_source
        >>> from normswap.norms import LayerNorm
        >>> target = ChannelNormTarget(LayerNorm, "layer")
        >>> target.decide(describe_source(nn.BatchNorm2d(4)), normswap.get_spec("ln"),
        ...               NormContext("bn", 4)).target
        'LayerNorm'
    """

    def __init__(
        self,
        layer: type[nn.Module],
        statistics: Literal["instance", "layer", "channels"],
        *,
        channels_last: bool = True,
    ) -> None:
        self.layer = layer
        self.statistics = statistics
        self.channels_last = channels_last

    def decide(self, src: SourceNorm, spec: NormSpec, ctx: NormContext) -> Decision:
        """Replace ``src`` (keeping its eps unless the spec sets one), or refuse a layout or a
        rank where the layer is not defined."""
        name = self.layer.__name__
        problem = layout_problem(
            name,
            src,
            ctx,
            spans_positions=self.statistics != "channels",
            channels_last_ok=self.channels_last,
        )
        if problem:
            return Decision(REPLACE, name, problem=problem)
        problem, note = statistics_problem(
            name,
            src,
            ctx.rank,
            ctx.spatial,
            channels=None if self.statistics == "instance" else src.num_channels,
            positions=self.statistics != "channels",
        )
        if problem:
            return Decision(REPLACE, name, problem=problem)
        exact = {
            "instance": lambda: exact_note(src, "groups", groups=src.num_channels),
            "layer": lambda: exact_note(src, "groups", groups=1),
            "channels": lambda: exact_note(src, "channels"),
        }[self.statistics]()
        note = "; ".join(filter(None, [note, exact])) or None
        return Decision(REPLACE, name, eps=new_eps(src, spec), note=note)

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
            **layout_kwargs(src),
        )
        return carry_over(src, new, spec)
