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

Each layer is fitted on the converted model's own inputs, not the reference's: it must
compensate what the converted layers before it changed (what each variant reached on the real
MobileNetV2: ``benchmarks/NOTES.md``, "Calibration").

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
:func:`calibrate`; the batches used are as many as the rank with the fewest has.

Layers are fitted by the :class:`~normswap.pretrained.fitters.Fitter` of their family, looked
up by class hierarchy (MRO); :func:`~normswap.pretrained.fitters.register_fitter` adds one for a
custom norm. Data is streamed one batch at a time (:mod:`normswap.inputs`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normswap.distributed import all_ranks_true, broadcast_tensors, is_distributed
from normswap.errors import CalibrationError, NormSwapError
from normswap.inputs import (
    BatchToInput,
    call_model,
    check_samples,
    count_samples,
    default_batch_to_input,
    describe,
    iter_inputs,
    model_device,
)
from normswap.modes import eval_mode
from normswap.pretrained.fitters import Fitter, assigned, find_fitter
from normswap.pretrained.lstsq import Sums
from normswap.pretrained.structure import converted_layers, unwrap
from normswap.sources import describe_source

__all__ = ["MATCHES", "CalibrationReport", "LayerFit", "calibrate", "check_runs"]

#: What :func:`calibrate` matches: ``"lstsq"`` minimizes the squared error of each layer's output;
#: ``"moments"`` takes the least-squares direction and rescales it so that each channel's output
#: mean and variance equal the reference's (errors then do not shrink activations layer after
#: layer).
MATCHES: tuple[str, ...] = ("moments", "lstsq")


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


def check_runs(model: nn.Module, inputs: Any, who: str, what: str = "calibration data") -> Any:
    """Run ``model`` on ``inputs``; a failure becomes a :class:`CalibrationError` naming the fix.

    Example:
        >>> check_runs(nn.Linear(3, 2), torch.zeros(1, 4), "model")
        Traceback (most recent call last):
        ...
        normswap.errors.CalibrationError: the model cannot run on the calibration data (a tensor ...
    """
    try:
        return call_model(model, inputs)
    except NormSwapError as err:
        raise CalibrationError(f"the {who} cannot run on the {what}: {err}") from err
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        raise CalibrationError(
            f"the {who} cannot run on the {what} ({describe(inputs)}): "
            f"{type(err).__name__}: {err}\nfix: pass batches of model inputs of the shape the "
            "model was trained on (e.g. (N, 3, H, W) images), as a tensor, a list of tensors or "
            "a DataLoader of tensors or (x, y) batches"
        ) from err


def _channels_first(t: Tensor, dim: int) -> Tensor:
    """``t`` with its channel dim ``dim`` moved to dim 1 (where the sums keep channels)."""
    return t if dim == 1 or t.dim() < 2 else t.movedim(dim, 1)


def _param(module: nn.Module, name: str) -> Tensor:
    for part in name.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def _after(norm: nn.Module) -> list[nn.Module]:
    """The modules a reference norm applies after normalizing (timm's drop, act), if any."""
    try:
        return [module for _, module in describe_source(norm).after]
    except NormSwapError:
        return []


def _fitters(layers: dict[str, nn.Module]) -> dict[str, Fitter]:
    fitters: dict[str, Fitter] = {}
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
            "normswap.register_fitter (a Fitter for the class) or exclude these layers from the "
            "swap"
        )
    return fitters


def calibrate(
    model: nn.Module,
    reference: nn.Module,
    data: Any,
    *,
    max_batches: int | None = None,
    passes: int = 1,
    match: str = "lstsq",
    batch_to_input: BatchToInput = default_batch_to_input,
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
        data: one tensor (one batch of inputs), or an iterable of batches (a list, a
            ``DataLoader``; an ``(x, y)`` batch gives its ``x``), streamed one batch at a time
            and moved to the model's device (:mod:`normswap.inputs`). A few batches of a few
            dozen samples are enough.
        max_batches: use at most this many batches of ``data``.
        passes: passes over the batches; the second one refits with every batch seen through
            the final upstream parameters (about 2× the time, usually a small gain).
        match: ``"lstsq"`` (least squares, the default) or ``"moments"`` (each channel's
            output mean and variance set to the reference's; see :data:`MATCHES`).
        batch_to_input: maps a batch of an iterable to model inputs (default: the first
            element of a tuple/list batch).

    Returns:
        A :class:`CalibrationReport` with each layer's relative error before and after.

    Raises:
        CalibrationError: empty data, data the models cannot run on, a reference that is not
            the model before the swap, or a converted layer without a fitter: nothing is
            modified. If the fit itself fails part-way, the fitted parameters are put back.

    Example:
        >>> import copy
        >>> ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> with torch.no_grad():
        ...     _ = ref[1].running_mean.uniform_(-1, 1), ref[1].running_var.uniform_(0.5, 2)
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
    if passes > 1 and not isinstance(data, Tensor) and iter(data) is data:
        raise CalibrationError(
            f"passes={passes} reads the data {passes} times, but it is a one-shot iterator "
            "(a generator): pass a list of batches or a DataLoader"
        )
    model, reference = unwrap(model), unwrap(reference)
    layers = converted_layers(model, reference)
    fitters = _fitters(layers)
    for path, layer in layers.items():
        fitters[path].coefficients(layer)  # affine=False layers are refused before any change
    device = model_device(model)

    def stream() -> Iterator[Any]:
        return iter_inputs(
            data,
            batch_to_input=batch_to_input,
            device=device,
            max_batches=max_batches,
            what="calibration data",
        )

    batches = stream()
    first = check_samples(next(batches, None), "calibration data")
    batches = itertools.chain([first], batches)
    ref_modules = {path: reference.get_submodule(path) for path in layers}
    skipped: list[tuple[str, str]] = []
    if not layers:
        skipped.append(("*", "no converted norm layer with parameters to fit"))
    saved = [(p, p.detach().clone()) for layer in layers.values() for p in layer.parameters()]

    with torch.no_grad(), eval_mode(model, reference):
        # Both models must run on the data before anything changes.
        check_runs(reference, first, "reference")
        check_runs(model, first, "converted model")
        sums: dict[tuple[str, int], Sums] = {}  # (path, candidate) -> sums
        candidates: dict[str, list[dict[str, Tensor]]] = {}
        chosen: dict[str, int] = {}
        targets: dict[str, list[Tensor]] = {}
        calls: dict[str, int] = {}
        initial = {p: fitters[p].coefficients(layer) for p, layer in layers.items()}

        reference_running = [False]

        def capture(path: str) -> Callable[..., None]:
            # The target is what the reference norm's normalization outputs: its forward
            # output, or for a norm + activation layer the input of the first module after
            # it. A copy: an in-place activation (ReLU(inplace=True)) would otherwise overwrite
            # it before the converted layer is fitted to it.
            def output_hook(_m: nn.Module, _args: Any, out: Tensor) -> None:
                if reference_running[0]:
                    targets[path].append(out.detach().clone())

            def input_hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
                if reference_running[0]:
                    targets[path].append(args[0].detach().clone())

            return output_hook if not _after(ref_modules[path]) else input_hook

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
                dim = fitter.channel_dim(module)
                target = _channels_first(targets[path][index], dim)
                # One least-squares fit per setting of the non-linear scalars (DyT's α); the
                # setting whose fit leaves the least error wins, and is what the layer keeps.
                if path not in candidates:
                    candidates[path] = fitter.candidates(module)
                best = None
                for i, values in enumerate(candidates[path]):
                    with assigned(module, values):
                        offset, basis = fitter.basis(module, x)
                    offset = None if offset is None else _channels_first(offset, dim)
                    basis = [None if a is None else _channels_first(a, dim) for a in basis]
                    if (path, i) not in sums:
                        sums[(path, i)] = Sums(target.shape[1], len(basis), x.device)
                    s = sums[(path, i)]
                    s.add(offset, basis, target)
                    coef = s.solve(match)
                    error = s.relative_error(coef)
                    if best is None or error < best[0]:
                        best = (error, i, coef)
                assert best is not None
                _, chosen[path], coef = best
                s = sums[(path, chosen[path])]
                with torch.no_grad():
                    for name, value in candidates[path][chosen[path]].items():
                        _param(module, name).copy_(value)
                fitter.assign(module, coef.to(x.dtype), s.gram, s.rhs)

            return hook

        handles = []
        samples = used = 0
        try:
            for path, bn in ref_modules.items():
                after = _after(bn)
                if after:
                    handles.append(after[0].register_forward_pre_hook(capture(path)))
                else:
                    handles.append(bn.register_forward_hook(capture(path)))
            for path, layer in layers.items():
                handles.append(layer.register_forward_pre_hook(fit(path)))
            for pass_index in range(passes):
                sums.clear()
                source = batches if pass_index == 0 else stream()
                for index in itertools.count():
                    batch = next(source, None)
                    # Under torch.distributed every rank fits on as many batches as the rank
                    # with the fewest (each fit sums over the ranks).
                    if not all_ranks_true(batch is not None):
                        break
                    for path in layers:
                        targets[path] = []
                        calls[path] = 0
                    # The reference's hooks fill targets; the model's hooks fit as they go.
                    reference_running[0] = True
                    try:
                        call_model(reference, batch)
                    finally:
                        reference_running[0] = False
                    call_model(model, batch)
                    if pass_index == 0:
                        samples += count_samples(batch)
                        used = index + 1
        except BaseException:
            for param, value in saved:
                param.copy_(value)
            raise
        finally:
            for h in handles:
                h.remove()
            targets.clear()
        if is_distributed():
            broadcast_tensors([p for layer in layers.values() for p in layer.parameters()])

    fits = []
    for path, layer in layers.items():
        fitter = fitters[path]
        s, s0 = sums.get((path, chosen.get(path, 0))), sums.get((path, 0))
        if s is None or s0 is None:
            skipped.append((path, "did not run on the calibration data"))
            continue
        fits.append(
            LayerFit(
                path=path,
                kind=type(layer).__name__,
                params=fitter.params,
                error_before=s0.relative_error(initial[path]),
                error_after=s.relative_error(fitter.coefficients(layer)),
                calls=s.calls,
            )
        )
    return CalibrationReport(
        layers=tuple(fits),
        batches=used,
        samples=samples,
        passes=passes,
        seconds=time.perf_counter() - start,
        skipped=tuple(skipped),
    )
