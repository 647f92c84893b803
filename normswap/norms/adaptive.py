"""Adaptive normalizations: AdaLIN (IN/LN mix) and conditional AdaLN (DiT adaLN-Zero style).

"AdaLN" means two things in the literature. :class:`AdaLIN` is U-GAT-IT's learnable mix of
instance and layer statistics (no condition). :class:`AdaLN` is the conditional form: a LayerNorm
whose output is scaled and shifted by an MLP of a condition ``c``, set from outside with
:func:`condition`::

    with condition(model, c):
        y = model(x)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from normswap.errors import ConditionError, NormSwapError, SpecError
from normswap.norms.common import (
    ChannelAffineNorm,
    is_positive_int,
    keep_memory_format,
    refuse_input,
    spatial_numel,
    where,
)
from normswap.norms.dispatch import group_norm

__all__ = [
    "AdaLIN",
    "AdaLN",
    "Conditioned",
    "condition",
]


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """View a ``(C,)`` or ``(N, C)`` tensor so it broadcasts against ``x`` of shape (N, C, *S)."""
    lead = (1, -1) if t.dim() == 1 else (t.shape[0], -1)
    return t.view(*lead, *([1] * (x.dim() - 2)))


class AdaLIN(ChannelAffineNorm):
    """U-GAT-IT's adaptive layer-instance norm with a learnable per-channel mix ``rho``.

    ``y = weight * (rho * IN(x) + (1 - rho) * LN(x)) + bias`` where ``IN`` normalizes over the
    spatial dims per sample and channel, ``LN`` over ``(C, *S)`` per sample (both with biased
    variance and no affine), and ``rho`` (shape ``(C,)``, init ``rho_init``) is clamped to
    ``[0, 1]`` in forward. Both statistics come from the fused ``F.group_norm`` kernel (``C``
    groups and 1 group); the mix and the affine are one ``torch.lerp`` and one ``torch.addcmul``.

    Differences from the U-GAT-IT code, for reference: there ``gamma``/``beta`` of AdaLIN are
    predicted from a style code (here they are learned per channel, as in their ``LIN``), the
    variance is unbiased, and ``rho`` is clipped in place after each optimizer step (here the
    clamp is in forward, so a ``rho`` pushed outside ``[0, 1]`` gets no gradient until moved back).

    Args:
        num_channels: number of channels ``C``.
        eps: value added to the variances for numerical stability.
        rho_init: initial value of ``rho`` in ``[0, 1]``; 1 starts as InstanceNorm, 0 as
            LayerNorm (U-GAT-IT uses 0.9 in decoder blocks).
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0) of shape ``(C,)``.
        device: factory kwarg for the parameters.
        dtype: factory kwarg for the parameters.

    Example:
        >>> norm = AdaLIN(64, rho_init=0.9)
        >>> norm(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        rho_init: float = 0.9,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        if isinstance(rho_init, bool) or not isinstance(rho_init, int | float):
            raise SpecError(f"AdaLIN: rho_init must be a float in [0, 1], got {rho_init!r}")
        if not 0 <= rho_init <= 1:
            raise SpecError(f"AdaLIN: rho_init must be in [0, 1], got {rho_init!r}")
        self.rho_init = float(rho_init)
        self.rho = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        nn.init.constant_(self.rho, self.rho_init)

    def reset_parameters(self) -> None:
        """Reset ``rho`` to ``rho_init`` and the affine to ones/zeros."""
        super().reset_parameters()
        nn.init.constant_(self.rho, self.rho_init)

    def _norm_forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` of shape ``(N, C, *S)`` with the clamped IN/LN mix.

        Args:
            x: activation of shape ``(N, C, *S)`` with at least one spatial dim.

        Returns:
            The normalized activation, same shape and memory format as ``x``.

        Raises:
            NormSwapError: no spatial dims, wrong channel count, or a single spatial element.

        Example:
            >>> AdaLIN(4)(torch.randn(2, 4, 5)).shape
            torch.Size([2, 4, 5])
        """
        if not torch.jit.is_scripting():
            self._check(x)
        inst = group_norm(x, self.num_channels, None, None, self.eps)
        layer = group_norm(x, 1, None, None, self.eps)
        # lerp(ln, in, rho) = rho * in + (1 - rho) * ln
        # Parameters follow the activation's dtype (under autocast group_norm returns bf16/fp16
        # while the parameters stay float32; lerp/addcmul need one dtype).
        view = [1, -1] + [1] * (x.dim() - 2)
        rho = self.rho.clamp(0, 1).view(view)
        cast = rho.dtype != layer.dtype
        out = torch.lerp(layer, inst, rho.to(layer.dtype) if cast else rho)
        weight, bias = self.weight, self.bias
        if weight is not None and bias is not None:
            weight, bias = weight.view(view), bias.view(view)
            if cast:
                weight, bias = weight.to(out.dtype), bias.to(out.dtype)
            out = torch.addcmul(bias, out, weight)
        if torch.jit.is_scripting() or x.is_contiguous():
            return out
        else:
            return keep_memory_format(out, x)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (see :meth:`_norm_forward`; the ``*Act`` variants call that one)."""
        return self._norm_forward(x)

    @torch.jit.unused
    def _check(self, x: Tensor) -> None:
        if x.dim() < 3 or x.shape[1] != self.num_channels:
            refuse_input(self, x, self.num_channels, min_dim=3)
        if spatial_numel(x) == 1:
            raise NormSwapError(
                f"{where(self)}: AdaLIN got input of shape {tuple(x.shape)} with a single "
                f"spatial element per channel, so its instance statistics are undefined; use "
                f"LayerNorm or GroupNorm here"
            )

    def extra_repr(self) -> str:
        """Describe the layer: channels, eps, rho_init and affine."""
        return (
            f"{self.num_channels}, eps={self.eps}, rho_init={self.rho_init}, affine={self.affine}"
        )


class AdaLN(ChannelAffineNorm):
    """Conditional LayerNorm, DiT adaLN-Zero style, modulated by a condition ``c``.

    ``h = LayerNorm(x)`` over ``(C, *S)`` per sample with a per-channel affine (so a converted
    BatchNorm's ``weight``/``bias`` are kept), then ``y = h * (1 + scale(c)) + shift(c)``, and with
    ``gate=True`` ``y = y * (1 + gate(c))``. ``shift``, ``scale`` (and ``gate``) are the chunks, in
    that order, of ``self.modulation(c)`` of shape ``(N, k * C)``. The modulation MLP's last
    Linear is zero-initialized, so at initialization the layer computes exactly the LayerNorm
    output whatever the condition.

    The condition is not a forward argument (the layer is a drop-in for BatchNorm): set it with
    the :func:`condition` context manager, which fills the plain attribute ``self.condition``
    (shape ``(N, cond_dim)``, or ``(cond_dim,)`` / ``(1, cond_dim)`` shared by the batch).

    Args:
        num_channels: number of channels ``C``.
        cond_dim: size of the condition vector.
        hidden_dim: hidden width of a two-layer modulation MLP; ``None`` for DiT's
            ``SiLU -> Linear``.
        gate: also predict a multiplicative gate ``1 + gate(c)``.
        eps: value added to the variance for numerical stability.
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0) of shape ``(C,)``.
        device: factory kwarg for the parameters.
        dtype: factory kwarg for the parameters.

    Example:
        >>> norm = AdaLN(64, cond_dim=16)
        >>> with condition(norm, torch.randn(2, 16)):
        ...     y = norm(torch.randn(2, 64, 8, 8))
        >>> y.shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(
        self,
        num_channels: int,
        cond_dim: int,
        hidden_dim: int | None = None,
        gate: bool = False,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        if not is_positive_int(cond_dim):
            raise SpecError(f"AdaLN: cond_dim must be a positive int, got {cond_dim!r}")
        if hidden_dim is not None and not is_positive_int(hidden_dim):
            raise SpecError(f"AdaLN: hidden_dim must be a positive int or None, got {hidden_dim!r}")
        self.cond_dim = cond_dim
        self.hidden_dim = hidden_dim
        self.gate = bool(gate)
        self.chunks = 3 if self.gate else 2
        factory = {"device": device, "dtype": dtype}
        out_features = self.chunks * num_channels
        if hidden_dim is None:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, out_features, **factory))
        else:
            self.modulation = nn.Sequential(
                nn.Linear(cond_dim, hidden_dim, **factory),
                nn.SiLU(),
                nn.Linear(hidden_dim, out_features, **factory),
            )
        self._zero_last_linear()
        #: The condition for the next forward passes; set by :func:`condition`.
        self.condition: Tensor | None = None

    def _zero_last_linear(self) -> None:
        last = self.modulation[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def reset_parameters(self) -> None:
        """Reset the affine to ones/zeros and the modulation (last Linear to zero)."""
        super().reset_parameters()
        for module in self.modulation:
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        self._zero_last_linear()

    def _checked_condition(self, x: Tensor) -> Tensor:
        c = self.condition
        if c is None:
            raise ConditionError(
                f"AdaLN at {where(self)} has no condition: call the model inside "
                f"`with normswap.condition(model, c):`"
            )
        batch = x.shape[0]
        if c.dim() == 1:
            c = c.unsqueeze(0)
        if c.dim() != 2 or c.shape[1] != self.cond_dim or c.shape[0] not in (1, batch):
            raise ConditionError(
                f"AdaLN at {where(self)}: condition of shape {tuple(self.condition.shape)} "
                f"does not fit input of shape {tuple(x.shape)}; expected "
                f"({batch}, {self.cond_dim}) or ({self.cond_dim},)"
            )
        return c

    def _norm_forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` of shape ``(N, C, *S)`` and modulate it by ``self.condition``.

        Args:
            x: activation of shape ``(N, C)`` or ``(N, C, *S)``.

        Returns:
            The modulated activation, same shape and memory format as ``x``.

        Raises:
            ConditionError: no condition is set, or its shape does not fit ``x``.
            NormSwapError: wrong rank or channel count, or a single element per sample.

        Example:
            >>> norm = AdaLN(4, cond_dim=3)
            >>> norm.condition = torch.randn(3)
            >>> norm(torch.randn(2, 4, 5)).shape
            torch.Size([2, 4, 5])
        """
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            refuse_input(self, x, self.num_channels, min_dim=2)
        c = self._checked_condition(x)
        if self.num_channels == 1 and spatial_numel(x) == 1:
            raise NormSwapError(
                f"{where(self)}: AdaLN sees 1 element per sample for input of shape "
                f"{tuple(x.shape)}, so its normalized output would be the constant bias"
            )
        h = group_norm(x, 1, self.weight, self.bias, self.eps)
        weight = self.modulation[-1].weight
        if c.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            c = c.to(weight.dtype)  # a condition in another dtype than the modulation's
        mod = self.modulation(c)
        params = (mod if mod.dtype == h.dtype else mod.to(h.dtype)).chunk(self.chunks, dim=1)
        shift, scale = _channel_view(params[0], x), _channel_view(params[1], x)
        out = torch.addcmul(shift, h, 1 + scale)
        if self.gate:
            out = out * (1 + _channel_view(params[2], x))
        return out if x.is_contiguous() else keep_memory_format(out, x)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` (see :meth:`_norm_forward`; the ``*Act`` variants call that one)."""
        return self._norm_forward(x)

    def extra_repr(self) -> str:
        """Describe the layer: channels, condition size, MLP width, gate, eps and affine."""
        return (
            f"{self.num_channels}, cond_dim={self.cond_dim}, hidden_dim={self.hidden_dim}, "
            f"gate={self.gate}, eps={self.eps}, affine={self.affine}"
        )


@contextlib.contextmanager
def condition(model: nn.Module, c: Tensor) -> Iterator[None]:
    """Set the condition ``c`` on every :class:`AdaLN` in ``model`` for the enclosed block.

    Every AdaLN among ``model.modules()`` (``model`` itself included; a shared instance once)
    gets ``.condition = c``; the previous values are restored on exit, also when the block
    raises, so contexts nest.

    Args:
        model: a module containing AdaLN layers (or an AdaLN itself).
        c: condition of shape ``(N, cond_dim)``, or ``(cond_dim,)`` shared by the batch.

    Yields:
        Nothing; run the model inside the block.

    Raises:
        ConditionError: ``model`` holds no AdaLN, ``c`` is not a tensor, or ``c``'s last dim
            does not match an AdaLN's ``cond_dim``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), AdaLN(8, cond_dim=4))
        >>> with condition(model, torch.randn(2, 4)):
        ...     y = model(torch.randn(2, 3, 8, 8))
    """
    layers = [m for m in model.modules() if isinstance(m, AdaLN)]
    if not layers:
        raise ConditionError("no AdaLN layers in this model; swap to 'adaln' first")
    if not isinstance(c, Tensor):
        raise ConditionError(f"the condition must be a torch.Tensor, got {type(c).__name__}")
    for layer in layers:
        if c.dim() not in (1, 2) or c.shape[-1] != layer.cond_dim:
            raise ConditionError(
                f"AdaLN at {where(layer)} expects a condition of shape (N, {layer.cond_dim}) "
                f"or ({layer.cond_dim},), got {tuple(c.shape)}"
            )
    previous = [layer.condition for layer in layers]
    for layer in layers:
        layer.condition = c
    try:
        yield
    finally:
        for layer, value in zip(layers, previous, strict=True):
            layer.condition = value


class Conditioned(nn.Module):
    """``model`` with the AdaLN condition as an explicit second input: ``forward(x, c)``.

    For export (``torch.export``, ``torch.onnx.export(..., dynamo=True)``, ``torch.jit.trace``)
    and serving, where a context manager cannot be part of the call: the exported graph takes
    the condition as an input. Same result as ``with condition(model, c): model(x)``.

    Args:
        model: a model holding :class:`AdaLN` layers.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), AdaLN(8, cond_dim=4))
        >>> x, c = torch.randn(2, 3, 8, 8), torch.randn(2, 4)
        >>> program = torch.export.export(Conditioned(net), (x, c))
        >>> with condition(net, c):
        ...     torch.allclose(program.module()(x, c), net(x))
        True
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not any(isinstance(m, AdaLN) for m in model.modules()):
            raise ConditionError("Conditioned: the model holds no AdaLN layer; export it as is")
        self.model = model

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Run ``model(x)`` with every AdaLN conditioned on ``c``."""
        with condition(self.model, c):
            return self.model(x)
