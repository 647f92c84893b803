"""The ``gn`` family: a norm → :class:`normswap.GroupNorm` (Wu & He, 2018).

Its spec, its target (a per-layer group decision), its fitter (per-channel γ/β) and its monitor
family (``gn``, also for ``torch.nn.GroupNorm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from normswap.errors import NormSwapError, SpecError
from normswap.families.base import (
    REPLACE,
    Decision,
    Family,
    NormContext,
    Target,
    carry_over,
    exact_note,
    factory,
    layout_kwargs,
    layout_problem,
    new_eps,
    register_family,
)
from normswap.graph.rules import statistics_problem
from normswap.norms import GroupNorm, resolve_groups
from normswap.pretrained.fitters import AffineFitter
from normswap.sources import SourceNorm
from normswap.specs import NormSpec, check_choice, check_positive_int

__all__ = ["GroupNormSpec", "GroupNormTarget"]

GroupPolicy = Literal["divisor", "error"]


@dataclass(frozen=True)
class GroupNormSpec(NormSpec):
    """GroupNorm with ``num_groups`` groups or ``group_size`` channels per group.

    Attributes:
        num_groups: groups per layer (the GN paper's default is 32).
        group_size: channels per group; when set, it wins over ``num_groups``.
        policy: ``"divisor"`` uses the largest divisor of C not above the request (each
            decision is reported); ``"error"`` refuses layers whose C does not divide.

    Example:
        >>> GroupNormSpec(num_groups=16).num_groups
        16
    """

    num_groups: int | None = 32
    group_size: int | None = None
    policy: GroupPolicy = "divisor"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_groups is None and self.group_size is None:
            raise SpecError("give num_groups or group_size (both are None)")
        check_positive_int("num_groups", self.num_groups, optional=True)
        check_positive_int("group_size", self.group_size, optional=True)
        check_choice("policy", self.policy, ("divisor", "error"))


class GroupNormTarget(Target):
    """A norm → :class:`normswap.GroupNorm` with a per-layer group decision.

    Example:
        >>> from normswap.sources import describe_source
        >>> d = GroupNormTarget().decide(
        ...     describe_source(nn.BatchNorm2d(45)), GroupNormSpec(), NormContext("bn", 4))
        >>> d.groups, d.note
        (15, '32 groups do not divide 45 channels; using 15')
    """

    def decide(self, src: SourceNorm, spec: NormSpec, ctx: NormContext) -> Decision:
        """Pick the group count for ``src``'s channels, or say why none fits."""
        assert isinstance(spec, GroupNormSpec)
        problem = layout_problem("GroupNorm", src, ctx, spans_positions=True)
        if problem:
            return Decision(REPLACE, "GroupNorm", problem=problem)
        try:
            groups, note = resolve_groups(
                src.num_channels, spec.num_groups, spec.group_size, spec.policy
            )
        except NormSwapError as err:
            return Decision(REPLACE, "GroupNorm", problem=str(err))
        problem, _ = statistics_problem(
            "GroupNorm", src, ctx.rank, ctx.spatial, channels=src.num_channels // groups
        )
        if problem:
            return Decision(REPLACE, "GroupNorm", problem=f"{problem} (or fewer groups)")
        note = "; ".join(filter(None, [note, exact_note(src, "groups", groups=groups)])) or None
        return Decision(REPLACE, "GroupNorm", groups=groups, eps=new_eps(src, spec), note=note)

    def build(self, src: SourceNorm, spec: NormSpec, decision: Decision) -> nn.Module:
        """A :class:`normswap.GroupNorm` holding ``src``'s γ/β."""
        assert decision.groups is not None and decision.eps is not None
        new = GroupNorm(
            src.num_channels,
            decision.groups,
            decision.eps,
            src.affine,
            **factory(src),
            **layout_kwargs(src),
        )
        return carry_over(src, new, spec)


FAMILY = register_family(
    Family(
        "gn",
        GroupNormSpec,
        GroupNormTarget(),
        layers=(nn.GroupNorm,),  # normswap.GroupNorm and torch's
        fitter=AffineFitter(),
    )
)
