"""timm's per-sample norms as sources, registered once timm is imported (normswap never
imports timm itself).

timm's ``LayerNorm``, ``LayerNorm2d``, ``GroupNorm`` and ``GroupNorm1`` subclass torch's norms
and override ``forward`` (to use timm's fast-norm kernels or to move channels), so torch's
adapters alone would refuse them; ``RmsNorm`` and ``RmsNorm2d`` are modules of their own. Each
is registered here with the adapter of what it computes, and the ``*Act`` layers (``GroupNormAct``,
``GroupNorm1Act``, ``LayerNormAct``, ``LayerNormAct2d``) as that norm followed by their
``drop``/``act`` children, as timm's BatchNorm + activation layers are
(:mod:`normswap.sources.normact`).
"""

from __future__ import annotations

import sys

from normswap.sources.base import SOURCES, add_lazy_registration, register_source
from normswap.sources.normact import norm_act_adapter
from normswap.sources.norms import (
    describe_group_norm,
    describe_layer_norm,
    describe_layer_norm_2d,
    describe_rms_norm,
    describe_rms_norm_2d,
)

__all__: list[str] = []

#: timm class name -> (source kind, adapter), in ``timm.layers.norm``.
_NORMS = {
    "LayerNorm": ("ln", describe_layer_norm),
    "LayerNorm2d": ("ln2d", describe_layer_norm_2d),
    "GroupNorm": ("gn", describe_group_norm),
    "GroupNorm1": ("gn", describe_group_norm),
    "RmsNorm": ("rms", describe_rms_norm),
    "RmsNorm2d": ("rms", describe_rms_norm_2d),
}
#: ... and the norm + activation layers in ``timm.layers.norm_act``.
_NORM_ACTS = {
    "GroupNormAct": ("gn", describe_group_norm),
    "GroupNorm1Act": ("gn", describe_group_norm),
    "LayerNormAct": ("ln", describe_layer_norm),
    "LayerNormAct2d": ("ln2d", describe_layer_norm_2d),
}


def _register(module_name: str, table: dict, act: bool) -> None:
    module = sys.modules.get(module_name)
    if module is None:  # pragma: no cover - only called once the module is imported
        return
    for name, (kind, adapter) in table.items():
        cls = getattr(module, name, None)
        if not isinstance(cls, type) or cls in SOURCES:
            continue
        if act:
            adapter = norm_act_adapter("drop", "act", base=adapter)
        register_source(cls, kind=kind)(adapter)


add_lazy_registration("timm.layers.norm", lambda: _register("timm.layers.norm", _NORMS, False))
add_lazy_registration(
    "timm.layers.norm_act", lambda: _register("timm.layers.norm_act", _NORM_ACTS, True)
)
