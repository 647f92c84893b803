"""What a norm family is, and the one registry that holds them.

A norm family is everything normswap knows about one target norm, in one module of
:mod:`normswap.families`: its **spec** (the typed options), its **target** (how it decides
what each BatchNorm becomes, and builds it), the **calibration fitter** of the layers it
builds, and the **monitor family** those layers are reported under. :func:`register_family`
registers all four at once, refusing the whole family if any part clashes, so a family is
either complete and usable everywhere or not registered at all. The CLI's list, the Hydra
configs' check, the tests' matrix and the recipes' sweep all derive from this registry.

Example:
    >>> get_family("gn").spec.__name__, get_family("gn").monitor
    ('GroupNormSpec', 'gn')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from normswap.errors import SpecError
from normswap.monitor.families import (
    MONITOR_FAMILIES,
    check_monitor_name,
    register_monitor_family,
)
from normswap.pretrained.fitters import FITTERS, Fitter
from normswap.registry import Registry
from normswap.report import CENTER, FOLD, REMOVE, REPLACE, SKIP, STANDARDIZE, UNTIE, WEIGHT_NORM
from normswap.sources import SourceNorm
from normswap.specs import SPECS, NormSpec

if TYPE_CHECKING:
    from normswap.graph.facts import GraphFacts

__all__ = [
    "CENTER",
    "FAMILIES",
    "FOLD",
    "PER_POSITION",
    "REMOVE",
    "REPLACE",
    "SKIP",
    "STANDARDIZE",
    "UNTIE",
    "WEIGHT_NORM",
    "Decision",
    "Family",
    "LayerStep",
    "NormContext",
    "PlanContext",
    "Target",
    "carry_over",
    "exact_note",
    "family_layers",
    "get_family",
    "layout_kwargs",
    "layout_problem",
    "new_eps",
    "new_requires_grad",
    "register_family",
    "unregister_family",
]


@dataclass(frozen=True)
class NormContext:
    """What the planner knows about one norm when a target decides.

    Attributes:
        path: canonical module path.
        rank: the input rank seen by tracing, or implied by the class; ``None`` if unknown.
        facts: graph facts when the model was traced (``None`` otherwise).
        spatial: the smallest number of spatial positions (prod of S) of its traced inputs,
            ``None`` when not traced.
        model: the model being planned (to look producers up by path).
        owners: :func:`normswap.graph.rules.parameter_owners` of the model.
        analysis: what the target's :meth:`Target.analyze` found for the whole model (``None``
            when it analyzes nothing).
        paths: every path of the norm (a shared module has several).

    Example:
        >>> NormContext("layer1.0.bn1", rank=4, spatial=64).rank
        4
    """

    path: str
    rank: int | None
    facts: GraphFacts | None = None
    spatial: int | None = None
    model: nn.Module | None = None
    owners: Mapping[int, Mapping[int, str]] | None = None
    analysis: Any = None
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanContext:
    """What the planner knows about the whole model when a target plans other layers.

    Attributes:
        model: the model being planned.
        owners: :func:`normswap.graph.rules.parameter_owners` of the model.
        decisions: every planned norm, by canonical path: ``(source, decision)``.
        analysis: what the target's :meth:`Target.analyze` found (``None`` when nothing).

    Example:
        >>> PlanContext(nn.Identity(), owners={}, decisions={}).decisions
        {}
    """

    model: nn.Module
    owners: Mapping[int, Mapping[int, str]]
    decisions: Mapping[str, tuple[SourceNorm, Decision]]
    analysis: Any = None


@dataclass(frozen=True)
class Decision:
    """A target's decision for one source norm.

    Exactly one of: a valid action (``replace``/``fold``/``remove``/``skip``) or a
    ``problem`` that makes the whole plan invalid. ``args`` carries what the target's
    :meth:`Target.build` needs beyond the fields (DyT's α for this layer).

    Example:
        >>> Decision("replace", "GroupNorm", groups=32, eps=1e-5).problem is None
        True
    """

    action: str
    target: str
    groups: int | None = None
    eps: float | None = None
    note: str | None = None
    reason: str | None = None
    into: str | None = None
    problem: str | None = None
    args: Any = None


@dataclass(frozen=True)
class LayerStep:
    """A change to a non-norm layer (weight norm, standardization, centring), or why it is
    skipped; ``args`` holds what its target needs to apply it (plain data).

    Example:
        >>> LayerStep(nn.Conv2d(3, 8, 3), ("conv1",), "weight_norm").kind
        'Conv2d'
    """

    module: nn.Module
    paths: tuple[str, ...]
    action: str
    reason: str | None = None
    note: str | None = None
    kind: str = ""
    args: Any = None

    def __post_init__(self) -> None:
        if not self.kind:  # the class name before any parametrization renames it
            object.__setattr__(self, "kind", type(self.module).__name__)


class Target:
    """How a family plans and builds: ``decide`` per norm, ``build`` the new module, and
    optionally plan and apply changes to other layers.

    ``decide`` and ``plan_layers`` must find every problem (a plan they accept is executed
    without a :class:`~normswap.errors.NormSwapError`); ``build`` creates new modules only and
    ``apply_layer`` changes only the layer of its step, never an existing tensor's values.

    Example:
        >>> from normswap.sources import describe_source
        >>> target = get_family("ln").target
        >>> src = describe_source(nn.BatchNorm2d(8))
        >>> decision = target.decide(src, normswap.get_spec("ln"), NormContext("bn", 4))
        >>> type(target.build(src, normswap.get_spec("ln"), decision)).__name__
        'LayerNorm'
    """

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

    def needs_eval_mode(self, spec: NormSpec) -> bool:
        """Whether the model must be in eval mode for the swap (folding reads running stats)."""
        return False

    def analyze(
        self,
        model: nn.Module,
        norms: list[tuple[SourceNorm, tuple[str, ...]]],
        spec: NormSpec,
        example_inputs: Any,
    ) -> Any:
        """Study the whole model once before the per-norm decisions (exact rewrites that span
        many layers need it); the result reaches :meth:`decide` and :meth:`plan_layers` as
        ``ctx.analysis``. Raise :class:`~normswap.errors.NormSwapError` to refuse the plan."""
        return None

    def layer_writes(self, step: LayerStep, spec: NormSpec) -> list[torch.Tensor]:
        """The existing tensors :meth:`apply_layer` overwrites in place for ``step`` (so that a
        failed apply can put their values back)."""
        return []

    def check_applied(self, model: nn.Module, plan: Any) -> None:
        """After every step ran: verify what the plan promised (an exact rewrite computes what
        the model computed); raise to have the whole swap rolled back."""

    def plan_layers(
        self, modules: list[tuple[nn.Module, tuple[str, ...]]], spec: NormSpec, ctx: PlanContext
    ) -> list[LayerStep]:
        """Plan changes to non-norm layers; ``modules`` are the selected candidates."""
        return []

    def apply_layer(self, step: LayerStep, spec: NormSpec) -> None:
        """Apply one planned layer change."""
        raise NotImplementedError


@dataclass(frozen=True)
class Family:
    """One norm family: what ``swap(model, name)`` converts to, and everything it needs.

    Attributes:
        name: the registered name (``"gn"``); also the spec's ``name``.
        spec: the spec dataclass (a :class:`~normswap.specs.NormSpec` subclass).
        target: how it plans and builds.
        layers: the layer classes this family owns (subclasses included): their fitter is
            ``fitter`` and they are monitored as ``monitor``. A family that builds another
            family's layers (``ws_gn`` builds ``gn``'s GroupNorm) owns none.
        fitter: the calibration fitter of ``layers`` (``None`` when there is nothing to fit).
        monitor: the monitor family name of ``layers`` (default: ``name``).
        also_monitor: other classes reported under ``monitor`` (``nn.GroupNorm`` for ``gn``).
        example: spec options that make a valid spec where a field has no usable default
            (``adaln`` needs ``cond_dim``); the test matrix and the docs use them.
        from_scratch: whether training a freshly initialized model with this family makes
            sense (``frozen`` does not: there it is no normalization at all); sweeps that train
            from scratch, such as the ``norm_shootout`` recipe, leave the others out.

    Example:
        >>> f = get_family("ln")
        >>> f.name, [c.__name__ for c in f.layers]
        ('ln', ['LayerNorm'])
    """

    name: str
    spec: type[NormSpec]
    target: Target
    layers: tuple[type[nn.Module], ...] = ()
    fitter: Fitter | None = None
    monitor: str = ""
    also_monitor: tuple[type[nn.Module], ...] = ()
    example: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    from_scratch: bool = True

    def __post_init__(self) -> None:
        if not self.monitor:
            object.__setattr__(self, "monitor", self.name)

    def example_spec(self) -> NormSpec:
        """A valid spec of this family: the defaults plus :attr:`example`.

        Example:
            >>> get_family("adaln").example_spec().cond_dim
            8
        """
        return self.spec(**self.example)

    @property
    def summary(self) -> str:
        """The first line of the spec's docstring (what ``normswap list`` prints).

        Example:
            >>> get_family("gn").summary
            'GroupNorm with ``num_groups`` groups or ``group_size`` channels per group.'
        """
        return (self.spec.__doc__ or "").strip().splitlines()[0] if self.spec.__doc__ else ""

    def defaults(self) -> dict[str, Any]:
        """The spec's field defaults (what ``conf/norm/<name>.yaml`` must say).

        Example:
            >>> get_family("gn").defaults()["num_groups"]
            32
        """
        out = {}
        for f in dataclasses.fields(self.spec):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out


#: Registered norm families by name.
FAMILIES: Registry[str, Family] = Registry("norm family")


def register_family(family: Family) -> Family:
    """Register a norm family: its spec, target, fitter and monitor family, all or nothing.

    Raises:
        SpecError: a part is missing or of the wrong kind, the name is taken, or one of its
            layer classes already has a fitter or a monitor family; nothing is registered then.

    Example:
        >>> from normswap.families.gn import GroupNormSpec, GroupNormTarget
        >>> @dataclasses.dataclass(frozen=True)
        ... class GN8Spec(GroupNormSpec):
        ...     '''GroupNorm with 8 groups by default.'''
        ...     num_groups: int | None = 8
        >>> _ = register_family(Family("gn8", GN8Spec, GroupNormTarget()))
        >>> normswap.get_spec("gn8").num_groups
        8
        >>> unregister_family("gn8")
    """
    problems = []
    if not (isinstance(family.spec, type) and issubclass(family.spec, NormSpec)):
        problems.append(f"spec must be a NormSpec subclass, got {family.spec!r}")
    elif not dataclasses.is_dataclass(family.spec):
        problems.append(f"spec {family.spec.__qualname__} must be a (frozen) dataclass")
    if not isinstance(family.target, Target):
        problems.append(f"target must be a Target instance, got {family.target!r}")
    if family.fitter is not None and not isinstance(family.fitter, Fitter):
        problems.append(f"fitter must be a Fitter instance or None, got {family.fitter!r}")
    for cls in (*family.layers, *family.also_monitor):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            problems.append(f"layers must be nn.Module subclasses, got {cls!r}")
    try:
        check_monitor_name(family.monitor)
    except SpecError as err:
        problems.append(str(err))
    if problems:
        raise SpecError(f"cannot register norm family {family.name!r}: {'; '.join(problems)}")
    # Check every registry first: a clash anywhere registers nothing.
    FAMILIES.check_free(family.name)
    SPECS.check_free(family.name)
    for cls in family.layers if family.fitter is not None else ():
        FITTERS.check_free(cls)
    for cls in (*family.layers, *family.also_monitor):
        MONITOR_FAMILIES.check_free(cls)
    family.spec.name = family.name
    family.target.name = family.name
    FAMILIES.register(family.name, family)
    SPECS.register(family.name, family.spec)
    for cls in family.layers:
        if family.fitter is not None:
            FITTERS.register(cls, family.fitter)
    for cls in (*family.layers, *family.also_monitor):
        register_monitor_family(cls, family.monitor)
    return family


def unregister_family(name: str) -> None:
    """Remove a registered family and everything it registered.

    Example:
        >>> "gn8" in FAMILIES
        False
    """
    family = FAMILIES.unregister(name)
    SPECS.unregister(name)
    for cls in family.layers:
        if family.fitter is not None:
            FITTERS.unregister(cls)
    for cls in (*family.layers, *family.also_monitor):
        MONITOR_FAMILIES.unregister(cls)


def get_family(name: str) -> Family:
    """The family registered under ``name``.

    Raises:
        SpecError: an unknown name, listing the registered ones.

    Example:
        >>> get_family("wn").target.name
        'wn'
    """
    return FAMILIES.get(name)


def family_layers() -> tuple[type[nn.Module], ...]:
    """Every layer class some family owns (to recognize already-converted layers).

    Example:
        >>> nn.GroupNorm in family_layers()
        True
    """
    return tuple(cls for _, family in FAMILIES.items() for cls in family.layers)


# --------------------------------------------------------------------------- helpers


def new_eps(src: SourceNorm, spec: NormSpec) -> float:
    """The new norm's eps: the spec's, or the source's when the spec says ``None``.

    Example:
        >>> from normswap.sources import describe_source
        >>> new_eps(describe_source(nn.BatchNorm2d(2, eps=1e-3)), normswap.get_spec("gn"))
        0.001
    """
    return float(spec.eps) if spec.eps is not None else src.eps


def new_requires_grad(src: SourceNorm, spec: NormSpec) -> bool:
    """Whether the new parameters train: the spec's ``trainable``, else the source's.

    Example:
        >>> from normswap.sources import describe_source
        >>> new_requires_grad(describe_source(nn.BatchNorm2d(2)), normswap.get_spec("gn"))
        True
    """
    return spec.trainable if spec.trainable is not None else src.requires_grad


def factory(src: SourceNorm) -> dict[str, Any]:
    """``device=``/``dtype=`` of the source, for building the new layer.

    Example:
        >>> from normswap.sources import describe_source
        >>> factory(describe_source(nn.BatchNorm2d(2)))["dtype"]
        torch.float32
    """
    return {"device": src.device, "dtype": src.dtype}


def _as_parameter(t: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """Reuse ``t`` when it already is a Parameter (optimizers keep working), else wrap it."""
    if isinstance(t, nn.Parameter):
        t.requires_grad_(requires_grad)
        return t
    return nn.Parameter(t.detach(), requires_grad=requires_grad)


#: The per-position targets a message suggests where statistics must not span positions.
PER_POSITION = "'ln2d', 'rms', 'dyt' or 'derf'"


def layout_problem(
    layer: str,
    src: SourceNorm,
    ctx: NormContext,
    *,
    spans_positions: bool,
    channels_last_ok: bool = True,
) -> str | None:
    """Why a ``layer`` cannot stand where ``src`` is, from the layout of what it normalizes.

    The one rule every target asks: the new layer needs one channel axis with one γ/β per
    channel (an ``nn.LayerNorm((C, H, W))`` with an elementwise affine has none); a layer that
    supports channels-first maps only cannot take a channels-last norm; and a layer whose
    statistics span the positions (GroupNorm, InstanceNorm, the GN paper's LayerNorm) cannot
    replace a channels-last norm of a ``(N, L, C)`` token sequence, where it would mix the
    tokens (a causal model would see later ones), nor one whose input rank is unknown (a
    ``(N, H, W, C)`` map is fine; pass ``example_inputs`` to tell them apart).

    Example:
        >>> from normswap.sources import describe_source
        >>> ln = describe_source(nn.LayerNorm(8))
        >>> layout_problem("GroupNorm", ln, NormContext("norm", 3), spans_positions=True)[:60]
        'LayerNorm normalizes each token of a (N, L, C) sequence: Gro'
        >>> layout_problem("GroupNorm", ln, NormContext("norm", 4), spans_positions=True) is None
        True
    """
    if not src.per_channel:
        return (
            f"{src.kind} normalizes the trailing dims {src.normalized_shape} with an elementwise "
            f"affine; {layer} has one γ/β per channel: exclude it"
        )
    if not src.channels_last:
        return None
    if not channels_last_ok:
        return (
            f"{src.kind} normalizes channels in the last dim; {layer} normalizes channels-first "
            f"(N, C, *S) maps only: exclude it or use {PER_POSITION}"
        )
    if spans_positions and ctx.rank is None:
        return (
            f"{src.kind} normalizes channels in the last dim and its input rank is unknown: pass "
            f"example_inputs so the plan can tell a (N, H, W, C) map, where {layer} is defined, "
            f"from a (N, L, C) token sequence, where it is not; or use {PER_POSITION}"
        )
    if spans_positions and ctx.rank == 3:
        return (
            f"{src.kind} normalizes each token of a (N, L, C) sequence: {layer} would normalize "
            "over the tokens together (a causal model would see later tokens); exclude it or "
            f"use a per-token norm: {PER_POSITION}"
        )
    return None


def exact_note(
    src: SourceNorm, over: str, *, groups: int | None = None, center: bool = True
) -> str | None:
    """``"exact: ..."`` when the new layer computes the source's very statistics (a rename:
    GroupNorm(1) ↔ the GN paper's LayerNorm, GroupNorm(C) ↔ InstanceNorm, ``nn.LayerNorm`` ↔
    channels-last ``ln2d``), else ``None``.

    Example:
        >>> from normswap.sources import describe_source
        >>> exact_note(describe_source(nn.GroupNorm(1, 4)), "groups", groups=1)
        'exact: the same statistics as the source (a rename)'
    """
    same = src.over == over and src.center == center and not src.has_statistics
    if over == "groups":
        same = same and src.groups == groups
    return "exact: the same statistics as the source (a rename)" if same else None


def layout_kwargs(src: SourceNorm) -> dict[str, Any]:
    """``channels_last=True`` for a channels-last source (the new layer keeps its layout).

    Example:
        >>> from normswap.sources import describe_source
        >>> [layout_kwargs(describe_source(m)) for m in (nn.LayerNorm(4), nn.BatchNorm2d(4))]
        [{'channels_last': True}, {}]
    """
    return {"channels_last": True} if src.channels_last else {}


def carry_over(src: SourceNorm, new: nn.Module, spec: NormSpec) -> nn.Module:
    """Move γ/β into ``new`` and copy the training flag and ``requires_grad``.

    A source without β (RMSNorm, ``LayerNorm(bias=False)``) leaves the new layer's zero β.
    γ/β are moved, not copied: the new module holds the same Parameter objects (for
    FrozenBatchNorm2d, Parameters sharing the buffers' storage), so nothing is allocated
    and an optimizer built before the swap still holds them.

    Example:
        >>> from normswap.sources import describe_source
        >>> bn = nn.BatchNorm2d(4)
        >>> new = carry_over(describe_source(bn), nn.GroupNorm(2, 4), normswap.get_spec("gn"))
        >>> new.weight is bn.weight
        True
    """
    grad = new_requires_grad(src, spec)
    if src.weight is not None and getattr(new, "weight", None) is not None:
        new.weight = _as_parameter(src.weight, grad)
        if src.bias is not None and getattr(new, "bias", None) is not None:
            new.bias = _as_parameter(src.bias, grad)  # else the new layer's zero β
    for p in new.parameters():
        p.requires_grad_(grad)
    new.train(src.training)
    return new
