"""What counts as a source norm, and how to read one: the source registry.

A *source* is a normalization normswap can replace. Each belongs to a *source kind*
(:data:`SOURCE_KINDS`: ``"bn"``, ``"ln"``, ``"ln2d"``, ``"gn"``, ``"in"``, ``"rms"``,
``"frozen"``), which is what ``swap(model, target, replace=...)`` selects. Each class registers
one small adapter that turns a module into a :class:`SourceNorm` record saying what it
normalizes over, its affine, eps and statistics; targets ask the record, never the class.

Lookup walks the module's class hierarchy (MRO), so subclasses are found; a subclass that
overrides ``forward`` is refused unless an adapter is registered for that exact class (its
behaviour would otherwise be silently dropped). Modules no class registration covers can still
be recognised by their structure (:func:`register_source_rule`; frozen-BatchNorm look-alikes are
found that way). The tracer, the planner, folding, calibration and the monitor all ask this
registry, so a class added with :func:`register_source` is traced, planned, folded and monitored
like the built-in ones.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from normswap.errors import SpecError, UnsupportedModuleError
from normswap.registry import Registry, TypeRegistry

__all__ = [
    "OVER",
    "SOURCES",
    "SOURCE_KINDS",
    "Adapter",
    "Source",
    "SourceKind",
    "SourceNorm",
    "add_lazy_registration",
    "describe_source",
    "device_dtype",
    "find_source_adapter",
    "is_source_norm",
    "register_source",
    "register_source_kind",
    "register_source_rule",
    "resolve_replace",
    "source_classes",
    "source_kind",
]

#: What a source's statistics span (:attr:`SourceNorm.over`), along its channel axis (dim 1,
#: or the last dim when :attr:`SourceNorm.channels_last`):
#:
#: * ``"batch"``: each channel over the batch and the positions, with running statistics for
#:   eval (BatchNorm; a frozen BatchNorm is its eval form);
#: * ``"groups"``: each sample, over ``groups`` groups of channels and all positions
#:   (GroupNorm; InstanceNorm is ``groups == C``, the GN paper's LayerNorm ``groups == 1``);
#: * ``"channels"``: each sample and position, over the channels (``nn.LayerNorm`` and
#:   ``nn.RMSNorm`` over the last dim or the trailing ``normalized_shape``; ConvNeXt's
#:   LayerNorm2d and timm's RmsNorm2d over dim 1).
OVER: tuple[str, ...] = ("batch", "groups", "channels")


@dataclass(frozen=True)
class SourceNorm:
    """What a source norm module is, read without modifying it.

    Attributes:
        module: the module itself.
        kind: the source class name (``"BatchNorm2d"``, ``"LayerNorm"``, ...).
        num_channels: C, the size of the channel axis (dim 1, or the last dim when
            ``channels_last``).
        eps: the module's epsilon (for ``nn.RMSNorm(eps=None)``, its dtype's machine epsilon).
        momentum: running-statistics momentum (``None`` for cumulative, frozen or none).
        weight: γ (a Parameter or a buffer), or ``None`` when not affine.
        bias: β, or ``None`` (RMSNorm has none; LayerNorm may have ``bias=False``).
        running_mean: running mean buffer, or ``None``.
        running_var: running variance buffer, or ``None``.
        training: the module's training flag.
        requires_grad: whether γ/β are trained (``False`` for a frozen BN, ``True`` for a norm
            without affine, which has nothing frozen).
        device: device of its tensors.
        dtype: floating dtype of its tensors.
        ranks: input ranks the class accepts (``(2, 3)`` for BatchNorm1d, ``(4,)`` for 2d);
            ``None`` when the class accepts any rank.
        after: child modules the source applies after normalizing, in order, by name (e.g.
            timm's ``drop`` and ``act``); a converted layer applies the same objects.
        source: the source kind (:data:`SOURCE_KINDS`), what ``replace=`` selects.
        over: what the statistics span (:data:`OVER`).
        groups: the number of channel groups for ``over="groups"``, else ``None``.
        center: whether the mean is subtracted (``False`` for RMSNorm).
        channels_last: whether the channel axis is the last dim (``nn.LayerNorm``,
            ``nn.RMSNorm``) rather than dim 1.
        normalized_shape: the trailing dims a channels-last norm normalizes (the affine's
            shape; more than one dim for ``nn.LayerNorm((C, H, W))``), else ``None``.

    Example:
        >>> src = describe_source(nn.BatchNorm2d(8, eps=1e-3))
        >>> src.kind, src.num_channels, src.eps, src.affine, src.has_statistics
        ('BatchNorm2d', 8, 0.001, True, True)
        >>> src = describe_source(nn.LayerNorm(16))
        >>> src.source, src.over, src.channels_last, src.normalized_shape
        ('ln', 'channels', True, (16,))
    """

    module: nn.Module
    kind: str
    num_channels: int
    eps: float
    momentum: float | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    training: bool
    requires_grad: bool
    device: torch.device
    dtype: torch.dtype
    ranks: tuple[int, ...] | None
    after: tuple[tuple[str, nn.Module], ...] = ()
    source: str = "bn"
    over: str = "batch"
    groups: int | None = None
    center: bool = True
    channels_last: bool = False
    normalized_shape: tuple[int, ...] | None = None

    @property
    def affine(self) -> bool:
        """Whether the source has γ (β may be absent: RMSNorm, ``LayerNorm(bias=False)``)."""
        return self.weight is not None

    @property
    def has_statistics(self) -> bool:
        """Whether the source holds running statistics (its eval mode is a fixed affine map)."""
        return self.running_mean is not None and self.running_var is not None

    @property
    def channel_dim(self) -> int:
        """The channel axis: 1 (channels first), or -1 (channels last).

        Example:
            >>> [describe_source(m).channel_dim for m in (nn.LayerNorm(4), nn.GroupNorm(2, 4))]
            [-1, 1]
        """
        return -1 if self.channels_last else 1

    @property
    def per_channel(self) -> bool:
        """Whether the affine (if any) is one value per channel along :attr:`channel_dim`
        (not an elementwise affine over several trailing dims).

        Example:
            >>> describe_source(nn.LayerNorm((4, 5))).per_channel
            False
        """
        return self.normalized_shape is None or len(self.normalized_shape) == 1


Adapter = Callable[[nn.Module], SourceNorm]


@dataclass(frozen=True)
class Source:
    """A registered source class: its kind and its adapter.

    Example:
        >>> SOURCES.get(nn.GroupNorm)
        Source(kind='gn', adapter=describe_group_norm)
    """

    kind: str
    adapter: Adapter

    def __repr__(self) -> str:
        name = getattr(self.adapter, "__qualname__", repr(self.adapter))
        return f"Source(kind={self.kind!r}, adapter={name})"


@dataclass(frozen=True)
class SourceKind:
    """One source kind: a name ``replace=`` accepts and what it covers.

    Example:
        >>> SOURCE_KINDS.get("gn").summary
        'GroupNorm (torch, timm, normswap)'
    """

    name: str
    summary: str


#: The source kinds, by name (what ``replace=`` accepts, besides ``"any"``).
SOURCE_KINDS: Registry[str, SourceKind] = Registry("source kind")
"""The source kinds by name (``"bn"``, ``"ln"``, ``"ln2d"``, ``"gn"``, ``"in"``, ``"rms"``): what
``replace=`` selects. :func:`register_source_kind` adds one."""


def register_source_kind(name: str, summary: str) -> SourceKind:
    """Add a source kind (a name for ``replace=``).

    Example:
        >>> _ = register_source_kind("scale", "ScaleNorm")
        >>> _ = SOURCE_KINDS.unregister("scale")
    """
    if name == "any":
        raise SpecError("'any' is reserved: it selects every source kind")
    return SOURCE_KINDS.register(name, SourceKind(name, summary))


for _name, _summary in (
    ("bn", "BatchNorm flavours (1d/2d/3d, Sync, lazy, + activation) and frozen BatchNorms"),
    ("ln", "LayerNorm: nn.LayerNorm over the trailing dims, and the GN paper's LayerNorm"),
    ("ln2d", "channels-first LayerNorm at each position (ConvNeXt's, timm's LayerNorm2d)"),
    ("gn", "GroupNorm (torch, timm, normswap)"),
    ("in", "InstanceNorm1d/2d/3d (torch, normswap)"),
    ("rms", "RMSNorm (torch, timm's RmsNorm/RmsNorm2d, normswap)"),
    ("frozen", "normswap's FrozenAffine: a BatchNorm with its statistics folded in"),
):
    register_source_kind(_name, _summary)

#: A rule that recognises modules by structure: ``rule(module) -> (kind, adapter) or None``.
Rule = Callable[[nn.Module], "Source | None"]


class _SourceRegistry(TypeRegistry[Source]):
    """The source registry; it first registers the adapters of libraries imported since the
    last lookup (:func:`add_lazy_registration`), so normswap never imports them itself, and
    falls back to structural rules (:func:`register_source_rule`)."""

    def __init__(self) -> None:
        super().__init__("source norm adapter")
        self.lazy: dict[str, list[Callable[[], None]]] = {}
        self.rules: list[Rule] = []

    def _load(self) -> None:
        if self.lazy:
            for name in [n for n in self.lazy if n in sys.modules]:
                for register in self.lazy.pop(name, []):
                    register()

    def match(self, obj: object) -> tuple[type, Source] | None:
        self._load()
        found = super().match(obj)
        if found is None and self.rules and isinstance(obj, nn.Module):
            for rule in self.rules:
                hit = rule(obj)
                if hit is not None:
                    return type(obj), hit
        return found

    def classes(self) -> tuple[type, ...]:
        self._load()
        return super().classes()


#: The registered source classes: class -> :class:`Source` (looked up by MRO).
SOURCES = _SourceRegistry()


def add_lazy_registration(module_name: str, register: Callable[[], None]) -> None:
    """Run ``register`` (which registers source adapters) once ``module_name`` is imported.

    Example:
        >>> add_lazy_registration("my_lib.layers", lambda: None)
        >>> len(SOURCES.lazy.pop("my_lib.layers"))
        1
    """
    SOURCES.lazy.setdefault(module_name, []).append(register)


def register_source(*classes: type, kind: str = "bn") -> Callable[[Adapter], Adapter]:
    """Register an adapter that describes modules of ``classes`` (and their subclasses).

    Registering an adapter for a subclass that overrides ``forward`` is how a user says
    "I know what this module computes; converting it as this kind of norm is right".

    Args:
        classes: the classes the adapter describes.
        kind: their source kind (:data:`SOURCE_KINDS`), what ``replace=`` selects them by.

    Raises:
        SpecError: a class that already has an adapter, or an unknown kind.

    Example:
        >>> from normswap.sources.torch_bn import describe_batchnorm
        >>> class ScaledBN(nn.BatchNorm2d):
        ...     def forward(self, x):  # a fused op that computes exactly what BatchNorm2d does
        ...         return super().forward(x)
        >>> _ = register_source(ScaledBN)(describe_batchnorm)
        >>> describe_source(ScaledBN(4)).num_channels
        4
        >>> _ = SOURCES.unregister(ScaledBN)
    """
    SOURCE_KINDS.get(kind)

    def decorator(fn: Adapter) -> Adapter:
        for cls in classes:
            SOURCES.register(cls, Source(kind, fn))
        return fn

    return decorator


def register_source_rule(rule: Rule) -> Rule:
    """Recognise modules that no registered class covers by their structure.

    ``rule(module)`` returns a :class:`Source` (kind and adapter) or ``None``; it is asked only
    for modules whose classes have no registration, in the order rules were added.

    Example:
        >>> rule = register_source_rule(lambda m: None)
        >>> SOURCES.rules.remove(rule)
    """
    if not callable(rule):
        raise SpecError(f"register_source_rule: rule must be callable, got {rule!r}")
    SOURCES.rules.append(rule)
    return rule


def resolve_replace(selection: str | Iterable[str] | None) -> tuple[str, ...]:
    """The source kinds ``replace=`` selects: a kind name, a tuple of them, or ``"any"``.

    Raises:
        SpecError: an unknown kind (the valid ones are listed) or an empty selection.

    Example:
        >>> resolve_replace("ln"), resolve_replace(("bn", "gn")), "rms" in resolve_replace("any")
        (('ln',), ('bn', 'gn'), True)
    """
    if selection is None:
        return ("bn",)
    names = (selection,) if isinstance(selection, str) else tuple(selection)
    if not names:
        raise SpecError(f"replace must name at least one source kind; choose from: {_kinds()}")
    if "any" in names:
        return tuple(SOURCE_KINDS)
    for name in names:
        if not isinstance(name, str) or name not in SOURCE_KINDS:
            raise SpecError(f"unknown source kind replace={name!r}; choose from: {_kinds()}")
    return tuple(dict.fromkeys(names))


def _kinds() -> str:
    return ", ".join([*SOURCE_KINDS, "any"])


def source_classes(replace: str | Iterable[str] | None = None) -> tuple[type, ...]:
    """The classes that have a registered adapter of the selected kinds (default ``"bn"``).

    Example:
        >>> nn.modules.batchnorm._BatchNorm in source_classes()
        True
        >>> nn.LayerNorm in source_classes("ln"), nn.LayerNorm in source_classes()
        (True, False)
    """
    kinds = resolve_replace(replace)
    return tuple(cls for cls, src in SOURCES.items() if src.kind in kinds)


def find_source_adapter(module: nn.Module) -> tuple[type, Adapter] | None:
    """Return ``(registered_class, adapter)`` for ``module`` by MRO, or ``None``.

    Example:
        >>> find_source_adapter(nn.BatchNorm2d(4))[0].__name__
        '_BatchNorm'
    """
    found = SOURCES.match(module)
    return None if found is None else (found[0], found[1].adapter)


def source_kind(module: nn.Module) -> str | None:
    """The source kind of ``module`` (``"bn"``, ``"ln"``, ...), or ``None`` if it is none.

    Example:
        >>> source_kind(nn.BatchNorm1d(3)), source_kind(nn.GroupNorm(1, 3)), source_kind(nn.ReLU())
        ('bn', 'gn', None)
    """
    found = SOURCES.match(module)
    return None if found is None else found[1].kind


def is_source_norm(module: nn.Module, replace: str | Iterable[str] | None = None) -> bool:
    """Whether ``module`` is a source norm of the selected kinds (default: BatchNorm, ``"bn"``).

    Example:
        >>> is_source_norm(nn.BatchNorm1d(3)), is_source_norm(nn.GroupNorm(1, 3))
        (True, False)
        >>> is_source_norm(nn.GroupNorm(1, 3), replace="any")
        True
    """
    kind = source_kind(module)
    return kind is not None and kind in resolve_replace(replace)


def describe_source(module: nn.Module) -> SourceNorm:
    """Describe a source norm module, refusing what cannot be converted faithfully.

    Raises:
        UnsupportedModuleError: not a registered source, an uninitialized lazy module, or a
            subclass whose ``forward`` differs from the registered class's.

    Example:
        >>> describe_source(nn.BatchNorm2d(8, eps=1e-3)).eps
        0.001
    """
    found = SOURCES.match(module)
    if found is None:
        raise UnsupportedModuleError(f"{type(module).__name__} is not a source norm module")
    registered, entry = found
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise UnsupportedModuleError(
            f"{type(module).__name__} is uninitialized (lazy): run one forward pass with a "
            "real input first so it knows its channel count, then swap"
        )
    if registered is not type(module) and type(module).forward is not registered.forward:
        raise UnsupportedModuleError(
            f"{type(module).__qualname__} overrides forward() of {registered.__name__} "
            "(e.g. a norm fused with an activation); converting it would drop that behaviour. "
            "Exclude it, or register an adapter for it with "
            f"normswap.register_source({type(module).__name__}, kind=...)"
        )
    src = entry.adapter(module)
    return src if src.source == entry.kind else dataclasses.replace(src, source=entry.kind)


def device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a module's own tensors (CPU and the default dtype if none).

    Example:
        >>> device_dtype(nn.BatchNorm1d(2).double())[1]
        torch.float64
    """
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()
