"""Convert a pretrained model so that it keeps what it learned: swap, calibrate, distill.

:func:`convert_pretrained` is the one call for the common case::

    result = normswap.convert_pretrained(model, "gn", unlabeled_images, budget=600)
    print(result)            # the swap report, what calibration and distillation did
    result.fidelity          # top-1 agreement with the original on held-out inputs

It keeps an unmodified copy of the model as the reference, swaps the norms
(:func:`normswap.swap`), re-fits the converted layers in closed form
(:func:`normswap.calibrate.calibrate`), optionally reconstructs it block by block from its own
inputs (``reconstruct=``, :func:`normswap.pretrained.reconstruct.reconstruct`), then distills
the converted model towards the copy (:func:`normswap.distill.distill`) for what is left of
the time budget, and measures the agreement reached. For ``wn`` with ``bn="fold"`` the
conversion is exact and the data-driven steps are skipped.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normswap.errors import CalibrationError
from normswap.inputs import (
    BatchToInput,
    call_model,
    count_samples,
    default_batch_to_input,
    first_inputs,
    model_device,
)
from normswap.modes import restore_training_flags, training_flags
from normswap.pretrained.adapt import adapt_statistics
from normswap.pretrained.calibrate import CalibrationReport, calibrate, check_runs
from normswap.pretrained.distill import (
    DistillCheck,
    DistillReport,
    distill,
    flush_denormal,
    hflip,
)
from normswap.pretrained.fidelity import Fidelity, fidelity
from normswap.pretrained.reconstruct import ReconstructionReport
from normswap.pretrained.reconstruct import reconstruct as reconstruct_blocks
from normswap.pretrained.structure import converted_layers
from normswap.progressive import (
    BlendSchedule,
    blend_layers,
    calibrate_blend,
    finish_blend,
    plan_progressive,
    set_blend,
    swap_progressive,
)
from normswap.report import SwapReport
from normswap.specs import NormSpec, get_spec
from normswap.surgery import swap

__all__ = ["ConversionResult", "calibrate_and_distill", "convert_pretrained"]


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert_pretrained` did and the fidelity it reached.

    Attributes:
        report: the swap report.
        calibration: the calibration report (``None`` when skipped).
        distillation: the distillation report (``None`` when skipped).
        fidelity: agreement with the original on ``val_data``: held-out inputs *from the
            conversion's own domain* (``None`` without them).
        seconds: time of the whole conversion, by the ``clock`` it was given.
        ood_fidelity: agreement on ``ood_data``, inputs from sources no step calibrated,
            distilled or stopped early on: how well the conversion carries the model's
            function to new data (``None`` without them).
        reconstruction: the block-wise reconstruction report (``None`` when skipped).

    Example:
        >>> r = ConversionResult(SwapReport((), {"name": "gn"}), None, None, None, 0.0)
        >>> r.to_dict()["fidelity"] is None
        True
    """

    report: SwapReport
    calibration: CalibrationReport | None
    distillation: DistillReport | None
    fidelity: Fidelity | None
    seconds: float
    ood_fidelity: Fidelity | None = None
    reconstruction: ReconstructionReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable dictionary.

        Example:
            >>> ConversionResult(SwapReport((), {}), None, None, None, 1.0).to_dict()["seconds"]
            1.0
        """
        return {
            "report": self.report.to_dict(),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "distillation": None if self.distillation is None else self.distillation.to_dict(),
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
            "ood_fidelity": None if self.ood_fidelity is None else self.ood_fidelity.to_dict(),
            "reconstruction": None
            if self.reconstruction is None
            else self.reconstruction.to_dict(),
            "seconds": self.seconds,
        }

    def __str__(self) -> str:
        parts = [str(self.report)]
        if self.calibration is not None:
            c = self.calibration
            mean_before = sum(f.error_before for f in c) / max(len(c), 1)
            mean_after = sum(f.error_after for f in c) / max(len(c), 1)
            parts.append(
                f"calibration: {len(c)} layer(s) on {c.samples} sample(s) in {c.seconds:.1f} s; "
                f"mean relative error {mean_before:.3f} -> {mean_after:.3f}"
            )
        if self.reconstruction is not None:
            parts.append(str(self.reconstruction))
        if self.distillation is not None:
            parts.append(str(self.distillation))
        if self.fidelity is not None:
            parts.append(f"fidelity, in-domain (held-out val_data): {self.fidelity}")
        if self.ood_fidelity is not None:
            parts.append(f"fidelity, out-of-domain (ood_data): {self.ood_fidelity}")
        parts.append(f"total: {self.seconds:.0f} s")
        return "\n".join(parts)


def _calibration_data(
    data: Any, samples: int, batch_size: int, batch_to_input: BatchToInput
) -> Any:
    """The first ``samples`` samples of ``data``: tensor chunks, or the raw batches holding them."""
    if isinstance(data, Tensor):
        return list(data[:samples].split(batch_size))

    def batches() -> Iterator[Any]:
        count = 0
        for batch in data:
            yield batch
            count += count_samples(batch_to_input(batch))
            if count >= samples:
                return

    return batches()


def convert_pretrained(
    model: nn.Module,
    spec: NormSpec | str,
    data: Any,
    *,
    budget: float = 600.0,
    val_data: Any = None,
    calibrate_samples: int = 256,
    batch_size: int = 32,
    distill_steps: int | None = None,
    lr: float = 1e-3,
    feature_weight: float = 0.0,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    on_check: Callable[[DistillCheck, nn.Module], None] | None = None,
    progress: bool = True,
    batch_to_input: BatchToInput = default_batch_to_input,
    progressive: float = 0.0,
    adapt_teacher: bool = False,
    ood_data: Any = None,
    replace: str | Iterable[str] | None = None,
    augment: Callable[[Tensor], Tensor] | None = hflip,
    reconstruct: float = 0.0,
    **overrides: Any,
) -> ConversionResult:
    """Swap ``model``'s norms for ``spec`` and bring it back to its pretrained behaviour.

    Steps: keep a deep copy of ``model`` as the reference; :func:`normswap.swap` (with the first
    input of ``data`` as example input: it checks input ranks and, for ``wn``, finds the layer
    each BatchNorm folds into);
    :func:`~normswap.calibrate.calibrate` on the first ``calibrate_samples`` samples of ``data``;
    block-wise reconstruction (:func:`~normswap.pretrained.reconstruct.reconstruct`) for the
    ``reconstruct`` share of what remains of ``budget`` (none by default), then
    :func:`~normswap.distill.distill` on ``data`` for the rest (early stop when agreement stops
    improving); :func:`~normswap.distill.fidelity` on ``val_data``. The
    model is converted in eval mode (folding and calibration use the running statistics) and
    its training flags are restored at the end. Everything is checked (spec, data, that both
    models run) before the model is modified.

    Args:
        model: the pretrained model, modified in place.
        spec: a spec or a registered name (``"gn"``, ``"ln"``, ``"in"``, ``"adalin"``, ``"wn"``...).
        data: unlabeled inputs for calibration and distillation: one tensor ``(N, ...)`` (best:
            distillation then draws random batches) or an iterable of batches (a list, a
            ``DataLoader``).
        budget: time budget in seconds for the whole conversion, measured by ``clock``.
        val_data: held-out inputs: distillation's early stopping checks agreement on them (they
            are never trained on) and the result's fidelity is measured on them. Without it,
            distillation holds out part of ``data`` for its early stopping and the result has
            no fidelity.
        calibrate_samples: samples of ``data`` used by calibration.
        batch_size: calibration and distillation batch size (when ``data`` is a tensor).
        distill_steps: the distillation schedule's length; ``None`` estimates what fits in the
            budget from the time of one step; 0 skips distillation.
        lr: distillation peak learning rate.
        feature_weight: weight of the per-layer feature loss in distillation.
        include: glob pattern(s) of module paths to convert.
        exclude: glob pattern(s) of module paths to leave alone.
        clock: ``time.perf_counter`` (wall time) or ``time.process_time`` (this process's CPU
            time, all threads), for ``budget``.
        on_check: passed to :func:`~normswap.distill.distill` (called at each agreement check).
        progress: show distillation's progress bar.
        batch_to_input: maps a batch of an iterable to model inputs (:mod:`normswap.inputs`).
        progressive: in ``(0, 1]``: progressive distillation (:mod:`normswap.progressive`):
            the norms become blends whose targets are calibrated, the student starts as its
            teacher and is the pure converted model after this fraction of the distillation
            steps; ``0`` swaps at once. Only families that replace norms one by one blend.
        adapt_teacher: re-estimate the BatchNorms' running statistics on ``data`` first
            (AdaBN, :func:`normswap.adapt_statistics`), so the teacher (and the conversion's
            starting point) is the model adapted to the target domain.
        ood_data: inputs from sources that no step sees (neither calibration, distillation,
            nor early stopping); the result's ``ood_fidelity`` is measured on them.
        replace: the source kinds to convert (``"bn"`` by default; see :func:`normswap.swap`).
        augment: applied to each distillation batch, teacher and student alike (default:
            random horizontal flips; ``None`` for none; see :func:`~normswap.distill.distill`).
        reconstruct: the share of the time left after calibration given to block-wise
            reconstruction (:func:`normswap.pretrained.reconstruct.reconstruct`: each block
            trained to reproduce the original block from its own inputs); distillation gets
            what is left. ``1`` gives it the whole budget and skips distillation unless
            ``distill_steps`` is set; ``0`` (the default) skips it: calibrate + distill
            reached more at the same budget (``benchmarks/results/ood.md``). Ignored with
            ``progressive``.
        **overrides: spec field overrides, e.g. ``num_groups=16``.

    Returns:
        A :class:`ConversionResult`: the swap report, the calibration and distillation
        reports, the fidelity reached and the time taken.

    Raises:
        SpecError: invalid spec or overrides.
        SwapError: some norm cannot be converted (nothing modified).
        CalibrationError: empty data, data the model cannot run on, or a bad argument (nothing
            modified).

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(weights=None).eval()
        >>> images = torch.randn(64, 3, 64, 64)
        >>> result = convert_pretrained(model, "gn", images, budget=60, distill_steps=0)
        >>> len(result.calibration)
        20
    """
    start = clock()
    the_spec = get_spec(spec, **overrides)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise CalibrationError(f"budget must be a positive number of seconds, got {budget!r}")
    for name, value in (("calibrate_samples", calibrate_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"{name} must be a positive int, got {value!r}")
    if distill_steps is not None and (
        isinstance(distill_steps, bool) or not isinstance(distill_steps, int) or distill_steps < 0
    ):
        raise CalibrationError(f"distill_steps must be an int >= 0 or None, got {distill_steps!r}")
    if (
        isinstance(progressive, bool)
        or not isinstance(progressive, (int, float))
        or not 0 <= progressive <= 1
    ):
        raise CalibrationError(
            f"progressive must be a fraction of the distillation in [0, 1], got {progressive!r}"
        )
    if (
        isinstance(reconstruct, bool)
        or not isinstance(reconstruct, (int, float))
        or not 0 <= reconstruct <= 1
    ):
        raise CalibrationError(
            f"reconstruct must be the share of the budget in [0, 1] given to block-wise "
            f"reconstruction, got {reconstruct!r}"
        )
    if not isinstance(adapt_teacher, bool):
        raise CalibrationError(f"adapt_teacher must be True or False, got {adapt_teacher!r}")

    flags = training_flags(model)
    first = first_inputs(
        data,
        batch_size=1,
        batch_to_input=batch_to_input,
        device=model_device(model),
        what="conversion data",
    )
    for name, extra in (("val_data", val_data), ("ood_data", ood_data)):
        if extra is not None:
            first_inputs(
                extra,
                batch_size=1,
                batch_to_input=batch_to_input,
                device=model_device(model),
                what=name,
            )
    model.eval()
    try:
        reference = copy.deepcopy(model)
        with torch.no_grad():
            check_runs(reference, first, "model", "conversion data")
        if progressive:
            # Refuses families that cannot blend before anything is modified.
            plan_progressive(reference, the_spec, include=include, exclude=exclude, replace=replace)
        if adapt_teacher:
            adapt_statistics(reference, data, batch_size=batch_size, batch_to_input=batch_to_input)
            model.load_state_dict(reference.state_dict())
        # One traced forward tells input ranks and, for weight norm, each BN's producer.
        convert = swap_progressive if progressive else swap
        report = convert(
            model,
            the_spec,
            include=include,
            exclude=exclude,
            example_inputs=first,
            replace=replace,
        )
        layers = converted_layers(model, reference)
        calibration = distillation = rebuilt = None
        if layers:
            calibration = (calibrate_blend if progressive else calibrate)(
                model,
                reference,
                _calibration_data(data, calibrate_samples, batch_size, batch_to_input),
                batch_to_input=batch_to_input,
            )
            left = budget - (clock() - start)
            if reconstruct and not progressive and left > 0:
                rebuilt = reconstruct_blocks(
                    model,
                    reference,
                    data,
                    max_seconds=reconstruct * left,
                    clock=clock,
                    batch_to_input=batch_to_input,
                )
                left = budget - (clock() - start)
            steps = distill_steps
            if steps is None and rebuilt is not None and reconstruct >= 1:
                steps = 0  # the whole budget went to reconstruction
            if steps is None:
                steps = _steps_that_fit(model, reference, data, first, batch_size, left, clock)
                left = budget - (clock() - start)
            if steps > 0 and left > 0:
                distillation = distill(
                    model,
                    reference,
                    data,
                    steps=steps,
                    lr=lr,
                    batch_size=batch_size,
                    feature_weight=feature_weight,
                    val_data=val_data,
                    max_seconds=left,
                    clock=clock,
                    on_check=on_check,
                    progress=progress,
                    batch_to_input=batch_to_input,
                    augment=augment,
                    blend=BlendSchedule(end=max(1, round(progressive * steps)))
                    if progressive
                    else None,
                )
        if blend_layers(model):  # no distillation ran: the calibrated converted model
            set_blend(model, 1.0)
            finish_blend(model)
        reached = ood = None
        if val_data is not None:
            reached = fidelity(model, reference, val_data, batch_to_input=batch_to_input)
        if ood_data is not None:
            ood = fidelity(model, reference, ood_data, batch_to_input=batch_to_input)
    finally:
        restore_training_flags(model, flags)
    return ConversionResult(
        report, calibration, distillation, reached, clock() - start, ood, rebuilt
    )


def _steps_that_fit(
    model: nn.Module,
    reference: nn.Module,
    data: Any,
    first: Any,
    batch_size: int,
    seconds: float,
    clock: Callable[[], float],
) -> int:
    """Distillation steps that fit in ``seconds``, from the time of two timed training steps
    (after a warm-up step)."""
    if seconds <= 0:
        return 0
    inputs = data[:batch_size].to(model_device(model)) if isinstance(data, Tensor) else first
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]

    def step() -> None:
        with torch.no_grad():
            call_model(reference, inputs)
        out = call_model(model, inputs)
        out.float().square().mean().backward()

    with flush_denormal(model_device(model)):  # as distill() runs
        step()  # warm-up: a timed first step over-estimates (benchmarks/NOTES.md)
        tick = clock()
        step()
        step()
        elapsed = (clock() - tick) / 2
    for p, g in zip(params, saved, strict=True):
        p.grad = g
    # Checks of agreement cost about a tenth of the time; keep that margin.
    return max(1, int(0.85 * seconds / max(elapsed, 1e-6)))


def calibrate_and_distill(
    model: nn.Module,
    reference: nn.Module,
    batches: Iterable[Any],
    *,
    batch_to_input: BatchToInput = default_batch_to_input,
    steps: int = 200,
    lr: float = 1e-3,
    **kwargs: Any,
) -> DistillReport:
    """What :func:`convert_pretrained` does after the swap, as a ``NormSwap(calibrate=...)``
    hook: :func:`~normswap.calibrate` on ``batches``, then :func:`~normswap.distill` on them.

    ``kwargs`` go to :func:`~normswap.distill` (``feature_weight``, ``max_seconds``, ...); part
    of the batches is held out for its early stopping.

    Example:
        >>> import functools
        >>> from normswap.callbacks import NormSwap
        >>> hook = functools.partial(calibrate_and_distill, steps=300)
        >>> NormSwap("gn", calibrate=hook, calibrate_batches=100).calibrate.keywords
        {'steps': 300}
    """
    batches = list(batches)
    calibrate(model, reference, batches, batch_to_input=batch_to_input)
    kwargs.setdefault("progress", False)
    return distill(
        model, reference, batches, steps=steps, lr=lr, batch_to_input=batch_to_input, **kwargs
    )
