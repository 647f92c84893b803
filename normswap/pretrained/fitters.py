"""Calibration fitters: a per-channel linear model of a converted layer's output.

:func:`normswap.calibrate` fits each converted layer's free per-channel parameters by least
squares; a :class:`Fitter` tells it how the layer's output depends on them. Each norm family
registers the fitter of its layers (:func:`normswap.register_family`); this module holds the
base class, the generic :class:`AffineFitter` and the registry.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from normswap.errors import CalibrationError
from normswap.registry import TypeRegistry

__all__ = [
    "FITTERS",
    "AffineFitter",
    "Fitter",
    "ScalarGridFitter",
    "assigned",
    "evaluate_with",
    "find_fitter",
    "layer_affine",
    "register_fitter",
]


class Fitter:
    """How to fit one family of converted layers: a per-channel linear model of its output.

    A fitter describes the layer's output as ``y = offset + Σ_k coef[c, k] · basis_k``: each
    basis has the output's shape (``None`` stands for the constant 1, the usual basis of a
    bias), ``coef`` has shape ``(C, K)``, and the fitter maps ``coef`` to and from the layer's
    parameters. Subclasses implement :meth:`basis`, :meth:`coefficients` and :meth:`assign`;
    :func:`register_fitter` makes them known.

    Attributes:
        params: names of the parameters the fitter sets, for the report.

    Example:
        >>> fitter = find_fitter(nn.GroupNorm(2, 4))
        >>> fitter.params, fitter.coefficients(nn.GroupNorm(2, 4)).shape
        (('weight', 'bias'), torch.Size([4, 2]))
    """

    params: tuple[str, ...] = ()

    def basis(self, module: nn.Module, x: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
        """Return ``(offset or None, [basis_1, ..., basis_K])`` for input ``x``."""
        raise NotImplementedError

    def candidates(self, module: nn.Module) -> list[dict[str, Tensor]]:
        """Values of the layer's non-linear scalar parameters to try (a grid): calibration
        fits the linear coefficients under each and keeps the setting whose fit leaves the least
        error (DyT's α). The first is the layer's current setting. Default: nothing to search.

        Example:
            >>> AffineFitter().candidates(nn.GroupNorm(2, 4))
            [{}]
        """
        return [{}]

    def channel_dim(self, module: nn.Module) -> int:
        """The dim of the layer's output that indexes its channels (the coefficients' rows):
        1, or -1 for a channels-last layer.

        Example:
            >>> AffineFitter().channel_dim(nn.GroupNorm(2, 4))
            1
        """
        return -1 if getattr(module, "channels_last", False) else 1

    def coefficients(self, module: nn.Module) -> Tensor:
        """The module's current parameters as ``coef`` of shape ``(C, K)``."""
        raise NotImplementedError

    def assign(self, module: nn.Module, coef: Tensor, gram: Tensor, rhs: Tensor) -> Tensor:
        """Set the parameters from the least-squares ``coef`` (shape ``(C, K)``).

        ``gram`` (``(C, K, K)``) and ``rhs`` (``(C, K)``) are the normal equations, for fitters
        that must re-solve under a constraint. Returns the ``coef`` actually assigned.
        """
        raise NotImplementedError


@contextlib.contextmanager
def assigned(module: nn.Module, values: Mapping[str, Tensor]) -> Iterator[None]:
    """Set some of ``module``'s parameters to ``values`` for a while (no autograd), then put
    them back.

    Example:
        >>> norm = nn.GroupNorm(1, 2)
        >>> with assigned(norm, {"bias": torch.ones(2)}):
        ...     inside = norm.bias.tolist()
        >>> inside, norm.bias.tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """
    tensors = {name: _attr(module, name) for name in values}
    saved = {name: t.detach().clone() for name, t in tensors.items()}
    try:
        with torch.no_grad():
            for name, value in values.items():
                tensors[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                tensors[name].copy_(value)


def _attr(module: nn.Module, name: str) -> Tensor:
    """``module.a.b`` for ``name == "a.b"``."""
    for part in name.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def evaluate_with(module: nn.Module, values: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``module.forward(x)`` with some parameters temporarily set to ``values`` (no hooks run).

    Example:
        >>> norm = nn.GroupNorm(1, 2)
        >>> x = torch.randn(3, 2, 4)
        >>> y = evaluate_with(norm, {"bias": torch.ones(2)}, x)
        >>> torch.allclose(y, norm(x) + 1, atol=1e-6), norm.bias.tolist()
        (True, [0.0, 0.0])
    """
    with assigned(module, values), torch.no_grad():
        # A norm + activation layer: the normalization alone (what is fitted).
        return getattr(module, "forward_norm", module.forward)(x)


def layer_affine(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The layer's per-channel ``(weight, bias)`` (``bias`` is ``None`` for a layer without β,
    such as RMSNorm); refuses a layer without ``weight``.

    Example:
        >>> layer_affine(nn.GroupNorm(1, 2, affine=False))
        Traceback (most recent call last):
        ...
        normswap.errors.CalibrationError: GroupNorm has no affine weight/bias to calibrate ...
    """
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, Tensor):
        raise CalibrationError(
            f"{type(module).__name__} has no affine weight/bias to calibrate (affine=False): "
            "convert with an affine target or exclude this layer"
        )
    return weight, bias if isinstance(bias, Tensor) else None


class AffineFitter(Fitter):
    """Layers computing ``weight[c] · x̂ + bias[c]`` from a normalized ``x̂`` (or
    ``weight[c] · x̂`` for a layer without β, such as RMSNorm).

    GroupNorm, LayerNorm, LayerNorm2d, InstanceNorm (batch or running statistics), RMSNorm and
    ``torch.nn.GroupNorm``. The basis ``x̂`` is the module's own output with weight 1 and bias
    0 (one extra forward of the layer).

    Example:
        >>> offset, (xhat, ones) = AffineFitter().basis(nn.GroupNorm(2, 4), torch.randn(2, 4, 3, 3))
        >>> offset, xhat.shape, ones
        (None, torch.Size([2, 4, 3, 3]), None)
    """

    params = ("weight", "bias")

    def basis(self, module: nn.Module, x: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
        """Return ``(None, [x̂, 1])`` (``(None, [x̂])`` without β)."""
        weight, bias = layer_affine(module)
        values = {"weight": torch.ones_like(weight)}
        if bias is not None:
            values["bias"] = torch.zeros_like(bias)
        xhat = evaluate_with(module, values, x)
        return None, [xhat, None] if bias is not None else [xhat]

    def coefficients(self, module: nn.Module) -> Tensor:
        """``(weight, bias)`` as ``(C, 2)`` (``(C, 1)`` without β)."""
        weight, bias = layer_affine(module)
        parts = [weight.detach()] if bias is None else [weight.detach(), bias.detach()]
        return torch.stack(parts, dim=1)

    def assign(self, module: nn.Module, coef: Tensor, gram: Tensor, rhs: Tensor) -> Tensor:
        """Copy ``coef[:, 0]`` into ``weight`` and ``coef[:, 1]`` into ``bias`` in place."""
        weight, bias = layer_affine(module)
        with torch.no_grad():
            weight.copy_(coef[:, 0])
            if bias is not None:
                bias.copy_(coef[:, 1])
        return coef


class ScalarGridFitter(AffineFitter):
    """An :class:`AffineFitter` for layers with scalar non-linear parameters too (DyT's α,
    Derf's α and shift): their values are searched on a grid (:meth:`candidates`), γ/β fitted
    by least squares under each, the best kept.

    Args:
        grid: parameter name -> the values to try; every combination is a candidate.

    Example:
        >>> from normswap.norms import DyT
        >>> fitter = ScalarGridFitter({"alpha": (0.25, 1.0)})
        >>> [float(c["alpha"]) for c in fitter.candidates(DyT(4, alpha_init=0.5))]
        [0.5, 0.25, 1.0]
    """

    def __init__(self, grid: Mapping[str, tuple[float, ...]]) -> None:
        self.grid = {name: tuple(values) for name, values in grid.items()}
        self.params = ("weight", "bias", *self.grid)

    def candidates(self, module: nn.Module) -> list[dict[str, Tensor]]:
        """The current values first, then every combination of the grid."""
        current = {name: getattr(module, name).detach().clone() for name in self.grid}
        out = [current]
        for combo in itertools.product(*self.grid.values()):
            out.append(
                {
                    name: torch.full_like(current[name], value)
                    for name, value in zip(self.grid, combo, strict=True)
                }
            )
        return out


class WrapperFitter(Fitter):
    """Fits the norm a wrapper holds in ``attr`` with that norm's own fitter (a
    :class:`~normswap.norms.BlendNorm`'s target, a :class:`~normswap.norms.NormThen`'s norm).

    Example:
        >>> from normswap.norms import NormThen
        >>> layer = NormThen(nn.GroupNorm(2, 4), [("act", nn.ReLU())])
        >>> WrapperFitter("norm").coefficients(layer).shape
        torch.Size([4, 2])
    """

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def _inner(self, module: nn.Module) -> tuple[Fitter, nn.Module]:
        inner = getattr(module, self.attr)
        fitter = find_fitter(inner)
        if fitter is None:
            raise CalibrationError(
                f"no calibration fitter for {type(inner).__name__} inside "
                f"{type(module).__name__}: register one with normswap.register_fitter"
            )
        self.params = fitter.params
        return fitter, inner

    def basis(self, module: nn.Module, x: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
        """The wrapped norm's basis on ``x``."""
        fitter, inner = self._inner(module)
        return fitter.basis(inner, x)

    def coefficients(self, module: nn.Module) -> Tensor:
        """The wrapped norm's coefficients."""
        fitter, inner = self._inner(module)
        return fitter.coefficients(inner)

    def assign(self, module: nn.Module, coef: Tensor, gram: Tensor, rhs: Tensor) -> Tensor:
        """Set the wrapped norm's parameters."""
        fitter, inner = self._inner(module)
        return fitter.assign(inner, coef, gram, rhs)

    def candidates(self, module: nn.Module) -> list[dict[str, Tensor]]:
        """The wrapped norm's candidates, by the wrapper's attribute path."""
        fitter, inner = self._inner(module)
        return [{f"{self.attr}.{k}": v for k, v in c.items()} for c in fitter.candidates(inner)]

    def channel_dim(self, module: nn.Module) -> int:
        """The wrapped norm's channel dim."""
        fitter, inner = self._inner(module)
        return fitter.channel_dim(inner)


#: Layer classes -> the fitter of their family (looked up by MRO). Norm families register their
#: layers' fitter with :func:`normswap.register_family`; :func:`register_fitter` adds one for a
#: layer of your own.
FITTERS: TypeRegistry[Fitter] = TypeRegistry("calibration fitter")


def register_fitter(*classes: type) -> Callable[[type[Fitter]], type[Fitter]]:
    """Class decorator: use this :class:`Fitter` for ``classes`` and their subclasses.

    Lookup walks the layer's MRO, so the most specific registration wins.

    Raises:
        SpecError: a class that already has a fitter.

    Example:
        >>> class MyNorm(nn.GroupNorm): ...
        >>> @register_fitter(MyNorm)
        ... class MyFitter(AffineFitter): ...
        >>> type(find_fitter(MyNorm(2, 4))).__name__
        'MyFitter'
        >>> _ = FITTERS.unregister(MyNorm)
    """

    def decorator(cls: type[Fitter]) -> type[Fitter]:
        fitter = cls()
        for c in classes:
            FITTERS.register(c, fitter)
        return cls

    return decorator


def _register_wrappers() -> None:
    from normswap.norms import BlendNorm, NormThen

    FITTERS.register(NormThen, WrapperFitter("norm"))
    FITTERS.register(BlendNorm, WrapperFitter("target"))


def find_fitter(module: nn.Module) -> Fitter | None:
    """The fitter registered for ``module``'s class or its nearest base class, or ``None``.

    Example:
        >>> type(find_fitter(nn.GroupNorm(2, 4))).__name__, find_fitter(nn.ReLU())
        ('AffineFitter', None)
    """
    return FITTERS.lookup(module)


_register_wrappers()
