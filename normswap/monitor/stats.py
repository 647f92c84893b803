"""Per-norm-layer statistics as pure tensor functions, and the columns they fill.

Nothing here imports Lightning; :class:`normswap.callbacks.NormMonitor` is the thin Lightning
glue around :class:`normswap.monitor.collector.NormStatsCollector`, and a plain PyTorch loop can
use the collector directly.

**Statistics** (columns of :data:`STATS`; every value is a float32 tensor computed on the
layer's device, never read back to the host here):

=============== ====================================================================================
``in_mean``     mean of the layer's input over all its elements
``in_std``      standard deviation (biased) of the input over all its elements
``bn_mean_gap`` BN with running stats: mean over channels of ``|μ_c − running_mean_c| /
                sqrt(running_var_c + ε)``, ``μ_c`` the batch mean; running stats read *before*
                the forward updates them (the train/eval discrepancy that hurts small batches)
``bn_var_gap``  same layers: mean over channels of ``|log((σ²_c + ε) / (running_var_c + ε))|``,
                ``σ²_c`` the biased batch variance (the one training normalizes with)
``out_mean``    mean of the layer's output
``out_std``     standard deviation (biased) of the output
``mod_shift``   AdaLN: mean ``|shift(c)|`` of the modulation output for the current condition
``mod_scale``   AdaLN: mean ``|scale(c)|``
``mod_gate``    AdaLN with ``gate=True``: mean ``|gate(c)|``
``saturated``   DyT / Derf: the fraction of inputs where the S-curve saturates, ``|α·x (+ s)| > 2``
                (tanh and erf are within 4% and 0.5% of ±1 there: those inputs pass almost no
                gradient; the failure reported for DyT at scale)
``gamma_mean``  mean of γ (the layer's ``weight``; FrozenBatchNorm2d's buffer too)
``gamma_std``   standard deviation (biased) of γ
``beta_mean``   mean of β (the layer's ``bias``)
``beta_std``    standard deviation (biased) of β
``rho``         AdaLIN: mean of ``clamp(ρ, 0, 1)`` (what the forward uses)
``alpha``       DyT / Derf: the scalar α
``g_mean``      weight norm: mean of ``g`` (``parametrizations.weight.original0``)
``v_norm``      weight norm: mean over output channels of ``‖v‖`` (``original1``)
``grad_norm``   L2 norm of the gradients of all the layer's parameters (γ, β, ρ, AdaLN's
                modulation MLP, WN's ``g`` and ``v`` and the conv bias)
=============== ====================================================================================

Activation statistics (``in_*``, ``bn_*``, ``out_*``, ``mod_*``) are computed per forward call
on the local batch and averaged over the calls of the step and over processes (the mean of
per-rank values: for a plain BN that is what each rank normalizes with); parameter statistics
are the same on every rank. A weight-normalized conv has no γ/β statistics (its ``weight`` is
a conv kernel); every other layer has those its ``weight``/``bias`` tensors allow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "COLUMN",
    "HISTORY_COLUMNS",
    "IN_START",
    "MOD_START",
    "OUT_START",
    "PARAM_START",
    "PARAM_STATS",
    "SATURATED",
    "STATS",
    "batchnorm_input_stats",
    "grouped_grad_norms",
    "modulation_magnitude",
    "moments",
    "saturation",
    "segment_mean_std",
]

#: The statistics of one layer, in column order (see the module docs for definitions).
STATS: tuple[str, ...] = (
    "in_mean",
    "in_std",
    "bn_mean_gap",
    "bn_var_gap",
    "out_mean",
    "out_std",
    "mod_shift",
    "mod_scale",
    "mod_gate",
    "saturated",
    "gamma_mean",
    "gamma_std",
    "beta_mean",
    "beta_std",
    "rho",
    "alpha",
    "g_mean",
    "v_norm",
    "grad_norm",
)

#: Columns of one :class:`NormHistory` entry: :data:`STATS` and ``calls`` (forward calls).
HISTORY_COLUMNS: tuple[str, ...] = (*STATS, "calls")

COLUMN = {name: i for i, name in enumerate(STATS)}
IN_START = COLUMN["in_mean"]  # in_mean, in_std[, bn_mean_gap, bn_var_gap]
OUT_START = COLUMN["out_mean"]  # out_mean, out_std
MOD_START = COLUMN["mod_shift"]  # mod_shift, mod_scale[, mod_gate]
SATURATED = COLUMN["saturated"]
PARAM_START = COLUMN["gamma_mean"]  # gamma_mean ... grad_norm, the parameter block
PARAM_STATS = STATS[PARAM_START:]


def _floating(x: Tensor) -> Tensor:
    """``x`` detached, in float32 unless it is already float32/float64 (fp16/bf16 upcast)."""
    x = x.detach()
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def moments(x: Tensor) -> Tensor:
    """Mean and biased standard deviation of all elements of ``x``.

    On the CPU this is the two-pass formula (``mean = Σx / n``, then ``‖x − mean‖ / sqrt(n)``),
    faster there than ``torch.var_mean`` and as exact (``benchmarks/NOTES.md``); elsewhere it is
    one fused ``torch.var_mean``.

    Args:
        x: a floating tensor of any shape with at least one element.

    Returns:
        A float32 tensor ``[mean, std]`` on ``x``'s device.

    Example:
        >>> moments(torch.tensor([1.0, 3.0]))
        tensor([2., 1.])
    """
    x = _floating(x)
    if x.device.type == "cpu":
        mean = x.sum() / x.numel()
        std = torch.linalg.vector_norm(x - mean) / math.sqrt(x.numel())
    else:
        var, mean = torch.var_mean(x, correction=0)
        std = var.sqrt()
    return torch.stack((mean, std)).float()


def _channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` of shape ``(N, C, *S)`` over ``(N, *S)``.

    ``torch.batch_norm_update_stats`` (BatchNorm's own statistics kernel), faster on the CPU than
    ``torch.var_mean`` over those dims (``benchmarks/NOTES.md``); ``var_mean`` is the fallback.
    """
    try:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    except (RuntimeError, NotImplementedError):  # a backend without the kernel
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
    return mean, var


def batchnorm_input_stats(
    x: Tensor, running_mean: Tensor, running_var: Tensor, eps: float
) -> Tensor:
    """Input moments and the batch-vs-running-statistics gap of a BatchNorm input.

    One per-channel pass gives the batch statistics (BatchNorm's own statistics kernel); the
    overall mean and variance follow exactly from them (every channel has the same element
    count: ``var = mean_c(σ²_c) + var_c(μ_c)``).

    Args:
        x: BN input of shape ``(N, C, *S)``.
        running_mean: ``(C,)`` running mean, read before the forward updates it.
        running_var: ``(C,)`` running variance, read before the forward updates it.
        eps: the layer's epsilon.

    Returns:
        A float32 tensor ``[in_mean, in_std, bn_mean_gap, bn_var_gap]`` (see the module docs).

    Example:
        >>> x = torch.tensor([[1.0], [3.0]])  # N=2, C=1: batch mean 2, batch variance 1
        >>> batchnorm_input_stats(x, torch.zeros(1), torch.ones(1), eps=0.0)
        tensor([2., 1., 2., 0.])
    """
    mean_c, var_c = _channel_moments(_floating(x))
    mean = mean_c.mean()
    var = var_c.mean() + (mean_c - mean).square().mean()
    ref_var = running_var.detach().to(var_c.dtype) + eps
    mean_gap = ((mean_c - running_mean.detach().to(mean_c.dtype)).abs() * ref_var.rsqrt()).mean()
    var_gap = ((var_c + eps) / ref_var).log().abs().mean()
    return torch.stack((mean, var.sqrt(), mean_gap, var_gap)).float()


def saturation(x: Tensor, alpha: Tensor, shift: Tensor | None = None) -> Tensor:
    """The fraction of elements where ``|α·x (+ s)| > 2``: a DyT's tanh (a Derf's erf) is
    saturated there.

    Example:
        >>> saturation(torch.tensor([0.5, 3.0, -5.0, 1.0]), torch.tensor([1.0]))
        tensor([0.5000])
    """
    z = _floating(x) * alpha.detach().float()
    if shift is not None:
        z = z + shift.detach().float()
    return z.abs().gt(2).float().mean().reshape(1)


def modulation_magnitude(params: Tensor, chunks: int) -> Tensor:
    """Mean absolute value of each chunk of an AdaLN modulation output.

    Args:
        params: the modulation MLP's output of shape ``(N, chunks * C)``.
        chunks: 2 (shift, scale) or 3 (shift, scale, gate).

    Returns:
        A float32 tensor ``[mean |shift|, mean |scale|(, mean |gate|)]``.

    Example:
        >>> modulation_magnitude(torch.tensor([[1.0, -1.0, 2.0, -4.0]]), chunks=2)
        tensor([1., 3.])
    """
    p = _floating(params)
    return p.reshape(p.shape[0], chunks, -1).abs().mean(dim=(0, 2)).float()


def segment_mean_std(
    tensors: Sequence[Tensor], segments: Tensor, num_segments: int
) -> tuple[Tensor, Tensor]:
    """Mean and biased std of groups of tensors, all groups in a few fused ops.

    Args:
        tensors: the tensors; they are flattened and concatenated.
        segments: for every element of the concatenation, the index of its group (int64, on
            the tensors' device), e.g. from ``torch.repeat_interleave(rows, numels)``.
        num_segments: the number of groups; groups without elements get 0.

    Returns:
        ``(mean, std)``, float32 tensors of shape ``(num_segments,)``.

    Example:
        >>> mean, std = segment_mean_std(
        ...     [torch.tensor([1.0, 3.0]), torch.tensor([5.0])], torch.tensor([0, 0, 2]), 3
        ... )
        >>> mean, std
        (tensor([2., 0., 5.]), tensor([1., 0., 0.]))
    """
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    zeros = flat.new_zeros(num_segments)
    total = zeros.index_add(0, segments, flat)
    total_sq = zeros.index_add(0, segments, flat * flat)
    count = zeros.index_add(0, segments, torch.ones_like(flat)).clamp_min(1)
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0)
    return mean, var.sqrt()


def grouped_grad_norms(grads: Sequence[Tensor], rows: Tensor, num_rows: int) -> Tensor:
    """L2 norm of groups of gradients: one ``torch._foreach_norm`` and one ``index_add``.

    Args:
        grads: gradient tensors.
        rows: ``(len(grads),)`` int64: the group of each gradient.
        num_rows: the number of groups; groups without gradients get 0.

    Returns:
        A float32 tensor of shape ``(num_rows,)``: ``sqrt(sum of ‖g‖² over the group)``.

    Example:
        >>> grouped_grad_norms([torch.tensor([3.0]), torch.tensor([4.0])], torch.tensor([1, 1]), 2)
        tensor([0., 5.])
    """
    device = rows.device
    norms = torch._foreach_norm(list(grads))
    squares = torch.stack([n.to(device, torch.float32) for n in norms]).square()
    return squares.new_zeros(num_rows).index_add_(0, rows, squares).sqrt()
