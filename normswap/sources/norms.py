"""Source adapters for the per-sample norms: LayerNorm, LayerNorm2d, GroupNorm, InstanceNorm,
RMSNorm (torch's, torchvision's and normswap's own), and normswap's FrozenAffine.

normswap's layers are sources too, so a converted model can be converted again (``replace="gn"``
after ``swap(model, "gn")``). Each adapter reads the module's own attributes only; what the
statistics span is said once, in the record (:class:`~normswap.sources.SourceNorm`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from normswap.errors import UnsupportedModuleError
from normswap.sources.base import SourceNorm, device_dtype, register_source

__all__ = [
    "describe_frozen_affine",
    "describe_group_norm",
    "describe_instance_norm",
    "describe_layer_norm",
    "describe_layer_norm_2d",
    "describe_rms_norm",
    "per_sample_record",
    "then_after",
]


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def per_sample_record(
    module: nn.Module,
    *,
    num_channels: int,
    eps: float,
    over: str,
    groups: int | None = None,
    center: bool = True,
    channels_last: bool = False,
    normalized_shape: tuple[int, ...] | None = None,
    running: bool = False,
) -> SourceNorm:
    """The record of a norm with per-sample statistics, read from ``module``'s ``weight``,
    ``bias`` (and ``running_mean``/``running_var`` with ``running``).

    Example:
        >>> per_sample_record(nn.GroupNorm(2, 4), num_channels=4, eps=1e-5, over="groups",
        ...                   groups=2).groups
        2
    """
    device, dtype = device_dtype(module)
    weight, bias = _tensor(module, "weight"), _tensor(module, "bias")
    return SourceNorm(
        module=module,
        kind=type(module).__name__,
        num_channels=int(num_channels),
        eps=float(eps),
        momentum=getattr(module, "momentum", None) if running else None,
        weight=weight,
        bias=bias,
        running_mean=_tensor(module, "running_mean") if running else None,
        running_var=_tensor(module, "running_var") if running else None,
        training=module.training,
        requires_grad=bool(weight is None or weight.requires_grad),
        device=device,
        dtype=dtype,
        ranks=None,
        over=over,
        groups=groups,
        center=center,
        channels_last=channels_last,
        normalized_shape=normalized_shape,
    )


def _channels_last_record(
    module: nn.Module, normalized_shape: tuple[int, ...], eps: float | None, center: bool
) -> SourceNorm:
    if eps is None:  # nn.RMSNorm(eps=None): the machine epsilon of the input's dtype
        eps = torch.finfo(device_dtype(module)[1]).eps
    return per_sample_record(
        module,
        num_channels=normalized_shape[-1],
        eps=eps,
        over="channels",
        center=center,
        channels_last=True,
        normalized_shape=tuple(int(d) for d in normalized_shape),
    )


def describe_layer_norm(module: nn.Module) -> SourceNorm:
    """Adapter for ``nn.LayerNorm`` (and timm's): per position over the trailing
    ``normalized_shape`` dims, channels last.

    Example:
        >>> src = describe_layer_norm(nn.LayerNorm(8, eps=1e-6, bias=False))
        >>> src.over, src.channels_last, src.eps, src.bias is None
        ('channels', True, 1e-06, True)
    """
    return _channels_last_record(module, tuple(module.normalized_shape), module.eps, center=True)


def describe_rms_norm(module: nn.Module) -> SourceNorm:
    """Adapter for ``nn.RMSNorm`` (and timm's ``RmsNorm``, normswap's ``RMSNorm``): no mean,
    channels last, or channels first where the module says so (``channels_last=False``).

    Example:
        >>> src = describe_rms_norm(nn.RMSNorm(8))
        >>> src.over, src.center, src.eps == torch.finfo(torch.float32).eps
        ('channels', False, True)
    """
    shape = tuple(getattr(module, "normalized_shape", None) or (module.num_channels,))
    if getattr(module, "channels_last", True):
        return _channels_last_record(module, shape, module.eps, center=False)
    return per_sample_record(
        module, num_channels=shape[-1], eps=module.eps, over="channels", center=False
    )


def describe_rms_norm_2d(module: nn.Module) -> SourceNorm:
    """Adapter for timm's ``RmsNorm2d``: RMS over dim 1 at each position.

    Example:
        >>> import timm.layers
        >>> describe_rms_norm_2d(timm.layers.RmsNorm2d(8)).channel_dim
        1
    """
    shape = tuple(module.normalized_shape)
    if len(shape) != 1:
        raise UnsupportedModuleError(f"{type(module).__name__} over {shape}: expected (C,)")
    return per_sample_record(
        module, num_channels=shape[0], eps=module.eps, over="channels", center=False
    )


def describe_layer_norm_2d(module: nn.Module) -> SourceNorm:
    """Adapter for channels-first LayerNorm at each position: ConvNeXt's ``LayerNorm2d``
    (torchvision, timm; an ``nn.LayerNorm`` subclass that moves C last and back) and
    normswap's :class:`~normswap.LayerNorm2d`.

    Example:
        >>> from torchvision.models.convnext import LayerNorm2d
        >>> src = describe_layer_norm_2d(LayerNorm2d(96, eps=1e-6))
        >>> src.over, src.channel_dim, src.num_channels
        ('channels', 1, 96)
    """
    if getattr(module, "channels_last", False):
        return _channels_last_record(module, (module.num_channels,), module.eps, center=True)
    shape = getattr(module, "normalized_shape", None)
    channels = int(shape[0]) if shape is not None else int(module.num_channels)
    if shape is not None and len(shape) != 1:
        raise UnsupportedModuleError(f"{type(module).__name__} over {tuple(shape)}: expected (C,)")
    return per_sample_record(module, num_channels=channels, eps=module.eps, over="channels")


def describe_group_norm(module: nn.Module) -> SourceNorm:
    """Adapter for GroupNorm (torch's, timm's, normswap's) and normswap's LayerNorm (one group).

    Example:
        >>> describe_group_norm(nn.GroupNorm(4, 8)).groups
        4
    """
    groups = getattr(module, "num_groups", 1)  # normswap.LayerNorm: GroupNorm(1, C)
    return per_sample_record(
        module,
        num_channels=module.num_channels,
        eps=module.eps,
        over="groups",
        groups=int(groups),
        channels_last=bool(getattr(module, "channels_last", False)),
    )


def describe_instance_norm(module: nn.Module) -> SourceNorm:
    """Adapter for ``nn.InstanceNorm1d/2d/3d`` and normswap's InstanceNorm: one group per
    channel; with ``track_running_stats`` the eval-mode running statistics are in the record.

    Example:
        >>> src = describe_instance_norm(nn.InstanceNorm2d(6))
        >>> src.groups, src.affine, src.has_statistics
        (6, False, False)
    """
    channels = getattr(module, "num_features", None) or module.num_channels
    src = per_sample_record(
        module,
        num_channels=channels,
        eps=module.eps,
        over="groups",
        groups=int(channels),
        channels_last=bool(getattr(module, "channels_last", False)),
        running=bool(getattr(module, "track_running_stats", False)),
    )
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        dims = module._get_no_batch_dim() + 1  # InstanceNorm2d: rank 4 (3 unbatched)
        return _replace_ranks(src, (dims,))
    return src


def _replace_ranks(src: SourceNorm, ranks: tuple[int, ...]) -> SourceNorm:
    return dataclasses.replace(src, ranks=ranks)


def describe_frozen_affine(module: nn.Module) -> SourceNorm:
    """Adapter for normswap's :class:`~normswap.FrozenAffine`: a frozen BatchNorm whose
    statistics are folded into ``weight``/``bias`` (mean 0, variance 1, eps 0 in the record).

    Example:
        >>> from normswap.norms import FrozenAffine
        >>> src = describe_frozen_affine(FrozenAffine(4))
        >>> src.over, src.eps, src.running_var.tolist()
        ('batch', 0.0, [1.0, 1.0, 1.0, 1.0])
    """
    if getattr(module, "center", False):  # a frozen LayerNorm: centred per position, fixed scale
        return per_sample_record(
            module,
            num_channels=module.num_channels,
            eps=0.0,
            over="channels",
            channels_last=module.channels_last,
            normalized_shape=(module.num_channels,) if module.channels_last else None,
        )
    device, dtype = device_dtype(module)
    c = int(module.num_channels)
    return SourceNorm(
        module=module,
        kind=type(module).__name__,
        num_channels=c,
        eps=0.0,
        momentum=None,
        weight=module.weight,
        bias=module.bias,
        running_mean=torch.zeros(c, device=device, dtype=dtype),
        running_var=torch.ones(c, device=device, dtype=dtype),
        training=module.training,
        requires_grad=bool(module.weight.requires_grad),
        device=device,
        dtype=dtype,
        ranks=getattr(module, "input_ranks", None),
        over="batch",
    )


def then_after(base: Callable[[nn.Module], SourceNorm]) -> Callable[[nn.Module], SourceNorm]:
    """An adapter for normswap's ``*Act`` layers (a norm, then the modules named in its
    ``after_names``): ``base`` describes the norm, the modules after it come along.

    Example:
        >>> from normswap.norms import GroupNorm, with_after
        >>> layer = with_after(GroupNorm(4, 2), [("act", nn.ReLU())])
        >>> [name for name, _ in then_after(describe_group_norm)(layer).after]
        ['act']
    """

    def adapter(module: nn.Module) -> SourceNorm:
        after = tuple((name, module._modules[name]) for name in module.after_names)
        return dataclasses.replace(base(module), after=after)

    adapter.__qualname__ = f"then_after({base.__qualname__})"
    return adapter


def _register() -> None:
    from normswap.norms import (
        FrozenAffine,
        GroupNorm,
        InstanceNorm,
        LayerNorm,
        LayerNorm2d,
        RMSNorm,
    )

    register_source(nn.LayerNorm, kind="ln")(describe_layer_norm)
    register_source(LayerNorm, kind="ln")(describe_group_norm)  # the GN paper's: GroupNorm(1)
    register_source(LayerNorm2d, kind="ln2d")(describe_layer_norm_2d)
    register_source(nn.GroupNorm, GroupNorm, kind="gn")(describe_group_norm)
    register_source(nn.modules.instancenorm._InstanceNorm, InstanceNorm, kind="in")(
        describe_instance_norm
    )
    register_source(nn.RMSNorm, RMSNorm, kind="rms")(describe_rms_norm)
    register_source(FrozenAffine, kind="frozen")(describe_frozen_affine)
    from normswap.norms import act

    for cls, kind, base in (
        (act.GroupNormAct, "gn", describe_group_norm),
        (act.LayerNormAct, "ln", describe_group_norm),
        (act.LayerNorm2dAct, "ln2d", describe_layer_norm_2d),
        (act.InstanceNormAct, "in", describe_instance_norm),
        (act.RMSNormAct, "rms", describe_rms_norm),
        (act.FrozenAffineAct, "frozen", describe_frozen_affine),
    ):
        register_source(cls, kind=kind)(then_after(base))
    try:
        from torchvision.models.convnext import LayerNorm2d as TVLayerNorm2d
    except ImportError:  # torchvision is a dependency, but the core works without it
        return
    register_source(TVLayerNorm2d, kind="ln2d")(describe_layer_norm_2d)


_register()
