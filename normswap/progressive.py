"""Progressive conversion: a pretrained model turns into the converted one gradually.

:func:`swap_progressive` plans the swap like :func:`normswap.swap`, but puts each new norm in a
:class:`~normswap.norms.BlendNorm` with the pretrained BatchNorm's eval-mode affine: at
``alpha = 0`` the model computes exactly what the pretrained model computed. A
:class:`BlendSchedule` ramps ``alpha`` to 1 over training steps (:func:`set_blend` applies it),
so the rest of the network adapts while the normalization changes under it; then
:func:`finish_blend` replaces every blend by its target norm and the model is a plain
converted model (the one ``swap`` would have made, with the trained parameters).

Used by :func:`normswap.convert_pretrained` (``progressive=``: distillation whose student
starts as the teacher) and the ``NormSwap`` callback (``progressive=``: fine-tuning that starts
from the pretrained model and ends with the new norm).

Example:
    >>> import torchvision
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> expected = model(x)
    >>> _ = swap_progressive(model, "gn")
    >>> torch.allclose(model(x), expected, atol=1e-4)  # alpha = 0: the pretrained model
    True
    >>> set_blend(model, 0.5)  # normalizes with a mix of the running and per-sample statistics
    20
    >>> set_blend(model, 1.0), finish_blend(model), type(model.bn1).__name__
    (20, 20, 'GroupNorm')
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from normswap.errors import SpecError, SwapError
from normswap.modules import module_paths, set_module, take_hooks
from normswap.norms import BlendNorm, FrozenAffine, NormThen, with_after
from normswap.plan import NormStep, Plan, plan
from normswap.report import REPLACE, SKIP, SwapReport
from normswap.specs import NormSpec
from normswap.surgery import apply

if TYPE_CHECKING:
    from normswap.pretrained.calibrate import CalibrationReport

__all__ = [
    "BlendSchedule",
    "anchor_blend",
    "blend_layers",
    "calibrate_blend",
    "finish_blend",
    "plan_progressive",
    "set_blend",
    "swap_progressive",
]


@dataclass(frozen=True)
class BlendSchedule:
    """``alpha(step)``: 0 until ``start``, ramped to 1 at ``end``, 1 afterwards.

    Attributes:
        end: the step at which the model is the converted one (``alpha = 1``).
        start: the step at which the ramp starts.
        shape: ``"linear"`` or ``"cosine"`` (slow at both ends).

    Example:
        >>> s = BlendSchedule(end=100, start=20)
        >>> s.alpha(0), s.alpha(60), s.alpha(100), s.alpha(500)
        (0.0, 0.5, 1.0, 1.0)
    """

    end: int
    start: int = 0
    shape: Literal["linear", "cosine"] = "linear"

    def __post_init__(self) -> None:
        for name in ("end", "start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"BlendSchedule: {name} must be an int >= 0, got {value!r}")
        if self.end <= self.start:
            raise SpecError(f"BlendSchedule: end ({self.end}) must come after start ({self.start})")
        if self.shape not in ("linear", "cosine"):
            raise SpecError(f"BlendSchedule: shape must be linear or cosine, got {self.shape!r}")

    def alpha(self, step: int) -> float:
        """The mix at ``step``.

        Example:
            >>> BlendSchedule(end=10, shape="cosine").alpha(5)
            0.5
        """
        if step <= self.start:
            return 0.0
        if step >= self.end:
            return 1.0
        t = (step - self.start) / (self.end - self.start)
        if self.shape == "cosine":
            t = 0.5 - 0.5 * math.cos(math.pi * t)
        return round(t, 12)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for checkpoints.

        Example:
            >>> BlendSchedule(end=4).to_dict()
            {'end': 4, 'start': 0, 'shape': 'linear'}
        """
        return {"end": self.end, "start": self.start, "shape": self.shape}


def _blend_wrapper(step: NormStep, new: nn.Module) -> nn.Module:
    src = step.source
    assert src is not None
    if src.over == "batch":  # a BatchNorm: its eval-mode affine, frozen
        assert src.running_mean is not None and src.running_var is not None
        frozen: nn.Module = FrozenAffine.from_statistics(
            src.running_mean, src.running_var, src.eps, src.weight, src.bias
        ).train(src.training)
    else:  # any other norm: a frozen copy of it, as pretrained
        frozen = copy.deepcopy(src.module).requires_grad_(False)
    return BlendNorm(frozen, new, alpha=0.0).train(src.training)


def plan_progressive(
    model: nn.Module,
    spec: NormSpec | str,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    example_inputs: Any = None,
    strict: bool = False,
    replace: str | Iterable[str] | None = None,
    **overrides: Any,
) -> Plan:
    """:func:`normswap.plan`, plus the rules of a progressive conversion; modifies nothing.

    Raises:
        SpecError: a family that does not replace norms one by one (``wn`` folds or removes
            them, ``ws_gn`` also changes the convs, which no blend can undo).
        SwapError: what :func:`normswap.plan` refuses, and BatchNorms without running
            statistics (there is no pretrained affine to start from).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> len(plan_progressive(model, "gn", num_groups=4).norm_steps)
        1
    """
    the_plan = plan(
        model,
        spec,
        include=include,
        exclude=exclude,
        example_inputs=example_inputs,
        strict=strict,
        replace=replace,
        **overrides,
    )
    name = the_plan.spec.name
    moves = {s.decision.action for s in the_plan.norm_steps} - {REPLACE, SKIP}
    if moves or any(s.action != SKIP for s in the_plan.layer_steps):
        raise SpecError(
            f"progressive conversion blends each BatchNorm into a new norm; {name!r} "
            f"{'folds or removes norms' if moves else 'also changes other layers'}, which no "
            "blend can undo: convert it with normswap.swap"
        )
    missing = [
        (s.paths[0], "has no running statistics: there is no pretrained affine to blend from")
        for s in the_plan.norm_steps
        if s.decision.action == REPLACE
        and s.source is not None
        and s.source.over == "batch"
        and not s.source.has_statistics
    ]
    if missing:
        lines = "\n".join(f"  - {p}: {m}" for p, m in missing)
        raise SwapError(
            f"cannot convert {type(model).__name__} progressively: {len(missing)} problem(s); "
            f"nothing was modified:\n{lines}\nfix: exclude them, or use normswap.swap",
            missing,
        )
    return the_plan


def swap_progressive(
    model: nn.Module,
    spec: NormSpec | str,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    example_inputs: Any = None,
    strict: bool = False,
    replace: str | Iterable[str] | None = None,
    **overrides: Any,
) -> SwapReport:
    """Swap like :func:`normswap.swap`, each new norm blended with its pretrained BatchNorm.

    Every replaced BatchNorm becomes a :class:`~normswap.norms.BlendNorm` of its eval-mode
    affine (frozen) and the new norm, at ``alpha = 0``: the model computes what it computed.
    The new norms hold the BatchNorms' γ/β (the same Parameters), ready to train or calibrate.
    What is refused is refused by :func:`plan_progressive`, before anything is modified.

    Raises:
        SpecError: see :func:`plan_progressive`.
        SwapError: see :func:`plan_progressive`.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> swap_progressive(model, "ln").counts()
        {'BatchNorm2d -> LayerNorm': 1}
        >>> type(model[1]).__name__, float(model[1].alpha)
        ('BlendNorm', 0.0)
    """
    the_plan = plan_progressive(
        model,
        spec,
        include=include,
        exclude=exclude,
        example_inputs=example_inputs,
        strict=strict,
        replace=replace,
        **overrides,
    )
    return apply(model, the_plan, wrap=_blend_wrapper)


def blend_layers(model: nn.Module) -> list[BlendNorm]:
    """Every :class:`~normswap.norms.BlendNorm` of ``model`` (a shared one once).

    Example:
        >>> blend_layers(nn.Sequential(nn.ReLU()))
        []
    """
    return [m for m in dict.fromkeys(model.modules()) if isinstance(m, BlendNorm)]


def set_blend(model: nn.Module, alpha: float) -> int:
    """Set ``alpha`` on every blend of ``model``; returns how many there are.

    Example:
        >>> set_blend(nn.Sequential(nn.ReLU()), 0.5)
        0
    """
    layers = blend_layers(model)
    for layer in layers:
        layer.set_alpha(alpha)
    return len(layers)


def anchor_blend(model: nn.Module) -> int:
    """Re-anchor every blend so ``alpha = 0`` is the pretrained model with the current affines.

    Needed after the target norms' ``weight``/``bias`` changed outside training (e.g.
    calibrated): a blend mixes statistics around the target's own affine.

    Returns:
        How many channels could not be made exact (see :meth:`BlendNorm.anchor`).

    Example:
        >>> anchor_blend(nn.Sequential(nn.ReLU()))
        0
    """
    return sum(layer.anchor() for layer in blend_layers(model))


def calibrate_blend(
    model: nn.Module, reference: nn.Module, data: Any, **kwargs: Any
) -> CalibrationReport:
    """Calibrate the target norms (at ``alpha = 1``), then re-anchor the blends at ``alpha = 0``.

    The progressive conversion then starts exactly at the pretrained model and ends at a
    calibrated converted model instead of one whose norms merely copied the BatchNorms' γ/β
    (measured in ``benchmarks/NOTES.md``: the ramp ends about 3 points higher). ``kwargs`` go
    to :func:`normswap.calibrate`. Every blend's ``alpha`` is restored afterwards.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> import copy; reference = copy.deepcopy(model)
        >>> _ = swap_progressive(model, "gn", num_groups=4)
        >>> x = torch.randn(4, 3, 8, 8)
        >>> _ = calibrate_blend(model, reference, x)
        >>> torch.allclose(model(x), reference(x), atol=1e-5)  # alpha = 0: still the original
        True
    """
    from normswap.pretrained.calibrate import calibrate

    layers = blend_layers(model)
    alphas = [layer._alpha for layer in layers]
    try:
        for layer in layers:
            layer.set_alpha(1.0)
        report = calibrate(model, reference, data, **kwargs)
    finally:
        for layer, alpha in zip(layers, alphas, strict=True):
            layer.set_alpha(alpha)
    anchor_blend(model)
    return report


def finish_blend(model: nn.Module) -> int:
    """Replace every blend by its target norm: a plain converted model. Returns how many.

    A blend followed by a norm + activation source's modules (a ``NormThen``) becomes the
    target's ``*Act`` variant with those modules, as :func:`normswap.swap` builds it. Hooks
    registered on the blend (or its wrapper) move to the replacement.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> _ = swap_progressive(model, "gn", num_groups=4)
        >>> finish_blend(model), type(model[1]).__name__
        (1, 'GroupNorm')
    """
    count = 0
    # Blends wrapped with a source's modules first: their inner blend goes with them.
    for wrapped in (True, False):
        for module, paths in list(module_paths(model).values()):
            if wrapped and isinstance(module, NormThen) and isinstance(module.norm, BlendNorm):
                after = [(name, module._modules[name]) for name in module.after_names]
                new = with_after(module.norm.target, after)
            elif not wrapped and isinstance(module, BlendNorm):
                new = module.target
            else:
                continue
            if any(p == "" for p in paths):
                raise SpecError("finish_blend: the model itself is a blend; finish its container")
            take_hooks(module, new)
            for path in paths:
                set_module(model, path, new)
            count += 1
    return count
