"""Norm layers followed by the modules a norm + activation source applied after normalizing.

timm's ``BatchNormAct2d`` computes ``act(drop(batch_norm(x)))``. Converting it, the new norm must
apply the very same ``drop`` and ``act`` modules (the same objects: in-place flags, custom
activations and their parameters kept) in the same order. :func:`with_after` gives a norm layer
those children: every layer of :mod:`normswap.norms` has an ``*Act`` variant (``GroupNormAct``,
...) that keeps the layer's own parameters at the top level, as timm's ``GroupNormAct`` does, so
a converted checkpoint loads into a timm model built with that norm layer; any other module
is wrapped in a :class:`NormThen`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from normswap.errors import NormSwapError
from normswap.norms.adaptive import AdaLIN, AdaLN
from normswap.norms.common import where
from normswap.norms.frozen import FrozenAffine
from normswap.norms.group import GroupNorm
from normswap.norms.instance import InstanceNorm
from normswap.norms.layer import LayerNorm, LayerNorm2d
from normswap.norms.pointwise import Derf, DyT
from normswap.norms.rms import RMSNorm

__all__ = [
    "ACT_VARIANTS",
    "AdaLINAct",
    "AdaLNAct",
    "AfterNorm",
    "DerfAct",
    "DyTAct",
    "FrozenAffineAct",
    "GroupNormAct",
    "InstanceNormAct",
    "LayerNorm2dAct",
    "LayerNormAct",
    "NormThen",
    "RMSNormAct",
    "with_after",
]


#: The modules after the norm that a scripted layer applies: timm's names, in timm's order.
SCRIPTABLE_AFTER = ("drop", "act")


def _check_scriptable(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__``: TorchScript cannot look modules up by a name held in data,
    so a scripted layer applies ``drop`` then ``act`` (timm's layout) and nothing else."""
    names = tuple(module.after_names)
    if names != tuple(n for n in SCRIPTABLE_AFTER if n in names):
        raise NormSwapError(
            f"{where(module)}: cannot script a {type(module).__name__} whose modules after the "
            f"norm are {list(names)}: scripting supports {list(SCRIPTABLE_AFTER)} in that order "
            "(trace it, or export it with torch.export, instead)"
        )
    return module


class _ThenAfter(nn.Module):
    """Mixin: the norm's forward, then the child modules named in ``after_names``, in order."""

    after_names = ()  # tuple[str, ...]; not annotated: TorchScript reads class annotations

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x``, then apply the modules that followed the source's normalization."""
        x = self._norm_forward(x)
        if torch.jit.is_scripting():
            if hasattr(self, "drop"):
                x = self.drop(x)
            if hasattr(self, "act"):
                x = self.act(x)
            return x
        else:
            for name in self.after_names:
                x = self._modules[name](x)
            return x

    def __prepare_scriptable__(self) -> nn.Module:
        return _check_scriptable(self)

    def forward_norm(self, x: Tensor) -> Tensor:
        """The normalization alone, without the modules after it (calibration fits this).

        Example:
            >>> layer = with_after(GroupNorm(4, 2), [("act", nn.ReLU())])
            >>> bool((layer.forward_norm(torch.randn(2, 4, 3)) < 0).any())
            True
        """
        return self._norm_forward(x)


class GroupNormAct(_ThenAfter, GroupNorm):
    """:class:`~normswap.GroupNorm` then the source's ``drop``/``act`` (timm's GroupNormAct).

    Example:
        >>> layer = with_after(GroupNorm(8, 4), [("drop", nn.Identity()), ("act", nn.SiLU())])
        >>> type(layer).__name__, sorted(layer.state_dict())
        ('GroupNormAct', ['bias', 'weight'])
    """


class LayerNormAct(_ThenAfter, LayerNorm):
    """:class:`~normswap.LayerNorm` then the source's modules (timm's GroupNorm1Act).

    Example:
        >>> type(with_after(LayerNorm(4), [("act", nn.ReLU())])).__name__
        'LayerNormAct'
    """


class LayerNorm2dAct(_ThenAfter, LayerNorm2d):
    """:class:`~normswap.LayerNorm2d` then the source's modules (timm's LayerNormAct2d).

    Example:
        >>> type(with_after(LayerNorm2d(4), [("act", nn.ReLU())])).__name__
        'LayerNorm2dAct'
    """


class InstanceNormAct(_ThenAfter, InstanceNorm):
    """:class:`~normswap.InstanceNorm` then the source's modules.

    Example:
        >>> type(with_after(InstanceNorm(4), [("act", nn.ReLU())])).__name__
        'InstanceNormAct'
    """


class AdaLINAct(_ThenAfter, AdaLIN):
    """:class:`~normswap.AdaLIN` then the source's modules.

    Example:
        >>> type(with_after(AdaLIN(4), [("act", nn.ReLU())])).__name__
        'AdaLINAct'
    """


class AdaLNAct(_ThenAfter, AdaLN):
    """:class:`~normswap.AdaLN` then the source's modules.

    Example:
        >>> type(with_after(AdaLN(4, cond_dim=2), [("act", nn.ReLU())])).__name__
        'AdaLNAct'
    """


class FrozenAffineAct(_ThenAfter, FrozenAffine):
    """:class:`~normswap.FrozenAffine` then the source's modules (timm's FrozenBatchNormAct2d).

    Example:
        >>> type(with_after(FrozenAffine(4), [("act", nn.ReLU())])).__name__
        'FrozenAffineAct'
    """


class RMSNormAct(_ThenAfter, RMSNorm):
    """:class:`~normswap.RMSNorm` then the source's modules.

    Example:
        >>> type(with_after(RMSNorm(4), [("act", nn.ReLU())])).__name__
        'RMSNormAct'
    """


class DyTAct(_ThenAfter, DyT):
    """:class:`~normswap.DyT` then the source's modules.

    Example:
        >>> type(with_after(DyT(4), [("act", nn.ReLU())])).__name__
        'DyTAct'
    """


class DerfAct(_ThenAfter, Derf):
    """:class:`~normswap.Derf` then the source's modules.

    Example:
        >>> type(with_after(Derf(4), [("act", nn.ReLU())])).__name__
        'DerfAct'
    """


#: The ``*Act`` variant of each norm layer class (exact classes: a subclass with its own
#: ``forward`` is wrapped in a :class:`NormThen` instead).
ACT_VARIANTS: dict[type[nn.Module], type[nn.Module]] = {
    GroupNorm: GroupNormAct,
    LayerNorm: LayerNormAct,
    LayerNorm2d: LayerNorm2dAct,
    InstanceNorm: InstanceNormAct,
    AdaLIN: AdaLINAct,
    AdaLN: AdaLNAct,
    FrozenAffine: FrozenAffineAct,
    RMSNorm: RMSNormAct,
    DyT: DyTAct,
    Derf: DerfAct,
}


class AfterNorm(nn.Sequential):
    """What a norm + activation source leaves where its normalization was removed or folded:
    the modules it applied after normalizing, under their names.

    Example:
        >>> with_after(nn.Identity(), [("drop", nn.Identity()), ("act", nn.ReLU())])
        AfterNorm(
          (drop): Identity()
          (act): ReLU()
        )
    """


class NormThen(_ThenAfter):
    """Any norm module, then the modules after it (a layer without an ``*Act`` variant).

    Example:
        >>> layer = with_after(nn.GroupNorm(2, 4), [("act", nn.ReLU())])
        >>> type(layer).__name__, sorted(layer.state_dict())
        ('NormThen', ['norm.bias', 'norm.weight'])
    """

    def __init__(self, norm: nn.Module, after: Sequence[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.norm = norm
        self.after_names = tuple(name for name, _ in after)
        for name, module in after:
            self.add_module(name, module)

    def _norm_forward(self, x: Tensor) -> Tensor:
        """The wrapped norm (``forward`` and ``forward_norm`` come from :class:`_ThenAfter`)."""
        return self.norm(x)


def with_after(norm: nn.Module, after: Sequence[tuple[str, nn.Module]]) -> nn.Module:
    """``norm`` followed by the modules ``after`` (``(name, module)`` pairs, in order).

    A layer of :mod:`normswap.norms` becomes its ``*Act`` variant in place (the same object,
    its parameters where they were, the modules added as children by name); an ``nn.Identity``
    (a removed or folded norm) becomes an :class:`AfterNorm` of the modules alone; any other
    module is wrapped in a :class:`NormThen`. The modules are the objects given, not copies.

    Example:
        >>> act = nn.ReLU(inplace=True)
        >>> layer = with_after(GroupNorm(4, 2), [("act", act)])
        >>> layer.act is act, layer(torch.randn(2, 4, 3)).min().item() >= 0
        (True, True)
    """
    after = [(name, module) for name, module in after]
    if not after:
        return norm
    if type(norm) is nn.Identity:
        return AfterNorm(OrderedDict(after))
    variant = ACT_VARIANTS.get(type(norm))
    clash = [name for name, _ in after if hasattr(norm, name)]
    if variant is None or clash:
        return NormThen(norm, after)
    norm.__class__ = variant
    norm.after_names = tuple(name for name, _ in after)
    for name, module in after:
        norm.add_module(name, module)
    return norm
