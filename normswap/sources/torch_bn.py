"""Source adapters for ``torch.nn``'s BatchNorm flavours and torchvision's FrozenBatchNorm2d."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normswap.errors import UnsupportedModuleError
from normswap.sources.base import SourceNorm, device_dtype, register_source

__all__ = ["describe_batchnorm", "describe_frozen_batchnorm"]

_BN_RANKS: tuple[tuple[type, tuple[int, ...]], ...] = (
    (nn.BatchNorm1d, (2, 3)),
    (nn.LazyBatchNorm1d, (2, 3)),
    (nn.BatchNorm2d, (4,)),
    (nn.LazyBatchNorm2d, (4,)),
    (nn.BatchNorm3d, (5,)),
    (nn.LazyBatchNorm3d, (5,)),
)


def _ranks_of(module: nn.Module) -> tuple[int, ...] | None:
    for cls, ranks in _BN_RANKS:
        if isinstance(module, cls):
            return ranks
    return None  # SyncBatchNorm and _BatchNorm itself accept any rank >= 2


@register_source(_BatchNorm, nn.SyncBatchNorm)
def describe_batchnorm(module: nn.Module) -> SourceNorm:
    """Adapter for ``torch.nn`` BatchNorm flavours (1d/2d/3d, SyncBatchNorm, lazy).

    Example:
        >>> describe_batchnorm(nn.BatchNorm1d(5)).ranks
        (2, 3)
    """
    assert isinstance(module, _BatchNorm)
    if module.num_features < 1:
        raise UnsupportedModuleError(
            f"{type(module).__name__} has num_features={module.num_features}: a lazy BatchNorm "
            "without affine parameters or running statistics never learns its channel count; "
            "build it as BatchNorm1d/2d/3d(C) instead"
        )
    device, dtype = device_dtype(module)
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


def describe_frozen_batchnorm(module: nn.Module) -> SourceNorm:
    """Adapter for a frozen BatchNorm kept as buffers (torchvision's ``FrozenBatchNorm2d``):
    ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``eps``, no ``num_features``.

    Example:
        >>> from torchvision.ops.misc import FrozenBatchNorm2d
        >>> src = describe_frozen_batchnorm(FrozenBatchNorm2d(6))
        >>> src.num_channels, src.requires_grad
        (6, False)
    """
    device, dtype = device_dtype(module)
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


def _register_torchvision() -> None:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:  # torchvision is a dependency, but the core works without it
        return
    register_source(FrozenBatchNorm2d)(describe_frozen_batchnorm)


_register_torchvision()
