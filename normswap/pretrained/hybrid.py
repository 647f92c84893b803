"""Hybrid conversion: ``frozen`` where converting costs the most, the new norm everywhere else.

Not every BatchNorm of a pretrained model is equally hard to replace by a per-sample norm (the
stem of a bias-free conv stack is the worst: ``benchmarks/NOTES.md``). :func:`conversion_costs`
measures, layer by layer, how far the model moves from the original when only that layer is
converted (and calibrated); :func:`hybrid_swap` then freezes the costliest layers (the
``frozen`` family: exact, batch-independent) and converts the rest. The result still never uses
batch statistics, which is what small-batch users need; it is not a pure per-sample-norm model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from normswap.errors import CalibrationError
from normswap.inputs import BatchToInput, default_batch_to_input
from normswap.modes import eval_mode
from normswap.plan import plan
from normswap.pretrained.calibrate import calibrate
from normswap.pretrained.fidelity import fidelity
from normswap.report import REPLACE, SwapReport
from normswap.specs import NormSpec, get_spec
from normswap.surgery import swap

__all__ = ["LayerCost", "conversion_costs", "hybrid_swap"]


@dataclass(frozen=True)
class LayerCost:
    """What converting one layer alone costs.

    Attributes:
        path: the BatchNorm's module path.
        kl: mean KL(original || converted) on the measurement inputs.
        agreement: top-1 agreement with the original there.
    """

    path: str
    kl: float
    agreement: float


def conversion_costs(
    model: nn.Module,
    spec: NormSpec | str,
    data: Any,
    *,
    calibrate_data: Any = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    batch_to_input: BatchToInput = default_batch_to_input,
    **overrides: Any,
) -> list[LayerCost]:
    """For every BatchNorm ``spec`` would replace: the cost of converting that layer alone.

    Each layer is converted on its own copy of the model, calibrated on ``calibrate_data``
    (default: ``data``) and compared with the original on ``data``. ``model`` is not modified.

    Returns:
        The costs, costliest first (by KL).

    Raises:
        SwapError: what :func:`normswap.plan` refuses.
        CalibrationError: no BatchNorm to convert, or data the model cannot run on.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Flatten()).eval()
        >>> costs = conversion_costs(net, "gn", torch.randn(16, 3, 8, 8), num_groups=4)
        >>> sorted(c.path for c in costs)
        ['1', '4']
    """
    the_spec = get_spec(spec, **overrides)
    paths = [
        s.paths[0]
        for s in plan(model, the_spec, include=include, exclude=exclude).norm_steps
        if s.decision.action == REPLACE
    ]
    if not paths:
        raise CalibrationError(f"no BatchNorm of {type(model).__name__} would become {spec!r}")
    calibrate_data = data if calibrate_data is None else calibrate_data
    costs = []
    with eval_mode(model):
        for path in paths:
            single = copy.deepcopy(model)
            swap(single, the_spec, include=path)
            calibrate(single, model, calibrate_data, batch_to_input=batch_to_input)
            f = fidelity(single, model, data, batch_to_input=batch_to_input)
            costs.append(LayerCost(path, f.kl, f.agreement))
    return sorted(costs, key=lambda c: -c.kl)


def hybrid_swap(
    model: nn.Module,
    spec: NormSpec | str,
    costs: list[LayerCost],
    *,
    frozen: int,
    **overrides: Any,
) -> tuple[SwapReport | None, SwapReport]:
    """Freeze the ``frozen`` costliest layers of ``costs``, convert the others to ``spec``.

    Returns:
        The ``frozen`` swap's report (``None`` for ``frozen=0``) and ``spec``'s.

    Raises:
        CalibrationError: ``frozen`` is not an int between 0 and ``len(costs)``.
        SwapError: what :func:`normswap.plan` refuses (nothing modified).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Flatten()).eval()
        >>> costs = [LayerCost("4", 1.0, 0.5), LayerCost("1", 0.1, 0.9)]
        >>> _ = hybrid_swap(net, "gn", costs, frozen=1, num_groups=4)
        >>> type(net[1]).__name__, type(net[4]).__name__
        ('GroupNorm', 'FrozenAffine')
    """
    if isinstance(frozen, bool) or not isinstance(frozen, int) or not 0 <= frozen <= len(costs):
        raise CalibrationError(
            f"frozen must be an int from 0 to {len(costs)} (the layers measured), got {frozen!r}"
        )
    costly = [c.path for c in costs[:frozen]]
    the_spec = get_spec(spec, **overrides)
    # Both plans are made before either swap runs: a refusal leaves the model untouched.
    if costly:
        plan(model, "frozen", include=costly)
    plan(model, the_spec, exclude=costly or None)
    first = swap(model, "frozen", include=costly) if costly else None
    second = swap(model, the_spec, exclude=costly or None)
    return first, second
