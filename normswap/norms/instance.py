"""Instance normalization with the channel count first and optional running statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normswap.errors import NormSwapError, SpecError
from normswap.norms.common import (
    ChannelAffineNorm,
    keep_memory_format,
    memory_format,
    refuse_input,
    spatial_numel,
    where,
)
from normswap.norms.dispatch import group_norm

__all__ = ["InstanceNorm"]


class InstanceNorm(ChannelAffineNorm):
    """InstanceNorm over the spatial dims ``S`` per sample and channel, any spatial rank >= 1.

    Without running statistics this is ``GroupNorm(C, C)`` and runs that fused kernel
    (``F.group_norm(x, C, ...)``), which, unlike :class:`torch.nn.InstanceNorm2d`, neither copies
    channels_last input to contiguous nor needs a rank-specific class. With
    ``track_running_stats=True`` it behaves like BatchNorm: training uses instance statistics and
    updates ``running_mean``/``running_var`` (``momentum=None`` means a cumulative average, as in
    BatchNorm, counted by ``num_batches_tracked``); eval uses the running statistics. The buffer
    names are BatchNorm's, so state dicts look familiar.

    Inputs without spatial dims, ``(N, C)``, are refused, and so are inputs with one spatial
    element whenever instance statistics are used: the output would be the constant bias.

    Args:
        num_channels: number of channels ``C``.
        eps: value added to the variance for numerical stability.
        momentum: running-statistics update factor; ``None`` for a cumulative average.
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0) of shape ``(C,)``.
        track_running_stats: keep running statistics and use them in eval mode.
        device: factory kwarg for parameters and buffers.
        dtype: factory kwarg for parameters and buffers.
        channels_last: the channel axis is the last dim, ``(N, *S, C)``.

    Example:
        >>> norm = InstanceNorm(64)
        >>> norm(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = False,
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
        if momentum is not None and (
            isinstance(momentum, bool)
            or not isinstance(momentum, int | float)
            or not 0 <= momentum <= 1
        ):
            raise SpecError(
                f"InstanceNorm: momentum must be a float in [0, 1] or None (cumulative "
                f"average), got {momentum!r}"
            )
        self.momentum = None if momentum is None else float(momentum)
        self.track_running_stats = bool(track_running_stats)
        self.running_mean: Tensor | None
        self.running_var: Tensor | None
        self.num_batches_tracked: Tensor | None
        if self.track_running_stats:
            self.register_buffer(
                "running_mean", torch.zeros(num_channels, device=device, dtype=dtype)
            )
            self.register_buffer(
                "running_var", torch.ones(num_channels, device=device, dtype=dtype)
            )
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        """Reset the running statistics to mean 0, variance 1 and 0 batches tracked."""
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and the affine parameters (as BatchNorm does)."""
        self.reset_running_stats()
        super().reset_parameters()

    def _norm_forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (channels in dim 1, or last when ``channels_last``).

        Example:
            >>> InstanceNorm(4, channels_last=True)(torch.randn(2, 3, 3, 4)).shape
            torch.Size([2, 3, 3, 4])
        """
        if self.channels_last:
            return self._normalize(x.movedim(-1, 1)).movedim(1, -1)
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        """Normalize ``x`` of shape ``(N, C, *S)`` over ``S``.

        Args:
            x: activation of shape ``(N, C, *S)`` with at least one spatial dim.

        Returns:
            The normalized activation, same shape and memory format as ``x``.

        Raises:
            NormSwapError: no spatial dims, wrong channel count, or a single spatial element
                while instance statistics are used.

        Example:
            >>> InstanceNorm(4)(torch.randn(2, 4, 5)).shape
            torch.Size([2, 4, 5])
        """
        if not torch.jit.is_scripting():
            self._check(x)
        if not self.track_running_stats:
            return group_norm(x, self.num_channels, self.weight, self.bias, self.eps)
        if not self.training:
            # Running statistics shared by every instance: exactly eval-mode batch norm, one
            # fused kernel that keeps the layout (F.instance_norm would repeat them N times).
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        tracked = self.num_batches_tracked
        assert tracked is not None
        tracked.add_(1)
        momentum = self.momentum
        factor = 1.0 / float(tracked) if momentum is None else momentum
        out = F.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats=True,
            momentum=factor,
            eps=self.eps,
        )
        if torch.jit.is_scripting():
            return out
        else:
            return self._own_copy(out, x)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (see :meth:`_norm_forward`; the ``*Act`` variants call that one)."""
        return self._norm_forward(x)

    @torch.jit.unused
    def _own_copy(self, out: Tensor, x: Tensor) -> Tensor:
        if out._is_view() and out.requires_grad:
            # F.instance_norm returns a view of its batch-norm output; an in-place op after this
            # layer (ReLU(inplace=True)) on a view is replayed through copies in backward.
            return out.clone(memory_format=memory_format(x))
        return keep_memory_format(out, x)

    @torch.jit.unused
    def _check(self, x: Tensor) -> None:
        if x.dim() < 3 or x.shape[1] != self.num_channels:
            refuse_input(self, x, self.num_channels, min_dim=3)
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats and spatial_numel(x) == 1:
            raise NormSwapError(
                f"{where(self)}: InstanceNorm got input of shape {tuple(x.shape)} with a single "
                f"spatial element per channel, so its output would be the constant bias; use a "
                f"norm whose statistics span channels or the batch (LayerNorm, GroupNorm, "
                f"BatchNorm) here"
            )

    def extra_repr(self) -> str:
        """Describe the layer: channels, eps, momentum, affine and running statistics."""
        last = ", channels_last=True" if self.channels_last else ""
        return (
            f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}{last}"
        )
