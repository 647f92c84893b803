"""Data-free conversion: synthesize inputs whose statistics match the BatchNorms' running ones.

A pretrained BatchNorm remembers the mean and variance of what it saw during training. Inputs
optimized so that every BatchNorm's batch statistics match its running statistics
(DeepInversion, Yin et al. 2020) look, layer by layer, like the training data — enough to
calibrate and distill a converted model when no image of the domain is at hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from normswap.errors import CalibrationError
from normswap.inputs import model_device
from normswap.modes import eval_mode
from normswap.sources import describe_source

__all__ = ["statistics_gap", "synthesize"]


def _statistics_norms(model: nn.Module) -> list[tuple[nn.Module, Tensor, Tensor]]:
    found = []
    for module in dict.fromkeys(model.modules()):
        try:
            src = describe_source(module)
        except ValueError:
            continue
        if src.source == "bn" and src.has_statistics:
            assert src.running_mean is not None and src.running_var is not None
            found.append((module, src.running_mean.detach(), src.running_var.detach()))
    return found


class _Gap:
    """Forward pre-hooks summing, per BatchNorm, the distance of its input's batch statistics
    from its running statistics: ``‖μ − μ_run‖ + ‖σ² − σ²_run‖`` (DeepInversion's loss)."""

    def __init__(self, norms: list[tuple[nn.Module, Tensor, Tensor]]) -> None:
        self.terms: list[Tensor] = []
        self.relative: list[Tensor] = []
        self.handles = [
            m.register_forward_pre_hook(self._hook(mean, var)) for m, mean, var in norms
        ]

    def _hook(self, mean: Tensor, var: Tensor) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            dims = [0, *range(2, x.dim())]
            batch_var, batch_mean = torch.var_mean(x, dim=dims, correction=0)
            mean_gap = torch.linalg.vector_norm(batch_mean - mean)
            var_gap = torch.linalg.vector_norm(batch_var - var)
            self.terms.append(mean_gap + var_gap)
            scale = torch.linalg.vector_norm(mean) + torch.linalg.vector_norm(var)
            self.relative.append(((mean_gap + var_gap) / scale.clamp_min(1e-12)).detach())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def statistics_gap(model: nn.Module, x: Tensor) -> float:
    """How far ``x``'s batch statistics are from the BatchNorms' running ones: the mean over
    the BatchNorms of ``(‖μ − μ_run‖ + ‖σ² − σ²_run‖) / (‖μ_run‖ + ‖σ²_run‖)``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> statistics_gap(model, torch.randn(8, 3, 8, 8)) > 0
        True
    """
    norms = _statistics_norms(model)
    if not norms:
        raise CalibrationError(f"{type(model).__name__} has no BatchNorm with running statistics")
    gap = _Gap(norms)
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    finally:
        gap.remove()
    return float(torch.stack(gap.relative).mean())


def _total_variation(x: Tensor) -> Tensor:
    dh = (x[..., 1:, :] - x[..., :-1, :]).square().mean()
    dw = (x[..., :, 1:] - x[..., :, :-1]).square().mean()
    return dh + dw


def synthesize(
    model: nn.Module,
    samples: int,
    size: int | tuple[int, int],
    *,
    channels: int = 3,
    steps: int = 200,
    lr: float = 0.1,
    batch_size: int = 32,
    tv_weight: float = 1e-2,
    l2_weight: float = 1e-4,
    jitter: int = 4,
    seed: int = 0,
    max_seconds: float | None = None,
) -> Tensor:
    """Inputs for ``model`` whose BatchNorm statistics match its running statistics.

    Starting from noise, each batch is optimized (Adam, ``steps`` steps) to minimize
    DeepInversion's loss: over every BatchNorm with running statistics, the distance of its
    input's batch mean and variance from the running ones, plus a total-variation and an L2
    prior on the image; each step sees the batch randomly shifted by up to ``jitter`` pixels and
    flipped, so the result does not depend on exact positions. The inputs live in the space
    the model reads (for torchvision classifiers: normalized images). The model is used in eval
    mode and not modified.

    Args:
        model: a model with BatchNorm running statistics (a pretrained model).
        samples: how many inputs.
        size: their spatial size (an int for square inputs).
        channels: input channels.
        steps: optimization steps per batch.
        lr: Adam's learning rate on the inputs.
        batch_size: inputs optimized together (BatchNorm statistics are batch statistics).
        tv_weight: weight of the total-variation prior (smooth images).
        l2_weight: weight of the L2 prior (bounded values).
        jitter: largest random shift, in pixels, per step.
        seed: seeds the noise and the augmentation.
        max_seconds: stop early (every batch gets an equal share of the time).

    Returns:
        A tensor ``(samples, channels, *size)`` on the model's device.

    Raises:
        CalibrationError: a model without running statistics, or a bad argument.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                       nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> with torch.no_grad():
        ...     _ = model[1].running_mean.fill_(0.5), model[4].running_var.fill_(3.0)
        >>> noise = torch.randn(16, 3, 12, 12)
        >>> images = synthesize(model, 16, 12, steps=100, batch_size=16)
        >>> statistics_gap(model, images) < statistics_gap(model, noise)
        True
    """
    for name, value in (("samples", samples), ("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"synthesize: {name} must be a positive int, got {value!r}")
    norms = _statistics_norms(model)
    if not norms:
        raise CalibrationError(
            f"{type(model).__name__} has no BatchNorm with running statistics to match"
        )
    hw = (size, size) if isinstance(size, int) else tuple(size)
    device = model_device(model) or torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    batches = []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    gap = _Gap(norms)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with eval_mode(model):
            for index, first in enumerate(range(0, samples, batch_size)):
                n = min(batch_size, samples - first)
                x = torch.randn(n, channels, *hw, generator=generator).to(device)
                x.requires_grad_(True)
                optimizer = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9))
                deadline = None
                if max_seconds is not None:
                    share = max_seconds / -(-samples // batch_size)
                    deadline = start + share * (index + 1)
                for _ in range(steps):
                    dy, dx = (
                        int(v)
                        for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator)
                    )
                    view = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
                    if bool(torch.rand((), generator=generator) < 0.5):
                        view = view.flip(-1)
                    gap.terms.clear()
                    model(view)
                    loss = torch.stack(gap.terms).sum()
                    loss = loss + tv_weight * _total_variation(x) + l2_weight * x.square().mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if deadline is not None and time.perf_counter() > deadline:
                        break
                batches.append(x.detach())
    finally:
        gap.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return torch.cat(batches)
