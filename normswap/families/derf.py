"""The ``derf`` family: a norm → :class:`normswap.Derf`, ``γ · erf(α·x + s) + β`` ("Stronger
Normalization-Free Transformers", Chen et al., 2025); its fitter searches α and s and fits γ/β;
its monitor family reports α, s and how often erf saturates."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from normswap.errors import SpecError
from normswap.families.base import Family, register_family
from normswap.families.dyt import ALPHA_GRID, DyTSpec, PointwiseTarget
from normswap.norms import Derf
from normswap.pretrained.fitters import ScalarGridFitter
from normswap.specs import NormSpec

__all__ = ["SHIFT_GRID", "DerfSpec"]

#: The shifts calibration tries (with the layer's own).
SHIFT_GRID: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25, 0.5)


@dataclass(frozen=True)
class DerfSpec(DyTSpec):
    """Dynamic erf, γ·erf(α·x + s) + β: no statistics, learnable scalars α and s per layer.

    Attributes:
        alpha_init: the initial α of every layer.
        alpha_paths: initial α by module path (glob pattern -> α; the first match wins).
        shift_init: the initial s (0: centred).

    Example:
        >>> DerfSpec(shift_init=0.1).shift_init
        0.1
    """

    alpha_init: float = 0.5
    alpha_paths: dict[str, float] = field(default_factory=dict)
    shift_init: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.shift_init
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise SpecError(f"shift_init must be a finite number, got {value!r}")


class DerfTarget(PointwiseTarget):
    """A norm → :class:`normswap.Derf` with the spec's α and s.

    Example:
        >>> DerfTarget().layer.__name__
        'Derf'
    """

    def __init__(self) -> None:
        super().__init__(Derf)

    def _args(self, spec: NormSpec, alpha: float) -> dict[str, Any]:
        assert isinstance(spec, DerfSpec)
        return {"alpha_init": alpha, "shift_init": float(spec.shift_init)}


FAMILY = register_family(
    Family(
        "derf",
        DerfSpec,
        DerfTarget(),
        layers=(Derf,),
        fitter=ScalarGridFitter({"alpha": ALPHA_GRID, "shift": SHIFT_GRID}),
    )
)
