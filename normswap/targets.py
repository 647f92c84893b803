"""Target families: how each spec plans and builds its layers.

One small class per target, registered by the spec's name. A target

* ``decide``s, for one source norm, what it becomes (or why that is impossible) without
  touching anything;
* ``build``s the new module from the source, carrying over what defines behaviour
  (γ/β — the same Parameter objects where shapes allow —, eps, device, dtype, training
  flag, ``requires_grad``);
* optionally plans and applies changes to other layers (weight norm, standardization).

Adding a target is registering one more class; nothing else dispatches on names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from normswap import norms
from normswap.errors import NormSwapError, SpecError
from normswap.report import FOLD, REMOVE, REPLACE, SKIP, STANDARDIZE, WEIGHT_NORM
from normswap.sources import SourceNorm
from normswap.specs import (
    AdaLINSpec,
    AdaLNSpec,
    GroupNormSpec,
    InstanceNormSpec,
    NormSpec,
    WeightNormSpec,
    WSGroupNormSpec,
)

if TYPE_CHECKING:
    from normswap.trace import GraphFacts

__all__ = ["Decision", "LayerStep", "NormContext", "Target", "get_target", "register_target"]


@dataclass(frozen=True)
class NormContext:
    """What the planner knows about one norm when a target decides.

    Attributes:
        path: canonical module path.
        rank: the input rank seen by tracing, or implied by the class; ``None`` if unknown.
        facts: graph facts when the model was traced (``None`` otherwise).
        spatial: the smallest number of spatial positions (prod of S) of its traced inputs,
            ``None`` when not traced.
    """

    path: str
    rank: int | None
    facts: GraphFacts | None = None
    spatial: int | None = None


@dataclass(frozen=True)
class Decision:
    """A target's decision for one source norm.

    Exactly one of: a valid action (``replace``/``fold``/``remove``/``skip``) or a
    ``problem`` that makes the whole plan invalid.
    """

    action: str
    target: str
    groups: int | None = None
    eps: float | None = None
    note: str | None = None
    reason: str | None = None
    into: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class LayerStep:
    """A change to a non-norm layer (weight norm, standardization), or why it is skipped."""

    module: nn.Module
    paths: tuple[str, ...]
    action: str
    reason: str | None = None
    note: str | None = None
    kind: str = ""

    def __post_init__(self) -> None:
        if not self.kind:  # the class name before any parametrization renames it
            object.__setattr__(self, "kind", type(self.module).__name__)


class Target:
    """Base class of a target family. Subclasses set ``layer`` or override ``build``."""

    name: str = ""

    def decide(self, src: SourceNorm, spec: NormSpec, ctx: NormContext) -> Decision:
        """Decide what ``src`` becomes; never modify anything."""
        raise NotImplementedError

    def build(self, src: SourceNorm, spec: NormSpec, decision: Decision) -> nn.Module:
        """Build the replacement module for ``src`` following ``decision``."""
        raise NotImplementedError

    def needs_graph(self, spec: NormSpec) -> bool:
        """Whether planning needs producer facts from tracing (folding does)."""
        return False

    def plan_layers(
        self, modules: list[tuple[nn.Module, tuple[str, ...]]], spec: NormSpec
    ) -> list[LayerStep]:
        """Plan changes to non-norm layers; ``modules`` are the selected candidates."""
        return []

    def apply_layer(self, step: LayerStep, spec: NormSpec) -> None:
        """Apply one planned layer change."""
        raise NotImplementedError


_TARGETS: dict[str, Target] = {}


def register_target(name: str) -> Callable[[type[Target]], type[Target]]:
    """Register a target family for the spec registered under ``name``.

    Example:
        >>> @register_target("my_gn")  # doctest: +SKIP
        ... class MyGN(GroupNormTarget): ...
    """

    def decorator(cls: type[Target]) -> type[Target]:
        if name in _TARGETS:
            raise SpecError(f"a target for {name!r} is already registered")
        cls.name = name
        _TARGETS[name] = cls()
        return cls

    return decorator


def get_target(spec: NormSpec) -> Target:
    """Return the target family for ``spec`` (by its registered name).

    Example:
        >>> from normswap.specs import GroupNormSpec
        >>> get_target(GroupNormSpec()).name
        'gn'
    """
    try:
        return _TARGETS[spec.name]
    except KeyError:
        raise SpecError(
            f"no target registered for spec {spec.name!r}; "
            f"registered: {', '.join(sorted(_TARGETS))}"
        ) from None


# --------------------------------------------------------------------------- helpers


def _eps(src: SourceNorm, spec: NormSpec) -> float:
    return float(spec.eps) if spec.eps is not None else src.eps


def _requires_grad(src: SourceNorm, spec: NormSpec) -> bool:
    return spec.trainable if spec.trainable is not None else src.requires_grad


def _factory(src: SourceNorm) -> dict[str, Any]:
    return {"device": src.device, "dtype": src.dtype}


def _as_parameter(t: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """Reuse ``t`` when it already is a Parameter (optimizers keep working), else wrap it."""
    if isinstance(t, nn.Parameter):
        t.requires_grad_(requires_grad)
        return t
    return nn.Parameter(t.detach(), requires_grad=requires_grad)


def carry_over(src: SourceNorm, new: nn.Module, spec: NormSpec) -> nn.Module:
    """Move γ/β into ``new`` and copy training flag and ``requires_grad``.

    γ/β are moved, not copied: the new module holds the same Parameter objects (for
    FrozenBatchNorm2d, Parameters sharing the buffers' storage), so nothing is allocated
    and an optimizer built before the swap still holds them.
    """
    grad = _requires_grad(src, spec)
    if src.weight is not None and getattr(new, "weight", None) is not None:
        new.weight = _as_parameter(src.weight, grad)
        new.bias = _as_parameter(src.bias, grad)
    for p in new.parameters():
        p.requires_grad_(grad)
    new.train(src.training)
    return new


def _rank_problem(target: str, src: SourceNorm, ctx: NormContext) -> tuple[str | None, str | None]:
    """Problem/note for targets that need spatial dims (IN, AdaLIN)."""
    if ctx.rank == 2:
        return (
            f"{target} needs spatial dims, but this {src.kind} normalizes (N, C) inputs "
            f"(instance statistics over one value are undefined); exclude it or use 'ln'",
            None,
        )
    if ctx.spatial == 1:
        return (
            f"{target} needs more than one spatial position, but this {src.kind} sees inputs "
            f"with a single one (e.g. after global pooling), where instance statistics are "
            f"undefined; exclude it or use 'ln'/'gn'",
            None,
        )
    if ctx.rank is None and (src.ranks is None or 2 in src.ranks):
        return None, (
            "input rank unknown: pass example_inputs to check; an (N, C) input is refused "
            "at run time"
        )
    return None, None


# --------------------------------------------------------------------------- targets


@register_target("gn")
class GroupNormTarget(Target):
    """BatchNorm → :class:`normswap.norms.GroupNorm` with a per-layer group decision."""

    def decide(self, src: SourceNorm, spec: NormSpec, ctx: NormContext) -> Decision:
        assert isinstance(spec, GroupNormSpec)
        eps = _eps(src, spec)
        try:
            groups, note = norms.resolve_groups(
                src.num_channels, spec.num_groups, spec.group_size, spec.policy
            )
        except NormSwapError as err:
            return Decision(REPLACE, "GroupNorm", problem=str(err))
        if ctx.rank == 2 and src.num_channels // groups == 1:
            return Decision(
                REPLACE,
                "GroupNorm",
                problem=(
                    f"{groups} groups of {src.num_channels} channels on an (N, C) input put one "
                    "value in each group: the output would be constant; use 'ln' or fewer groups"
                ),
            )
        return Decision(REPLACE, "GroupNorm", groups=groups, eps=eps, note=note)

    def build(self, src: SourceNorm, spec: NormSpec, decision: Decision) -> nn.Module:
        assert decision.groups is not None and decision.eps is not None
        new = norms.GroupNorm(
            src.num_channels, decision.groups, decision.eps, src.affine, **_factory(src)
        )
        return carry_over(src, new, spec)


class _SimpleTarget(Target):
    """A target whose layer takes ``(C, eps=, affine=, device=, dtype=)``."""

    layer: type[nn.Module]
    needs_spatial = False

    def decide(self, src: SourceNorm, spec: NormSpec, ctx: NormContext) -> Decision:
        note = None
        if self.needs_spatial:
            problem, note = _rank_problem(self.layer.__name__, src, ctx)
            if problem:
                return Decision(REPLACE, self.layer.__name__, problem=problem)
        return Decision(REPLACE, self.layer.__name__, eps=_eps(src, spec), note=note)

    def extra_kwargs(self, src: SourceNorm, spec: NormSpec) -> dict[str, Any]:
        return {}

    def build(self, src: SourceNorm, spec: NormSpec, decision: Decision) -> nn.Module:
        new = self.layer(
            src.num_channels,
            eps=decision.eps,
            affine=src.affine,
            **self.extra_kwargs(src, spec),
            **_factory(src),
        )
        return carry_over(src, new, spec)


@register_target("ln")
class LayerNormTarget(_SimpleTarget):
    """BatchNorm → :class:`normswap.norms.LayerNorm` (statistics over C and S)."""

    layer = norms.LayerNorm


@register_target("ln2d")
class LayerNorm2dTarget(_SimpleTarget):
    """BatchNorm → :class:`normswap.norms.LayerNorm2d` (channels-only, per position)."""

    layer = norms.LayerNorm2d


@register_target("in")
class InstanceNormTarget(_SimpleTarget):
    """BatchNorm → :class:`normswap.norms.InstanceNorm`."""

    layer = norms.InstanceNorm
    needs_spatial = True

    def extra_kwargs(self, src: SourceNorm, spec: NormSpec) -> dict[str, Any]:
        assert isinstance(spec, InstanceNormSpec)
        return {"momentum": spec.momentum, "track_running_stats": spec.track_running_stats}

    def build(self, src: SourceNorm, spec: NormSpec, decision: Decision) -> nn.Module:
        new = super().build(src, spec, decision)
        if getattr(new, "track_running_stats", False) and src.running_mean is not None:
            # A starting point: E[instance mean] equals the BN mean; the BN variance is an
            # upper bound of the mean instance variance. Training refines both.
            with torch.no_grad():
                new.running_mean.copy_(src.running_mean)
                new.running_var.copy_(src.running_var)
        return new


@register_target("adalin")
class AdaLINTarget(_SimpleTarget):
    """BatchNorm → :class:`normswap.norms.AdaLIN` (learnable IN/LN mix ρ)."""

    layer = norms.AdaLIN
    needs_spatial = True

    def extra_kwargs(self, src: SourceNorm, spec: NormSpec) -> dict[str, Any]:
        assert isinstance(spec, AdaLINSpec)
        return {"rho_init": spec.rho_init}


@register_target("adaln")
class AdaLNTarget(_SimpleTarget):
    """BatchNorm → :class:`normswap.norms.AdaLN` (zero-initialized conditional modulation)."""

    layer = norms.AdaLN

    def extra_kwargs(self, src: SourceNorm, spec: NormSpec) -> dict[str, Any]:
        assert isinstance(spec, AdaLNSpec)
        return {"cond_dim": spec.cond_dim, "hidden_dim": spec.hidden_dim, "gate": spec.gate}


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


def _is_transposed(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvTransposeNd)


@register_target("ws_gn")
class WSGroupNormTarget(GroupNormTarget):
    """BatchNorm → GroupNorm, and every (non-transposed) conv weight-standardized."""

    def plan_layers(
        self, modules: list[tuple[nn.Module, tuple[str, ...]]], spec: NormSpec
    ) -> list[LayerStep]:
        steps = []
        for module, paths in modules:
            if not _is_conv(module) or _is_transposed(module):
                continue
            if norms.is_weight_parametrized(module):
                steps.append(LayerStep(module, paths, SKIP, reason="weight already parametrized"))
            elif module.weight[0].numel() == 1:
                steps.append(
                    LayerStep(
                        module,
                        paths,
                        SKIP,
                        reason="fan-in of 1: standardization would zero the weight",
                    )
                )
            else:
                steps.append(LayerStep(module, paths, STANDARDIZE))
        return steps

    def apply_layer(self, step: LayerStep, spec: NormSpec) -> None:
        assert isinstance(spec, WSGroupNormSpec)
        norms.standardize_weight(step.module, eps=spec.ws_eps)


@register_target("wn")
class WeightNormTarget(Target):
    """Weight norm on conv/linear layers; BatchNorms folded, removed or kept."""

    def needs_graph(self, spec: NormSpec) -> bool:
        assert isinstance(spec, WeightNormSpec)
        return spec.bn == "fold"

    def decide(self, src: SourceNorm, spec: NormSpec, ctx: NormContext) -> Decision:
        assert isinstance(spec, WeightNormSpec)
        if spec.bn == "keep":
            return Decision(SKIP, src.kind, reason="kept (bn='keep')")
        if spec.bn == "remove":
            return Decision(REMOVE, "Identity")
        problem = _fold_problem(src, ctx)
        if problem is None:
            assert ctx.facts is not None
            return Decision(FOLD, "Identity", into=ctx.facts.producers()[ctx.path])
        if spec.unfoldable == "keep":
            return Decision(SKIP, src.kind, reason=f"not foldable: {problem}")
        if spec.unfoldable == "remove":
            return Decision(REMOVE, "Identity", note=f"not foldable: {problem}")
        return Decision(
            FOLD,
            "Identity",
            problem=f"cannot fold: {problem}; exclude it, or set unfoldable='keep' or 'remove'",
        )

    def build(self, src: SourceNorm, spec: NormSpec, decision: Decision) -> nn.Module:
        return nn.Identity()

    def plan_layers(
        self, modules: list[tuple[nn.Module, tuple[str, ...]]], spec: NormSpec
    ) -> list[LayerStep]:
        assert isinstance(spec, WeightNormSpec)
        steps = []
        for module, paths in modules:
            kind = "conv" if _is_conv(module) else "linear" if isinstance(module, nn.Linear) else ""
            if kind not in spec.layers:
                continue
            if norms.is_weight_parametrized(module):
                steps.append(LayerStep(module, paths, SKIP, reason="weight already parametrized"))
                continue
            weight = module.weight
            if weight.device.type != "meta":
                dim = 1 if _is_transposed(module) else 0
                rows = weight.detach().transpose(0, dim).flatten(1)
                if not bool(rows.abs().amax(dim=1).gt(0).all()):
                    steps.append(
                        LayerStep(
                            module,
                            paths,
                            SKIP,
                            reason="has all-zero output channels: weight norm would give NaN",
                        )
                    )
                    continue
            steps.append(LayerStep(module, paths, WEIGHT_NORM))
        return steps

    def apply_layer(self, step: LayerStep, spec: NormSpec) -> None:
        norms.weight_norm(step.module)


def _fold_problem(src: SourceNorm, ctx: NormContext) -> str | None:
    if src.running_mean is None or src.running_var is None:
        return "it tracks no running statistics"
    if src.training:
        return "it is in training mode: call model.eval() first (folding uses running statistics)"
    if ctx.facts is None:
        return "the model was not traced"
    info = ctx.facts.norms.get(ctx.path)
    if info is None:
        return "it did not run in the traced forward pass"
    if not info.foldable:
        return info.reason or "not foldable"
    return None
