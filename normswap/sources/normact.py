"""BatchNorm layers that do more after normalizing: "norm + activation" sources.

timm's ``BatchNormAct2d`` (and ``SyncBatchNormAct``, ``FrozenBatchNormAct2d``) normalize like a
BatchNorm and then apply child modules, ``act(drop(x))``. A source adapter built by
:func:`norm_act_adapter` describes such a layer as its BatchNorm part plus ``after``, the child
modules it applies, by name and in order; the converted layer normalizes with the target norm
and then applies the very same modules (:func:`normswap.norms.with_after`).

:func:`register_norm_act` is how a user declares a layer of their own: "``MyBNAct`` is a
BatchNorm followed by its ``act`` child". timm's layers are registered the first time normswap
looks at a module while timm is imported; normswap never imports timm itself.
"""

from __future__ import annotations

import sys

from torch import nn

from normswap.errors import SpecError, UnsupportedModuleError
from normswap.sources.base import Adapter, SourceNorm, add_lazy_registration, register_source
from normswap.sources.torch_bn import describe_batchnorm, describe_frozen_batchnorm

__all__ = ["norm_act_adapter", "register_norm_act"]


def norm_act_adapter(*after: str, base: Adapter = describe_batchnorm) -> Adapter:
    """An adapter for a BatchNorm layer that applies its child modules ``after`` (by name, in
    order) to the normalized output; ``base`` describes the BatchNorm part.

    A child named in ``after`` that the instance does not have is left out (timm's
    ``SyncBatchNormAct`` applies ``drop``/``act`` only where they exist).

    Example:
        >>> class BNReLU(nn.BatchNorm2d):
        ...     def __init__(self, c):
        ...         super().__init__(c)
        ...         self.act = nn.ReLU()
        ...     def forward(self, x):
        ...         return self.act(super().forward(x))
        >>> src = norm_act_adapter("act")(BNReLU(4))
        >>> [(name, type(m).__name__) for name, m in src.after]
        [('act', 'ReLU')]
    """
    if not after or not all(isinstance(name, str) and name for name in after):
        raise SpecError(f"norm_act_adapter takes the names of the child modules, got {after!r}")

    def adapter(module: nn.Module) -> SourceNorm:
        src = base(module)
        found = []
        for name in after:
            child = module._modules.get(name)
            if child is not None:
                found.append((name, child))
        extra = [n for n in module._modules if n not in after]
        if extra:
            raise UnsupportedModuleError(
                f"{type(module).__name__} has child module(s) {extra} besides the declared "
                f"{list(after)}; declare every module it applies after normalizing"
            )
        return _with_after(src, tuple(found))

    adapter.__doc__ = f"Adapter for a BatchNorm followed by {', '.join(after)}."
    return adapter


def _with_after(src: SourceNorm, after: tuple[tuple[str, nn.Module], ...]) -> SourceNorm:
    from dataclasses import replace

    return replace(src, after=after)


def register_norm_act(cls: type[nn.Module], *after: str, frozen: bool = False) -> None:
    """Declare that ``cls`` computes ``after[-1](...after[0](batch_norm(x)))``.

    ``cls`` is a BatchNorm subclass (or, with ``frozen=True``, a module with torchvision
    ``FrozenBatchNorm2d``'s buffers) whose ``forward`` normalizes and then applies its child
    modules named ``after``, in that order. normswap then converts it like a BatchNorm and keeps
    those modules (the same objects) after the new norm, instead of refusing its own
    ``forward``. The declaration is trusted: if the class does anything else, the conversion
    will not compute what it computed.

    Raises:
        SpecError: ``cls`` is registered already, or no child names are given.

    Example:
        >>> class BNSiLU(nn.BatchNorm2d):
        ...     def __init__(self, c):
        ...         super().__init__(c)
        ...         self.act = nn.SiLU()
        ...     def forward(self, x):
        ...         return self.act(super().forward(x))
        >>> register_norm_act(BNSiLU, "act")
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), BNSiLU(8))
        >>> normswap.swap(model, "gn", num_groups=4).counts()
        {'BNSiLU -> GroupNorm': 1}
        >>> type(model[1]).__name__, model[1].act is not None
        ('GroupNormAct', True)
        >>> _ = normswap.sources.SOURCES.unregister(BNSiLU)
    """
    base = describe_frozen_batchnorm if frozen else describe_batchnorm
    register_source(cls)(norm_act_adapter(*after, base=base))


def _register_timm() -> None:
    """Register timm's norm + activation BatchNorm layers (called once timm is imported)."""
    norm_act = sys.modules.get("timm.layers.norm_act")
    if norm_act is None:  # pragma: no cover - only called once the module is imported
        return
    for name, frozen in (
        ("BatchNormAct2d", False),
        ("SyncBatchNormAct", False),
        ("FrozenBatchNormAct2d", True),
    ):
        cls = getattr(norm_act, name, None)
        if isinstance(cls, type) and cls not in _registered():
            register_norm_act(cls, "drop", "act", frozen=frozen)


def _registered() -> tuple[type, ...]:
    from normswap.sources.base import SOURCES

    return SOURCES.classes()


add_lazy_registration("timm.layers.norm_act", _register_timm)
