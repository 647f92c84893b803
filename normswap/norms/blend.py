"""A norm on its way from a pretrained norm to another norm, moved by ``alpha``.

Converting a pretrained model all at once changes every layer's output at once. A
:class:`BlendNorm` holds the BatchNorm's eval-mode affine (a :class:`~normswap.FrozenAffine`,
exactly what the pretrained model computed) and the new norm, and ``alpha`` moves it from one
to the other: at ``alpha = 0`` the model computes exactly what it did, at ``alpha = 1``
exactly what the converted model does. :mod:`normswap.progressive` ramps ``alpha`` during
distillation or fine-tuning and then replaces every blend by its target.

How the two are mixed matters (measured in ``benchmarks/NOTES.md``, "progressive
conversion"). Mixing the *outputs*, ``(1 − α)·frozen(x) + α·target(x)``, lets training escape
the conversion: the frozen branch is linear in ``x`` and the target is scale-invariant, so
growing the activations lets the frozen branch dominate until ``α`` reaches 1, where accuracy
collapses. For targets whose statistics are known (:data:`BLEND_STATISTICS`: GroupNorm,
LayerNorm, InstanceNorm without running statistics, LayerNorm2d) the blend instead mixes the
*statistics*: it normalizes with ``μ_α = (1 − α)·μ₀ + α·μ(x)`` and
``σ²_α = (1 − α)·σ₀² + α·(σ²(x) + eps)`` and applies the target's own affine, where ``μ₀, σ₀²``
are the statistics that make the target's affine reproduce the frozen BatchNorm. Every ``α``
is then a normalization the network cannot escape by rescaling. Other targets mix outputs, and so
do blends that start from a norm other than a BatchNorm (a pretrained LayerNorm, kept frozen as it
was: at ``alpha = 0`` the model is the pretrained one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from normswap.errors import SpecError
from normswap.norms.frozen import FrozenAffine
from normswap.norms.group import GroupNorm
from normswap.norms.instance import InstanceNorm
from normswap.norms.layer import LayerNorm, LayerNorm2d
from normswap.registry import TypeRegistry

__all__ = ["BLEND_STATISTICS", "BlendNorm", "StatisticsFn", "register_blend_statistics"]

#: ``statistics(target, x) -> (mean, var)``: the target norm's per-sample statistics of ``x``
#: (biased variance, without eps), shaped to broadcast against ``x``; ``None`` when the
#: target's current mode does not normalize with per-sample statistics.
StatisticsFn = Callable[[nn.Module, Tensor], "tuple[Tensor, Tensor] | None"]

#: How each target class computes its statistics, looked up along the class hierarchy.
BLEND_STATISTICS: TypeRegistry[StatisticsFn] = TypeRegistry("blend statistics")


def register_blend_statistics(cls: type, fn: StatisticsFn) -> StatisticsFn:
    """Teach :class:`BlendNorm` a target's statistics, so it blends statistics, not outputs.

    The target must compute ``(x − mean) / sqrt(var + eps) · weight[c] + bias[c]`` with its
    ``weight``, ``bias`` (or none) and ``eps`` attributes.

    Example:
        >>> class MyGN(nn.GroupNorm): ...
        >>> register_blend_statistics(MyGN, BLEND_STATISTICS.get(nn.GroupNorm)) is not None
        True
        >>> _ = BLEND_STATISTICS.unregister(MyGN)
    """
    return BLEND_STATISTICS.register(cls, fn)


def _grouped(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    n, c = x.shape[:2]
    var, mean = torch.var_mean(x.reshape(n, groups, -1), dim=-1, correction=0, keepdim=True)
    shape = (n, groups, 1, *([1] * (x.dim() - 2)))
    view = (n, c, *([1] * (x.dim() - 2)))
    # (N, G, 1, ...) -> (N, C, 1, ...): each group's statistic for each of its channels.
    expand = (n, groups, c // groups, *([1] * (x.dim() - 2)))
    return (
        mean.view(shape).expand(expand).reshape(view),
        var.view(shape).expand(expand).reshape(view),
    )


def _group_statistics(target: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    return _grouped(x, target.num_groups)


def _layer_statistics(target: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    return _grouped(x, 1)


def _instance_statistics(target: nn.Module, x: Tensor) -> tuple[Tensor, Tensor] | None:
    if target.track_running_stats and not target.training:
        return None  # eval mode normalizes with running statistics: mix outputs instead
    return _grouped(x, x.shape[1])


def _channel_statistics(target: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
    return mean, var


BLEND_STATISTICS.register(nn.GroupNorm, _group_statistics)
BLEND_STATISTICS.register(GroupNorm, _group_statistics)
BLEND_STATISTICS.register(LayerNorm, _layer_statistics)
BLEND_STATISTICS.register(InstanceNorm, _instance_statistics)
BLEND_STATISTICS.register(LayerNorm2d, _channel_statistics)


class BlendNorm(nn.Module):
    """The pretrained BatchNorm at ``alpha = 0``, the target norm at ``alpha = 1``.

    For targets in :data:`BLEND_STATISTICS` the statistics are mixed (see the module
    docstring) and the target's ``weight``/``bias`` apply at every ``alpha``; at ``alpha = 0``
    that is the frozen BatchNorm with a trainable affine. :meth:`anchor` computes the starting
    statistics ``mean0``/``var0`` from the frozen affine and the target's affine (it runs at
    construction; run it again after changing the target's affine, e.g. after calibrating it,
    so that ``alpha = 0`` is again exactly the pretrained layer). Other targets mix outputs,
    ``(1 − alpha)·frozen(x) + alpha·target(x)``.

    ``alpha`` is a persistent buffer, so a checkpoint taken part-way keeps it (a Python copy of
    it is what the forward pass reads, so no tensor is read back). At ``alpha = 1`` only the
    target runs. In between, gradients reach the input through both the starting and the
    per-sample statistics, and the target's affine.

    Args:
        frozen: the pretrained norm, frozen: a BatchNorm as a frozen affine, or any other norm
            module (a LayerNorm's frozen copy), whose outputs are mixed with the target's.
        target: the new norm layer.
        alpha: the starting mix.

    Example:
        >>> blend = BlendNorm(FrozenAffine(4), nn.GroupNorm(2, 4), alpha=0.0)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(blend(x), blend.frozen(x), atol=1e-6)
        True
        >>> blend.set_alpha(1.0)
        >>> torch.equal(blend(x), blend.target(x))
        True
    """

    def __init__(self, frozen: nn.Module, target: nn.Module, alpha: float = 0.0) -> None:
        super().__init__()
        self.frozen = frozen
        self.target = target
        tensor = next(iter([*frozen.parameters(), *frozen.buffers()]), torch.zeros(()))
        self.register_buffer("alpha", torch.tensor(0.0, device=tensor.device))
        if _affine_start(frozen):
            factory = {"device": tensor.device, "dtype": tensor.dtype}
            self.register_buffer("mean0", torch.zeros(frozen.num_channels, **factory))
            self.register_buffer("var0", torch.ones(frozen.num_channels, **factory))
        self.inexact_channels = 0
        self.anchor()
        self.set_alpha(alpha)

    @property
    def mixes_statistics(self) -> bool:
        """Whether this blend mixes statistics (its target is in :data:`BLEND_STATISTICS`).

        Example:
            >>> BlendNorm(FrozenAffine(2), nn.Identity()).mixes_statistics
            False
        """
        return _affine_start(self.frozen) and BLEND_STATISTICS.lookup(self.target) is not None

    def anchor(self) -> int:
        """Set ``mean0``/``var0`` so that ``alpha = 0`` reproduces the frozen affine.

        With the frozen affine ``s·x + b`` and the target's ``γ, β``: ``mean0 = (β − b) / s``
        and ``var0 = (γ / s)²``. A channel where ``γ`` and ``s`` differ in sign cannot be
        written this way; it starts from the target's affine over unit statistics instead.

        Returns:
            How many channels are not exact (0 for a fresh conversion, where ``γ`` is the
            BatchNorm's).

        Example:
            >>> BlendNorm(FrozenAffine(3), nn.GroupNorm(1, 3)).anchor()
            0
        """
        if not _affine_start(self.frozen):  # outputs are mixed: nothing to anchor
            return 0
        weight, bias = _affine(self.target, self.frozen.num_channels, self.mean0)
        if self.mean0.device.type == "meta":
            return 0
        with torch.no_grad():
            calc = torch.float32 if self.mean0.device.type == "mps" else torch.float64
            s, b = self.frozen.weight.to(calc), self.frozen.bias.to(calc)
            gamma, beta = weight.detach().to(calc), bias.detach().to(calc)
            ok = (s * gamma > 0) | ((s == 0) & (gamma == 0))
            safe_s = torch.where(s == 0, torch.ones_like(s), s)
            mean0 = torch.where(ok & (s != 0), (beta - b) / safe_s, torch.zeros_like(s))
            var0 = torch.where(ok & (s != 0), (gamma / safe_s) ** 2, torch.ones_like(s))
            self.mean0.copy_(mean0)
            self.var0.copy_(var0)
        self.inexact_channels = int((~ok).sum()) if self.mixes_statistics else 0
        return self.inexact_channels

    def set_alpha(self, alpha: float) -> None:
        """Set the mix (``0``: the pretrained BatchNorm, ``1``: the target norm).

        Example:
            >>> blend = BlendNorm(FrozenAffine(2), nn.GroupNorm(1, 2))
            >>> blend.set_alpha(0.25); float(blend.alpha)
            0.25
        """
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise SpecError(f"BlendNorm: alpha must be a number in [0, 1], got {alpha!r}")
        self._alpha = float(alpha)
        with torch.no_grad():
            self.alpha.fill_(self._alpha)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.alpha.device.type != "meta":
            self._alpha = float(self.alpha)

    def forward(self, x: Tensor) -> Tensor:
        """The blended normalization of ``x`` (the target alone at ``alpha = 1``)."""
        alpha = self._alpha
        if alpha >= 1.0:
            return self.target(x)
        rule = BLEND_STATISTICS.lookup(self.target) if self.mixes_statistics else None
        stats = None if rule is None or alpha <= 0.0 else rule(self.target, x)
        if rule is None or (stats is None and alpha > 0.0):
            if alpha <= 0.0:
                return self.frozen(x)
            start, end = self.frozen(x), self.target(x)
            return torch.lerp(start, end.to(start.dtype), alpha)
        view = (1, -1, *([1] * (x.dim() - 2)))
        weight, bias = _affine(self.target, x.shape[1], x)
        weight, bias = weight.to(x.dtype).view(view), bias.to(x.dtype).view(view)
        mean0, var0 = self.mean0.to(x.dtype).view(view), self.var0.to(x.dtype).view(view)
        if stats is None:  # alpha = 0: the frozen BatchNorm with the target's affine
            scale = weight * torch.rsqrt(var0)
            return torch.addcmul(bias - mean0 * scale, x, scale)
        mean, var = stats
        eps = float(self.target.eps)
        mean = torch.lerp(mean0, mean, alpha)
        var = torch.lerp(var0, var + eps, alpha)
        scale = torch.rsqrt(var) * weight
        return torch.addcmul(bias - mean * scale, x, scale)

    def extra_repr(self) -> str:
        """Describe the mix."""
        how = "statistics" if self.mixes_statistics else "outputs"
        return f"alpha={self._alpha:.4g}, mixes={how}"


def _affine_start(frozen: nn.Module) -> bool:
    """Whether a blend starts from a BatchNorm's frozen affine (statistics can be mixed)."""
    return isinstance(frozen, FrozenAffine) and not frozen.center and not frozen.channels_last


def _affine(target: nn.Module, channels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    weight = getattr(target, "weight", None)
    bias = getattr(target, "bias", None)
    if not isinstance(weight, Tensor):
        weight = torch.ones(channels, device=like.device, dtype=like.dtype)
    if not isinstance(bias, Tensor):
        bias = torch.zeros(channels, device=like.device, dtype=like.dtype)
    return weight, bias
