"""Root-mean-square normalization over the channels at each position (RMSNorm).

Eager float32/float64 CPU input is differentiated by :class:`_RMSNormFunction` (PyTorch has no
CPU kernel for ``rms_norm``'s backward); why: ``benchmarks/NOTES.md`` ("DyT, Derf and RMSNorm").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normswap.errors import NormSwapError
from normswap.norms.common import (
    ChannelAffineNorm,
    channels_to_last,
    check_channels,
    per_position,
    where,
)
from normswap.norms.dispatch import eager_cpu_kernel

__all__ = ["RMSNorm"]


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dim in few passes, differentiated by LayerNorm's fused backward.

    Forward: ``rstd = 1 / sqrt(‖x‖² / C + eps)`` (one ``vector_norm`` pass, no temporary), then
    ``x · rstd`` and the weight in place on the one fresh output (CPU ``rms_norm`` is a composite
    of ``pow``, ``mean`` and three products). On CPU, autograd differentiates that composite
    (a dozen passes). Given a zero mean, ``native_layer_norm_backward`` computes
    ``rstd · (g·w − x̂ · mean(g·w·x̂)) − rstd · mean(g·w)`` (``x̂ = x · rstd``) and the weight's
    gradient ``Σ g · x̂`` in one kernel; RMSNorm's gradient lacks the last term (the mean's
    share), which is added back with one matrix-vector product and one in-place add. Under grad
    mode (double backward, ``torch.func``) the backward is the plain differentiable formula;
    ``jvp`` serves forward-mode AD.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        rstd = norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        out = x * rstd
        return (out if weight is None else out.mul_(weight)), rstd

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        x, weight, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero-filled gradient for rstd
        ctx.save_for_backward(x, weight, output[1])
        ctx.save_for_forward(x, weight, output[1])
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_rstd: Tensor | None) -> tuple:
        if grad is None:  # not materialized: the output had no gradient
            return None, None, None
        x, weight, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_RMSNormFunction.plain_backward(grad, x, weight, ctx.eps), None)
        need_x, need_weight, _ = ctx.needs_input_grad
        channels = x.shape[-1]
        mask = [need_x, need_weight, False]
        zero_mean = torch.zeros_like(rstd)
        grad_x, grad_weight, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x, [channels], zero_mean, rstd, weight, None, mask
        )
        if need_x:  # add back rstd · mean(g·w), LayerNorm's mean's share (a per-row scalar)
            row = grad @ weight if weight is not None else grad.sum(-1)
            grad_x.add_(row.unsqueeze(-1).mul_(rstd).div_(channels))
        return grad_x, grad_weight, None

    @staticmethod
    def plain_backward(
        grad: Tensor, x: Tensor, weight: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor | None]:
        """Gradients for x and the weight by out-of-place ops (differentiable by autograd)."""
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normed = x * rstd
        g_w = grad if weight is None else grad * weight
        grad_x = rstd * (g_w - normed * (g_w * normed).mean(-1, keepdim=True))
        dims = list(range(x.dim() - 1))
        return grad_x, None if weight is None else torch.sum(grad * normed, dims)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, _deps: None) -> tuple:
        x, weight, rstd = ctx.saved_tensors
        normed = x * rstd
        out = torch.zeros_like(x)
        if dx is not None:
            dnormed = rstd * (dx - normed * (normed * dx).mean(-1, keepdim=True))
            out = out + (dnormed if weight is None else dnormed * weight)
        if dweight is not None:
            out = out + normed * dweight
        return out, None


class RMSNorm(ChannelAffineNorm):
    """RMSNorm over the channels at each position: ``y = x / sqrt(mean_c(x²) + eps) · γ (+ β)``.

    Zhang & Sennrich (2019); what LLaMA-style transformers normalize with. Unlike LayerNorm it
    subtracts no mean. The channel axis is the last dim (``channels_last=True``, a transformer's
    tokens: exactly :class:`torch.nn.RMSNorm`, which :func:`normswap.finalize` turns it into) or
    dim 1 (the default, timm's ``RmsNorm2d``, standing where a CNN's BatchNorm stood). Computed
    by ``F.rms_norm`` (large eager float32/float64 CPU input: by :class:`_RMSNormFunction`, whose
    backward is one fused kernel); channels-first input is moved channels-last the cheapest way
    for its layout and back. ``bias=True`` adds a per-channel β (an exact LayerNorm → RMSNorm
    conversion keeps a LayerNorm's β here when no following linear layer can take it).

    Args:
        num_channels: number of channels ``C``.
        eps: value added to the mean square.
        affine: learn a per-channel ``weight`` (init 1).
        bias: also learn a per-channel ``bias`` (init 0); needs ``affine``.
        device: factory kwarg for the parameters.
        dtype: factory kwarg for the parameters.
        channels_last: the channel axis is the last dim, ``(N, *S, C)``.

    Example:
        >>> norm = RMSNorm(64)
        >>> norm(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        >>> x = torch.randn(2, 5, 16)
        >>> torch.allclose(RMSNorm(16, channels_last=True)(x), nn.RMSNorm(16, eps=1e-6)(x))
        True
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        affine: bool = True,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            num_channels,
            eps=eps,
            affine=affine,
            device=device,
            dtype=dtype,
            channels_last=channels_last,
        )
        if not bias:
            self.register_parameter("bias", None)

    def _norm_forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (channels in dim 1, or last when ``channels_last``).

        Args:
            x: activation of shape ``(N, C, *S)`` (``(N, *S, C)`` when ``channels_last``).

        Returns:
            The normalized activation, same shape and memory format as ``x``.

        Raises:
            NormSwapError: wrong rank or channel count, or ``C == 1``.

        Example:
            >>> RMSNorm(4)(torch.randn(2, 4, 5)).shape
            torch.Size([2, 4, 5])
        """
        if self.channels_last or x.dim() == 2:
            if torch.jit.is_scripting():
                return self._rms(x)
            else:
                self._check(x)
                return self._rms_eager(x)
        if torch.jit.is_scripting():
            return self._plain(x)
        else:
            if torch.jit.is_tracing() or torch.compiler.is_compiling():
                return self._plain(x)  # a graph of plain ops, whatever the layout
            self._check(x)
            return per_position(x, self._rms_eager)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (see :meth:`_norm_forward`; the ``*Act`` variants call that one)."""
        return self._norm_forward(x)

    def _rms(self, x: Tensor) -> Tensor:
        """``F.rms_norm`` over the last dim (plus the bias)."""
        out = F.rms_norm(x, [self.num_channels], self.weight, self.eps)
        bias = self.bias
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out

    @torch.jit.unused
    def _rms_eager(self, x: Tensor) -> Tensor:
        """:meth:`_rms`, differentiated by :class:`_RMSNormFunction` where that applies."""
        weight = () if self.weight is None else (self.weight,)
        if not eager_cpu_kernel("rms", x, *weight):
            return self._rms(x)
        out = _RMSNormFunction.apply(x, self.weight, self.eps)[0]
        bias = self.bias
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out

    def _plain(self, x: Tensor) -> Tensor:
        last, back = channels_to_last(x.dim())
        return self._rms(x.permute(last)).permute(back)

    @torch.jit.unused
    def _check(self, x: Tensor) -> None:
        check_channels(self, x, self.num_channels, self.channels_last)
        if self.num_channels == 1:
            raise NormSwapError(
                f"{where(self)}: RMSNorm over 1 channel maps every value to its sign times γ "
                f"(input shape {tuple(x.shape)}); it needs more than one channel"
            )

    def extra_repr(self) -> str:
        """Describe the layer: channels, eps, affine, bias and layout."""
        return super().extra_repr() + (", bias=True" if self.bias is not None else "")
