"""The ``adalin`` family: BatchNorm → :class:`normswap.AdaLIN`, U-GAT-IT's learnable
per-channel mix ρ of instance and layer statistics; its fitter re-fits ``weight``, ``bias`` and
``rho`` together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normswap.errors import SpecError
from normswap.families.base import Family, register_family
from normswap.families.simple import ChannelNormTarget
from normswap.norms import AdaLIN
from normswap.pretrained.fitters import Fitter, evaluate_with, layer_affine
from normswap.pretrained.lstsq import solve
from normswap.sources import SourceNorm
from normswap.specs import NormSpec

__all__ = ["AdaLINFitter", "AdaLINSpec", "AdaLINTarget"]


@dataclass(frozen=True)
class AdaLINSpec(NormSpec):
    """U-GAT-IT's AdaLIN: a learnable per-channel mix ρ of IN and LN statistics.

    Attributes:
        rho_init: initial ρ in [0, 1] (1 = pure InstanceNorm, 0 = pure LayerNorm).

    Example:
        >>> AdaLINSpec(rho_init=0.5).rho_init
        0.5
    """

    rho_init: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rho_init, (int, float)) or not 0.0 <= self.rho_init <= 1.0:
            raise SpecError(f"rho_init must be in [0, 1], got {self.rho_init!r}")


class AdaLINTarget(ChannelNormTarget):
    """BatchNorm → :class:`normswap.AdaLIN`; refuses norms without spatial positions.

    Example:
        >>> AdaLINTarget().layer.__name__
        'AdaLIN'
    """

    def __init__(self) -> None:
        super().__init__(AdaLIN, "instance", channels_last=False)

    def extra_kwargs(self, src: SourceNorm, spec: NormSpec) -> dict[str, Any]:
        """``rho_init`` from the spec."""
        assert isinstance(spec, AdaLINSpec)
        return {"rho_init": spec.rho_init}


class AdaLINFitter(Fitter):
    """AdaLIN: ``y = w·(ρ·IN(x) + (1 − ρ)·LN(x)) + b`` is linear in ``(w·ρ, w·(1 − ρ), b)``.

    The unconstrained fit gives ``w = p + q`` and ``ρ = p / (p + q)``; when that ``ρ`` falls
    outside ``[0, 1]`` (where the layer clamps it) it is clipped and ``(w, b)`` re-solved
    exactly for the clipped ``ρ`` from the same sums.

    Example:
        >>> _, basis = AdaLINFitter().basis(AdaLIN(4), torch.randn(2, 4, 3, 3))
        >>> len(basis)
        3
    """

    params = ("weight", "bias", "rho")

    def basis(self, module: nn.Module, x: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
        """Return ``(None, [IN(x), LN(x), 1])`` computed by the module itself."""
        weight, _ = layer_affine(module)
        one, zero = torch.ones_like(weight), torch.zeros_like(weight)
        inst = evaluate_with(module, {"weight": one, "bias": zero, "rho": one}, x)
        layer = evaluate_with(module, {"weight": one, "bias": zero, "rho": zero}, x)
        return None, [inst, layer, None]

    def coefficients(self, module: nn.Module) -> Tensor:
        """``(w·ρ, w·(1 − ρ), b)`` as ``(C, 3)``."""
        weight, bias = layer_affine(module)
        rho = module.rho.detach().clamp(0, 1)
        w = weight.detach()
        return torch.stack([w * rho, w * (1 - rho), bias.detach()], dim=1)

    def assign(self, module: nn.Module, coef: Tensor, gram: Tensor, rhs: Tensor) -> Tensor:
        """Set ``weight``, ``bias`` and ``rho``, re-solving where ``rho`` had to be clipped."""
        weight, bias = layer_affine(module)
        total = coef[:, 0] + coef[:, 1]
        ok = total.abs() > 1e-12
        rho = torch.where(ok, coef[:, 0] / torch.where(ok, total, 1), module.rho.detach().to(coef))
        clipped = (rho < 0) | (rho > 1)
        if bool(clipped.any()):
            rho = rho.clamp(0, 1)
            # y = w·(ρ·I + (1 − ρ)·L) + b: the sums of the 2-term basis follow from the 3-term
            # ones through T = [[ρ, 0], [1 − ρ, 0], [0, 1]].
            t = torch.zeros(coef.shape[0], 3, 2, dtype=gram.dtype, device=gram.device)
            t[:, 0, 0], t[:, 1, 0], t[:, 2, 1] = rho.to(gram), (1 - rho).to(gram), 1
            tt = t.transpose(1, 2)
            sub = solve(tt @ gram @ t, (tt @ rhs.unsqueeze(-1))[..., 0]).to(coef)
            refit = torch.stack([sub[:, 0] * rho, sub[:, 0] * (1 - rho), sub[:, 1]], dim=1)
            coef = torch.where(clipped.unsqueeze(1), refit, coef)
        with torch.no_grad():
            weight.copy_(coef[:, 0] + coef[:, 1])
            bias.copy_(coef[:, 2])
            module.rho.copy_(rho)
        return coef


FAMILY = register_family(
    Family("adalin", AdaLINSpec, AdaLINTarget(), layers=(AdaLIN,), fitter=AdaLINFitter())
)
