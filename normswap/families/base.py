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
from normswap.report import FOLD, REMOVE, REPLACE, SKIP, STANDARDIZE, WEIGHT_NORM
from normswap.sources import SourceNorm
from normswap.specs import SPECS, NormSpec

if TYPE_CHECKING:
    from normswap.graph.facts import GraphFacts

__all__ = [
    "FAMILIES",
    "FOLD",
    "REMOVE",
    "REPLACE",
    "SKIP",
    "STANDARDIZE",
    "WEIGHT_NORM",
    "Decision",
    "Family",
    "LayerStep",
    "NormContext",
    "PlanContext",
    "Target",
    "carry_over",
    "family_layers",
    "get_family",
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


@dataclass(frozen=True)
class PlanContext:
    """What the planner knows about the whole model when a target plans other layers.

    Attributes:
        model: the model being planned.
        owners: :func:`normswap.graph.rules.parameter_owners` of the model.
        decisions: every planned norm, by canonical path: ``(source, decision)``.

    Example:
        >>> PlanContext(nn.Identity(), owners={}, decisions={}).decisions
        {}
    """

    model: nn.Module
    owners: Mapping[int, Mapping[int, str]]
    decisions: Mapping[str, tuple[SourceNorm, Decision]]


@dataclass(frozen=True)
class Decision:
    """A target's decision for one source norm.

    Exactly one of: a valid action (``replace``/``fold``/``remove``/``skip``) or a
    ``problem`` that makes the whole plan invalid.

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


@dataclass(frozen=True)
class LayerStep:
    """A change to a non-norm layer (weight norm, standardization), or why it is skipped.

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


def carry_over(src: SourceNorm, new: nn.Module, spec: NormSpec) -> nn.Module:
    """Move γ/β into ``new`` and copy the training flag and ``requires_grad``.

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
        new.bias = _as_parameter(src.bias, grad)
    for p in new.parameters():
        p.requires_grad_(grad)
    new.train(src.training)
    return new
