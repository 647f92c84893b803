"""Group normalization and the group-count policy.

:func:`resolve_groups` decides how many groups a layer of ``C`` channels gets (the paper's default
is 32 groups; "group size" is the other common policy) and says so when the request had to be
adjusted. :class:`GroupNorm` is :class:`torch.nn.GroupNorm` with the channel count first, so it can
stand where ``BatchNorm(num_features)`` stood.

"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normswap.errors import NormSwapError, SpecError
from normswap.norms.common import is_positive_int, refuse_input, spatial_numel, where
from normswap.norms.dispatch import group_norm

__all__ = ["GROUP_POLICIES", "GroupNorm", "resolve_groups"]

#: Valid values of ``policy`` in :func:`resolve_groups`.
GROUP_POLICIES: tuple[str, ...] = ("divisor", "error")


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _format_ints(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def resolve_groups(
    num_channels: int,
    num_groups: int | None = 32,
    group_size: int | None = None,
    policy: str = "divisor",
) -> tuple[int, str | None]:
    """Decide the number of groups for a GroupNorm over ``num_channels`` channels.

    Exactly one request is used: ``group_size`` (channels per group) when given, else
    ``num_groups``. When the request does not divide the channel count, policy ``"divisor"``
    picks the largest divisor of ``C`` not above the requested group count (for ``group_size``:
    the smallest group size at least as large as requested that divides ``C``) and returns a note
    saying so; policy ``"error"`` raises instead. The result never exceeds ``num_channels``.

    Args:
        num_channels: channel count ``C`` of the layer (positive int).
        num_groups: requested number of groups; ignored when ``group_size`` is given.
        group_size: requested channels per group; takes precedence over ``num_groups``.
        policy: ``"divisor"`` (adjust and report) or ``"error"`` (refuse).

    Returns:
        ``(groups, note)`` where ``note`` is ``None`` when the request was used as is, else a
        one-line explanation of the adjustment.

    Raises:
        SpecError: an argument is not a positive int, both requests are ``None``, or the policy
            is unknown.
        NormSwapError: policy ``"error"`` and the request does not divide ``num_channels``; the
            message lists the valid choices.

    Example:
        >>> resolve_groups(64)
        (32, None)
        >>> resolve_groups(45)
        (15, '32 groups do not divide 45 channels; using 15')
        >>> resolve_groups(48, group_size=16)
        (3, None)
    """
    if policy not in GROUP_POLICIES:
        raise SpecError(
            f"unknown group policy {policy!r}; valid policies: {', '.join(GROUP_POLICIES)}"
        )
    if not is_positive_int(num_channels):
        raise SpecError(f"num_channels must be a positive int, got {num_channels!r}")
    if group_size is not None:
        if not is_positive_int(group_size):
            raise SpecError(
                f"group_size must be a positive int (channels per group), got {group_size!r}"
            )
        return _groups_from_size(num_channels, group_size, policy)
    if num_groups is None:
        raise SpecError("give num_groups or group_size (both are None)")
    if not is_positive_int(num_groups):
        raise SpecError(f"num_groups must be a positive int, got {num_groups!r}")
    return _groups_from_count(num_channels, num_groups, policy)


def _groups_from_count(channels: int, groups: int, policy: str) -> tuple[int, str | None]:
    if channels % groups == 0:
        return groups, None
    divisors = _divisors(channels)
    if policy == "error":
        raise NormSwapError(
            f"{groups} groups do not divide {channels} channels; valid group counts for "
            f"{channels} channels: {_format_ints(divisors)} (or use policy='divisor')"
        )
    chosen = max(d for d in divisors if d <= groups)
    if groups > channels:
        return chosen, f"{groups} groups exceed {channels} channels; using {chosen}"
    return chosen, f"{groups} groups do not divide {channels} channels; using {chosen}"


def _groups_from_size(channels: int, size: int, policy: str) -> tuple[int, str | None]:
    if channels % size == 0:
        return channels // size, None
    divisors = _divisors(channels)
    if policy == "error":
        raise NormSwapError(
            f"group size {size} does not divide {channels} channels; valid group sizes for "
            f"{channels} channels: {_format_ints(divisors)} (or use policy='divisor')"
        )
    # The largest group count not above C / size that divides C (at least 1 group).
    chosen = max(d for d in divisors if d <= max(channels // size, 1))
    return chosen, (
        f"group size {size} does not divide {channels} channels; "
        f"using {chosen} groups of {channels // chosen}"
    )


class GroupNorm(nn.GroupNorm):
    """GroupNorm with the channel count first, a drop-in for ``BatchNorm(num_features)``.

    Computes ``F.group_norm`` (one fused kernel) over ``(N, C, *S)`` input of any rank >= 2 and
    returns the output in the input's memory format. Unlike :class:`torch.nn.GroupNorm` it
    refuses, at forward time, inputs where every group holds a single element (e.g. ``(N, C)``
    input with ``num_groups == C``): the output would be the constant bias (opacus#567).

    Args:
        num_channels: number of channels ``C`` expected in the input.
        num_groups: number of groups; must divide ``num_channels`` (use :func:`resolve_groups`
            to pick a valid count).
        eps: value added to the variance for numerical stability.
        affine: learn a per-channel scale (initialized to 1) and shift (initialized to 0).
        device: factory kwarg for the parameters.
        dtype: factory kwarg for the parameters.
        channels_last: the channel axis is the last dim, ``(N, *S, C)``.

    Raises:
        NormSwapError: ``num_groups`` does not divide ``num_channels`` (the message lists the
            valid counts) or an argument is invalid.

    Example:
        >>> norm = GroupNorm(64, num_groups=32)
        >>> norm(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    #: Module path set by the surgery so that forward-time errors can name the layer.
    normswap_path = ""  # str; not annotated: TorchScript reads class annotations

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channels_last: bool = False,
    ) -> None:
        groups, _ = resolve_groups(num_channels, num_groups, policy="error")
        super().__init__(groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        #: Whether the channel axis is the last dim (a ConvNeXt block's ``(N, H, W, C)`` map).
        self.channels_last = bool(channels_last)

    def _norm_forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` (channels in dim 1, or last when ``channels_last``).

        Example:
            >>> GroupNorm(8, num_groups=4, channels_last=True)(torch.randn(2, 3, 3, 8)).shape
            torch.Size([2, 3, 3, 8])
        """
        if self.channels_last:
            return self._normalize(input.movedim(-1, 1)).movedim(1, -1)
        return self._normalize(input)

    def _normalize(self, input: Tensor) -> Tensor:
        """Normalize ``input`` of shape ``(N, C, *S)``.

        Args:
            input: activation of shape ``(N, C, *S)``.

        Returns:
            The normalized activation, same shape and memory format as ``input``.

        Raises:
            NormSwapError: wrong rank or channel count, or one element per group.

        Example:
            >>> GroupNorm(8, num_groups=4)(torch.randn(2, 8, 3)).shape
            torch.Size([2, 8, 3])
        """
        if not torch.jit.is_scripting():  # eager checks; a scripted layer relies on the op's
            self._check(input)
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` (see :meth:`_norm_forward`; the ``*Act`` variants call that one)."""
        return self._norm_forward(input)

    @torch.jit.unused
    def _check(self, input: Tensor) -> None:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            refuse_input(self, input, self.num_channels, min_dim=2)
        # One element per group needs one channel per group and a single position.
        if self.num_groups == self.num_channels and spatial_numel(input) == 1:
            raise NormSwapError(
                f"{where(self)}: GroupNorm with {self.num_groups} groups over "
                f"{self.num_channels} channels sees 1 element per group for input of shape "
                f"{tuple(input.shape)}, so its output would be the constant bias; use fewer "
                f"groups (e.g. num_groups=1, a LayerNorm) or a larger spatial extent"
            )

    def extra_repr(self) -> str:
        """Describe the layer: channels, groups, eps and affine."""
        last = ", channels_last=True" if self.channels_last else ""
        return (
            f"num_channels={self.num_channels}, num_groups={self.num_groups}, "
            f"eps={self.eps}, affine={self.affine}{last}"
        )
