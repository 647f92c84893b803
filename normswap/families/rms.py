"""The ``rms`` family: a norm → :class:`normswap.RMSNorm` (Zhang & Sennrich, 2019).

``center="none"`` (the default) replaces a norm by an RMSNorm over the same channels at each
position, keeping γ (and β, where the source has one): a change of normalization to train with.
``center="fold"`` makes LayerNorms RMSNorms *exactly*: every writer into what they read is
centred and their γ/β folded into the linear layers that read them
(:mod:`normswap.graph.center`), checked on the example inputs after the swap. Where a writer
cannot be centred, the plan refuses with the path and the reason, or keeps those LayerNorms with
``uncentrable="keep"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from normswap.errors import NormSwapError
from normswap.families.base import (
    REPLACE,
    SKIP,
    Decision,
    Family,
    LayerStep,
    NormContext,
    PlanContext,
    Target,
    carry_over,
    exact_note,
    factory,
    layout_kwargs,
    layout_problem,
    new_eps,
    new_requires_grad,
    register_family,
)
from normswap.graph import center
from normswap.graph.rules import statistics_problem
from normswap.norms import RMSNorm
from normswap.pretrained.fitters import AffineFitter
from normswap.report import CENTER, UNTIE
from normswap.sources import SourceNorm
from normswap.specs import NormSpec, check_choice

__all__ = ["RMSNormSpec", "RMSNormTarget"]

CenterPolicy = Literal["none", "fold"]
UncentrablePolicy = Literal["error", "keep"]


@dataclass(frozen=True)
class RMSNormSpec(NormSpec):
    """RMSNorm over the channels at each position; ``center="fold"`` converts LayerNorm exactly.

    Attributes:
        center: ``"none"`` replaces each norm by an RMSNorm (no mean subtracted: not the same
            function); ``"fold"`` makes LayerNorms RMSNorms exactly, by centring every writer
            into what they read and folding γ/β into the linear layers that read them (needs
            ``example_inputs``; the model's outputs are checked after the swap).
        uncentrable: with ``center="fold"``, what to do with a LayerNorm whose input cannot be
            centred (a LayerScale, a depthwise conv, a norm's output written into it): ``"error"``
            refuses the swap and lists them, ``"keep"`` leaves them LayerNorms.

    Example:
        >>> RMSNormSpec(center="fold").center
        'fold'
    """

    center: CenterPolicy = "none"
    uncentrable: UncentrablePolicy = "error"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("center", self.center, ("none", "fold"))
        check_choice("uncentrable", self.uncentrable, ("error", "keep"))


def _layer_norm(src: SourceNorm) -> bool:
    """Whether ``src`` is a LayerNorm over its channels at each position (what ``fold`` makes
    an RMSNorm exactly)."""
    return src.over == "channels" and src.center and src.per_channel


class RMSNormTarget(Target):
    """A norm → :class:`normswap.RMSNorm`; LayerNorm → RMSNorm exactly with ``center="fold"``.

    Example:
        >>> from normswap.sources import describe_source
        >>> d = RMSNormTarget().decide(
        ...     describe_source(nn.RMSNorm(8)), RMSNormSpec(), NormContext("norm", 3))
        >>> d.target, d.note
        ('RMSNorm', 'exact: the same statistics as the source (a rename)')
    """

    def needs_graph(self, spec: NormSpec) -> bool:
        """``center="fold"`` follows the model's tensors (and input ranks) from a trace."""
        assert isinstance(spec, RMSNormSpec)
        return spec.center == "fold"

    def analyze(
        self,
        model: nn.Module,
        norms: list[tuple[SourceNorm, tuple[str, ...]]],
        spec: NormSpec,
        example_inputs: Any,
    ) -> center.CenterAnalysis | None:
        """With ``center="fold"``: what centring and folding make the LayerNorms exact."""
        assert isinstance(spec, RMSNormSpec)
        if spec.center != "fold":
            return None
        layer_norms = {paths[0]: paths for src, paths in norms if _layer_norm(src)}
        if not layer_norms:
            return None
        if example_inputs is None:
            raise NormSwapError(
                "center='fold' follows the tensors of one forward pass to find the layers "
                "writing into each LayerNorm: pass example_inputs (e.g. a small batch)"
            )
        return center.analyze(model, layer_norms, example_inputs)

    def decide(self, src: SourceNorm, spec: NormSpec, ctx: NormContext) -> Decision:
        """Replace ``src``; with ``center="fold"``, only a LayerNorm whose input can be centred."""
        assert isinstance(spec, RMSNormSpec)
        problem = layout_problem("RMSNorm", src, ctx, spans_positions=False)
        if problem:
            return Decision(REPLACE, "RMSNorm", problem=problem)
        problem, note = statistics_problem(
            "RMSNorm", src, ctx.rank, ctx.spatial, channels=src.num_channels, positions=False
        )
        if problem:
            return Decision(REPLACE, "RMSNorm", problem=problem)
        eps = new_eps(src, spec)
        if spec.center == "none":
            note = "; ".join(filter(None, [note, exact_note(src, "channels", center=False)]))
            return Decision(REPLACE, "RMSNorm", eps=eps, note=note or None)
        if not _layer_norm(src):
            return Decision(
                REPLACE,
                "RMSNorm",
                problem=(
                    f"center='fold' makes a LayerNorm over the channels at each position an "
                    f"RMSNorm exactly; {src.kind} is not one: exclude it, or use center='none'"
                ),
            )
        found = ctx.analysis
        if not isinstance(found, center.CenterAnalysis):  # another problem stopped it: listed
            return Decision(
                REPLACE,
                "RMSNorm",
                problem="center='fold' needs the model's value graph, which the other problems "
                "listed kept from being recorded",
            )
        why = found.problems.get(ctx.path)
        if why is not None:
            if spec.uncentrable == "keep":
                return Decision(SKIP, src.kind, reason=f"kept (cannot be centred: {why})")
            return Decision(
                REPLACE,
                "RMSNorm",
                problem=(
                    f"cannot centre what it reads: {why}; exclude it, or set "
                    "uncentrable='keep' to keep it a LayerNorm"
                ),
            )
        keep = ctx.path in found.keeps_gamma
        note = f"exact: {found.notes.get(ctx.path, 'centred')}"
        return Decision(REPLACE, "RMSNorm", eps=eps, note=note, args={"keep_affine": keep})

    def build(self, src: SourceNorm, spec: NormSpec, decision: Decision) -> nn.Module:
        """An RMSNorm in ``src``'s layout: with γ (and β) carried over, or, where they fold into
        the layers reading it, a weight of ones."""
        assert decision.eps is not None
        fold = decision.args is not None and not decision.args["keep_affine"]
        new = RMSNorm(
            src.num_channels,
            eps=decision.eps,
            affine=src.affine,
            bias=src.bias is not None and not fold,
            **factory(src),
            **layout_kwargs(src),
        )
        if not fold:
            return carry_over(src, new, spec)
        for p in new.parameters():
            p.requires_grad_(new_requires_grad(src, spec))
        return new.train(src.training)

    def plan_layers(
        self, modules: list[tuple[nn.Module, tuple[str, ...]]], spec: NormSpec, ctx: PlanContext
    ) -> list[LayerStep]:
        """With ``center="fold"``: untie shared weights, then centre each writer and fold each
        converted LayerNorm's γ/β into its readers, one step per module."""
        found = ctx.analysis
        if not isinstance(found, center.CenterAnalysis):
            return []
        converted = {
            path: (src.weight, src.bias)
            for path, (src, decision) in ctx.decisions.items()
            if decision.action == REPLACE and decision.args and not decision.args["keep_affine"]
        }
        paths = _paths(ctx.model)
        steps = [
            LayerStep(
                ctx.model.get_submodule(module),
                paths[module],
                UNTIE,
                note=f"its {attr} was tied; it keeps a copy of the original values",
                args={"attr": attr},
            )
            for module, attr in found.untie
        ]
        edits: dict[str, list[tuple[str, Any]]] = {}
        for c in found.centre:
            edits.setdefault(c.module, []).append(("centre", c))
        for norm, absorbs in found.absorb.items():
            if norm in converted:
                for a in absorbs:
                    edits.setdefault(a.module, []).append(("absorb", (a, *converted[norm])))
        for module, todo in edits.items():
            steps.append(
                LayerStep(
                    ctx.model.get_submodule(module),
                    paths[module],
                    CENTER,
                    note=_describe(todo),
                    args={"edits": todo},
                )
            )
        return steps

    def layer_writes(self, step: LayerStep, spec: NormSpec) -> list[Tensor]:
        """The parameters a centring step changes in place."""
        if step.action != CENTER:
            return []
        names = set()
        for kind, edit in step.args["edits"]:
            if kind == "centre":
                names.add(edit.attr)
            else:
                names.add(edit[0].attr)
                if edit[0].bias is not None:
                    names.add(edit[0].bias)
        return [getattr(step.module, n) for n in sorted(names)]

    def apply_layer(self, step: LayerStep, spec: NormSpec) -> None:
        """Untie a weight, or centre and fold into one module's parameters (in float64)."""
        if step.action == UNTIE:
            attr = step.args["attr"]
            original = getattr(step.module, attr)
            setattr(
                step.module, attr, nn.Parameter(original.detach().clone(), original.requires_grad)
            )
            return
        center.apply_module_edits(step.module, step.args["edits"])

    def check_applied(self, model: nn.Module, plan: Any) -> None:
        """The model computes what it computed (the rewrite is exact), or the swap is undone."""
        found = getattr(plan, "analysis", None)
        if isinstance(found, center.CenterAnalysis) and any(
            s.action == CENTER for s in plan.layer_steps
        ):
            center.check_outputs(model, found)


def _paths(model: nn.Module) -> dict[str, tuple[str, ...]]:
    found: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        found.setdefault(id(m), []).append(path)
    return {paths[0]: tuple(paths) for paths in found.values()}


def _describe(todo: list[tuple[str, Any]]) -> str:
    centred = sorted({e.attr for kind, e in todo if kind == "centre"})
    norms = sorted({e[0].norm for kind, e in todo if kind == "absorb"})
    parts = []
    if centred:
        parts.append(f"{', '.join(centred)} centred (it writes into a normalized stream)")
    if norms:
        parts.append(f"takes γ/β of {', '.join(norms)}")
    return "; ".join(parts)


FAMILY = register_family(
    Family("rms", RMSNormSpec, RMSNormTarget(), layers=(RMSNorm,), fitter=AffineFitter())
)
