"""The norm families, one module each, registered on import.

Each module holds one family's spec, target, calibration fitter and monitor family, and
registers them together with :func:`normswap.register_family`. Adding a family is one more
module here (imported below) and one ``conf/norm/<name>.yaml``.
"""

from __future__ import annotations

from normswap.families import (
    adalin,
    adaln,
    derf,
    dyt,
    frozen,
    gn,
    instance,
    ln,
    ln2d,
    rms,
    wn,
    ws_gn,
)
from normswap.families.base import (
    FAMILIES,
    Decision,
    Family,
    LayerStep,
    NormContext,
    PlanContext,
    Target,
    family_layers,
    get_family,
    register_family,
    unregister_family,
)

__all__ = [
    "FAMILIES",
    "Decision",
    "Family",
    "LayerStep",
    "NormContext",
    "PlanContext",
    "Target",
    "adalin",
    "adaln",
    "derf",
    "dyt",
    "family_layers",
    "frozen",
    "get_family",
    "gn",
    "instance",
    "ln",
    "ln2d",
    "register_family",
    "rms",
    "unregister_family",
    "wn",
    "ws_gn",
]
