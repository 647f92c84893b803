"""The ``adaln`` family: BatchNorm → :class:`normswap.AdaLN`, a DiT-style conditional
LayerNorm whose zero-initialized modulation makes the converted model compute exactly the
``ln`` swap until it learns otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normswap.errors import SpecError
from normswap.families.base import Family, register_family
from normswap.families.simple import ChannelNormTarget
from normswap.norms import AdaLN
from normswap.pretrained.fitters import AffineFitter, evaluate_with, layer_affine
from normswap.sources import SourceNorm
from normswap.specs import NormSpec, check_positive_int

__all__ = ["AdaLNSpec", "AdaLNTarget", "ModulatedAffineFitter"]


@dataclass(frozen=True)
class AdaLNSpec(NormSpec):
    """Conditional AdaLN (DiT adaLN-Zero style): LN modulated by a condition vector.

    The modulation MLP starts at zero, so the converted model computes exactly what a
    plain LayerNorm swap computes until it learns otherwise. Pass the condition with
    ``with normswap.condition(model, c): model(x)``.

    Attributes:
        cond_dim: size of the condition vector (required).
        hidden_dim: hidden width of the modulation MLP (``None``: a single linear layer).
        gate: also predict a multiplicative gate.

    Example:
        >>> AdaLNSpec(cond_dim=8).cond_dim
        8
    """

    cond_dim: int | None = None
    hidden_dim: int | None = None
    gate: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cond_dim is None:
            raise SpecError(
                "adaln needs the condition size: e.g. swap(model, 'adaln', cond_dim=16) "
                "or norm.cond_dim=16"
            )
        check_positive_int("cond_dim", self.cond_dim)
        check_positive_int("hidden_dim", self.hidden_dim, optional=True)


class AdaLNTarget(ChannelNormTarget):
    """BatchNorm → :class:`normswap.AdaLN` (zero-initialized conditional modulation).

    Example:
        >>> AdaLNTarget().layer.__name__
        'AdaLN'
    """

    def __init__(self) -> None:
        super().__init__(AdaLN, "layer", channels_last=False)

    def extra_kwargs(self, src: SourceNorm, spec: NormSpec) -> dict[str, Any]:
        """``cond_dim``, ``hidden_dim`` and ``gate`` from the spec."""
        assert isinstance(spec, AdaLNSpec)
        return {"cond_dim": spec.cond_dim, "hidden_dim": spec.hidden_dim, "gate": spec.gate}


class ModulatedAffineFitter(AffineFitter):
    """Layers whose output is linear in ``weight``/``bias`` in any other way, e.g. AdaLN.

    AdaLN computes ``(weight · x̂ + bias) · (1 + scale(c)) + shift(c)``: the basis is found by
    running the layer three times, with ``(weight, bias)`` set to ``(0, 0)``, ``(1, 0)`` and
    ``(0, 1)``; its modulation is left as it is and its condition must be set (call
    :func:`calibrate` inside ``with normswap.condition(model, c):``).

    Example:
        >>> norm = AdaLN(4, cond_dim=2)
        >>> with normswap.condition(norm, torch.zeros(2)):
        ...     offset, basis = ModulatedAffineFitter().basis(norm, torch.randn(2, 4, 3))
        >>> len(basis)
        2
    """

    def basis(self, module: nn.Module, x: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
        """Return ``(y(0, 0), [y(1, 0) − y(0, 0), y(0, 1) − y(0, 0)])``."""
        weight, _ = layer_affine(module)
        one, zero = torch.ones_like(weight), torch.zeros_like(weight)
        y00 = evaluate_with(module, {"weight": zero, "bias": zero}, x)
        y10 = evaluate_with(module, {"weight": one, "bias": zero}, x)
        y01 = evaluate_with(module, {"weight": zero, "bias": one}, x)
        if not bool(y00.abs().amax() > 0) and bool((y01 == 1).all()):
            return None, [y10, None]  # no modulation at work: plain affine
        return y00, [y10 - y00, y01 - y00]


FAMILY = register_family(
    Family(
        "adaln",
        AdaLNSpec,
        AdaLNTarget(),
        layers=(AdaLN,),
        fitter=ModulatedAffineFitter(),
        example={"cond_dim": 8},
    )
)
