"""Group normalization and the group-count policy.

:func:`resolve_groups` decides how many groups a layer of ``C`` channels gets (the paper's default
is 32 groups; "group size" is the other common policy) and says so when the request had to be
adjusted. :class:`GroupNorm` is :class:`torch.nn.GroupNorm` with the channel count first, so it can
stand where ``BatchNorm(num_features)`` stood.

The private helpers at the bottom (input checks, memory-format preservation) are shared by every
layer in :mod:`normswap.norms`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normswap.errors import NormSwapError, SpecError

__all__ = ["GROUP_POLICIES", "GroupNorm", "resolve_groups"]

#: Valid values of ``policy`` in :func:`resolve_groups`.
GROUP_POLICIES: tuple[str, ...] = ("divisor", "error")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
    if not _is_positive_int(num_channels):
        raise SpecError(f"num_channels must be a positive int, got {num_channels!r}")
    if group_size is not None:
        if not _is_positive_int(group_size):
            raise SpecError(
                f"group_size must be a positive int (channels per group), got {group_size!r}"
            )
        return _groups_from_size(num_channels, group_size, policy)
    if num_groups is None:
        raise SpecError("give num_groups or group_size (both are None)")
    if not _is_positive_int(num_groups):
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

    Raises:
        NormSwapError: ``num_groups`` does not divide ``num_channels`` (the message lists the
            valid counts) or an argument is invalid.

    Example:
        >>> norm = GroupNorm(64, num_groups=32)
        >>> norm(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    #: Module path set by the surgery so that forward-time errors can name the layer.
    normswap_path: str = ""

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        groups, _ = resolve_groups(num_channels, num_groups, policy="error")
        super().__init__(groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
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
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            _refuse_input(self, input, self.num_channels, min_dim=2)
        # One element per group needs one channel per group and a single position.
        if self.num_groups == self.num_channels and _spatial_numel(input) == 1:
            raise NormSwapError(
                f"{_where(self)}: GroupNorm with {self.num_groups} groups over "
                f"{self.num_channels} channels sees 1 element per group for input of shape "
                f"{tuple(input.shape)}, so its output would be the constant bias; use fewer "
                f"groups (e.g. num_groups=1, a LayerNorm) or a larger spatial extent"
            )
        return _group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        """Describe the layer: channels, groups, eps and affine."""
        return (
            f"num_channels={self.num_channels}, num_groups={self.num_groups}, "
            f"eps={self.eps}, affine={self.affine}"
        )


# ---------------------------------------------------------------------------------------------
# Helpers shared by the layers of normswap.norms (private).
# ---------------------------------------------------------------------------------------------


def _where(module: nn.Module) -> str:
    """The module's surgery path when known, else its class name (for error messages)."""
    return getattr(module, "normswap_path", "") or type(module).__name__


def _spatial_numel(x: Tensor) -> int:
    """Number of elements of one channel of one sample (1 for ``(N, C)`` input)."""
    return math.prod(x.shape[2:])


def _refuse_input(module: nn.Module, x: Tensor, num_channels: int, min_dim: int) -> None:
    """Raise for input of too low rank or with the wrong channel count, naming the module.

    The layers test ``x.dim() < min_dim or x.shape[1] != num_channels`` inline and call this only
    when it holds: a forward pass then costs two attribute reads, not a function call.
    """
    name = type(module).__name__
    if x.dim() < min_dim:
        layout = "(N, C)" if min_dim == 2 else "(N, C, *S) with at least one spatial dim"
        raise NormSwapError(
            f"{_where(module)}: {name} expects input of shape {layout}, got shape "
            f"{tuple(x.shape)}; add the missing batch/channel dims (e.g. x.unsqueeze(0))"
        )
    if x.shape[1] != num_channels:
        raise NormSwapError(
            f"{_where(module)}: {name} was built for {num_channels} channels but got input of "
            f"shape {tuple(x.shape)} ({x.shape[1]} channels in dim 1); the channel dim must be "
            f"dim 1, as for BatchNorm"
        )


#: The channels-last memory format of each input rank that has one.
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _memory_format(x: Tensor) -> torch.memory_format:
    """The named memory format of ``x``: channels_last(_3d) when only that one fits."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    if (
        x.dim() == 5
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return torch.channels_last_3d
    return torch.contiguous_format


#: On CPU, PyTorch's channels_last GroupNorm kernel is slow when each group holds few channels
#: (``benchmarks/layer_overhead.py`` and a sweep over map sizes, forward+backward, 1 thread,
#: torch 2.14.1). Through a contiguous copy and back: InstanceNorm (1 channel per group) takes
#: 0.19-0.79x the time from 4x4 to 56x56 maps (below 4x4 the copies cost more: 1.3x at 2x2; about
#: even at 32x32); GroupNorm with 2-4 channels per group 0.48-0.91x from 4x4 to 31x33 maps at
#: batch 8 and 32. From 1024 positions per channel the channels_last kernel itself gets twice as
#: fast (2 channels per group: 3.5 us per position at 1023 positions, 1.7 at 1024 and 1025), and
#: the detour loses there (1.1-3.1x at 32x32 to 64x64); from 8 channels per group the
#: channels_last kernel is the faster one at every size. channels per group -> (min, max)
#: positions.
_VIA_CONTIGUOUS_POSITIONS = {1: (16, None), 2: (16, 1023), 3: (16, 1023), 4: (16, 1023)}


#: The other way round: PyTorch's contiguous GroupNorm CPU backward is slow when a channel holds 2
#: to 7 positions (2x2 to 2x3 maps, e.g. resnet's last stage at 64 px), where its channels_last
#: kernel is not (``layer_overhead.py`` and a sweep over map sizes, forward+backward, 1 thread,
#: AVX-512, torch 2.14.1): 8x512x2x2 with 32 groups takes 265 us contiguous, 96 us through a
#: channels_last copy (0.36x); 8x256x2x2 with 1 group 0.58x; 32x2048x2x2 0.20x. It pays off
#: from 8 channels per group over 2-7 positions and from 4 over 4-7 positions (4 channels at
#: 1x2: 1.11x; 1 or 2 channels per group, as in InstanceNorm: no gain); 1x1 and >= 3x3 maps are
#: fast contiguous. (min channels per group, min positions, max positions), first match wins.
_VIA_CHANNELS_LAST_POSITIONS = ((8, 2, 7), (4, 4, 7))


def _slow_contiguous_backward(x: Tensor, groups: int, weight: Tensor | None) -> bool:
    """Whether contiguous CPU ``x`` would hit the slow GroupNorm backward (see above)."""
    if x.dim() not in _CHANNELS_LAST or x.dtype is not torch.float32:  # measured: fp32
        return False
    if not (x.requires_grad or (weight is not None and weight.requires_grad)):
        return False
    if not torch.is_grad_enabled():
        return False
    positions, per_group = _spatial_numel(x), x.shape[1] // groups
    for min_channels, low, high in _VIA_CHANNELS_LAST_POSITIONS:
        if per_group >= min_channels:
            return low <= positions <= high
    return False


def _group_norm(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``F.group_norm`` by the faster CPU kernel for ``x``'s layout, in ``x``'s memory format.

    On CPU, input whose layout has the slower kernel for its shape goes through a copy in the
    other layout (the tables above), and the output comes back in ``x``'s memory format. Calls
    the op ``F.group_norm`` wraps, ``torch.group_norm``, directly: the wrapper's Python
    checks (a torch-function test and a batch-size product over a freshly built list) cost about
    5% of a forward+backward at the small maps of late CNN stages (``layer_overhead.py``), and
    the layers' own checks already refuse what it would (a single element per group).
    """
    if x.is_contiguous():
        if x.is_cpu and _slow_contiguous_backward(x, groups, weight):
            fmt = _CHANNELS_LAST[x.dim()]
            out = torch.group_norm(x.contiguous(memory_format=fmt), groups, weight, bias, eps)
            return out.contiguous()
        return torch.group_norm(x, groups, weight, bias, eps)
    fmt = _CHANNELS_LAST.get(x.dim(), torch.contiguous_format)
    if fmt is torch.contiguous_format or not x.is_contiguous(memory_format=fmt):
        return torch.group_norm(x, groups, weight, bias, eps)  # any other strides: contiguous out
    window = _VIA_CONTIGUOUS_POSITIONS.get(x.shape[1] // groups)
    if window is not None and x.is_cpu:
        positions, (low, high) = _spatial_numel(x), window
        if positions >= low and (high is None or positions <= high):
            x = x.contiguous()
    return torch.group_norm(x, groups, weight, bias, eps).contiguous(memory_format=fmt)


def _keep_memory_format(out: Tensor, like: Tensor) -> Tensor:
    """Return ``out`` in ``like``'s memory format (a no-op when it already is)."""
    return out.contiguous(memory_format=_memory_format(like))
