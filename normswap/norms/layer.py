"""Layer normalization in its two CNN forms.

* :class:`LayerNorm` is the Group Normalization paper's LN: statistics over ``(C, *S)`` per sample,
  a per-channel affine. It equals ``GroupNorm(1, C)`` and is computed by that fused kernel.
* :class:`LayerNorm2d` is the ConvNeXt "channels" form: statistics over ``C`` only, per sample and
  position, computed by ``F.layer_norm`` after moving the channel dim last.

Both take the channel count first (drop-in for ``BatchNorm(num_features)``).
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
    refuse_input,
    spatial_numel,
    where,
)
from normswap.norms.dispatch import group_norm

__all__ = ["LayerNorm", "LayerNorm2d"]


class LayerNorm(ChannelAffineNorm):
    """LayerNorm over ``(C, *S)`` per sample with a per-channel affine (the GN paper's LN).

    ``y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]`` with mean and (biased) variance
    over all of one sample's channels and positions. Identical to ``GroupNorm(1, C)`` and
    computed by the same fused kernel, ``F.group_norm(x, 1, ...)``; accepts ``(N, C)`` and
    ``(N, C, *S)`` input of any rank and keeps the input's memory format.

    Args:
        num_channels: number of channels ``C``.
        eps: value added to the variance for numerical stability.
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0) of shape ``(C,)``.
        device: factory kwarg for the parameters.
        dtype: factory kwarg for the parameters.
        channels_last: the channel axis is the last dim, ``(N, *S, C)``.

    Example:
        >>> norm = LayerNorm(64)
        >>> norm(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def _norm_forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (channels in dim 1, or last when ``channels_last``).

        Example:
            >>> LayerNorm(4, channels_last=True)(torch.randn(2, 3, 3, 4)).shape
            torch.Size([2, 3, 3, 4])
        """
        if self.channels_last:
            return self._normalize(x.movedim(-1, 1)).movedim(1, -1)
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        """Normalize ``x`` of shape ``(N, C, *S)`` over ``(C, *S)``.

        Args:
            x: activation of shape ``(N, C)`` or ``(N, C, *S)``.

        Returns:
            The normalized activation, same shape and memory format as ``x``.

        Raises:
            NormSwapError: wrong rank or channel count, or a single element per sample.

        Example:
            >>> LayerNorm(4)(torch.randn(3, 4)).shape
            torch.Size([3, 4])
        """
        if not torch.jit.is_scripting():
            self._check(x)
        return group_norm(x, 1, self.weight, self.bias, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (see :meth:`_norm_forward`; the ``*Act`` variants call that one)."""
        return self._norm_forward(x)

    @torch.jit.unused
    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            refuse_input(self, x, self.num_channels, min_dim=2)
        if self.num_channels == 1 and spatial_numel(x) == 1:
            raise NormSwapError(
                f"{where(self)}: LayerNorm sees 1 element per sample for input of shape "
                f"{tuple(x.shape)}, so its output would be the constant bias; it needs more "
                f"than one channel or position"
            )


class LayerNorm2d(ChannelAffineNorm):
    """Channels-only LayerNorm per sample and position (ConvNeXt style), any rank >= 2.

    ``y[n, :, *s] = layer_norm(x[n, :, *s]) * weight + bias``. For ``(N, C)`` input it is plain
    ``F.layer_norm`` over ``C``. For ``(N, C, *S)`` it is ``F.layer_norm`` over the last dim of
    ``x.movedim(1, -1)``, moved back, with the implementation chosen by the input's layout: for
    channels_last input moving C last is a free view, and only the output is copied once (under
    autograd, so that it is not a view; see ``forward``); contiguous 4-d/5-d
    input is first copied to channels_last by the dedicated kernel, and the output is copied
    back. The output is returned in the input's memory format. Why this implementation:
    ``benchmarks/NOTES.md`` ("LayerNorm2d").

    Args:
        num_channels: number of channels ``C``.
        eps: value added to the variance for numerical stability.
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0) of shape ``(C,)``.
        device: factory kwarg for the parameters.
        dtype: factory kwarg for the parameters.
        channels_last: the channel axis is the last dim, ``(N, *S, C)``.

    Example:
        >>> norm = LayerNorm2d(64)
        >>> norm(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def _norm_forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` of shape ``(N, C, *S)`` over ``C`` at every position.

        Args:
            x: activation of shape ``(N, C)`` or ``(N, C, *S)``.

        Returns:
            The normalized activation, same shape and memory format as ``x``.

        Raises:
            NormSwapError: wrong rank or channel count, or ``C == 1``.

        Example:
            >>> LayerNorm2d(4)(torch.randn(2, 4, 5)).shape
            torch.Size([2, 4, 5])
        """
        if self.channels_last:  # nn.LayerNorm over the last dim: the fused op as it is
            if not torch.jit.is_scripting():
                self._check_last(x)
            return F.layer_norm(x, [self.num_channels], self.weight, self.bias, self.eps)
        if torch.jit.is_scripting():
            return self._plain(x)
        else:
            if torch.jit.is_tracing() or torch.compiler.is_compiling():
                return self._plain(x)  # a graph of plain ops, whatever the layout
            return self._eager(x)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (see :meth:`_norm_forward`; the ``*Act`` variants call that one)."""
        return self._norm_forward(x)

    def _plain(self, x: Tensor) -> Tensor:
        """``F.layer_norm`` over the channel dim moved last, and back (one graph for any
        layout: what scripting, tracing and export record)."""
        shape = [self.num_channels]
        if x.dim() == 2:
            return F.layer_norm(x, shape, self.weight, self.bias, self.eps)
        last, back = channels_to_last(x.dim())
        out = F.layer_norm(x.permute(last), shape, self.weight, self.bias, self.eps)
        return out.permute(back)

    @torch.jit.unused
    def _check_last(self, x: Tensor) -> None:
        check_channels(self, x, self.num_channels, channels_last=True)

    @torch.jit.unused
    def _eager(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            refuse_input(self, x, self.num_channels, min_dim=2)
        if self.num_channels == 1:
            raise NormSwapError(
                f"{where(self)}: LayerNorm2d over 1 channel normalizes a single element per "
                f"position (input shape {tuple(x.shape)}), so its output would be the constant "
                f"bias; use LayerNorm (statistics over channels and positions) instead"
            )
        shape = (self.num_channels,)
        return per_position(x, lambda t: F.layer_norm(t, shape, self.weight, self.bias, self.eps))
