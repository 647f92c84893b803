"""What counts as a BatchNorm source, and how to read one: the source registry.

Each BN flavour registers one small adapter that turns a module into a :class:`SourceNorm`
record. Lookup walks the module's class hierarchy (MRO), so subclasses are found; a subclass
that overrides ``forward`` is refused unless an adapter is registered for that exact class (its
behaviour would otherwise be silently dropped). The tracer, the planner, folding, calibration
and the monitor all ask this registry, so a class added with :func:`register_source` is
traced, planned, folded and monitored like the built-in ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from normswap.errors import UnsupportedModuleError
from normswap.registry import TypeRegistry

__all__ = [
    "SOURCES",
    "Adapter",
    "SourceNorm",
    "add_lazy_registration",
    "describe_source",
    "device_dtype",
    "find_source_adapter",
    "is_source_norm",
    "register_source",
    "source_classes",
]


@dataclass(frozen=True)
class SourceNorm:
    """What a BatchNorm-family module is, read without modifying it.

    Attributes:
        module: the module itself.
        kind: the source class name (``"BatchNorm2d"``, ``"FrozenBatchNorm2d"``, ...).
        num_channels: C.
        eps: the module's epsilon.
        momentum: running-statistics momentum (``None`` for cumulative or frozen).
        weight: γ (a Parameter or a buffer), or ``None`` when not affine.
        bias: β, or ``None``.
        running_mean: running mean buffer, or ``None``.
        running_var: running variance buffer, or ``None``.
        training: the module's training flag.
        requires_grad: whether γ/β are trained (``False`` for a frozen BN, ``True`` for a BN
            without affine, which has nothing frozen).
        device: device of its tensors.
        dtype: floating dtype of its tensors.
        ranks: input ranks the class accepts (``(2, 3)`` for BatchNorm1d, ``(4,)`` for 2d);
            ``None`` when the class accepts any rank (SyncBatchNorm).
        after: child modules the source applies after normalizing, in order, by name (e.g.
            timm's ``drop`` and ``act``); a converted layer applies the same objects.

    Example:
        >>> src = describe_source(nn.BatchNorm2d(8, eps=1e-3))
        >>> src.kind, src.num_channels, src.eps, src.affine, src.has_statistics
        ('BatchNorm2d', 8, 0.001, True, True)
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

    @property
    def affine(self) -> bool:
        """Whether the source has γ/β."""
        return self.weight is not None

    @property
    def has_statistics(self) -> bool:
        """Whether the source holds running statistics (its eval mode is a fixed affine map)."""
        return self.running_mean is not None and self.running_var is not None


Adapter = Callable[[nn.Module], SourceNorm]


class _SourceRegistry(TypeRegistry[Adapter]):
    """The source registry; it first registers the adapters of libraries imported since the
    last lookup (:func:`add_lazy_registration`), so normswap never imports them itself."""

    def __init__(self) -> None:
        super().__init__("BatchNorm source adapter")
        self.lazy: dict[str, Callable[[], None]] = {}

    def _load(self) -> None:
        if self.lazy:
            for name in [n for n in self.lazy if n in sys.modules]:
                self.lazy.pop(name)()

    def match(self, obj: object) -> tuple[type, Adapter] | None:
        self._load()
        return super().match(obj)

    def classes(self) -> tuple[type, ...]:
        self._load()
        return super().classes()


#: The registered BatchNorm families: class -> adapter (looked up by MRO).
SOURCES = _SourceRegistry()


def add_lazy_registration(module_name: str, register: Callable[[], None]) -> None:
    """Run ``register`` (which registers source adapters) once ``module_name`` is imported.

    Example:
        >>> add_lazy_registration("my_lib.layers", lambda: None)
        >>> SOURCES.lazy.pop("my_lib.layers") is not None
        True
    """
    SOURCES.lazy[module_name] = register


def register_source(*classes: type) -> Callable[[Adapter], Adapter]:
    """Register an adapter that describes modules of ``classes`` (and their subclasses).

    Registering an adapter for a subclass that overrides ``forward`` is how a user says
    "I know what this module computes; converting it as a BatchNorm is right".

    Raises:
        SpecError: a class that already has an adapter.

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

    def decorator(fn: Adapter) -> Adapter:
        for cls in classes:
            SOURCES.register(cls, fn)
        return fn

    return decorator


def source_classes() -> tuple[type, ...]:
    """The classes that have a registered adapter (subclasses are found through them).

    Example:
        >>> nn.modules.batchnorm._BatchNorm in source_classes()
        True
    """
    return SOURCES.classes()


def find_source_adapter(module: nn.Module) -> tuple[type, Adapter] | None:
    """Return ``(registered_class, adapter)`` for ``module`` by MRO, or ``None``.

    Example:
        >>> find_source_adapter(nn.BatchNorm2d(4))[0].__name__
        '_BatchNorm'
    """
    return SOURCES.match(module)


def is_source_norm(module: nn.Module) -> bool:
    """Whether ``module`` belongs to a registered BatchNorm family.

    Example:
        >>> is_source_norm(nn.BatchNorm1d(3)), is_source_norm(nn.GroupNorm(1, 3))
        (True, False)
    """
    return SOURCES.match(module) is not None


def describe_source(module: nn.Module) -> SourceNorm:
    """Describe a BatchNorm-family module, refusing what cannot be converted faithfully.

    Raises:
        UnsupportedModuleError: not a registered family, an uninitialized lazy BN, or a
            subclass whose ``forward`` differs from the registered class's.

    Example:
        >>> describe_source(nn.BatchNorm2d(8, eps=1e-3)).eps
        0.001
    """
    found = SOURCES.match(module)
    if found is None:
        raise UnsupportedModuleError(f"{type(module).__name__} is not a BatchNorm-family module")
    registered, adapter = found
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise UnsupportedModuleError(
            f"{type(module).__name__} is uninitialized (lazy): run one forward pass with a "
            "real input first so it knows its channel count, then swap"
        )
    if type(module).forward is not registered.forward:
        raise UnsupportedModuleError(
            f"{type(module).__qualname__} overrides forward() of {registered.__name__} "
            "(e.g. a BN fused with an activation); converting it would drop that behaviour. "
            "Exclude it, or register an adapter for it with "
            f"normswap.register_source({type(module).__name__})"
        )
    return adapter(module)


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
