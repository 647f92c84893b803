"""Exact folding of an eval-mode BatchNorm into the conv/linear layer that produces its input.

An eval-mode BatchNorm is the per-channel affine map ``y = s * x + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``. When ``x`` is the
output of a conv or linear layer and nothing else uses it, the map folds into that layer:
``W' = s * W`` (per output channel) and ``b' = s * b + t``, after which the BatchNorm is the
identity. The arithmetic is done in float64 and cast back to the weight's dtype.

:func:`fold_conv_bn` folds one pair (whether the pair may fold is
:func:`normswap.graph.rules.fold_problems`'s call); :func:`normswap.fold_bn` plans and folds
every pair of a model, all or none.
"""

from __future__ import annotations

import torch
from torch import nn

from normswap.errors import FoldError
from normswap.graph.rules import fold_problems
from normswap.sources import SourceNorm, describe_source

__all__ = ["affine_of", "fold_conv_bn"]


def affine_of(
    src: SourceNorm, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm's per-channel ``(scale, shift)``: ``bn(x) = scale * x + shift``.

    Example:
        >>> from normswap.sources import describe_source
        >>> bn = nn.BatchNorm1d(2, eps=0.0).eval()
        >>> affine_of(describe_source(bn), torch.float64, torch.device("cpu"))[0]
        tensor([1., 1.], dtype=torch.float64)
    """
    assert src.running_mean is not None and src.running_var is not None
    mean = src.running_mean.to(device, dtype)
    var = src.running_var.to(device, dtype)
    gamma = torch.ones_like(mean) if src.weight is None else src.weight.detach().to(device, dtype)
    beta = torch.zeros_like(mean) if src.bias is None else src.bias.detach().to(device, dtype)
    scale = gamma * torch.rsqrt(var + src.eps)
    return scale, beta - mean * scale


def fold_conv_bn(producer: nn.Module, bn: nn.Module, *, path: str | None = None) -> None:
    """Fold an eval-mode BatchNorm into the conv/linear layer that produces its input, in place.

    Afterwards ``producer(x)`` equals the old ``bn(producer(x))`` (up to float rounding; the
    arithmetic is float64) and ``bn`` can be replaced by ``nn.Identity()``, which the caller does.
    ``bn`` itself is not modified.

    Supported producers: ``Conv1d/2d/3d`` (any groups, dilation, with or without bias),
    ``ConvTranspose1d/2d/3d`` (any groups; the output channel is weight dim 1) and ``Linear``
    followed by a BatchNorm1d over its ``(N, C)`` output. Supported norms: every registered
    BatchNorm source with running statistics (``affine=False`` means gamma = 1, beta = 0),
    torchvision's ``FrozenBatchNorm2d`` included.

    The producer's Parameter objects are kept (updated in place), so optimizers and anything
    else holding them stay valid; their dtype, device, memory format (a channels_last weight stays
    channels_last) and ``requires_grad`` are unchanged. A producer without bias gets a new bias
    Parameter with the weight's dtype, device and ``requires_grad`` (an optimizer built earlier
    does not know it). A producer whose weight or bias is parametrized is refused rather than
    folded into the unconstrained original, because that is exact only for some
    parametrizations (e.g. not for weight norm, which re-normalizes the scaled weight).

    Whether the producer's output feeds anything else is a graph fact this function cannot see:
    :func:`normswap.fold_bn` and ``swap(model, "wn", bn="fold")`` check it before folding.

    Args:
        producer: the conv/linear layer; modified in place.
        bn: the BatchNorm; must be in eval mode (a ``FrozenBatchNorm2d`` always is).
        path: the BatchNorm's module path, named in error messages.

    Raises:
        FoldError: every problem :func:`~normswap.graph.rules.fold_problems` finds, with its fix;
            nothing is modified.

    Example:
        >>> conv, bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8).eval()
        >>> x = torch.randn(2, 3, 16, 16)
        >>> expected = bn(conv(x))
        >>> fold_conv_bn(conv, bn)
        >>> torch.allclose(conv(x), expected, atol=1e-6)
        True
    """
    try:
        src = describe_source(bn)
    except FoldError:
        raise
    except ValueError as err:
        raise FoldError(f"cannot fold {type(bn).__name__}: {err}") from None
    problems = fold_problems(src, producer)
    if problems:
        where = f"{src.kind} {path!r}" if path is not None else src.kind
        raise FoldError(
            f"cannot fold {where} into {type(producer).__name__}: {'; '.join(problems)}"
        )
    weight = producer.weight
    # float64 everywhere but on devices without it (MPS).
    calc = torch.float32 if weight.device.type == "mps" else torch.float64
    with torch.no_grad():
        scale, shift = affine_of(src, calc, weight.device)
        w = weight.detach().to(calc)
        if isinstance(producer, nn.modules.conv._ConvTransposeNd):
            # weight: (in, out / groups, *k); output channel g * (out / groups) + j.
            g, per_group = producer.groups, w.shape[1]
            spatial = (1,) * (w.ndim - 2)
            grouped = w.reshape(g, w.shape[0] // g, per_group, *w.shape[2:])
            w = (grouped * scale.reshape(g, 1, per_group, *spatial)).reshape(w.shape)
        else:
            w = w * scale.reshape(-1, *(1,) * (w.ndim - 1))
        bias = shift if producer.bias is None else producer.bias.detach().to(calc) * scale + shift
        weight.copy_(w)  # copy_ keeps the destination's dtype and strides (memory format)
        if producer.bias is None:
            producer.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
        else:
            producer.bias.copy_(bias)
