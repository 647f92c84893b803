"""AdaBN: re-estimate a model's BatchNorm statistics on the data of a new domain.

A pretrained BatchNorm normalizes with its training data's statistics. When the data a model
is converted or fine-tuned on comes from another domain (grayscale clothes for an ImageNet
model), re-estimating the running mean and variance there (Li et al., "Revisiting Batch
Normalization for Practical Domain Adaptation", 2016) makes the eval-mode model fit that domain
without training; :func:`normswap.convert_pretrained` can adapt the teacher this way before it
converts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normswap.distributed import all_ranks_true
from normswap.errors import CalibrationError
from normswap.inputs import (
    BatchToInput,
    call_model,
    check_samples,
    count_samples,
    default_batch_to_input,
    iter_inputs,
    model_device,
)
from normswap.modes import eval_mode
from normswap.sources import describe_source

__all__ = ["adapt_statistics"]


def adapt_statistics(
    model: nn.Module,
    data: Any,
    *,
    max_batches: int | None = None,
    batch_size: int = 32,
    batch_to_input: BatchToInput = default_batch_to_input,
) -> int:
    """Replace every BatchNorm's running statistics by those of ``data`` (AdaBN), in place.

    Each BatchNorm with running statistics and a momentum is reset and then accumulates a
    cumulative average over the batches (``momentum=None`` for the pass); everything else runs
    in eval mode (dropout off) without gradients. Afterwards every module's mode and momentum
    are as before. Under ``torch.distributed`` each rank accumulates its own data and every
    rank then holds the statistics of all ranks' samples pooled (means weighted by sample
    counts, variances including the spread between the ranks' means).

    Args:
        model: the model; modified in place (its BatchNorm buffers only).
        data: one tensor of samples (split into ``batch_size`` batches) or an iterable of batches.
        max_batches: use at most this many batches.
        batch_size: batch size when ``data`` is a tensor.
        batch_to_input: maps a batch of an iterable to model inputs.

    Returns:
        The number of samples the statistics were estimated on (per rank).

    Raises:
        CalibrationError: empty data, or a model without an adaptable BatchNorm.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
        >>> adapt_statistics(model, torch.randn(64, 3, 8, 8) + 5)
        64
        >>> bool(model[1].running_mean.abs().mean() > 1)
        True
    """
    norms = []
    for module in model.modules():
        try:
            src = describe_source(module)
        except ValueError:
            continue
        if (
            src.source == "bn"
            and src.has_statistics
            and hasattr(module, "momentum")
            and hasattr(module, "reset_running_stats")
        ):
            norms.append(module)
    if not norms:
        raise CalibrationError(
            f"{type(model).__name__} has no BatchNorm with running statistics to adapt"
        )
    device = model_device(model)
    stream = iter_inputs(
        data,
        batch_size=batch_size,
        batch_to_input=batch_to_input,
        device=device,
        max_batches=max_batches,
        what="adaptation data",
    )
    first = check_samples(next(stream, None), "adaptation data")
    saved = [
        (m, m.momentum, m.running_mean.clone(), m.running_var.clone(), _tracked(m)) for m in norms
    ]
    samples = 0
    try:
        with torch.no_grad(), eval_mode(model):
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over every batch
                m.train()
            batch: Any = first
            while all_ranks_true(batch is not None):
                call_model(model, batch)
                samples += count_samples(batch)
                batch = next(stream, None)
    except BaseException:
        with torch.no_grad():
            for m, momentum, mean, var, tracked in saved:
                m.momentum = momentum
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)
        raise
    for m, momentum, _, _, _ in saved:
        m.momentum = momentum
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _pool_ranks(norms, samples)
    return samples


def _tracked(module: nn.Module) -> Tensor | None:
    tracked = getattr(module, "num_batches_tracked", None)
    return tracked.clone() if isinstance(tracked, Tensor) else None


def _pool_ranks(norms: list[nn.Module], samples: int) -> None:
    """Every rank's statistics become those of all ranks' samples together: means weighted by
    each rank's sample count, variances including the spread of the ranks' means."""
    with torch.no_grad():
        count = torch.tensor(float(samples), device=norms[0].running_mean.device)
        torch.distributed.all_reduce(count)
        share = samples / max(float(count), 1.0)
        for m in norms:
            mean, var = m.running_mean, m.running_var
            second = (var + mean.square()) * share  # this rank's share of E[x^2]
            mean.mul_(share)
            torch.distributed.all_reduce(mean)
            torch.distributed.all_reduce(second)
            var.copy_(second - mean.square())
