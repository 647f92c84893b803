"""Planning: decide, for every module path, what a swap will do — before changing anything.

A :class:`Plan` is computed from the model, a spec and the include/exclude patterns. Every
problem found (indivisible channels under the error policy, InstanceNorm on (N, C), an
uninitialized lazy BN, a BN subclass with its own forward, an unfoldable BN, ...) is
collected, and :func:`plan` raises one :class:`~normswap.errors.SwapError` listing them
all. A valid plan is executed by :func:`normswap.surgery.apply`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from normswap.errors import NormSwapError, SwapError, UnsupportedModuleError
from normswap.families import (
    Decision,
    LayerStep,
    NormContext,
    PlanContext,
    Target,
    family_layers,
    get_family,
)
from normswap.families.base import new_requires_grad
from normswap.graph import NormFacts, graph_facts
from normswap.graph.rules import parameter_owners
from normswap.modules import module_paths
from normswap.report import FOLD, SKIP, SwapRecord, SwapReport
from normswap.sources import (
    SourceNorm,
    describe_source,
    resolve_replace,
    source_classes,
    source_kind,
)
from normswap.specs import NormSpec, get_spec

__all__ = ["NormStep", "Plan", "check_model", "module_paths", "plan"]


@dataclass(frozen=True)
class NormStep:
    """The planned fate of one BatchNorm-family module instance (at all its paths).

    Example:
        >>> bn = nn.BatchNorm2d(8)
        >>> plan(nn.Sequential(bn, bn), "ln").norm_steps[0].paths
        ('0', '1')
    """

    module: nn.Module
    paths: tuple[str, ...]
    source: SourceNorm | None
    decision: Decision

    def record(self, spec: NormSpec) -> SwapRecord:
        """This step as a report record (``frozen``: the new parameters do not train)."""
        d = self.decision
        src = self.source
        frozen = False
        if src is not None and d.action != SKIP and d.target != "Identity":
            frozen = not new_requires_grad(src, spec)
        note = d.note
        if src is not None and src.after and d.action != SKIP:
            kept = ", ".join(f"{name} ({type(m).__name__})" for name, m in src.after)
            note = "; ".join(filter(None, [note, f"then its {kept}, the same modules"]))
        return SwapRecord(
            path=self.paths[0],
            source=type(self.module).__name__,
            target=d.target,
            action=d.action,
            channels=src.num_channels if src is not None else None,
            groups=d.groups,
            eps=d.eps,
            note=note,
            reason=d.reason,
            aliases=self.paths[1:],
            frozen=frozen,
            into=d.into,
        )


@dataclass(frozen=True)
class Plan:
    """A validated swap plan: what happens to each module, in module order.

    Attributes:
        spec: the spec being applied.
        target: the target family that builds the new layers.
        norm_steps: one step per source norm module of the replaced kinds.
        layer_steps: changes to other layers (weight norm, weight standardization, centring).
        notes: model-level remarks for the report.
        replace: the source kinds replaced (``("bn",)`` by default).
        analysis: what the target's whole-model analysis found (exact rewrites), or ``None``.

    Example:
        >>> p = plan(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "gn", num_groups=4)
        >>> [(s.paths, s.decision.groups) for s in p.norm_steps]
        [(('1',), 4)]
    """

    spec: NormSpec
    target: Target
    norm_steps: tuple[NormStep, ...]
    layer_steps: tuple[LayerStep, ...]
    notes: tuple[str, ...]
    replace: tuple[str, ...] = ("bn",)
    analysis: Any = None

    def records(self) -> tuple[SwapRecord, ...]:
        """Report records for every step (norms first, then other layers, each in order)."""
        out = [s.record(self.spec) for s in self.norm_steps]
        for step in self.layer_steps:
            out.append(
                SwapRecord(
                    path=step.paths[0],
                    source=step.kind,
                    target=step.kind,
                    action=step.action,
                    reason=step.reason,
                    note=step.note,
                    aliases=step.paths[1:],
                )
            )
        return tuple(out)

    def report(self, *, dry_run: bool) -> SwapReport:
        """The plan as a :class:`SwapReport`."""
        return SwapReport(
            self.records(),
            self.spec.to_dict(),
            dry_run=dry_run,
            notes=self.notes,
            replace=self.replace,
        )


def check_model(model: object) -> None:
    """Refuse what cannot be converted in place: not a module, or a TorchScript module.

    Raises:
        UnsupportedModuleError: ``model`` is not an ``nn.Module`` (``None``, a state dict, ...)
            or is scripted/traced TorchScript, whose submodules cannot be replaced.

    Example:
        >>> check_model(None)
        Traceback (most recent call last):
        ...
        normswap.errors.UnsupportedModuleError: the model must be a torch.nn.Module, got NoneType...
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModuleError(
            f"{type(model).__name__} is a TorchScript module, whose submodules cannot be "
            "replaced: convert the eager model, then script it "
            "(normswap.swap(model, ...); torch.jit.script(model))"
        )
    if not isinstance(model, nn.Module):
        hint = (
            " (a state dict? build the model and load it first)" if isinstance(model, dict) else ""
        )
        raise UnsupportedModuleError(
            f"the model must be a torch.nn.Module, got {type(model).__name__}{hint}"
        )


def _selected(paths: list[str], include: tuple[str, ...] | None, exclude: tuple[str, ...]) -> bool:
    if any(fnmatchcase(p, pat) for p in paths for pat in exclude):
        return False
    return include is None or any(fnmatchcase(p, pat) for p in paths for pat in include)


def _patterns(value: str | Iterable[str] | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    pats = (value,) if isinstance(value, str) else tuple(value)
    for p in pats:
        if not isinstance(p, str) or not p:
            raise SwapError(f"{name} must hold non-empty glob strings, got {p!r}")
    return pats


def _scripted_norms(
    modules: list[tuple[nn.Module, list[str]]],
    inc: tuple[str, ...] | None,
    exc: tuple[str, ...],
    strict: bool,
    kinds: tuple[str, ...],
) -> list[tuple[str, str]]:
    """Problems for TorchScript submodules holding a norm of the replaced kinds that normswap
    cannot replace: a selected one, or any one under ``strict`` (which refuses every one left)."""
    names = {cls.__name__ for cls in _subclasses(source_classes(kinds))}
    problems = []
    for module, paths in modules:
        if not isinstance(module, torch.jit.ScriptModule) or not paths[0]:
            continue
        for inner, inner_module in module.named_modules():
            kind = getattr(inner_module, "original_name", "")
            full = [f"{p}.{inner}" if inner else p for p in paths]
            if kind in names and (strict or _selected(full, inc, exc)):
                problems.append(
                    (
                        full[0],
                        f"{kind} inside the TorchScript module {paths[0]!r}, where no module can "
                        "be replaced: convert the eager module, then script it, or exclude it",
                    )
                )
    return problems


def _subclasses(classes: tuple[type, ...]) -> set[type]:
    found: set[type] = set()
    stack = list(classes)
    while stack:
        cls = stack.pop()
        if cls not in found:
            found.add(cls)
            stack.extend(cls.__subclasses__())
    return found


def _with_model_dtype(src: SourceNorm, model: nn.Module, traced: NormFacts | None) -> SourceNorm:
    """A source with no floating tensor of its own takes the model's first floating tensor's
    device, and the dtype of its traced input (else that tensor's)."""
    own = [*src.module.parameters(recurse=False), *src.module.buffers(recurse=False)]
    if any(t.is_floating_point() for t in own):
        return src
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            src = dataclasses.replace(src, device=t.device, dtype=t.dtype)
            break
    if traced is not None and traced.input_dtype is not None:
        src = dataclasses.replace(src, dtype=traced.input_dtype)
    return src


def _inside(path: str, prefixes: set[str]) -> bool:
    """Whether ``path`` is strictly inside one of ``prefixes`` (module paths).

    Checks the dotted ancestors of ``path`` against a set: linear in the model size overall,
    where scanning every prefix for every module grew with modules × norms.
    """
    parts = path.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def plan(
    model: nn.Module,
    spec: NormSpec | str,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    example_inputs: Any = None,
    strict: bool = False,
    replace: str | Iterable[str] | None = None,
    **overrides: Any,
) -> Plan:
    """Plan a swap without modifying ``model``.

    Args:
        model: any ``nn.Module``.
        spec: a spec object or a registered norm name (``"gn"``, ``"ln"``, ...).
        include: glob pattern(s) on module paths; only matching modules are converted.
        exclude: glob pattern(s) on module paths to leave alone.
        example_inputs: inputs for one traced forward pass (a tensor, a tuple of
            positional args, or a dict of keyword args). Gives every norm's input rank
            and producer; needed to fold BN (or torch.fx is tried without it).
        strict: refuse the plan if any norm of the replaced kinds would remain.
        replace: which source kinds to replace: a kind (``"bn"``, the default; ``"ln"``,
            ``"ln2d"``, ``"gn"``, ``"in"``, ``"rms"``, ``"frozen"``), a tuple of them, or
            ``"any"`` (:data:`normswap.sources.SOURCE_KINDS`).
        **overrides: spec field overrides (``num_groups=16``).

    Returns:
        A valid :class:`Plan`.

    Raises:
        SpecError: bad spec name, field or value.
        SwapError: one error listing every offending module path and its fix.

    Example:
        >>> import torchvision
        >>> p = plan(torchvision.models.resnet18(), "gn", num_groups=16)
        >>> len(p.norm_steps)
        20
    """
    check_model(model)
    spec = get_spec(spec, **overrides)
    target = get_family(spec.name).target
    kinds = resolve_replace(replace)
    inc = _patterns(include, "include")
    exc = _patterns(exclude, "exclude") or ()

    problems: list[tuple[str, str]] = []
    notes: list[str] = []
    all_modules = list(module_paths(model).values())
    all_paths = [p for _, paths in all_modules for p in paths]
    if inc is not None:
        for pat in inc:
            if not any(fnmatchcase(p, pat) for p in all_paths):
                problems.append(
                    (
                        f"include={pat!r}",
                        "matches no module path (paths look like "
                        f"{', '.join(repr(p) for p in all_paths[1:4])})",
                    )
                )
    for pat in exc:
        if not any(fnmatchcase(p, pat) for p in all_paths):
            notes.append(f"exclude pattern {pat!r} matches no module")

    found_kinds = [(m, paths, source_kind(m)) for m, paths in all_modules]
    sources = [(m, paths) for m, paths, kind in found_kinds if kind in kinds]
    problems += _scripted_norms(all_modules, inc, exc, strict, kinds)
    if not sources:
        notes.append(_nothing_to_convert(kinds, [kind for _, _, kind in found_kinds if kind]))
    if any(paths[0] == "" for _, paths in sources):
        problems.append(
            ("<root>", "the model itself is a norm; wrap it in a container (nn.Sequential) first")
        )

    facts = None
    selected = [(m, paths) for m, paths in sources if _selected(paths, inc, exc)]
    if example_inputs is not None or (selected and target.needs_graph(spec)):
        lazy = [paths[0] for m, paths in all_modules if isinstance(m, LazyModuleMixin)]
        if example_inputs is not None and lazy:
            # A traced forward would initialize them: the plan would change the model.
            problems.append(
                (
                    "<trace>",
                    f"uninitialized lazy module(s) {', '.join(lazy[:5])}: tracing with "
                    "example_inputs would initialize them; run one forward pass first",
                )
            )
        else:
            norm_types = tuple(dict.fromkeys(type(m) for m, _ in sources))
            try:
                facts = graph_facts(model, example_inputs, norm_types=norm_types or None)
            except NormSwapError as err:
                problems.append(("<trace>", str(err)))
    owners = parameter_owners(model)
    folded_into: dict[str, str] = {}

    described: dict[int, SourceNorm] = {}
    for module, paths in selected:
        try:
            traced = facts.norms.get(paths[0]) if facts is not None else None
            described[id(module)] = _with_model_dtype(describe_source(module), model, traced)
        except NormSwapError as err:
            problems.append((paths[0], str(err)))
    analysis = None
    if described and not problems:
        chosen = [(described[id(m)], tuple(paths)) for m, paths in selected if id(m) in described]
        try:
            analysis = target.analyze(model, chosen, spec, example_inputs)
        except NormSwapError as err:
            problems.append(("<analysis>", str(err)))
            described.clear()  # no decision without the analysis: its problem is listed

    norm_steps: list[NormStep] = []
    norm_paths: list[str] = []
    for module, paths in sources:
        norm_paths.extend(paths)
        if not _selected(paths, inc, exc):
            decision = Decision(SKIP, type(module).__name__, reason="excluded by include/exclude")
            norm_steps.append(NormStep(module, tuple(paths), None, decision))
            continue
        src = described.get(id(module))
        if src is None:
            continue  # its problem is listed
        rank = spatial = None
        if facts is not None and paths[0] in facts.norms and facts.norms[paths[0]].calls:
            seen = facts.norms[paths[0]]
            rank = seen.input_rank
            spatial = min((_positions(shape, src) for shape in seen.input_shapes), default=None)
        elif src.ranks is not None and len(src.ranks) == 1:
            rank = src.ranks[0]
        ctx = NormContext(
            paths[0],
            rank,
            facts,
            spatial,
            model=model,
            owners=owners,
            analysis=analysis,
            paths=tuple(paths),
        )
        decision = target.decide(src, spec, ctx)
        if decision.problem:
            problems.append((paths[0], decision.problem))
            continue
        if decision.action == FOLD and decision.into is not None:
            if decision.into in folded_into:
                problems.append(
                    (
                        paths[0],
                        f"cannot fold into {decision.into}: {folded_into[decision.into]} is "
                        "folded into it already; exclude one of them",
                    )
                )
                continue
            folded_into[decision.into] = paths[0]
        norm_steps.append(NormStep(module, tuple(paths), src, decision))

    # Layers inside norms (an AdaLN's modulation MLP) are part of the norm, not candidates.
    converted = family_layers()
    norm_paths += [p for m, paths in all_modules if isinstance(m, converted) for p in paths]
    inside = set(norm_paths)
    candidates = [
        (m, tuple(paths))
        for m, paths in all_modules
        if paths[0] and _selected(paths, inc, exc) and not _inside(paths[0], inside)
    ]
    decisions = {s.paths[0]: (s.source, s.decision) for s in norm_steps if s.source is not None}
    layer_steps = target.plan_layers(
        candidates, spec, PlanContext(model, owners, decisions, analysis)
    )

    if strict:
        for step in norm_steps:
            if step.decision.action == SKIP:
                problems.append(
                    (
                        step.paths[0],
                        f"would remain a {type(step.module).__name__} "
                        f"({step.decision.reason}); strict=True refuses that",
                    )
                )
    if problems:
        lines = "\n".join(f"  - {path}: {msg}" for path, msg in problems)
        raise SwapError(
            f"cannot swap {type(model).__name__} to {spec.name!r}: {len(problems)} problem(s); "
            f"nothing was modified:\n{lines}",
            problems,
        )
    return Plan(spec, target, tuple(norm_steps), tuple(layer_steps), tuple(notes), kinds, analysis)


def _positions(shape: tuple[int, ...], src: SourceNorm) -> int:
    """The positions of one sample's input: dims other than the batch and the channel axis."""
    return math.prod(shape[1:-1]) if src.channels_last else math.prod(shape[2:])


#: How a note names the modules of each source kind.
_KIND_LABEL = {"bn": "BatchNorm-family"}


def _nothing_to_convert(kinds: tuple[str, ...], present: list[str]) -> str:
    """The note for a model without a norm of the replaced kinds: and which norms it has."""
    label = " or ".join(_KIND_LABEL.get(k, f"{k!r}") for k in kinds)
    note = f"the model holds no {label} module: no norm to convert"
    counts: dict[str, int] = {}
    for kind in present:
        counts[kind] = counts.get(kind, 0) + 1
    if counts:
        held = ", ".join(f"{k!r} x{n}" for k, n in counts.items())
        choice = next(iter(counts)) if len(counts) == 1 else "any"
        note += (
            f"; it holds other norms ({held}; kinds: normswap.sources.SOURCE_KINDS): convert "
            f"them with replace={choice!r}"
        )
    return note
