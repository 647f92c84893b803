"""The ``dyt`` family: a norm → :class:`normswap.DyT`, ``γ · tanh(α·x) + β`` (Zhu et al., CVPR
2025), with α chosen per layer (``alpha_init``, or ``alpha_paths`` by module path); its fitter
searches α and fits γ/β; its monitor family reports α and how often tanh saturates.

:class:`PointwiseTarget` is shared with the ``derf`` family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from normswap.errors import SpecError
from normswap.families.base import (
    REPLACE,
    Decision,
    Family,
    NormContext,
    Target,
    carry_over,
    factory,
    layout_kwargs,
    layout_problem,
    register_family,
)
from normswap.graph.rules import statistics_problem
from normswap.norms import DyT
from normswap.pretrained.fitters import ScalarGridFitter
from normswap.sources import SourceNorm
from normswap.specs import NormSpec

__all__ = ["ALPHA_GRID", "DyTSpec", "PointwiseTarget", "check_alphas"]

#: The α values calibration tries (with the layer's own): tanh near-linear to saturating.
ALPHA_GRID: tuple[float, ...] = tuple(round(10 ** (k / 6), 4) for k in range(-15, 7))


def check_alphas(alpha_init: float, alpha_paths: Mapping[str, float]) -> None:
    """Refuse an ``alpha_init`` or ``alpha_paths`` value that is not a finite number > 0, or a
    pattern that is not a non-empty string (for the ``dyt`` and ``derf`` specs).

    Example:
        >>> check_alphas(0.5, {"*": -1.0})
        Traceback (most recent call last):
        ...
        normswap.errors.SpecError: alpha_paths['*'] must be a finite number > 0, got -1.0
    """
    values = {"alpha_init": alpha_init}
    values |= {f"alpha_paths[{k!r}]": v for k, v in alpha_paths.items()}
    for name, value in values.items():
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and value > 0):
            raise SpecError(f"{name} must be a finite number > 0, got {value!r}")
    for pattern in alpha_paths:
        if not isinstance(pattern, str) or not pattern:
            raise SpecError(f"alpha_paths keys must be non-empty glob strings, got {pattern!r}")


def _paths_dict(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise SpecError(
            "alpha_paths must map module-path glob patterns to α, e.g. {'*.attn_norm': 0.8}; "
            f"got {value!r}"
        )
    return {k: v for k, v in value.items()}


@dataclass(frozen=True)
class DyTSpec(NormSpec):
    """Dynamic Tanh, γ·tanh(α·x) + β: no statistics, a learnable scalar α per layer.

    Attributes:
        alpha_init: the initial α of every layer (0.5, the paper's default for ViTs).
        alpha_paths: initial α by module path: glob pattern -> α, the first matching pattern
            wins (the paper's LLaMA recipe: attention 0.8, FFN and final norms 0.2).

    Example:
        >>> DyTSpec(alpha_paths={"*.attn_norm": 0.8}).alpha_for(("layers.0.attn_norm",))
        0.8
    """

    alpha_init: float = 0.5
    alpha_paths: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "alpha_paths", _paths_dict(self.alpha_paths))
        check_alphas(self.alpha_init, self.alpha_paths)

    def alpha_for(self, paths: tuple[str, ...]) -> float:
        """The initial α of the layer registered at ``paths``.

        Example:
            >>> DyTSpec(alpha_init=0.3).alpha_for(("blocks.0.norm1",))
            0.3
        """
        for pattern, alpha in self.alpha_paths.items():
            if any(fnmatchcase(p, pattern) for p in paths):
                return float(alpha)
        return float(self.alpha_init)


class PointwiseTarget(Target):
    """A norm → a point-wise layer (DyT, Derf) holding its γ/β, in its layout.

    Point-wise layers have no statistics, so they can stand where any norm with one channel
    axis stood: a transformer's tokens, a channels-last map, a CNN's channels-first map. Their
    α comes from the spec, per module path.

    Example:
        >>> from normswap.sources import describe_source
        >>> target = PointwiseTarget(DyT)
        >>> d = target.decide(describe_source(nn.LayerNorm(8)), DyTSpec(), NormContext("n", 3))
        >>> d.target, d.args
        ('DyT', {'alpha_init': 0.5})
    """

    def __init__(self, layer: type[nn.Module]) -> None:
        self.layer = layer

    def decide(self, src: SourceNorm, spec: NormSpec, ctx: NormContext) -> Decision:
        """Replace ``src`` (any layout with one channel axis), with its α."""
        name = self.layer.__name__
        problem = layout_problem(name, src, ctx, spans_positions=False)
        if problem:
            return Decision(REPLACE, name, problem=problem)
        problem, note = statistics_problem(
            name, src, ctx.rank, ctx.spatial, channels=src.num_channels, positions=False
        )
        if problem:
            return Decision(REPLACE, name, problem=problem)
        alpha = spec.alpha_for(ctx.paths or (ctx.path,))  # type: ignore[attr-defined]
        notes = [note, self._note(src, spec, alpha)]
        return Decision(
            REPLACE, name, note="; ".join(filter(None, notes)) or None, args=self._args(spec, alpha)
        )

    def _note(self, src: SourceNorm, spec: NormSpec, alpha: float) -> str | None:
        notes = []
        if alpha != spec.alpha_init:  # type: ignore[attr-defined]
            notes.append(f"alpha_init {alpha:g} (alpha_paths)")
        if src.over == "batch":
            notes.append(
                f"{self.layer.__name__} computes no statistics: its authors find it does not "
                "replace BatchNorm without loss"
            )
        return "; ".join(notes) or None

    def _args(self, spec: NormSpec, alpha: float) -> dict[str, Any]:
        return {"alpha_init": alpha}

    def build(self, src: SourceNorm, spec: NormSpec, decision: Decision) -> nn.Module:
        """The point-wise layer, holding ``src``'s γ/β (a zero β where it has none)."""
        new = self.layer(
            src.num_channels,
            **decision.args,
            affine=src.affine,
            **factory(src),
            **layout_kwargs(src),
        )
        return carry_over(src, new, spec)


FAMILY = register_family(
    Family(
        "dyt",
        DyTSpec,
        PointwiseTarget(DyT),
        layers=(DyT,),
        fitter=ScalarGridFitter({"alpha": ALPHA_GRID}),
    )
)
