"""A frozen per-channel affine: what an eval-mode BatchNorm computes, as two tensors; and a
LayerNorm whose statistics are fixed (its mean subtracted per position, its scale fixed)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normswap.errors import SpecError
from normswap.norms.common import check_channels, is_positive_int

__all__ = ["FrozenAffine"]


class FrozenAffine(nn.Module):
    """``y = weight[c] · x + bias[c]``: a BatchNorm with its eval statistics folded in.

    An eval-mode BatchNorm is the per-channel affine map ``γ · (x − μ) / sqrt(σ² + ε) + β``; this
    layer holds it as ``weight = γ / sqrt(σ² + ε)`` and ``bias = β − μ · weight`` (what detectron2
    calls FrozenBatchNorm, without keeping the statistics apart). It does not depend on the batch,
    computes the same in train and eval mode, and is exact for a pretrained model. ``weight`` and
    ``bias`` are Parameters, frozen (``requires_grad=False``) unless made trainable. Any input
    rank >= 2 with channels in dim 1 (or last, ``channels_last=True``); the output keeps the
    input's memory format.

    ``center=True`` subtracts each position's mean over the channels first: a LayerNorm whose
    division by each token's standard deviation is replaced by a fixed scale, ``weight · (x −
    mean_c(x)) + bias`` — linear in ``x`` (the "LN-free" transformer of Heimersheim, 2024).

    Args:
        num_channels: number of channels ``C``.
        device: factory kwarg for the parameters.
        dtype: factory kwarg for the parameters.
        requires_grad: whether ``weight`` and ``bias`` train.
        center: subtract each position's mean over the channels (a frozen LayerNorm).
        channels_last: the channel axis is the last dim, ``(N, *S, C)``.

    Example:
        >>> bn = nn.BatchNorm2d(4).eval()
        >>> frozen = FrozenAffine.from_statistics(bn.running_mean, bn.running_var, bn.eps,
        ...                                       bn.weight, bn.bias)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(frozen(x), bn(x), atol=1e-6)
        True
    """

    #: Module path set by the surgery so that forward-time errors can name the layer.
    normswap_path = ""  # str; not annotated: TorchScript reads class annotations

    def __init__(
        self,
        num_channels: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        requires_grad: bool = False,
        *,
        center: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not is_positive_int(num_channels):
            raise SpecError(
                f"FrozenAffine: num_channels must be a positive int, got {num_channels!r}"
            )
        self.num_channels = num_channels
        self.center = bool(center)
        self.channels_last = bool(channels_last)
        #: Input ranks the BatchNorm it stands for accepted (``(4,)`` for BatchNorm2d), when
        #: known: :func:`normswap.finalize` picks the plain BatchNormNd from it.
        self.input_ranks: tuple[int, ...] | None = None
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_channels, **factory), requires_grad)
        self.bias = nn.Parameter(torch.zeros(num_channels, **factory), requires_grad)

    @classmethod
    def from_statistics(
        cls,
        mean: Tensor,
        var: Tensor,
        eps: float,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        *,
        requires_grad: bool = False,
    ) -> FrozenAffine:
        """The affine an eval-mode BatchNorm with these statistics and ``γ``/``β`` computes.

        The arithmetic is float64, cast back to ``mean``'s dtype (float32 on MPS).

        Example:
            >>> f = FrozenAffine.from_statistics(torch.ones(2), torch.full((2,), 4.0), 0.0)
            >>> f.weight.tolist(), f.bias.tolist()
            ([0.5, 0.5], [-0.5, -0.5])
        """
        dtype, device = mean.dtype, mean.device
        calc = torch.float32 if device.type == "mps" else torch.float64
        layer = cls(mean.shape[0], device=device, dtype=dtype, requires_grad=requires_grad)
        if device.type == "meta":
            return layer
        with torch.no_grad():
            scale = torch.rsqrt(var.detach().to(calc) + eps)
            if weight is not None:
                scale = scale * weight.detach().to(calc)
            shift = -mean.detach().to(calc) * scale
            if bias is not None:
                shift = shift + bias.detach().to(calc)
            layer.weight.copy_(scale)
            layer.bias.copy_(shift)
        return layer

    def _norm_forward(self, x: Tensor) -> Tensor:
        """Return ``weight[c] · x + bias[c]`` for ``x`` of shape ``(N, C, *S)``.

        Example:
            >>> FrozenAffine(3)(torch.randn(2, 3)).shape
            torch.Size([2, 3])
        """
        if not torch.jit.is_scripting():
            self._check(x)
        dim = x.dim() - 1 if self.channels_last else 1
        if self.center:
            x = x - x.mean(dim, keepdim=True)
        view = [-1] + [1] * (x.dim() - 1 - dim)
        weight, bias = self.weight.view(view), self.bias.view(view)
        if weight.dtype != x.dtype:  # autocast: follow the activation's dtype, as BN's output does
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        return torch.addcmul(bias, x, weight)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (see :meth:`_norm_forward`; the ``*Act`` variants call that one)."""
        return self._norm_forward(x)

    @torch.jit.unused
    def _check(self, x: Tensor) -> None:
        check_channels(self, x, self.num_channels, self.channels_last)

    def extra_repr(self) -> str:
        """Describe the layer: channels, whether it trains, centring and layout."""
        extra = (", center=True" if self.center else "") + (
            ", channels_last=True" if self.channels_last else ""
        )
        return f"{self.num_channels}, requires_grad={self.weight.requires_grad}{extra}"
