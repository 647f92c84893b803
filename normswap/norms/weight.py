"""Weight reparameterizations of conv/linear layers: weight standardization and weight norm.

Both modify a module in place through :mod:`torch.nn.utils.parametrize`, so the module keeps its
class and forward, ``module.weight`` is recomputed from the stored original on access, and the
state dict holds ``parametrizations.weight.original`` (WS) or ``...original0/1`` (WN).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm as _TorchWeightNorm

from normswap.errors import SpecError, UnsupportedModuleError
from normswap.norms.common import memory_format
from normswap.norms.reparam import register_parametrization

__all__ = [
    "Reparam",
    "WeightKind",
    "WeightStandardization",
    "is_weight_parametrized",
    "output_channel_dim",
    "reparam_problem",
    "standardize_weight",
    "weight_norm",
]

#: What :func:`is_weight_parametrized` can look for.
WeightKind = Literal["any", "weight_norm", "weight_standardization"]
_KINDS: tuple[str, ...] = ("any", "weight_norm", "weight_standardization")


class WeightStandardization(nn.Module):
    """Parametrization standardizing a weight per output channel (Qiao et al. 2019; BiT).

    ``w_hat = (w - mean) / sqrt(var + eps)`` with the mean and biased variance of each slice
    along ``dim`` (the output channel: 0 for Conv/Linear, 1 for ConvTranspose), computed by one
    fused batch-norm kernel over the weight viewed as ``(before, C, after)`` in memory order, so
    nothing is copied and the result keeps the weight's memory format (a channels_last conv
    weight stays channels_last). This is timm's ``StdConv2d`` formulation (why:
    ``benchmarks/NOTES.md``, "Weight standardization").

    On ``eps``: the WS paper's code adds 1e-5 to the (unbiased) std, timm's ``StdConv2d`` uses
    1e-6 and its BiT ports 1e-8 on the biased variance, the official BiT PyTorch code 1e-10. The
    default here is 1e-6 on the variance: PyTorch's default conv init gives a per-channel variance
    of ``1 / (3 * fan_in)`` (7e-5 at fan-in 3x3x512), so 1e-5 would already shrink the
    standardized weight's variance by about 12% there, while 1e-6 stays within about 1.5%.

    Register it with ``parametrize.register_parametrization(conv, "weight",
    WeightStandardization())`` or use :func:`standardize_weight`, which also checks the module.

    Args:
        eps: value added to the per-channel variance.
        dim: the output-channel dim of the weight.

    Example:
        >>> conv = nn.Conv2d(8, 16, 3)
        >>> _ = parametrize.register_parametrization(conv, "weight", WeightStandardization())
        >>> conv.weight.mean(dim=(1, 2, 3)).abs().max() < 1e-5
        tensor(True)
    """

    def __init__(self, eps: float = 1e-6, dim: int = 0) -> None:
        super().__init__()
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
            raise SpecError(f"WeightStandardization: eps must be a float >= 0, got {eps!r}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise SpecError(f"WeightStandardization: dim must be an int, got {dim!r}")
        self.eps = float(eps)
        self.dim = dim

    def forward(self, weight: Tensor) -> Tensor:
        """Return the standardized ``weight``.

        Args:
            weight: the original weight, at least 2-d.

        Returns:
            The weight with zero mean and (up to ``eps``) unit variance per slice along ``dim``,
            in the input's memory format.

        Example:
            >>> w = WeightStandardization()(torch.randn(4, 3, 3, 3))
            >>> w.shape
            torch.Size([4, 3, 3, 3])
        """
        rank = weight.dim()
        if torch.compiler.is_compiling():
            # The compiler fuses this composition itself, and the batch-norm path's reshapes
            # become views in the traced backward that fail when the real weight gradient's
            # strides differ from the traced ones (resnet50 under aot_eager).
            dim = self.dim % rank
            reduce = [d for d in range(rank) if d != dim]
            var, mean = torch.var_mean(weight, dim=reduce, keepdim=True, correction=0)
            return (weight - mean) * torch.rsqrt(var + self.eps)
        order = _MEMORY_ORDER.get((rank, memory_format(weight)), tuple(range(rank)))
        # The weight in memory order is a contiguous tensor; seen as (before, C, after) around the
        # output-channel dim, batch norm's statistics are exactly the per-channel ones wanted.
        flat = weight.permute(order)
        at = order.index(self.dim % rank)
        shape = flat.shape
        view = flat.reshape(math.prod(shape[:at]), shape[at], math.prod(shape[at + 1 :]))
        # The op F.batch_norm wraps: the wrapper refuses eps=0 in training, which this class
        # accepts (as the var_mean formula did; a constant channel then gives nan, as there).
        out = torch.batch_norm(
            view, None, None, None, None, True, 0.0, self.eps, torch.backends.cudnn.enabled
        )
        return out.reshape(shape).permute(_inverse(order))

    def extra_repr(self) -> str:
        """Describe the parametrization: eps and dim."""
        return f"eps={self.eps}, dim={self.dim}"


#: Dims of a weight from the outermost to the innermost in memory, per (rank, memory format).
_MEMORY_ORDER: dict[tuple[int, torch.memory_format], tuple[int, ...]] = {
    (4, torch.channels_last): (0, 2, 3, 1),
    (5, torch.channels_last_3d): (0, 2, 3, 4, 1),
}


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``order``."""
    inverse = [0] * len(order)
    for position, d in enumerate(order):
        inverse[d] = position
    return tuple(inverse)


def _name(module: nn.Module) -> str:
    """The module's class name as the user wrote it (not ``ParametrizedConv2d``)."""
    return parametrize.type_before_parametrizations(module).__name__


#: What :func:`reparam_problem` checks a layer for.
Reparam = Literal["weight_norm", "weight_standardization"]
_REPARAMS: tuple[str, ...] = ("weight_norm", "weight_standardization")


def reparam_problem(module: nn.Module, kind: Reparam) -> str | None:
    """Why ``module.weight`` cannot take the reparameterization ``kind`` (``None`` when it can).

    The one rule behind :func:`weight_norm`, :func:`standardize_weight` and the planner of the
    ``wn`` and ``ws_gn`` families: a layer qualifies when it is a Conv/ConvTranspose/Linear
    (subclasses included) with an initialized weight whose output channels are one weight dim
    (not a grouped ConvTranspose), without a parametrization already, and, for weight norm, with
    no all-zero output channel (``g · v / ‖v‖`` is NaN there; not checked on the meta device),
    for standardization, a fan-in above 1 (standardizing one element gives zero).

    Args:
        module: any module.
        kind: ``"weight_norm"`` or ``"weight_standardization"``.

    Returns:
        A sentence naming the problem and its fix, or ``None``.

    Example:
        >>> reparam_problem(nn.Conv2d(4, 8, 3), "weight_norm") is None
        True
        >>> reparam_problem(nn.ConvTranspose2d(4, 8, 3, groups=2), "weight_norm")
        "ConvTranspose2d with groups=2: its weight's dim 1 mixes the output channels of ..."
    """
    if kind not in _REPARAMS:
        raise SpecError(f"unknown reparameterization {kind!r}; valid: {', '.join(_REPARAMS)}")
    name = _name(module)
    if not isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
        return (
            f"{name} is not a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear layer (or subclass), "
            "the layers a weight reparameterization applies to"
        )
    if parametrize.is_parametrized(module, "weight"):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])
        return (
            f"{name}'s weight already has a parametrization ({kinds}); remove it first with "
            "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')"
        )
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return f"{name} has an uninitialized (lazy) weight: run one forward pass first"
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups != 1:
        return (
            f"{name} with groups={module.groups}: its weight's dim 1 mixes the output channels "
            "of different groups, so a per-output-channel reparameterization is not supported"
        )
    dim = output_channel_dim(module)
    if kind == "weight_standardization" and weight.numel() // weight.shape[dim] == 1:
        return (
            f"each output channel of {name} (weight shape {tuple(weight.shape)}) has a fan-in "
            "of 1, so the standardized weight would be all zeros"
        )
    if kind == "weight_norm" and weight.device.type != "meta":
        rows = weight.detach().transpose(0, dim).flatten(1)
        if not bool(rows.abs().amax(dim=1).gt(0).all()):
            return f"{name} has all-zero output channels, where weight norm would give NaN"
    return None


def output_channel_dim(module: nn.Module) -> int:
    """The dim of ``module.weight`` that indexes output channels: 1 for ConvTranspose, else 0.

    Args:
        module: a Conv, ConvTranspose or Linear module (subclasses included).

    Returns:
        ``1`` for ConvTranspose (weight ``(in, out / groups, *k)``), ``0`` otherwise.

    Example:
        >>> output_channel_dim(nn.ConvTranspose2d(4, 8, 3))
        1
    """
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def is_weight_parametrized(module: nn.Module, kind: WeightKind = "any") -> bool:
    """Whether ``module.weight`` carries a parametrization of the given kind.

    Args:
        module: any module.
        kind: ``"weight_norm"`` (torch's ``parametrizations.weight_norm``),
            ``"weight_standardization"`` (:class:`WeightStandardization`) or ``"any"``.

    Returns:
        ``True`` when a matching parametrization is registered on ``module.weight``.

    Raises:
        SpecError: unknown ``kind``.

    Example:
        >>> conv = weight_norm(nn.Conv2d(4, 8, 3))
        >>> is_weight_parametrized(conv, "weight_norm"), is_weight_parametrized(conv, "any")
        (True, True)
    """
    if kind not in _KINDS:
        raise SpecError(f"unknown parametrization kind {kind!r}; valid kinds: {', '.join(_KINDS)}")
    if not parametrize.is_parametrized(module, "weight"):
        return False
    if kind == "any":
        return True
    wanted = _TorchWeightNorm if kind == "weight_norm" else WeightStandardization
    return any(isinstance(p, wanted) for p in module.parametrizations["weight"])


def _refuse(module: nn.Module, kind: Reparam) -> None:
    problem = reparam_problem(module, kind)
    if problem is not None:
        action = "weight-normalize" if kind == "weight_norm" else "standardize the weight of"
        raise UnsupportedModuleError(f"cannot {action} {_name(module)}: {problem}")


def standardize_weight(module: nn.Module, eps: float = 1e-6) -> nn.Module:
    """Apply :class:`WeightStandardization` to ``module.weight`` in place.

    Refuses what :func:`reparam_problem` refuses, e.g. a weight that already has a
    parametrization (WS applied twice, or WS on top of weight norm) and a layer whose output
    channels have a fan-in of 1 (``Linear(1, n)``, a 1x1 depthwise conv).

    Args:
        module: a Conv/ConvTranspose/Linear module (subclasses included).
        eps: value added to the per-channel variance (see :class:`WeightStandardization`).

    Returns:
        ``module`` itself, now parametrized.

    Raises:
        UnsupportedModuleError: the problem :func:`reparam_problem` names.

    Example:
        >>> conv = standardize_weight(nn.Conv2d(8, 16, 3))
        >>> is_weight_parametrized(conv, "weight_standardization")
        True
    """
    _refuse(module, "weight_standardization")
    dim = output_channel_dim(module)
    register_parametrization(module, "weight", WeightStandardization(eps, dim=dim))
    return module


def weight_norm(module: nn.Module) -> nn.Module:
    """Apply torch's weight norm (``w = g * v / ||v||`` per output channel) in place.

    Registers the parametrization of :func:`torch.nn.utils.parametrizations.weight_norm` (same
    values, state-dict keys and legacy-key hook), with ``dim=0`` for Conv/Linear and ``dim=1`` for
    ConvTranspose, except that the recomputed weight keeps the memory format of the stored ``v``
    (a channels_last conv gets a channels_last weight, computed without copies; see
    ``_WeightNorm``). Right after applying it the module computes the same output.
    The state dict then holds ``parametrizations.weight.original0`` (``g``) and ``original1``
    (``v``).

    Args:
        module: a Conv/ConvTranspose/Linear module (subclasses included).

    Returns:
        ``module`` itself, now parametrized.

    Raises:
        UnsupportedModuleError: the problem :func:`reparam_problem` names.

    Example:
        >>> conv = weight_norm(nn.Conv2d(4, 8, 3))
        >>> sorted(k for k in conv.state_dict() if "original" in k)
        ['parametrizations.weight.original0', 'parametrizations.weight.original1']
    """
    _refuse(module, "weight_norm")
    dim = output_channel_dim(module)
    register_parametrization(module, "weight", _WeightNorm(dim), unsafe=True)
    module._register_load_state_dict_pre_hook(_legacy_weight_norm_keys)
    return module


class _WeightNorm(_TorchWeightNorm):
    """torch's weight-norm parametrization, computed in the memory format of the stored ``v``.

    ``torch._weight_norm`` copies a channels_last ``v`` to contiguous and returns a contiguous
    weight, so after ``model.to(memory_format=torch.channels_last)`` every step would pay
    weight-sized copies and feed the conv a weight in the other layout. For a channels_last(_3d)
    ``v`` the same kernel runs on the permuted view that moves the input-channel dim last, which
    is contiguous, and the result is permuted back: no copy, a channels_last weight. A contiguous
    ``v`` takes torch's path unchanged (bitwise the same weight); for a channels_last ``v`` the
    per-channel norm is summed in memory order, so the weight can differ from torch's in the
    last bit. Measurements: ``benchmarks/NOTES.md``.

    It subclasses torch's class and keeps its name, so ``isinstance`` checks, ``right_inverse``,
    :func:`torch.nn.utils.parametrize.remove_parametrizations` and reprs behave as with
    :func:`torch.nn.utils.parametrizations.weight_norm`.
    """

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        """Return ``g * v / ||v||`` (norm per slice along ``dim``) in ``v``'s memory format."""
        if (
            self.dim == -1
            or weight_v.is_contiguous()
            or memory_format(weight_v) is torch.contiguous_format
        ):
            return torch._weight_norm(weight_v, weight_g, self.dim)
        rank = weight_v.dim()
        to_last = (0, *range(2, rank), 1)  # a contiguous view of a channels_last tensor
        back = (0, rank - 1, *range(1, rank - 1))
        dim = to_last.index(self.dim % rank)
        out = torch._weight_norm(weight_v.permute(to_last), weight_g.permute(to_last), dim)
        return out.permute(back)


def _legacy_weight_norm_keys(
    state_dict: dict[str, Tensor], prefix: str, *args: object, **kwargs: object
) -> None:
    """Accept the keys of the old ``torch.nn.utils.weight_norm`` (``weight_g``/``weight_v``),
    as torch's parametrization does."""
    g_key, v_key = f"{prefix}weight_g", f"{prefix}weight_v"
    if g_key in state_dict and v_key in state_dict:
        state_dict[f"{prefix}parametrizations.weight.original0"] = state_dict.pop(g_key)
        state_dict[f"{prefix}parametrizations.weight.original1"] = state_dict.pop(v_key)
