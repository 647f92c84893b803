"""Source adapters: read what defines a BatchNorm-family module's behaviour.

Each BN flavour (``_BatchNorm`` and its subclasses, ``SyncBatchNorm``, torchvision's
``FrozenBatchNorm2d``, ...) registers one small adapter that turns the module into a
:class:`SourceNorm` record. Lookup walks the module's class hierarchy (MRO), so subclasses
are found; a subclass that overrides ``forward`` is refused unless an adapter is
registered for that exact class (its behaviour would otherwise be silently dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from normswap.errors import SpecError, UnsupportedModuleError

__all__ = [
    "SourceNorm",
    "describe_source",
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

    @property
    def affine(self) -> bool:
        """Whether the source has γ/β."""
        return self.weight is not None


Adapter = Callable[[nn.Module], SourceNorm]
_ADAPTERS: dict[type, Adapter] = {}


def register_source(*classes: type) -> Callable[[Adapter], Adapter]:
    """Register an adapter that describes modules of ``classes`` (and their subclasses).

    Registering an adapter for a subclass that overrides ``forward`` is how a user says
    "I know what this module computes; converting it as a BatchNorm is right".

    Example:
        >>> @register_source(MyFusedBN)  # doctest: +SKIP
        ... def _describe_fused(m):
        ...     return describe_batchnorm(m)
    """

    def decorator(fn: Adapter) -> Adapter:
        for cls in classes:
            if cls in _ADAPTERS:
                raise SpecError(f"a source adapter for {cls.__qualname__} is already registered")
            _ADAPTERS[cls] = fn
        return fn

    return decorator


def source_classes() -> tuple[type, ...]:
    """The classes that have a registered adapter (subclasses are found through them).

    Example:
        >>> nn.BatchNorm2d in source_classes() or _BatchNorm in source_classes()
        True
    """
    return tuple(_ADAPTERS)


def find_source_adapter(module: nn.Module) -> tuple[type, Adapter] | None:
    """Return ``(registered_class, adapter)`` for ``module`` by MRO, or ``None``.

    Example:
        >>> find_source_adapter(nn.BatchNorm2d(4))[0].__name__
        '_BatchNorm'
    """
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return cls, _ADAPTERS[cls]
    return None


def is_source_norm(module: nn.Module) -> bool:
    """Whether ``module`` belongs to a registered BatchNorm family.

    Example:
        >>> is_source_norm(nn.BatchNorm1d(3)), is_source_norm(nn.GroupNorm(1, 3))
        (True, False)
    """
    return find_source_adapter(module) is not None


def describe_source(module: nn.Module) -> SourceNorm:
    """Describe a BatchNorm-family module, refusing what cannot be converted faithfully.

    Raises:
        UnsupportedModuleError: not a registered family, an uninitialized lazy BN, or a
            subclass whose ``forward`` differs from the registered class's.

    Example:
        >>> describe_source(nn.BatchNorm2d(8, eps=1e-3)).eps
        0.001
    """
    found = find_source_adapter(module)
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


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


_BN_RANKS: dict[type, tuple[int, ...] | None] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
}


def _ranks_of(module: nn.Module) -> tuple[int, ...] | None:
    for cls in type(module).__mro__:
        if cls in _BN_RANKS:
            return _BN_RANKS[cls]
    for lazy, ranks in (
        (nn.LazyBatchNorm1d, (2, 3)),
        (nn.LazyBatchNorm2d, (4,)),
        (nn.LazyBatchNorm3d, (5,)),
    ):
        if isinstance(module, lazy):
            return ranks
    return None


@register_source(_BatchNorm, nn.SyncBatchNorm)
def describe_batchnorm(module: nn.Module) -> SourceNorm:
    """Adapter for ``torch.nn`` BatchNorm flavours (1d/2d/3d, SyncBatchNorm, lazy).

    Example:
        >>> describe_batchnorm(nn.BatchNorm1d(5)).ranks
        (2, 3)
    """
    assert isinstance(module, _BatchNorm)
    device, dtype = _device_dtype(module)
    weight = module.weight if module.affine else None
    return SourceNorm(
        module=module,
        kind=type(module).__name__,
        num_channels=int(module.num_features),
        eps=float(module.eps),
        momentum=module.momentum,
        weight=weight,
        bias=module.bias if module.affine else None,
        running_mean=module.running_mean,
        running_var=module.running_var,
        training=module.training,
        requires_grad=bool(weight is None or weight.requires_grad),
        device=device,
        dtype=dtype,
        ranks=_ranks_of(module),
    )


def _register_torchvision() -> None:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:  # torchvision is a dependency, but the core works without it
        return

    @register_source(FrozenBatchNorm2d)
    def describe_frozen(module: nn.Module) -> SourceNorm:
        """Adapter for torchvision's FrozenBatchNorm2d (buffers only, no num_features)."""
        device, dtype = _device_dtype(module)
        return SourceNorm(
            module=module,
            kind=type(module).__name__,
            num_channels=int(module.weight.shape[0]),
            eps=float(module.eps),
            momentum=None,
            weight=module.weight,
            bias=module.bias,
            running_mean=module.running_mean,
            running_var=module.running_var,
            training=module.training,
            requires_grad=False,
            device=device,
            dtype=dtype,
            ranks=(4,),
        )


_register_torchvision()
