"""Frozen-BatchNorm look-alikes: recognised by structure, checked by what they compute.

Many libraries carry their own copy of torchvision's ``FrozenBatchNorm2d`` instead of importing
it: Hugging Face's DETR family alone has ``DetrFrozenBatchNorm2d``, ``RTDetrFrozenBatchNorm2d``,
``TableTransformerFrozenBatchNorm2d``, ... — plain modules holding the four buffers ``weight``,
``bias``, ``running_mean`` and ``running_var``, no parameters, and a forward that may hard-code its
epsilon (HF's uses 1e-5 and has no ``eps`` attribute). No class registration can list them all.

A module is such a look-alike when its class is named like a frozen BatchNorm (``Frozen`` then
``BatchNorm`` or ``BN``), it holds exactly those four 1-d buffers of one length, no parameters
and no children. Its epsilon is then *measured*, not guessed: a copy with unit γ, zero β, zero
mean and zero variance maps 1 to ``1 / sqrt(eps)``; and a second probe with random statistics
checks that the module computes ``γ · (x − μ) / sqrt(σ² + eps) + β``. A look-alike that computes
something else is refused with that reason (exclude it, or register an adapter for its class).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from normswap.errors import UnsupportedModuleError
from normswap.sources.base import Source, SourceNorm, device_dtype, register_source_rule

__all__ = ["describe_frozen_lookalike", "is_frozen_lookalike", "measure_eps"]

_NAME = re.compile(r"frozen_?(batch_?norm|bn)", re.IGNORECASE)
_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_lookalike(module: nn.Module) -> bool:
    """Whether ``module`` has the structure of a frozen BatchNorm (name, buffers, nothing else).

    Example:
        >>> class MyFrozenBatchNorm2d(nn.Module):
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         for name in ("weight", "bias", "running_mean", "running_var"):
        ...             self.register_buffer(name, torch.ones(n))
        >>> is_frozen_lookalike(MyFrozenBatchNorm2d(4)), is_frozen_lookalike(nn.BatchNorm2d(4))
        (True, False)
    """
    if not _NAME.search(type(module).__name__) or module._modules:
        return False
    if next(module.parameters(recurse=False), None) is not None:
        return False
    buffers = dict(module.named_buffers(recurse=False))
    if set(buffers) - {"num_batches_tracked"} != set(_BUFFERS):
        return False
    shapes = {tuple(buffers[name].shape) for name in _BUFFERS}
    return len(shapes) == 1 and len(next(iter(shapes))) == 1


def _probe(module: nn.Module, values: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``module``'s output on ``x`` with its buffers replaced by ``values``, on a copy."""
    twin = copy.deepcopy(module)
    for hooks in (twin._forward_pre_hooks, twin._forward_hooks):  # the user's, not for a probe
        hooks.clear()
    for name, value in values.items():
        setattr(twin, name, value)
    with torch.no_grad():
        return twin(x)


def measure_eps(module: nn.Module) -> float:
    """The epsilon a frozen-BatchNorm look-alike's forward really adds to the variance.

    Raises:
        UnsupportedModuleError: the module does not compute a frozen BatchNorm (its output does
            not follow ``γ · (x − μ) / sqrt(σ² + eps) + β`` on a float64 probe).

    Example:
        >>> from torchvision.ops.misc import FrozenBatchNorm2d
        >>> measure_eps(FrozenBatchNorm2d(3, eps=1e-3))
        0.001
    """
    c = int(module.weight.shape[0])
    f64 = {"dtype": torch.float64}
    unit = {
        "weight": torch.ones(c, **f64),
        "bias": torch.zeros(c, **f64),
        "running_mean": torch.zeros(c, **f64),
        "running_var": torch.zeros(c, **f64),
    }
    try:
        y = _probe(module, unit, torch.ones(1, c, 1, 1, **f64))
        eps = float((1.0 / y.double().square()).mean())
        g = torch.Generator().manual_seed(0)
        stats = {
            "weight": torch.rand(c, generator=g, **f64) + 0.5,
            "bias": torch.randn(c, generator=g, **f64),
            "running_mean": torch.randn(c, generator=g, **f64),
            "running_var": torch.rand(c, generator=g, **f64) + 0.5,
        }
        x = torch.randn(2, c, 3, 3, generator=g, **f64)
        got = _probe(module, stats, x).double()
    except Exception as err:  # any failure means it is not what its structure suggests
        raise UnsupportedModuleError(
            f"{type(module).__name__} looks like a frozen BatchNorm (its name and buffers) but "
            f"its forward failed on a probe ({type(err).__name__}: {err}); exclude it or "
            f"register an adapter with normswap.register_source({type(module).__name__})"
        ) from None
    view = (1, c, 1, 1)
    scale = stats["weight"].view(view) / (stats["running_var"].view(view) + eps).sqrt()
    expected = (x - stats["running_mean"].view(view)) * scale + stats["bias"].view(view)
    if not (eps >= 0 and torch.allclose(got, expected, rtol=1e-9, atol=1e-9)):
        raise UnsupportedModuleError(
            f"{type(module).__name__} looks like a frozen BatchNorm (its name and buffers) but "
            "does not compute γ·(x − μ)/sqrt(σ² + eps) + β; exclude it or register an adapter "
            f"with normswap.register_source({type(module).__name__})"
        )
    return float(f"{eps:.6g}")  # 1e-05, not 1.0000000000000008e-05


def describe_frozen_lookalike(module: nn.Module) -> SourceNorm:
    """Adapter for a frozen-BatchNorm look-alike: its buffers, and its measured epsilon.

    Example:
        >>> class DetrLikeFrozenBatchNorm2d(nn.Module):  # eps hard-coded, as in HF's DETR
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
        ...                             ("running_var", 1.0)):
        ...             self.register_buffer(name, torch.full((n,), value))
        ...     def forward(self, x):
        ...         scale = self.weight.view(1, -1, 1, 1) * (
        ...             self.running_var.view(1, -1, 1, 1) + 1e-5).rsqrt()
        ...         return x * scale + self.bias.view(1, -1, 1, 1) - (
        ...             self.running_mean.view(1, -1, 1, 1) * scale)
        >>> src = describe_frozen_lookalike(DetrLikeFrozenBatchNorm2d(8))
        >>> src.source, src.num_channels, src.eps, src.requires_grad
        ('bn', 8, 1e-05, False)
    """
    device, dtype = device_dtype(module)
    return SourceNorm(
        module=module,
        kind=type(module).__name__,
        num_channels=int(module.weight.shape[0]),
        eps=measure_eps(module),
        momentum=None,
        weight=module.weight,
        bias=module.bias,
        running_mean=module.running_mean,
        running_var=module.running_var,
        training=module.training,
        requires_grad=False,
        device=device,
        dtype=dtype,
        ranks=(4,),
    )


@register_source_rule
def _frozen_lookalike_rule(module: nn.Module) -> Source | None:
    return Source("bn", describe_frozen_lookalike) if is_frozen_lookalike(module) else None
