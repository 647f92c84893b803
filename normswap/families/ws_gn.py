"""The ``ws_gn`` family: weight-standardized convolutions plus GroupNorm (Qiao et al. 2019;
BiT). It builds the ``gn`` family's GroupNorm, so its layers are calibrated and monitored as
``gn``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from normswap.errors import SpecError
from normswap.families.base import (
    SKIP,
    STANDARDIZE,
    Family,
    LayerStep,
    PlanContext,
    register_family,
)
from normswap.families.gn import GroupNormSpec, GroupNormTarget
from normswap.norms import reparam_problem, standardize_weight
from normswap.specs import NormSpec

__all__ = ["WSGroupNormSpec", "WSGroupNormTarget"]


@dataclass(frozen=True)
class WSGroupNormSpec(GroupNormSpec):
    """Weight-standardized convolutions plus GroupNorm (BiT style).

    Standardizing a pretrained conv changes what it computes; use this for training.

    Attributes:
        ws_eps: epsilon of the weight standardization (1e-6, as timm's StdConv2d: PyTorch's
            default conv init gives per-channel weight variances near 1e-4, which a larger
            eps would visibly shrink).

    Example:
        >>> WSGroupNormSpec(num_groups=32).ws_eps
        1e-06
    """

    ws_eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.ws_eps, (int, float)) or not self.ws_eps > 0:
            raise SpecError(f"ws_eps must be a positive number, got {self.ws_eps!r}")


class WSGroupNormTarget(GroupNormTarget):
    """BatchNorm → GroupNorm, and every (non-transposed) conv weight-standardized.

    Example:
        >>> WSGroupNormTarget().plan_layers([], WSGroupNormSpec(), None)
        []
    """

    def plan_layers(
        self, modules: list[tuple[nn.Module, tuple[str, ...]]], spec: NormSpec, ctx: PlanContext
    ) -> list[LayerStep]:
        """Standardize every selected conv the rule allows; the rest skipped, saying why."""
        steps = []
        for module, paths in modules:
            if not isinstance(module, nn.modules.conv._ConvNd) or isinstance(
                module, nn.modules.conv._ConvTransposeNd
            ):
                continue
            reason = reparam_problem(module, "weight_standardization")
            steps.append(
                LayerStep(module, paths, STANDARDIZE if reason is None else SKIP, reason=reason)
            )
        return steps

    def apply_layer(self, step: LayerStep, spec: NormSpec) -> None:
        """Register weight standardization on the step's conv."""
        assert isinstance(spec, WSGroupNormSpec)
        standardize_weight(step.module, eps=spec.ws_eps)


FAMILY = register_family(Family("ws_gn", WSGroupNormSpec, WSGroupNormTarget(), monitor="gn"))
