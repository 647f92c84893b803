"""The ``wn`` family: weight normalization on conv/linear layers (Salimans & Kingma, 2016),
with each BatchNorm folded into the layer that produces its input (exact), removed or kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from normswap.families.base import (
    FOLD,
    REMOVE,
    SKIP,
    WEIGHT_NORM,
    Decision,
    Family,
    LayerStep,
    NormContext,
    PlanContext,
    Target,
    register_family,
)
from normswap.graph.rules import fold_problems, norm_fold_problems
from normswap.monitor.families import register_monitor_rule
from normswap.norms import is_weight_parametrized, reparam_problem, weight_norm
from normswap.sources import SourceNorm
from normswap.specs import NormSpec, check_choice

__all__ = ["WeightNormSpec", "WeightNormTarget"]

BNPolicy = Literal["keep", "remove", "fold"]
UnfoldablePolicy = Literal["error", "keep", "remove"]
LayerKind = Literal["conv", "linear"]


@dataclass(frozen=True)
class WeightNormSpec(NormSpec):
    """Weight normalization on conv/linear layers, with a policy for the BatchNorms.

    Attributes:
        bn: ``"fold"`` folds each eval-mode BN into the conv/linear producing its input
            (exact: outputs unchanged), ``"remove"`` replaces BNs with identity,
            ``"keep"`` leaves them.
        unfoldable: with ``bn="fold"``, what to do with a BN that cannot be folded exactly
            (its input comes from a concat, or feeds other layers too): ``"error"`` refuses
            the swap and lists them, ``"keep"`` leaves them, ``"remove"`` removes them.
        layers: which layer kinds get weight norm: any of ``"conv"``, ``"linear"``.

    Example:
        >>> WeightNormSpec(bn="remove").bn
        'remove'
    """

    bn: BNPolicy = "fold"
    unfoldable: UnfoldablePolicy = "error"
    layers: tuple[str, ...] = field(default=("conv", "linear"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("bn", self.bn, ("keep", "remove", "fold"))
        check_choice("unfoldable", self.unfoldable, ("error", "keep", "remove"))
        layers = tuple(self.layers) if not isinstance(self.layers, str) else (self.layers,)
        object.__setattr__(self, "layers", layers)
        for kind in layers:
            check_choice("layers", kind, ("conv", "linear"))


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    return "linear" if isinstance(module, nn.Linear) else ""


def _fold_problem(src: SourceNorm, ctx: NormContext) -> tuple[str | None, str | None]:
    """``(problem, producer path)`` of folding ``src`` by the rulebook."""
    if ctx.facts is None:
        untraced = "the model was not traced: pass example_inputs"
        return "; ".join([*norm_fold_problems(src), untraced]), None
    info = ctx.facts.norms.get(ctx.path)
    if info is None:
        return "it did not run in the traced forward pass", None
    producer = None
    if info.producer is not None and ctx.model is not None:
        producer = ctx.model.get_submodule(info.producer)
    problems = fold_problems(
        src, producer, facts=info, owners=ctx.owners, producer_path=info.producer
    )
    return "; ".join(problems) or None, info.producer


def _zero_scale(src: SourceNorm) -> bool:
    """Whether folding ``src`` zeroes some output channel of its producer (γ = 0 there)."""
    if src.weight is None or src.weight.device.type == "meta":
        return False
    return bool((src.weight.detach() == 0).any())


class WeightNormTarget(Target):
    """Weight norm on conv/linear layers; BatchNorms folded, removed or kept.

    Example:
        >>> WeightNormTarget().needs_graph(WeightNormSpec(bn="fold"))
        True
    """

    def needs_graph(self, spec: NormSpec) -> bool:
        """Folding needs each BatchNorm's producer, from tracing."""
        assert isinstance(spec, WeightNormSpec)
        return spec.bn == "fold"

    def needs_eval_mode(self, spec: NormSpec) -> bool:
        """Folding uses running statistics: the model must be in eval mode for the swap."""
        assert isinstance(spec, WeightNormSpec)
        return spec.bn == "fold"

    def decide(self, src: SourceNorm, spec: NormSpec, ctx: NormContext) -> Decision:
        """Fold, remove or keep ``src`` as the spec says (and whether it can fold)."""
        assert isinstance(spec, WeightNormSpec)
        if spec.bn == "keep":
            return Decision(SKIP, src.kind, reason="kept (bn='keep')")
        if spec.bn == "remove":
            return Decision(REMOVE, "Identity")
        problem, producer = _fold_problem(src, ctx)
        if problem is None:
            return Decision(FOLD, "Identity", into=producer)
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
        """An ``nn.Identity`` where the BatchNorm was (folded or removed)."""
        return nn.Identity()

    def plan_layers(
        self, modules: list[tuple[nn.Module, tuple[str, ...]]], spec: NormSpec, ctx: PlanContext
    ) -> list[LayerStep]:
        """Weight norm on every selected conv/linear the rule allows; the rest skip, saying why."""
        assert isinstance(spec, WeightNormSpec)
        zeroed = {
            decision.into: path
            for path, (src, decision) in ctx.decisions.items()
            if decision.action == FOLD and _zero_scale(src)
        }
        steps = []
        for module, paths in modules:
            if _kind(module) not in spec.layers:
                continue
            reason = reparam_problem(module, "weight_norm")
            if reason is None and paths[0] in zeroed:
                reason = (
                    f"folding {zeroed[paths[0]]} (γ = 0 for some channels) gives it all-zero "
                    "output channels, where weight norm would give NaN"
                )
            if reason is None:
                others = [
                    p for i, p in ctx.owners.get(id(module.weight), {}).items() if i != id(module)
                ]
                if others:
                    reason = (
                        f"its weight is shared with {', '.join(sorted(others))}; weight norm "
                        "would untie them"
                    )
            steps.append(
                LayerStep(module, paths, WEIGHT_NORM if reason is None else SKIP, reason=reason)
            )
        return steps

    def apply_layer(self, step: LayerStep, spec: NormSpec) -> None:
        """Register weight norm on the step's layer."""
        weight_norm(step.module)


def _weight_normalized(module: nn.Module) -> bool:
    return is_weight_parametrized(module, "weight_norm")


FAMILY = register_family(Family("wn", WeightNormSpec, WeightNormTarget()))
register_monitor_rule(_weight_normalized, "wn")
