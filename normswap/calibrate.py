"""Calibration: re-fit converted norm layers so they reproduce the original BatchNorm outputs.

After a swap, every converted layer ``y = f(x; θ)`` (GroupNorm, LayerNorm, InstanceNorm, AdaLIN,
AdaLN, ...) still holds the BatchNorm's γ/β, which were learned for *batch* statistics: copied
as they are, a pretrained model's predictions change completely. :func:`calibrate` re-fits each
converted layer's free per-channel parameters (``weight``/``bias``, and AdaLIN's ``rho``) by
least squares, so that on calibration data its outputs match the reference model's BatchNorm
outputs at the same path:

    minimize over (weight[c], bias[c], ...)   Σ_{n, s} (f(x; θ)[n, c, s] − BN_ref(x_ref)[n, c, s])²

where ``x`` is the converted model's own input to the layer (so each layer is fitted to what the
already-calibrated layers before it produce) and ``x_ref`` the reference's. For every supported
layer the output is linear in these parameters per channel, ``f = y0 + Σ_k θ_k[c] · A_k``, so the
fit is closed-form: per-channel Gram sums ``Σ A_i A_j`` and ``Σ A_i (t − y0)`` are accumulated
(float64) and a ``K × K`` system is solved per channel. No labels, no gradient steps.

Measured on the pretrained MobileNetV2 converted to GroupNorm (top-1 agreement with the
original on held-out Fashion-MNIST images): least squares 14%, rescaling the least-squares
fit to each channel's mean/std (``match="moments"``) 6%, and fitting every layer on the
*reference's* inputs instead of the converted model's own 0%: each layer must compensate what
the converted layers before it changed. No per-channel fit gets close to the original (see
:mod:`normswap.distill` for what does better).

**One pass, in execution order.** For each batch, the reference runs once and its BatchNorm
outputs at the converted paths are kept (memory: the reference's BatchNorm outputs for one
batch); then the converted model runs once, and a forward pre-hook on each converted layer adds
that batch's sums to the layer's running sums, solves, and sets the parameters *before the layer
runs*, so the layers after it see calibrated inputs. After the last batch each layer is fitted
to every batch. ``passes=2`` repeats the pass with fresh sums, so every batch is seen with the
final upstream parameters.

**Distributed.** When ``torch.distributed`` is initialized, the sums are all-reduced at every
layer (every rank fits to the data of all ranks) and the fitted parameters are broadcast from
rank 0 at the end, so every rank holds bit-identical parameters. Every rank must call
:func:`calibrate`; the batch count used is the smallest over the ranks.

Layers are fitted by a :class:`Fitter` looked up by class hierarchy (MRO);
:func:`register_fitter` adds one for a custom norm.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normswap.errors import NormSwapError
from normswap.norms.adaptive import AdaLIN, AdaLN
from normswap.norms.layer import _ChannelAffineNorm
from normswap.sources import is_source_norm

__all__ = [
    "AdaLINFitter",
    "AffineFitter",
    "CalibrationError",
    "CalibrationReport",
    "Fitter",
    "LayerFit",
    "calibrate",
    "converted_layers",
    "find_fitter",
    "input_batches",
    "register_fitter",
]


#: What :func:`calibrate` matches: ``"lstsq"`` minimizes the squared error of each layer's output;
#: ``"moments"`` takes the least-squares direction and rescales it so that each channel's output
#: mean and variance equal the reference's (errors then do not shrink activations layer after
#: layer).
MATCHES: tuple[str, ...] = ("moments", "lstsq")


class CalibrationError(NormSwapError):
    """Calibration or distillation cannot run: bad data, a reference that is not the model
    before the swap, or a converted layer that no fitter knows. Nothing was modified."""


# --------------------------------------------------------------------------- fitters


class Fitter:
    """How to fit one family of converted layers: a per-channel linear model of its output.

    A fitter describes the layer's output as ``y = offset + Σ_k coef[c, k] · basis_k``: each
    basis has the output's shape (``None`` stands for the constant 1, the usual basis of a
    bias), ``coef`` has shape ``(C, K)``, and the fitter maps ``coef`` to and from the layer's
    parameters. Subclasses implement :meth:`basis`, :meth:`coefficients` and :meth:`assign`;
    :func:`register_fitter` makes them known.

    Attributes:
        params: names of the parameters the fitter sets, for the report.
    """

    params: tuple[str, ...] = ()

    def basis(self, module: nn.Module, x: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
        """Return ``(offset or None, [basis_1, ..., basis_K])`` for input ``x``."""
        raise NotImplementedError

    def coefficients(self, module: nn.Module) -> Tensor:
        """The module's current parameters as ``coef`` of shape ``(C, K)``."""
        raise NotImplementedError

    def assign(self, module: nn.Module, coef: Tensor, gram: Tensor, rhs: Tensor) -> Tensor:
        """Set the parameters from the least-squares ``coef`` (shape ``(C, K)``).

        ``gram`` (``(C, K, K)``) and ``rhs`` (``(C, K)``) are the normal equations, for fitters
        that must re-solve under a constraint. Returns the ``coef`` actually assigned.
        """
        raise NotImplementedError


def _evaluate(module: nn.Module, values: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``module.forward(x)`` with some parameters temporarily set to ``values`` (no hooks run)."""
    saved = {name: getattr(module, name).detach().clone() for name in values}
    try:
        with torch.no_grad():
            for name, value in values.items():
                getattr(module, name).copy_(value)
            return module.forward(x)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                getattr(module, name).copy_(value)


def _params(module: nn.Module) -> tuple[Tensor, Tensor]:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor):
        raise CalibrationError(
            f"{type(module).__name__} has no affine weight/bias to calibrate (affine=False): "
            "convert with an affine target or exclude this layer"
        )
    return weight, bias


class AffineFitter(Fitter):
    """Layers computing ``weight[c] · x̂ + bias[c]`` from a normalized ``x̂``.

    GroupNorm, LayerNorm, LayerNorm2d, InstanceNorm (batch or running statistics) and
    ``torch.nn.GroupNorm``. The basis ``x̂`` is the module's own output with weight 1 and bias
    0 (one extra forward of the layer).

    Example:
        >>> from normswap.norms import GroupNorm
        >>> offset, (xhat, ones) = AffineFitter().basis(GroupNorm(4, 2), torch.randn(2, 4, 3, 3))
        >>> offset, xhat.shape, ones
        (None, torch.Size([2, 4, 3, 3]), None)
    """

    params = ("weight", "bias")

    def basis(self, module: nn.Module, x: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
        """Return ``(None, [x̂, 1])``."""
        weight, _ = _params(module)
        xhat = _evaluate(
            module, {"weight": torch.ones_like(weight), "bias": torch.zeros_like(weight)}, x
        )
        return None, [xhat, None]

    def coefficients(self, module: nn.Module) -> Tensor:
        """``(weight, bias)`` as ``(C, 2)``."""
        weight, bias = _params(module)
        return torch.stack([weight.detach(), bias.detach()], dim=1)

    def assign(self, module: nn.Module, coef: Tensor, gram: Tensor, rhs: Tensor) -> Tensor:
        """Copy ``coef[:, 0]`` into ``weight`` and ``coef[:, 1]`` into ``bias`` in place."""
        weight, bias = _params(module)
        with torch.no_grad():
            weight.copy_(coef[:, 0])
            bias.copy_(coef[:, 1])
        return coef


class ModulatedAffineFitter(AffineFitter):
    """Layers whose output is linear in ``weight``/``bias`` in any other way, e.g. AdaLN.

    AdaLN computes ``(weight · x̂ + bias) · (1 + scale(c)) + shift(c)``: the basis is found by
    running the layer three times, with ``(weight, bias)`` set to ``(0, 0)``, ``(1, 0)`` and
    ``(0, 1)``; its modulation is left as it is and its condition must be set (call
    :func:`calibrate` inside ``with normswap.condition(model, c):``).

    Example:
        >>> from normswap.norms import AdaLN, condition
        >>> norm = AdaLN(4, cond_dim=2)
        >>> with condition(norm, torch.zeros(2)):
        ...     offset, basis = ModulatedAffineFitter().basis(norm, torch.randn(2, 4, 3))
        >>> len(basis)
        2
    """

    def basis(self, module: nn.Module, x: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
        """Return ``(y(0, 0), [y(1, 0) − y(0, 0), y(0, 1) − y(0, 0)])``."""
        weight, _ = _params(module)
        one, zero = torch.ones_like(weight), torch.zeros_like(weight)
        y00 = _evaluate(module, {"weight": zero, "bias": zero}, x)
        y10 = _evaluate(module, {"weight": one, "bias": zero}, x)
        y01 = _evaluate(module, {"weight": zero, "bias": one}, x)
        if not bool(y00.abs().amax() > 0) and bool((y01 == 1).all()):
            return None, [y10, None]  # no modulation at work: plain affine
        return y00, [y10 - y00, y01 - y00]


class AdaLINFitter(Fitter):
    """AdaLIN: ``y = w·(ρ·IN(x) + (1 − ρ)·LN(x)) + b`` is linear in ``(w·ρ, w·(1 − ρ), b)``.

    The unconstrained fit gives ``w = p + q`` and ``ρ = p / (p + q)``; when that ``ρ`` falls
    outside ``[0, 1]`` (where the layer clamps it) it is clipped and ``(w, b)`` re-solved
    exactly for the clipped ``ρ`` from the same sums.

    Example:
        >>> _, basis = AdaLINFitter().basis(AdaLIN(4), torch.randn(2, 4, 3, 3))
        >>> len(basis)
        3
    """

    params = ("weight", "bias", "rho")

    def basis(self, module: nn.Module, x: Tensor) -> tuple[Tensor | None, list[Tensor | None]]:
        """Return ``(None, [IN(x), LN(x), 1])`` computed by the module itself."""
        weight, _ = _params(module)
        one, zero = torch.ones_like(weight), torch.zeros_like(weight)
        inst = _evaluate(module, {"weight": one, "bias": zero, "rho": one}, x)
        layer = _evaluate(module, {"weight": one, "bias": zero, "rho": zero}, x)
        return None, [inst, layer, None]

    def coefficients(self, module: nn.Module) -> Tensor:
        """``(w·ρ, w·(1 − ρ), b)`` as ``(C, 3)``."""
        weight, bias = _params(module)
        rho = module.rho.detach().clamp(0, 1)
        w = weight.detach()
        return torch.stack([w * rho, w * (1 - rho), bias.detach()], dim=1)

    def assign(self, module: nn.Module, coef: Tensor, gram: Tensor, rhs: Tensor) -> Tensor:
        """Set ``weight``, ``bias`` and ``rho``, re-solving where ``rho`` had to be clipped."""
        weight, bias = _params(module)
        total = coef[:, 0] + coef[:, 1]
        ok = total.abs() > 1e-12
        rho = torch.where(ok, coef[:, 0] / torch.where(ok, total, 1), module.rho.detach().to(coef))
        clipped = (rho < 0) | (rho > 1)
        if bool(clipped.any()):
            rho = rho.clamp(0, 1)
            # y = w·(ρ·I + (1 − ρ)·L) + b: the sums of the 2-term basis follow from the 3-term
            # ones through T = [[ρ, 0], [1 − ρ, 0], [0, 1]].
            t = torch.zeros(coef.shape[0], 3, 2, dtype=gram.dtype, device=gram.device)
            t[:, 0, 0], t[:, 1, 0], t[:, 2, 1] = rho.to(gram), (1 - rho).to(gram), 1
            tt = t.transpose(1, 2)
            sub = _solve(tt @ gram @ t, (tt @ rhs.unsqueeze(-1))[..., 0]).to(coef)
            refit = torch.stack([sub[:, 0] * rho, sub[:, 0] * (1 - rho), sub[:, 1]], dim=1)
            coef = torch.where(clipped.unsqueeze(1), refit, coef)
        with torch.no_grad():
            weight.copy_(coef[:, 0] + coef[:, 1])
            bias.copy_(coef[:, 2])
            module.rho.copy_(rho)
        return coef


_FITTERS: dict[type, Fitter] = {}


def register_fitter(*classes: type) -> Callable[[type[Fitter]], type[Fitter]]:
    """Class decorator: use this :class:`Fitter` for ``classes`` and their subclasses.

    Lookup walks the layer's MRO, so the most specific registration wins.

    Example:
        >>> @register_fitter(nn.GroupNorm)
        ... class MyFitter(AffineFitter): ...
        >>> type(find_fitter(nn.GroupNorm(2, 4))).__name__
        'MyFitter'
        >>> _ = register_fitter(nn.GroupNorm)(AffineFitter)  # restore the default
    """

    def decorator(cls: type[Fitter]) -> type[Fitter]:
        for c in classes:
            _FITTERS[c] = cls()
        return cls

    return decorator


register_fitter(_ChannelAffineNorm, nn.GroupNorm)(AffineFitter)
register_fitter(AdaLN)(ModulatedAffineFitter)
register_fitter(AdaLIN)(AdaLINFitter)


def find_fitter(module: nn.Module) -> Fitter | None:
    """The fitter registered for ``module``'s class or its nearest base class, or ``None``.

    Example:
        >>> type(find_fitter(AdaLIN(4))).__name__, find_fitter(nn.ReLU())
        ('AdaLINFitter', None)
    """
    for cls in type(module).__mro__:
        if cls in _FITTERS:
            return _FITTERS[cls]
    return None


# --------------------------------------------------------------------------- data


def _first_item(batch: Any) -> Any:
    """The model input of a ``(x, y)``-style batch, the batch itself otherwise."""
    if isinstance(batch, (tuple, list)) and batch and not isinstance(batch[0], (tuple, list)):
        return batch[0]
    return batch


def _move(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    if isinstance(inputs, Tensor):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, tuple):
        return tuple(_move(i, device) for i in inputs)
    if isinstance(inputs, Mapping):
        return {k: _move(v, device) for k, v in inputs.items()}
    return inputs


def _describe(inputs: Any) -> str:
    if isinstance(inputs, Tensor):
        return f"a tensor of shape {tuple(inputs.shape)}"
    if isinstance(inputs, tuple):
        return "a tuple of (" + ", ".join(_describe(i) for i in inputs) + ")"
    if isinstance(inputs, Mapping):
        return "a dict with keys " + ", ".join(map(str, inputs))
    return f"a {type(inputs).__name__}"


def input_batches(
    data: Any, *, max_batches: int | None = None, device: torch.device | None = None
) -> list[Any]:
    """Turn calibration data into a list of model inputs.

    Accepts one input tensor (one batch), a list of input tensors (the ``NormSwap`` callback's
    ``batches``), or any iterable such as a ``DataLoader`` yielding tensors, ``(x, y)`` tuples/lists
    (``x`` is used; labels are ignored) or dicts of keyword arguments. A tuple whose first item is
    itself a tuple is taken as positional arguments.

    Args:
        data: the calibration data.
        max_batches: stop after this many batches.
        device: move tensors there (``None``: leave them where they are).

    Returns:
        The model inputs, one per batch: tensors, tuples of positional args, or dicts.

    Raises:
        CalibrationError: no batches, or ``max_batches`` is not a positive int.

    Example:
        >>> batches = input_batches([(torch.zeros(2, 3), torch.tensor([0, 1]))])
        >>> batches[0].shape
        torch.Size([2, 3])
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise CalibrationError(f"max_batches must be a positive int or None, got {max_batches!r}")
    if isinstance(data, Tensor):
        data = [data]
    elif isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise CalibrationError(
            f"data must be an input tensor, a list of input tensors or an iterable (DataLoader) "
            f"of tensors or (x, y) batches, got {type(data).__name__}"
        )
    out: list[Any] = []
    for batch in data:
        item = _first_item(batch)
        if isinstance(item, list):
            item = tuple(item)
        out.append(_move(item, device))
        if max_batches is not None and len(out) >= max_batches:
            break
    if not out:
        raise CalibrationError(
            "the calibration data is empty (no batches): pass at least one batch of model inputs"
        )
    return out


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


# --------------------------------------------------------------------------- structure


def _unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of a DistributedDataParallel/DataParallel wrapper."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _param_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
    # A parametrized weight (weight norm, standardization) lives under ``parametrizations``;
    # its effective shape is what the reference's plain weight has.
    for name in getattr(module, "parametrizations", {}):
        shapes[name] = tuple(getattr(module, name).shape)
    return shapes


def converted_layers(model: nn.Module, reference: nn.Module) -> dict[str, nn.Module]:
    """The converted norm layers of ``model``: ``{path: layer}`` where ``reference`` has a BN.

    Checks first that ``reference`` is ``model`` before its swap: the same module paths and
    classes outside the converted norms (parametrized layers count as their class), with the
    same parameter shapes. Norms that were excluded from the swap (still BatchNorm), folded or
    removed (``Identity``) are left out.

    Args:
        model: the converted model.
        reference: the model before the swap (an unmodified copy).

    Returns:
        ``{canonical path: converted layer}`` in module order.

    Raises:
        CalibrationError: the structures differ (naming the first differences) or ``reference``
            is ``model`` itself.

    Example:
        >>> import copy, normswap
        >>> ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> model = copy.deepcopy(ref)
        >>> _ = normswap.swap(model, "gn", num_groups=2)
        >>> list(converted_layers(model, ref))
        ['1']
    """
    model, reference = _unwrap(model), _unwrap(reference)
    if model is reference:
        raise CalibrationError(
            "reference is the model itself: pass a copy made before the swap "
            "(reference = copy.deepcopy(model); normswap.swap(model, ...))"
        )
    problems: list[str] = []
    model_modules = dict(model.named_modules(remove_duplicate=False))
    converted: dict[str, nn.Module] = {}
    norm_prefixes: list[str] = []
    seen: set[int] = set()
    for path, ref_mod in reference.named_modules(remove_duplicate=False):
        mod = model_modules.get(path)
        if mod is None:
            problems.append(f"{path!r} ({type(ref_mod).__name__}) is missing from the model")
            continue
        if is_source_norm(ref_mod):
            norm_prefixes.append(path + ".")
            if mod is ref_mod:
                problems.append(
                    f"{path!r}: model and reference share the same module object; the "
                    "reference must be a copy made before the swap (copy.deepcopy)"
                )
            elif (
                not is_source_norm(mod) and not isinstance(mod, nn.Identity) and id(mod) not in seen
            ):
                seen.add(id(mod))
                converted[path] = mod
            continue
        if any(path.startswith(p) for p in norm_prefixes):
            continue
        if not isinstance(mod, type(ref_mod)):
            problems.append(
                f"{path!r} is a {type(mod).__name__} in the model but a {type(ref_mod).__name__} "
                "in the reference"
            )
        else:
            shapes, ref_shapes = _param_shapes(mod), _param_shapes(ref_mod)
            # Folding a BatchNorm gives a bias-free conv a bias; nothing else may appear.
            extra = set(shapes) - set(ref_shapes) - {"bias"}
            if extra or any(shapes.get(n) != s for n, s in ref_shapes.items()):
                problems.append(f"{path!r} has parameters of other shapes than in the reference")
    ref_paths = {p for p, _ in reference.named_modules(remove_duplicate=False)}
    for path, mod in model_modules.items():
        if path in ref_paths or any(path.startswith(p) for p in norm_prefixes):
            continue
        if ".parametrizations" in f".{path}":
            continue
        problems.append(f"{path!r} ({type(mod).__name__}) is not in the reference")
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:8])
        more = f"\n  (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CalibrationError(
            f"reference ({type(reference).__name__}) is not the model before its swap "
            f"({type(model).__name__}): {len(problems)} difference(s):\n{shown}{more}\n"
            "fix: pass the unmodified original as reference, e.g. reference = "
            "copy.deepcopy(model) before normswap.swap(model, ...)"
        )
    return converted


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class LayerFit:
    """What calibration did to one layer.

    Attributes:
        path: canonical module path.
        kind: the layer's class name.
        params: the parameters that were re-fitted.
        error_before: squared error of the layer's output against the reference BatchNorm's
            output with the parameters it had before, relative to the reference output's
            per-channel variance (1.0 is as bad as predicting each channel's mean).
        error_after: the same with the fitted parameters.
        calls: how many layer calls the fit used (batches × calls per forward).
    """

    path: str
    kind: str
    params: tuple[str, ...]
    error_before: float
    error_after: float
    calls: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary of the record.

        Example:
            >>> LayerFit("bn", "GroupNorm", ("weight", "bias"), 2.0, 0.1, 4).to_dict()["path"]
            'bn'
        """
        return {
            "path": self.path,
            "kind": self.kind,
            "params": list(self.params),
            "error_before": self.error_before,
            "error_after": self.error_after,
            "calls": self.calls,
        }


@dataclass(frozen=True)
class CalibrationReport(Sequence[LayerFit]):
    """The result of :func:`calibrate`: one :class:`LayerFit` per calibrated layer.

    Attributes:
        layers: the fits, in execution order.
        batches: batches used (per rank).
        samples: samples used (per rank; the first dim of each input tensor).
        passes: passes over the batches.
        seconds: wall time.
        skipped: ``(path, reason)`` for converted paths that had nothing to fit.

    Example:
        >>> report = CalibrationReport((), batches=1, samples=8, passes=1, seconds=0.1)
        >>> len(report), report.to_dict()["samples"]
        (0, 8)
    """

    layers: tuple[LayerFit, ...]
    batches: int
    samples: int
    passes: int
    seconds: float
    skipped: tuple[tuple[str, str], ...] = field(default=())

    def __getitem__(self, index: Any) -> Any:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerFit]:
        return iter(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable dictionary of the report.

        Example:
            >>> CalibrationReport((), 1, 8, 1, 0.0).to_dict()["layers"]
            []
        """
        return {
            "batches": self.batches,
            "samples": self.samples,
            "passes": self.passes,
            "seconds": self.seconds,
            "layers": [f.to_dict() for f in self.layers],
            "skipped": [list(s) for s in self.skipped],
        }

    def __str__(self) -> str:
        lines = [
            f"normswap calibration: {len(self.layers)} layer(s), {self.batches} batch(es), "
            f"{self.samples} sample(s), {self.passes} pass(es), {self.seconds:.1f} s"
        ]
        if self.layers:
            width = max(len(f.path) for f in self.layers)
            lines.append(f"{'path':<{width}}  {'kind':<12}  rel. error before -> after")
            lines += [
                f"{f.path:<{width}}  {f.kind:<12}  {f.error_before:.4f} -> {f.error_after:.4f}"
                for f in self.layers
            ]
        lines += [f"skipped {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the fit


def _solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """Per-channel ``gram @ coef = rhs``, with a tiny relative ridge for dead channels."""
    k = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + 1e-9 * scale[:, None, None] * eye, rhs.unsqueeze(-1))[..., 0]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _collective_device() -> torch.device:
    """Where small tensors for collectives must live: the current GPU for NCCL, else CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Sums:
    """Running least-squares sums of one layer (float64, per channel)."""

    def __init__(self, channels: int, k: int, device: torch.device) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.gram = torch.zeros(channels, k, k, **f64)
        self.rhs = torch.zeros(channels, k, **f64)
        self.moments = torch.zeros(channels, 3, **f64)  # Σ r², Σ t, Σ t²
        self.count = torch.zeros((), **f64)
        self.calls = 0
        self.const: list[int] = []
        self.offset = False

    def add(self, offset: Tensor | None, basis: list[Tensor | None], target: Tensor) -> None:
        if target.dtype not in (torch.float32, torch.float64):  # half precision: sum in fp32
            target = target.float()
            offset = None if offset is None else offset.float()
            basis = [None if a is None else a.float() for a in basis]
        dims = [0, *range(2, target.dim())]
        count = target.numel() // target.shape[1]

        scratch: list[Tensor] = []

        def total(a: Tensor | None, b: Tensor | None) -> Tensor:
            # Per-channel Σ a·b (None is the constant 1), reduced in the activations' dtype and
            # accumulated over batches in float64. Products go to one reused scratch tensor:
            # a fresh large allocation per product costs more than the product itself.
            if a is None and b is None:
                return torch.full((target.shape[1],), float(count), dtype=torch.float64)
            if a is None or b is None:
                return (a if b is None else b).sum(dims).double()
            if not scratch:
                scratch.append(torch.empty_like(target))
            return torch.mul(a, b, out=scratch[0]).sum(dims).double()

        r = target if offset is None else target - offset
        k = len(basis)
        gram = torch.empty(target.shape[1], k, k, dtype=torch.float64, device=target.device)
        for i in range(k):
            for j in range(i, k):
                gram[:, i, j] = gram[:, j, i] = total(basis[i], basis[j]).to(gram.device)
        rhs = torch.stack([total(a, r) for a in basis], dim=1).to(gram.device)
        t_sum = total(target, None)
        t_sq = total(target, target)
        r_sq = t_sq if offset is None else total(r, r)
        moments = torch.stack([r_sq, t_sum, t_sq], dim=1)
        counts = torch.full((1,), float(count), dtype=torch.float64, device=gram.device)
        if _distributed():
            parts = [gram, rhs, moments.to(gram.device), counts]
            flat = torch.cat([p.flatten() for p in parts])
            torch.distributed.all_reduce(flat)
            gram, rhs, moments, counts = (
                chunk.view_as(p)
                for chunk, p in zip(flat.split([p.numel() for p in parts]), parts, strict=True)
            )
        self.gram += gram
        self.rhs += rhs
        self.moments += moments.to(self.moments.device)
        self.count += counts[0]
        self.calls += 1
        self.const = [i for i, a in enumerate(basis) if a is None]
        self.offset = offset is not None

    def solve(self, match: str) -> Tensor:
        """The per-channel coefficients: least squares, or rescaled to the target's variance."""
        coef = _solve(self.gram, self.rhs)
        if match == "lstsq" or len(self.const) != 1 or self.offset:
            return coef
        c = self.const[0]
        n = self.count.clamp_min(1)
        means = self.gram[:, :, c] / n  # E[A_k] (A_c = 1)
        free = torch.ones(coef.shape[1], dtype=torch.bool, device=coef.device)
        free[c] = False
        cf = coef * free
        mean_pred = (cf * means).sum(1)
        var_pred = torch.einsum("ci,cij,cj->c", cf, self.gram, cf) / n - mean_pred.square()
        _, st, stt = self.moments.unbind(1)
        mean_t = st / n
        var_t = (stt / n - mean_t.square()).clamp_min(0)
        scale = torch.where(var_pred > 1e-12, (var_t / var_pred.clamp_min(1e-12)).sqrt(), 1.0)
        cf = cf * scale[:, None]
        out = cf.clone()
        out[:, c] = mean_t - (cf * means).sum(1)
        return out

    def relative_error(self, coef: Tensor) -> float:
        coef = coef.double().to(self.gram.device)
        sq, st, stt = self.moments.unbind(1)
        err = (
            sq - 2 * (coef * self.rhs).sum(1) + torch.einsum("ci,cij,cj->c", coef, self.gram, coef)
        )
        var = stt - st.square() / self.count.clamp_min(1)
        return float(err.clamp_min(0).sum() / var.sum().clamp_min(1e-30))


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put every module in eval mode, restoring each module's own flag afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    return None


def _check_runs(model: nn.Module, inputs: Any, who: str) -> Any:
    try:
        return _call(model, inputs)
    except NormSwapError as err:
        raise CalibrationError(f"the {who} cannot run on the calibration data: {err}") from err
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        raise CalibrationError(
            f"the {who} cannot run on the calibration data ({_describe(inputs)}): "
            f"{type(err).__name__}: {err}\nfix: pass batches of model inputs of the shape the "
            "model was trained on (e.g. (N, 3, H, W) images), as a tensor, a list of tensors or "
            "a DataLoader of tensors or (x, y) batches"
        ) from err


def _broadcast_parameters(layers: Iterable[nn.Module]) -> None:
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                torch.distributed.broadcast(p.data, src=0)


def calibrate(
    model: nn.Module,
    reference: nn.Module,
    data: Any,
    *,
    max_batches: int | None = None,
    passes: int = 1,
    match: str = "lstsq",
) -> CalibrationReport:
    """Re-fit every converted norm layer of ``model`` to reproduce ``reference``'s BatchNorms.

    For each converted layer (a path where ``reference`` has a BatchNorm-family module and
    ``model`` a GroupNorm, LayerNorm, LayerNorm2d, InstanceNorm, AdaLIN, AdaLN, ...), fits its
    per-channel ``weight``/``bias`` (and AdaLIN's ``rho``) by closed-form least squares so that
    its output matches the reference BatchNorm's output on ``data``, in execution order, each
    layer seeing the already-calibrated layers' outputs (see the module docs). Both models run
    in eval mode (each module's training flag is restored afterwards); no labels and no
    gradients are used. Parameters are updated in place (the same ``Parameter`` objects, so an
    optimizer built earlier stays valid).

    Usable directly as the ``NormSwap`` callback's ``calibrate=`` hook.

    Args:
        model: the converted model (after :func:`normswap.swap`); modified in place. A
            ``DistributedDataParallel`` wrapper is unwrapped.
        reference: the model before the swap (an unmodified copy with the same structure).
        data: model inputs: one tensor, a list of tensors, or an iterable/``DataLoader`` of
            tensors or ``(x, y)`` batches (labels are ignored). Tensors are moved to the model's
            device. A few batches of a few dozen samples are enough.
        max_batches: use at most this many batches of ``data``.
        passes: passes over the batches; the second one refits with every batch seen through
            the final upstream parameters (about 2× the time, usually a small gain).
        match: ``"lstsq"`` (least squares, the default) or ``"moments"`` (each channel's
            output mean and variance set to the reference's; see :data:`MATCHES`).

    Returns:
        A :class:`CalibrationReport` with each layer's relative error before and after.

    Raises:
        CalibrationError: empty data, data the models cannot run on, a reference that is not
            the model before the swap, or a converted layer without a fitter; nothing is
            modified in any of these cases.

    Example:
        >>> import copy, normswap
        >>> ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> with torch.no_grad():
        ...     ref[1].running_mean.uniform_(-1, 1); ref[1].running_var.uniform_(0.5, 2)
        >>> model = copy.deepcopy(ref)
        >>> _ = normswap.swap(model, "gn", num_groups=2)
        >>> report = calibrate(model, ref, torch.randn(16, 3, 12, 12))
        >>> report[0].error_after < report[0].error_before
        True
    """
    start = time.perf_counter()
    if match not in MATCHES:
        raise CalibrationError(f"unknown match {match!r}; use one of {', '.join(MATCHES)}")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise CalibrationError(f"passes must be a positive int, got {passes!r}")
    model, reference = _unwrap(model), _unwrap(reference)
    layers = converted_layers(model, reference)
    fitters: dict[str, Fitter] = {}
    skipped: list[tuple[str, str]] = []
    missing = []
    for path, layer in layers.items():
        fitter = find_fitter(layer)
        if fitter is None:
            missing.append(f"{path!r} ({type(layer).__name__})")
        else:
            fitters[path] = fitter
    if missing:
        raise CalibrationError(
            f"no calibration fitter for {', '.join(missing)}: register one with "
            "`from normswap.calibrate import register_fitter` (a Fitter for the class) or exclude "
            "these layers from the swap"
        )
    batches = input_batches(data, max_batches=max_batches, device=_device(model))
    if _distributed():
        count = torch.tensor(len(batches), device=_collective_device())
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
        batches = batches[: int(count)]
    ref_modules = {path: reference.get_submodule(path) for path in layers}

    with torch.no_grad(), _eval_mode(model, reference):
        # Both models must run on the data before anything changes.
        _check_runs(reference, batches[0], "reference")
        _check_runs(model, batches[0], "converted model")
        for path in layers:
            _params(layers[path])  # affine=False layers are refused before any change
        if not layers:
            skipped.append(("*", "no converted norm layer with parameters to fit"))
        sums: dict[str, _Sums] = {}
        targets: dict[str, list[Tensor]] = {}
        calls: dict[str, int] = {}
        initial = {p: fitters[p].coefficients(layer) for p, layer in layers.items()}

        def capture(path: str) -> Callable[[nn.Module, Any, Tensor], None]:
            def hook(_m: nn.Module, _args: Any, out: Tensor) -> None:
                targets[path].append(out.detach())

            return hook

        def fit(path: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            fitter = fitters[path]

            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                index = calls[path]
                calls[path] += 1
                if index >= len(targets[path]):
                    raise CalibrationError(
                        f"{path!r} ran more often in the converted model than in the reference: "
                        "the two models do not compute the same graph"
                    )
                x = args[0]
                offset, basis = fitter.basis(module, x)
                if path not in sums:
                    sums[path] = _Sums(x.shape[1], len(basis), x.device)
                sums[path].add(offset, basis, targets[path][index])
                s = sums[path]
                coef = s.solve(match)
                fitter.assign(module, coef.to(x.dtype), s.gram, s.rhs)

            return hook

        handles = []
        try:
            for path, bn in ref_modules.items():
                handles.append(bn.register_forward_hook(capture(path)))
            for path, layer in layers.items():
                handles.append(layer.register_forward_pre_hook(fit(path)))
            samples = 0
            for pass_index in range(passes):
                sums.clear()
                for batch in batches:
                    for path in layers:
                        targets[path] = []
                        calls[path] = 0
                    # The reference's hooks fill targets; the model's hooks fit as they go.
                    _call(reference, batch)
                    _call(model, batch)
                    if pass_index == 0:
                        samples += _batch_size(batch)
        finally:
            for h in handles:
                h.remove()
            targets.clear()
        if _distributed():
            _broadcast_parameters(layers.values())

    fits = []
    for path, layer in layers.items():
        fitter = fitters[path]
        s = sums.get(path)
        if s is None:
            skipped.append((path, "did not run on the calibration data"))
            continue
        fits.append(
            LayerFit(
                path=path,
                kind=type(layer).__name__,
                params=fitter.params,
                error_before=s.relative_error(initial[path]),
                error_after=s.relative_error(fitter.coefficients(layer)),
                calls=s.calls,
            )
        )
    return CalibrationReport(
        layers=tuple(fits),
        batches=len(batches),
        samples=samples,
        passes=passes,
        seconds=time.perf_counter() - start,
        skipped=tuple(skipped),
    )


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for v in values if isinstance(values, Iterable) else ():
        if isinstance(v, Tensor) and v.dim():
            return int(v.shape[0])
    return 0
