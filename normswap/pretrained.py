"""Convert a pretrained model so that it keeps what it learned: swap, calibrate, distill.

:func:`convert_pretrained` is the one call for the common case::

    result = normswap.convert_pretrained(model, "gn", unlabeled_images, budget=600)
    print(result)            # the swap report, what calibration and distillation did
    result.fidelity          # top-1 agreement with the original on held-out inputs

It keeps an unmodified copy of the model as the reference, swaps the norms
(:func:`normswap.swap`), re-fits the converted layers in closed form
(:func:`normswap.calibrate.calibrate`), then distills the converted model towards the copy
(:func:`normswap.distill.distill`) for what is left of the time budget, and measures the
agreement reached. For ``wn`` with ``bn="fold"`` the conversion is exact and the data-driven
steps are skipped.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normswap.calibrate import (
    CalibrationError,
    CalibrationReport,
    _check_runs,
    _device,
    calibrate,
    converted_layers,
    input_batches,
)
from normswap.distill import (
    DistillCheck,
    DistillReport,
    Fidelity,
    _flush_denormal,
    distill,
    fidelity,
)
from normswap.report import SwapReport
from normswap.specs import NormSpec, get_spec
from normswap.surgery import swap

__all__ = ["ConversionResult", "convert_pretrained"]


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert_pretrained` did and the fidelity it reached.

    Attributes:
        report: the swap report.
        calibration: the calibration report (``None`` when skipped).
        distillation: the distillation report (``None`` when skipped).
        fidelity: agreement with the original on the held-out inputs (``None`` without them).
        seconds: wall time of the whole conversion.

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
        if self.distillation is not None:
            parts.append(str(self.distillation))
        if self.fidelity is not None:
            parts.append(f"fidelity on held-out inputs: {self.fidelity}")
        parts.append(f"total: {self.seconds:.0f} s")
        return "\n".join(parts)


def _first_inputs(data: Any) -> Any:
    if isinstance(data, Tensor):
        return data[:1]
    return input_batches(data, max_batches=1)[0]


def _calibration_batches(data: Any, samples: int, batch_size: int) -> list[Any]:
    if isinstance(data, Tensor):
        return list(data[:samples].split(batch_size))
    batches: list[Any] = []
    count = 0
    for inputs in input_batches(data):
        batches.append(inputs)
        count += inputs.shape[0] if isinstance(inputs, Tensor) else 1
        if count >= samples:
            break
    return batches


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
    **overrides: Any,
) -> ConversionResult:
    """Swap ``model``'s BatchNorms for ``spec`` and bring it back to its pretrained behaviour.

    Steps: keep a deep copy of ``model`` as the reference; :func:`normswap.swap` (with the first
    input of ``data`` as example input: it checks input ranks and, for ``wn``, finds the layer
    each BatchNorm folds into);
    :func:`~normswap.calibrate.calibrate` on the first ``calibrate_samples`` samples of ``data``;
    :func:`~normswap.distill.distill` on ``data`` for what remains of ``budget`` (early stop
    when agreement stops improving); :func:`~normswap.distill.fidelity` on ``val_data``. The
    model is converted in eval mode (folding and calibration use the running statistics) and
    its training flags are restored at the end. Everything is checked (spec, data, that both
    models run) before the model is modified.

    Args:
        model: the pretrained model, modified in place.
        spec: a spec or a registered name (``"gn"``, ``"ln"``, ``"in"``, ``"adalin"``, ``"wn"``...).
        data: unlabeled inputs for calibration and distillation: one tensor ``(N, ...)`` (best:
            distillation then draws random batches) or a list / ``DataLoader`` of batches.
        budget: time budget in seconds for the whole conversion, measured by ``clock``.
        val_data: held-out inputs to measure the fidelity reached (never trained on). Without
            it, distillation holds out part of ``data`` for its early stopping and the result
            has no fidelity.
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

    flags = {path: m.training for path, m in model.named_modules(remove_duplicate=False)}
    model.eval()
    try:
        reference = copy.deepcopy(model)
        first = _first_inputs(data)
        with torch.no_grad():
            _check_runs(reference, _move_like(first, model), "model")
        # One traced forward tells input ranks and, for weight norm, each BN's producer.
        report = swap(
            model,
            the_spec,
            include=include,
            exclude=exclude,
            example_inputs=_move_like(first, model),
        )
        layers = converted_layers(model, reference)
        calibration = distillation = None
        if layers:
            calibration = calibrate(
                model, reference, _calibration_batches(data, calibrate_samples, batch_size)
            )
            left = budget - (clock() - start)
            steps = distill_steps
            if steps is None:
                steps = _steps_that_fit(model, reference, data, batch_size, left, clock)
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
                    val_data=None,
                    max_seconds=left,
                    clock=clock,
                    on_check=on_check,
                    progress=progress,
                )
        reached = None
        if val_data is not None:
            reached = fidelity(model, reference, val_data)
    finally:
        _restore_flags(model, flags)
    return ConversionResult(report, calibration, distillation, reached, time.perf_counter() - start)


def _restore_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    """Give each path its training flag back; a new module takes its predecessor's flag
    (and a module new inside it, such as AdaLN's modulation, its parent's)."""
    restored: dict[str, bool] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        parent = path.rpartition(".")[0]
        flag = flags.get(path, restored.get(parent, flags.get("", module.training)))
        module.training = flag
        restored[path] = flag


def _move_like(inputs: Any, model: nn.Module) -> Any:
    device = _device(model)
    return input_batches(inputs, device=device)[0] if device is not None else inputs


def _steps_that_fit(
    model: nn.Module,
    reference: nn.Module,
    data: Any,
    batch_size: int,
    seconds: float,
    clock: Callable[[], float],
) -> int:
    """Distillation steps that fit in ``seconds``, from the time of two timed training steps
    (after a warm-up step)."""
    if seconds <= 0:
        return 0
    inputs = data[:batch_size] if isinstance(data, Tensor) else _first_inputs(data)
    inputs = _move_like(inputs, model)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]

    def step() -> None:
        with torch.no_grad():
            reference(inputs)
        out = model(inputs)
        out.float().square().mean().backward()

    with _flush_denormal(_device(model)):  # as distill() runs
        step()  # warm-up: one timed first step over-estimated the step time by ~45%
        tick = clock()
        step()
        step()
        elapsed = (clock() - tick) / 2
    for p, g in zip(params, saved, strict=True):
        p.grad = g
    # Checks of agreement cost about a tenth of the time; keep that margin.
    return max(1, int(0.85 * seconds / max(elapsed, 1e-6)))
