"""Which kernel runs: the CPU group-norm layout detours and normswap's eager CPU autograd
functions (DyT, Derf, RMSNorm), behind one switch.

Every layer of :mod:`normswap.norms` normalizes through :func:`group_norm`. On CPU, PyTorch's
group-norm kernel is slow for some shapes in one memory format and fast in the other; where
``benchmarks/layer_overhead.py`` measured the detour faster, the input goes through a copy in
the other layout and the output comes back in the input's memory format. The windows and the
measurements behind them: ``benchmarks/NOTES.md`` ("Kernel dispatch").

:func:`set_kernel_dispatch` turns the detours off (then every call is plain
``torch.group_norm``), as timm's ``set_fast_norm`` does for its kernels. Values are the same
either way up to float rounding; only the speed differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normswap.norms.common import CHANNELS_LAST, spatial_numel

__all__ = [
    "EAGER_CPU_MIN_NUMEL",
    "eager_cpu_kernel",
    "group_norm",
    "kernel_dispatch_enabled",
    "set_kernel_dispatch",
]

_ENABLED = True

#: channels_last input through a contiguous copy: channels per group -> (min, max) positions.
VIA_CONTIGUOUS_POSITIONS: dict[int, tuple[int, int | None]] = {
    1: (16, None),
    2: (16, 1023),
    3: (16, 1023),
    4: (16, 1023),
}

#: contiguous input through a channels_last copy, under autograd (the slow contiguous backward):
#: (min channels per group, min positions, max positions); the first match wins.
VIA_CHANNELS_LAST_POSITIONS: tuple[tuple[int, int, int], ...] = ((8, 2, 7), (4, 4, 7))


#: The smallest inputs (elements) where an eager CPU autograd function beats autograd's graph of
#: the plain ops: below, its Python overhead outweighs the memory passes it saves
#: (``benchmarks/NOTES.md``, "DyT, Derf and RMSNorm").
EAGER_CPU_MIN_NUMEL: dict[str, int] = {"pointwise": 1 << 16, "rms": 1 << 17}


def eager_cpu_kernel(kind: str, x: Tensor, *params: Tensor | None) -> bool:
    """Whether a layer's eager CPU autograd function applies (``kind``: ``"pointwise"`` for DyT
    and Derf, ``"rms"`` for RMSNorm): dispatch on, float32/float64 CPU input of at least
    :data:`EAGER_CPU_MIN_NUMEL` elements, every parameter given present and of the input's dtype,
    not scripted, traced, compiled or exported (those record the plain ops, which a compiler
    fuses).

    Example:
        >>> w = torch.ones(1024)
        >>> eager_cpu_kernel("rms", torch.zeros(2, 1024), w)
        False
        >>> eager_cpu_kernel("rms", torch.zeros(1024, 1024), w)
        True
    """
    if not _ENABLED or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if x.numel() < EAGER_CPU_MIN_NUMEL[kind]:
        return False
    if any(p is None or p.dtype != x.dtype for p in params):
        return False
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling())


def set_kernel_dispatch(enabled: bool) -> None:
    """Turn the CPU layout detours of :func:`group_norm` and the eager CPU autograd functions of
    DyT, Derf and RMSNorm on (the default) or off.

    Example:
        >>> set_kernel_dispatch(False); kernel_dispatch_enabled()
        False
        >>> set_kernel_dispatch(True)
    """
    global _ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"set_kernel_dispatch takes True or False, got {enabled!r}")
    _ENABLED = enabled


def kernel_dispatch_enabled() -> bool:
    """Whether :func:`group_norm` may take a CPU layout detour (and the eager CPU autograd
    functions may run).

    Example:
        >>> kernel_dispatch_enabled()
        True
    """
    return _ENABLED


def slow_contiguous_backward(x: Tensor, groups: int, weight: Tensor | None) -> bool:
    """Whether contiguous CPU ``x`` would hit the slow contiguous GroupNorm backward.

    Example:
        >>> slow_contiguous_backward(torch.zeros(8, 512, 2, 2, requires_grad=True), 32, None)
        True
    """
    if x.dim() not in CHANNELS_LAST or x.dtype is not torch.float32:  # measured: fp32
        return False
    if not (x.requires_grad or (weight is not None and weight.requires_grad)):
        return False
    if not torch.is_grad_enabled():
        return False
    positions, per_group = spatial_numel(x), x.shape[1] // groups
    for min_channels, low, high in VIA_CHANNELS_LAST_POSITIONS:
        if per_group >= min_channels:
            return low <= positions <= high
    return False


def group_norm(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``torch.group_norm`` by the faster CPU kernel for ``x``'s layout, in ``x``'s format.

    Calls the op ``F.group_norm`` wraps directly: the wrapper's Python checks cost measurably
    at the small maps of late CNN stages, and the layers check their input themselves. Under
    ``torch.jit.script``, ``torch.jit.trace``, ``torch.export`` and ``torch.compile`` it is the
    plain op: a graph holds ``group_norm`` itself, not the eager layout choices (which depend on
    ``requires_grad`` and would make a traced graph differ from run to run).

    Example:
        >>> group_norm(torch.randn(2, 8, 4, 4), 4, None, None, 1e-5).shape
        torch.Size([2, 8, 4, 4])
    """
    if torch.jit.is_scripting():
        return torch.group_norm(x, groups, weight, bias, eps)
    else:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return torch.group_norm(x, groups, weight, bias, eps)
        return _dispatched(x, groups, weight, bias, eps)


def _dispatched(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    if not _ENABLED or not x.is_cpu:
        out = torch.group_norm(x, groups, weight, bias, eps)
        fmt = CHANNELS_LAST.get(x.dim())
        if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
            return out.contiguous(memory_format=fmt)
        return out
    if x.is_contiguous():
        if slow_contiguous_backward(x, groups, weight):
            fmt = CHANNELS_LAST[x.dim()]
            out = torch.group_norm(x.contiguous(memory_format=fmt), groups, weight, bias, eps)
            return out.contiguous()
        return torch.group_norm(x, groups, weight, bias, eps)
    fmt = CHANNELS_LAST.get(x.dim(), torch.contiguous_format)
    if fmt is torch.contiguous_format or not x.is_contiguous(memory_format=fmt):
        return torch.group_norm(x, groups, weight, bias, eps)  # any other strides: contiguous out
    window = VIA_CONTIGUOUS_POSITIONS.get(x.shape[1] // groups)
    if window is not None:
        positions, (low, high) = spatial_numel(x), window
        if positions >= low and (high is None or positions <= high):
            x = x.contiguous()
    return torch.group_norm(x, groups, weight, bias, eps).contiguous(memory_format=fmt)
