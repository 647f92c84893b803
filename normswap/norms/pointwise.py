"""Point-wise replacements for normalization: Dynamic Tanh (DyT) and Dynamic erf (Derf).

Neither computes statistics: each applies one learnable S-shaped function to every element,
then a per-channel affine. DyT (Zhu, Chen, He, LeCun, Liu, CVPR 2025): ``γ · tanh(α·x) + β``
with a scalar α (0.5 at init by default). Derf ("Stronger Normalization-Free Transformers",
Chen et al., 2025): ``γ · erf(α·x + s) + β`` with scalars α and s. Both work on any layout: the
channel axis is dim 1 (a CNN's map) or the last dim (``channels_last=True``, tokens).

Scripted, traced, compiled and exported, each forward is one expression of native element-wise
ops (``torch.compile`` fuses it into one kernel). Eager float32/float64 CPU input goes through
an autograd function of fewer passes over memory instead
(:func:`normswap.norms.dispatch.eager_cpu_kernel`); why:
``benchmarks/NOTES.md`` ("DyT, Derf and RMSNorm").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normswap.errors import SpecError
from normswap.norms.common import check_channels, is_positive_int
from normswap.norms.dispatch import eager_cpu_kernel

__all__ = ["Derf", "DyT", "PointwiseNorm"]

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_LOG2_E = math.log2(math.e)


def _along(t: Tensor, dim: int, rank: int) -> Tensor:
    """A per-channel ``(C,)`` tensor viewed to broadcast along ``dim`` of a rank-``rank`` input."""
    return t.view([-1] + [1] * (rank - 1 - dim))


def _others(dim: int, rank: int) -> list[int]:
    """Every dim but ``dim``: what a per-channel gradient sums over."""
    return [d for d in range(rank) if d != dim]


def _scale_shift(y: Tensor, weight: Tensor, bias: Tensor, dim: int) -> Tensor:
    """``weight · y + bias`` with per-channel ``(C,)`` tensors along ``dim``: one ``addcmul``
    when the channels are ``y``'s innermost dim in memory, else a product and an in-place add
    (CPU ``addcmul`` does not vectorize operands constant along the innermost dim)."""
    rank = y.dim()
    weight, bias = _along(weight, dim, rank), _along(bias, dim, rank)
    if y.stride(dim) == 1:
        return torch.addcmul(bias, y, weight)
    return torch.mul(y, weight).add_(bias)


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b)``: one ``dot`` over both in memory order when they are dense with the same
    strides (contiguous or channels_last alike, no temporary), else a product and a sum."""
    if a.stride() == b.stride():
        order = sorted(range(a.dim()), key=a.stride, reverse=True)
        a_mem, b_mem = a.permute(order), b.permute(order)
        if a_mem.is_contiguous() and b_mem.is_contiguous():
            return torch.dot(a_mem.view(-1), b_mem.view(-1))
    return torch.sum(a * b)


class _DyTFunction(torch.autograd.Function):
    """``weight · tanh(alpha · x) + bias`` along channel dim ``dim``, in few passes (eager CPU).

    Forward: ``y = tanh(αx) = 2·sigmoid(2αx) − 1`` computed in place on one fresh tensor (the CPU
    sigmoid kernel is several times faster than tanh's), then the affine. Backward from
    ``y``, in place on one fresh tensor ``t = g · y`` (``g_weight = Σ t``), which becomes
    ``g · (1 − y²) · weight`` (``g_α = Σ t · x``, one ``dot``), then ``g_x = α · t``. Under grad
    mode (double backward, ``torch.func``) the backward is the plain differentiable formula
    (:meth:`plain_backward`); ``jvp`` serves forward-mode AD.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor, dim: int
    ) -> tuple[Tensor, Tensor]:
        y = x * (2 * alpha)
        y.sigmoid_().mul_(2).sub_(1)
        return _scale_shift(y, weight, bias, dim), y

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        x, alpha, weight, _, dim = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero-filled gradient for y
        ctx.save_for_backward(x, output[1], alpha, weight)
        ctx.save_for_forward(x, output[1], alpha, weight)
        ctx.dim = dim

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_y: Tensor | None) -> tuple:
        if grad is None:  # not materialized: the output had no gradient
            return None, None, None, None, None
        x, y, alpha, weight = ctx.saved_tensors
        dim, rank = ctx.dim, x.dim()
        if torch.is_grad_enabled():
            return (*_DyTFunction.plain_backward(grad, x, alpha, weight, dim), None)
        need_x, need_alpha, need_weight, need_bias, _ = ctx.needs_input_grad
        dims = _others(dim, rank)
        t = grad * y  # the one fresh tensor: grad may be batched by vmap, so it comes first
        grad_weight = t.sum(dims) if need_weight else None
        grad_bias = grad.sum(dims) if need_bias else None
        grad_x = grad_alpha = None
        if need_x or need_alpha:
            t.mul_(y).sub_(grad).mul_(_along(-weight, dim, rank))  # g · (1 − y²) · weight
            grad_alpha = _flat_dot(t, x).view(1) if need_alpha else None
            grad_x = t.mul_(alpha) if need_x else None
        return grad_x, grad_alpha, grad_weight, grad_bias, None

    @staticmethod
    def plain_backward(
        grad: Tensor, x: Tensor, alpha: Tensor, weight: Tensor, dim: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gradients for x, α, weight and bias by out-of-place ops from the saved input (so that
        autograd can differentiate them)."""
        rank = x.dim()
        y = torch.tanh(x * alpha)
        g_z = torch.ops.aten.tanh_backward(grad, y) * _along(weight, dim, rank)
        dims = _others(dim, rank)
        grad_alpha = torch.sum(g_z * x).view(1)
        return g_z * alpha, grad_alpha, torch.sum(grad * y, dims), torch.sum(grad, dims)

    @staticmethod
    def jvp(ctx, dx, dalpha, dweight, dbias, _ddim) -> tuple:
        x, y, alpha, weight = ctx.saved_tensors
        dim, rank = ctx.dim, x.dim()
        dz = torch.zeros_like(x)
        if dx is not None:
            dz = dz + alpha * dx
        if dalpha is not None:
            dz = dz + dalpha * x
        out = torch.ops.aten.tanh_backward(dz, y) * _along(weight, dim, rank)
        if dweight is not None:
            out = out + _along(dweight, dim, rank) * y
        if dbias is not None:
            out = out + _along(dbias, dim, rank)
        return out, None


class _DerfFunction(torch.autograd.Function):
    """``weight · erf(alpha · x + shift) + bias`` along channel dim ``dim``, in few passes
    (eager CPU).

    Forward: ``z = αx + s``, ``e = erf(z)``, the affine; ``z`` and ``e`` are kept. Backward in
    place on one fresh tensor ``t = g · e`` (``g_weight = Σ t``), which becomes
    ``g · weight · 2/√π · exp(−z²)`` (``g_s = Σ t``, ``g_α = Σ t · x``), then ``g_x = α · t``.
    Differentiable under grad mode and with a ``jvp``, as :class:`_DyTFunction`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor, bias: Tensor, dim: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        z = torch.mul(x, alpha).add_(shift)  # addcmul is slow with (1,) operands
        e = torch.erf(z)
        return _scale_shift(e, weight, bias, dim), z, e

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        x, alpha, shift, weight, _, dim = inputs
        _, z, e = output
        ctx.mark_non_differentiable(z, e)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for z and e
        ctx.save_for_backward(x, z, e, alpha, shift, weight)
        ctx.save_for_forward(x, z, e, alpha, weight)
        ctx.dim = dim

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_z: Tensor | None, _grad_e: Tensor | None) -> tuple:
        if grad is None:  # not materialized: the output had no gradient
            return None, None, None, None, None, None
        x, z, e, alpha, shift, weight = ctx.saved_tensors
        dim, rank = ctx.dim, x.dim()
        if torch.is_grad_enabled():
            return (*_DerfFunction.plain_backward(grad, x, alpha, shift, weight, dim), None)
        need_x, need_alpha, need_shift, need_weight, need_bias, _ = ctx.needs_input_grad
        dims = _others(dim, rank)
        t = grad * e  # the one fresh tensor: grad may be batched by vmap, so it comes first
        grad_weight = t.sum(dims) if need_weight else None
        grad_bias = grad.sum(dims) if need_bias else None
        grad_x = grad_alpha = grad_shift = None
        if need_x or need_alpha or need_shift:
            t.copy_(z).mul_(z).mul_(-_LOG2_E).exp2_()  # exp(−z²), by the faster exp2 kernel
            t.mul_(grad).mul_(_along(weight * _TWO_OVER_SQRT_PI, dim, rank))
            grad_shift = t.sum().view(1) if need_shift else None
            grad_alpha = _flat_dot(t, x).view(1) if need_alpha else None
            grad_x = t.mul_(alpha) if need_x else None
        return grad_x, grad_alpha, grad_shift, grad_weight, grad_bias, None

    @staticmethod
    def plain_backward(
        grad: Tensor, x: Tensor, alpha: Tensor, shift: Tensor, weight: Tensor, dim: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Gradients for x, α, s, weight and bias by out-of-place ops from the saved input (so
        that autograd can differentiate them)."""
        rank = x.dim()
        z = torch.addcmul(shift, x, alpha)
        g_z = grad * torch.exp(-z * z) * _along(weight * _TWO_OVER_SQRT_PI, dim, rank)
        dims = _others(dim, rank)
        grad_alpha, grad_shift = torch.sum(g_z * x).view(1), g_z.sum().view(1)
        grad_weight = torch.sum(grad * torch.erf(z), dims)
        return g_z * alpha, grad_alpha, grad_shift, grad_weight, torch.sum(grad, dims)

    @staticmethod
    def jvp(ctx, dx, dalpha, dshift, dweight, dbias, _ddim) -> tuple:
        x, z, e, alpha, weight = ctx.saved_tensors
        dim, rank = ctx.dim, x.dim()
        dz = torch.zeros_like(x)
        if dx is not None:
            dz = dz + alpha * dx
        if dalpha is not None:
            dz = dz + dalpha * x
        if dshift is not None:
            dz = dz + dshift
        out = dz * torch.exp(-z * z) * _along(weight * _TWO_OVER_SQRT_PI, dim, rank)
        if dweight is not None:
            out = out + _along(dweight, dim, rank) * e
        if dbias is not None:
            out = out + _along(dbias, dim, rank)
        return out, None, None


class PointwiseNorm(nn.Module):
    """Base of DyT and Derf: ``γ · f(x) + β`` per channel, with the channel count first.

    Holds ``num_channels``, ``affine``, ``weight`` and ``bias`` (``None`` when not affine)
    with BatchNorm's names, so a converter can move a norm's γ/β across, and ``channels_last``.

    Example:
        >>> DyT(4).weight.shape, DyT(4, channels_last=True).channels_last
        (torch.Size([4]), True)
    """

    #: Module path set by the surgery so that forward-time errors can name the layer.
    normswap_path = ""  # str; not annotated: TorchScript reads class annotations

    def __init__(
        self,
        num_channels: int,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not is_positive_int(num_channels):
            raise SpecError(
                f"{type(self).__name__}: num_channels must be a positive int, got {num_channels!r}"
            )
        self.num_channels = num_channels
        self.affine = bool(affine)
        self.channels_last = bool(channels_last)
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _affine(self, y: Tensor) -> Tensor:
        """``weight · y + bias`` along the channel axis (see :func:`_scale_shift`)."""
        weight, bias = self.weight, self.bias
        if weight is None or bias is None:
            return y
        dim = y.dim() - 1 if self.channels_last else 1
        return _scale_shift(y, weight.to(y.dtype), bias.to(y.dtype), dim)

    @torch.jit.unused
    def _check(self, x: Tensor) -> None:
        check_channels(self, x, self.num_channels, self.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the point-wise function and the affine (see :meth:`_norm_forward`)."""
        return self._norm_forward(x)

    def _channel_dim(self, x: Tensor) -> int:
        return x.dim() - 1 if self.channels_last else 1

    def _norm_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        """Describe the layer: channels, affine and layout."""
        last = ", channels_last=True" if self.channels_last else ""
        return f"{self.num_channels}, affine={self.affine}{last}"


def _check_alpha(cls: str, value: object, name: str = "alpha_init") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{cls}: {name} must be a finite number, got {value!r}")
    return float(value)


class DyT(PointwiseNorm):
    """Dynamic Tanh: ``y = γ · tanh(α·x) + β`` with a learnable scalar α (Zhu et al., 2025).

    A drop-in for a norm layer in a transformer (the paper: ViT-B 82.3 → 82.5, ConvNeXt-B 83.7
    → 83.7 ImageNet top-1); its authors find it does not replace BatchNorm without loss. α
    sets which inputs tanh keeps near-linear: ``|α·x| > 2`` saturates (``NormMonitor`` reports
    that fraction, the failure seen at scale).

    Args:
        num_channels: number of channels ``C``.
        alpha_init: the initial α (0.5 in the paper's ViTs; their LLaMA recipe uses 0.2-0.8).
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0).
        device: factory kwarg for the parameters.
        dtype: factory kwarg for the parameters.
        channels_last: the channel axis is the last dim, ``(N, *S, C)``.

    Example:
        >>> dyt = DyT(8, alpha_init=0.5)
        >>> x = torch.randn(2, 8, 4, 4)
        >>> torch.allclose(dyt(x), torch.tanh(0.5 * x))
        True
    """

    def __init__(
        self,
        num_channels: int,
        alpha_init: float = 0.5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channels_last: bool = False,
    ) -> None:
        super().__init__(num_channels, affine, device, dtype, channels_last=channels_last)
        alpha = _check_alpha("DyT", alpha_init)
        self.alpha = nn.Parameter(torch.full((1,), alpha, device=device, dtype=dtype))

    def _norm_forward(self, x: Tensor) -> Tensor:
        """``γ · tanh(α·x) + β``.

        Example:
            >>> DyT(4, channels_last=True)(torch.randn(2, 3, 4)).shape
            torch.Size([2, 3, 4])
        """
        if torch.jit.is_scripting():
            return self._affine(torch.tanh(x * self.alpha.to(x.dtype)))
        else:
            self._check(x)
            weight, bias = self.weight, self.bias
            if weight is None or bias is None:
                y = torch.tanh(x * self.alpha.to(x.dtype))
                # autograd saved tanh's output: an in-place op after this layer (a ReLU) must
                # get a tensor of its own
                return y.clone() if y.requires_grad else y
            if eager_cpu_kernel("pointwise", x, self.alpha, weight, bias):
                return _DyTFunction.apply(x, self.alpha, weight, bias, self._channel_dim(x))[0]
            return self._affine(torch.tanh(x * self.alpha.to(x.dtype)))

    def extra_repr(self) -> str:
        """Describe the layer: channels, α, affine and layout."""
        return f"{super().extra_repr()}, alpha={float(self.alpha.detach().float()[0]):.4g}"


class Derf(PointwiseNorm):
    """Dynamic erf: ``y = γ · erf(α·x + s) + β`` with learnable scalars α and s (Chen et al.,
    "Stronger Normalization-Free Transformers", 2025: ViT top-1 LN 82.3, DyT 82.5, Derf 82.8).

    Args:
        num_channels: number of channels ``C``.
        alpha_init: the initial α (0.5, as DyT's default; the paper sets it per model).
        shift_init: the initial s (0: zero-centred).
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0).
        device: factory kwarg for the parameters.
        dtype: factory kwarg for the parameters.
        channels_last: the channel axis is the last dim, ``(N, *S, C)``.

    Example:
        >>> derf = Derf(8)
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(derf(x), torch.erf(0.5 * x))
        True
    """

    def __init__(
        self,
        num_channels: int,
        alpha_init: float = 0.5,
        shift_init: float = 0.0,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channels_last: bool = False,
    ) -> None:
        super().__init__(num_channels, affine, device, dtype, channels_last=channels_last)
        alpha = _check_alpha("Derf", alpha_init)
        shift = _check_alpha("Derf", shift_init, "shift_init")
        self.alpha = nn.Parameter(torch.full((1,), alpha, device=device, dtype=dtype))
        self.shift = nn.Parameter(torch.full((1,), shift, device=device, dtype=dtype))

    def _norm_forward(self, x: Tensor) -> Tensor:
        """``γ · erf(α·x + s) + β``.

        Example:
            >>> Derf(4)(torch.randn(2, 4, 3)).shape
            torch.Size([2, 4, 3])
        """
        if not torch.jit.is_scripting():
            self._check(x)
            weight, bias = self.weight, self.bias
            if (
                weight is not None
                and bias is not None
                and eager_cpu_kernel("pointwise", x, self.alpha, self.shift, weight, bias)
            ):
                dim = self._channel_dim(x)
                return _DerfFunction.apply(x, self.alpha, self.shift, weight, bias, dim)[0]
        inner = torch.mul(x, self.alpha.to(x.dtype)).add_(self.shift.to(x.dtype))
        return self._affine(torch.erf(inner))

    def extra_repr(self) -> str:
        """Describe the layer: channels, α, s, affine and layout."""
        alpha = float(self.alpha.detach().float()[0])
        shift = float(self.shift.detach().float()[0])
        return f"{super().extra_repr()}, alpha={alpha:.4g}, shift={shift:.4g}"
