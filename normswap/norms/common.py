"""What every layer of :mod:`normswap.norms` shares: input checks, memory-format helpers and
the per-channel affine base class."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from normswap.errors import NormSwapError, SpecError

__all__ = [
    "CHANNELS_LAST",
    "ChannelAffineNorm",
    "channels_to_last",
    "is_positive_int",
    "keep_memory_format",
    "memory_format",
    "per_position",
    "refuse_input",
    "spatial_numel",
    "where",
]

#: The channels-last memory format of each input rank that has one.
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) above 0.

    Example:
        >>> is_positive_int(3), is_positive_int(True), is_positive_int(0)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def where(module: nn.Module) -> str:
    """The module's surgery path when known, else its class name (for error messages).

    Example:
        >>> where(nn.ReLU())
        'ReLU'
    """
    return getattr(module, "normswap_path", "") or type(module).__name__


def spatial_numel(x: Tensor) -> int:
    """Number of elements of one channel of one sample (1 for ``(N, C)`` input).

    Example:
        >>> spatial_numel(torch.zeros(2, 3, 4, 5))
        20
    """
    return math.prod(x.shape[2:])


def refuse_input(module: nn.Module, x: Tensor, num_channels: int, min_dim: int) -> None:
    """Raise for input of too low rank or with the wrong channel count, naming the module.

    The layers test ``x.dim() < min_dim or x.shape[1] != num_channels`` inline and call this only
    when it holds: a forward pass then costs two attribute reads, not a function call.

    Example:
        >>> refuse_input(nn.ReLU(), torch.zeros(2, 3), 4, min_dim=2)
        Traceback (most recent call last):
        ...
        normswap.errors.NormSwapError: ReLU: ReLU was built for 4 channels but got input of ...
    """
    name = type(module).__name__
    if x.dim() < min_dim:
        layout = "(N, C)" if min_dim == 2 else "(N, C, *S) with at least one spatial dim"
        raise NormSwapError(
            f"{where(module)}: {name} expects input of shape {layout}, got shape "
            f"{tuple(x.shape)}; add the missing batch/channel dims (e.g. x.unsqueeze(0))"
        )
    if x.shape[1] != num_channels:
        raise NormSwapError(
            f"{where(module)}: {name} was built for {num_channels} channels but got input of "
            f"shape {tuple(x.shape)} ({x.shape[1]} channels in dim 1); the channel dim must be "
            f"dim 1, as for BatchNorm"
        )


def check_channels(module: nn.Module, x: Tensor, num_channels: int, channels_last: bool) -> None:
    """Refuse input without ``num_channels`` channels where the layer reads them: dim 1
    (:func:`refuse_input`), or the last dim for a ``channels_last=True`` layer.

    Example:
        >>> check_channels(nn.ReLU(), torch.zeros(2, 5, 3), 3, channels_last=True)  # fine
        >>> check_channels(nn.ReLU(), torch.zeros(2, 3, 5), 3, channels_last=True)
        Traceback (most recent call last):
        ...
        normswap.errors.NormSwapError: ReLU: ReLU(channels_last=True) was built for 3 channels ...
    """
    if not channels_last:
        if x.dim() < 2 or x.shape[1] != num_channels:
            refuse_input(module, x, num_channels, min_dim=2)
        return
    if x.dim() < 2 or x.shape[-1] != num_channels:
        raise NormSwapError(
            f"{where(module)}: {type(module).__name__}(channels_last=True) was built for "
            f"{num_channels} channels in the last dim, got input of shape {tuple(x.shape)}"
        )


def memory_format(x: Tensor) -> torch.memory_format:
    """The named memory format of ``x``: channels_last(_3d) when only that one fits.

    Example:
        >>> memory_format(torch.zeros(1, 3, 2, 2).to(memory_format=torch.channels_last))
        torch.channels_last
    """
    if x.dim() in CHANNELS_LAST and not x.is_contiguous():
        fmt = CHANNELS_LAST[x.dim()]
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def keep_memory_format(out: Tensor, like: Tensor) -> Tensor:
    """Return ``out`` in ``like``'s memory format (a no-op when it already is).

    Example:
        >>> like = torch.zeros(1, 3, 2, 2).to(memory_format=torch.channels_last)
        >>> keep_memory_format(torch.zeros(1, 3, 2, 2), like).is_contiguous()
        False
    """
    return out.contiguous(memory_format=memory_format(like))


def channels_to_last(rank: int) -> tuple[list[int], list[int]]:
    """The permutation moving dim 1 last and the one moving it back, as explicit lists (what
    scripting, tracing and export record; ``movedim(1, -1)`` exports to ONNX as a Transpose
    with perm -1).

    Example:
        >>> channels_to_last(4)
        ([0, 2, 3, 1], [0, 3, 1, 2])
    """
    last = list(range(rank))
    last.append(last.pop(1))  # (0, 2, ..., 1)
    back = [0, rank - 1]
    for d in range(1, rank - 1):
        back.append(d)  # (0, last, 1, ...)
    return last, back


def per_position(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``fn``, an op over the last dim, to the channels (dim 1) of ``x`` at every
    position, and return the result in ``x``'s memory format (eager mode).

    For channels_last input moving C last is a free view, and only the output is copied once
    (under autograd, so that it is not a view); contiguous 4-d/5-d input is first copied to
    channels_last by the dedicated kernel, and the output is copied back. Why:
    ``benchmarks/NOTES.md`` ("LayerNorm2d").

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> out = per_position(x, lambda t: t - t.mean(-1, keepdim=True))
        >>> torch.allclose(out.mean(1), torch.zeros(2, 4, 4), atol=1e-6), out.is_contiguous()
        (True, True)
    """
    if x.dim() == 2:
        return fn(x)
    fmt = memory_format(x)
    channels_last = CHANNELS_LAST.get(x.dim())
    if fmt == torch.contiguous_format and channels_last is not None:
        # One dedicated NCHW -> NHWC copy, then the same path as channels_last input.
        inner = x.contiguous(memory_format=channels_last)
    else:
        inner = x  # channels_last: moving C last below is a free view
    moved = fn(inner.movedim(1, -1)).movedim(-1, 1)
    if fmt is torch.contiguous_format or not moved.requires_grad:
        return moved.contiguous(memory_format=fmt)  # a copy, or a view with no autograd
    # channels_last under autograd: ``moved`` is a view of ``out``, and an in-place op after
    # this layer (resnet's ReLU(inplace=True)) would make autograd replay it through copies
    # (benchmarks/NOTES.md). A fresh tensor costs one copy forward and none backward.
    return moved.clone(memory_format=fmt)


class ChannelAffineNorm(nn.Module):
    """Base of the norms with a per-channel affine ``weight``/``bias`` of shape ``(C,)``.

    Holds ``num_channels``, ``eps``, ``affine``, ``weight`` and ``bias`` (``None`` when
    ``affine=False``) with the same names and initialization as BatchNorm, so a converter can
    move a BatchNorm's ``weight``/``bias`` across unchanged.

    Example:
        >>> norm = ChannelAffineNorm(4, eps=1e-3)
        >>> norm.weight.shape, norm.eps
        (torch.Size([4]), 0.001)
    """

    #: Module path set by the surgery so that forward-time errors can name the layer.
    normswap_path = ""  # str; not annotated: TorchScript reads class annotations

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
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
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
            raise SpecError(f"{type(self).__name__}: eps must be a float >= 0, got {eps!r}")
        if not math.isfinite(eps):
            raise SpecError(f"{type(self).__name__}: eps must be finite, got {eps!r}")
        self.num_channels = num_channels
        self.eps = float(eps)
        self.affine = bool(affine)
        #: Whether the channel axis is the last dim (``(N, *S, C)``: a transformer's tokens or a
        #: ConvNeXt block's channels-last map) instead of dim 1.
        self.channels_last = bool(channels_last)
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if self.affine:
            self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._reset_affine()

    def _reset_affine(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def reset_parameters(self) -> None:
        """Reset ``weight`` to ones and ``bias`` to zeros (as BatchNorm does)."""
        self._reset_affine()

    def extra_repr(self) -> str:
        """Describe the layer: channels, eps and affine (and channels last, when it is)."""
        last = ", channels_last=True" if self.channels_last else ""
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}{last}"
