"""``NormSwap``: the swap as a Lightning callback, done in ``setup()``.

``Callback.setup`` runs before the checkpoint restore, the strategy's set-up (SyncBatchNorm
conversion, device move, DDP wrapping) and ``configure_optimizers``, so the converted model
is what gets restored, wrapped and optimized (Lightning#16170 is what happens otherwise).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from normswap.distributed import broadcast_module
from normswap.errors import NormSwapError
from normswap.inputs import BatchToInput, default_batch_to_input
from normswap.progressive import (
    BlendSchedule,
    anchor_blend,
    blend_layers,
    finish_blend,
    set_blend,
    swap_progressive,
)
from normswap.record import RECORD_FORMAT, surgery_record, swap_for_training
from normswap.report import SwapReport
from normswap.sources import resolve_replace
from normswap.specs import NormSpec, get_spec

__all__ = ["CalibrateFn", "NormSwap"]

#: ``calibrate(model, reference, batches, *, batch_to_input)``: re-fit the converted ``model``
#: so it behaves like ``reference`` (the model before the swap) on ``batches`` (training batches,
#: on the device), each made model inputs by ``batch_to_input`` (:mod:`normswap.inputs`).
#: :func:`normswap.calibrate` and :func:`normswap.distill` take exactly these arguments.
CalibrateFn = Callable[..., Any]
"""What ``NormSwap(calibrate=...)`` takes: ``fn(model, reference, batches, *, batch_to_input)``
(:func:`normswap.calibrate`, :func:`normswap.distill`, or both in turn)."""

_APPLIED = "_normswap_record"  # attribute set on a module once it has been swapped


def _patterns(value: str | Iterable[str] | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    pats = (value,) if isinstance(value, str) else tuple(value)
    if not pats or not all(isinstance(p, str) and p for p in pats):
        raise NormSwapError(
            f"NormSwap({name}=...) takes a glob string or a list of them, got {value!r}"
        )
    return pats


class NormSwap(Callback):
    """Swap a LightningModule's BatchNorms when the Trainer sets it up.

    The swap runs once per module in ``setup()`` (fit → validate → test does not swap
    twice), before checkpoint restore, DDP wrapping and ``configure_optimizers``. The
    report is logged on rank zero (as text, as ``normswap/<source -> target>`` counts in the
    hyperparameters, and as ``normswap_report.json`` in the log dir), and the surgery record
    is saved in every checkpoint, so ``trainer.fit(ckpt_path=...)`` resumes the converted
    model, and :func:`normswap.restore` rebuilds it outside a Trainer.

    Module paths in ``include``/``exclude`` are relative to the LightningModule
    (``"model.layer4.*"`` for a module that holds the network as ``self.model``).

    With ``progressive=``, the BatchNorms become :class:`~normswap.norms.BlendNorm` layers
    (:func:`normswap.swap_progressive`): training starts exactly from the pretrained model
    and the blends move to the new norm along the :class:`~normswap.BlendSchedule`, set
    from ``trainer.global_step`` before every training batch (the same on every rank). When
    ``fit`` ends at or after the schedule's ``end`` the blends are replaced by their target
    norms (:func:`normswap.finish_blend`): a plain converted model. Checkpoints taken on the
    way hold the blends and the schedule; ``trainer.fit(ckpt_path=...)`` resumes mid-ramp.
    With ``calibrate=``, the target norms are calibrated (at ``alpha = 1``) before the ramp
    starts, and the blends re-anchored, so step 0 is still the pretrained model
    (:func:`normswap.calibrate_blend`).

    With ``sync_batchnorm=True``, BatchNorms that the spec leaves alone become SyncBatchNorm
    as usual (Lightning converts them after this callback ran). With ``"wn"`` and
    ``bn="fold"``, the module is put in eval mode for the swap only: folding uses the
    (pretrained) running statistics.

    Args:
        spec: a spec object or a registered norm name (``"gn"``, ``"ln"``, ...).
        include: glob pattern(s) of module paths to convert.
        exclude: glob pattern(s) of module paths to leave alone.
        calibrate: ``True`` runs :func:`normswap.calibrate` (closed-form re-fit of the
            converted layers to the pretrained BatchNorms' outputs), or any
            ``calibrate(model, reference, batches, *, batch_to_input)`` function, e.g.
            ``functools.partial(normswap.distill, steps=200)``; it runs at the start of
            training on ``calibrate_batches`` training batches (``reference`` is a copy of the
            module before the swap), on every rank, and rank zero's result is broadcast.
        calibrate_batches: how many training batches calibration sees.
        batch_to_input: maps a training batch to the model inputs, for calibration (passed to
            it) and tracing (default: the first element of a tuple/list batch; see
            :mod:`normswap.inputs`).
        example_inputs: inputs for one traced forward pass of the LightningModule (needed
            for models torch.fx cannot trace when folding, and to check input ranks).
        strict: fail if any norm of the replaced kinds would remain.
        replace: the source kinds to replace (``"bn"`` by default; ``"ln"``, a tuple, or
            ``"any"``; see :func:`normswap.swap`).
        progressive: a :class:`~normswap.BlendSchedule`, its fields as a mapping
            (``{"end": 1000, "shape": "cosine"}``), or the step at which the model is fully
            converted (an int); ``None`` swaps at once.
        **overrides: spec field overrides, e.g. ``num_groups=16``.

    Example:
        >>> swap = NormSwap("gn", num_groups=16, exclude="model.fc")
        >>> swap.spec.num_groups, swap.state_key
        (16, "NormSwap{'spec': 'gn'}")
        >>> trainer = pl.Trainer(callbacks=[swap], logger=False)
        >>> trainer.fit(lit_module)  # doctest: +SKIP
    """

    def __init__(
        self,
        spec: NormSpec | str,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        calibrate: CalibrateFn | bool | None = None,
        calibrate_batches: int = 4,
        batch_to_input: BatchToInput = default_batch_to_input,
        example_inputs: Any = None,
        strict: bool = False,
        progressive: BlendSchedule | Mapping[str, Any] | int | None = None,
        replace: str | Iterable[str] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.replace = resolve_replace(replace)  # SpecError names the valid kinds
        self.progressive = _schedule(progressive)
        self._finished = False
        self._alpha: float | None = None
        self.spec = get_spec(spec, **overrides)  # SpecError names the valid choices
        self.include = _patterns(include, "include")
        self.exclude = _patterns(exclude, "exclude")
        if calibrate is True:
            from normswap.pretrained.calibrate import calibrate as calibrate_fn

            calibrate = calibrate_fn
        elif calibrate is False:
            calibrate = None
        if calibrate is not None and not callable(calibrate):
            raise NormSwapError(
                "NormSwap(calibrate=...) takes True (normswap.calibrate) or a function "
                "calibrate(model, reference, batches, *, batch_to_input), "
                f"got {type(calibrate).__name__}"
            )
        if isinstance(calibrate_batches, bool) or not isinstance(calibrate_batches, int):
            raise NormSwapError(
                f"NormSwap(calibrate_batches=...) must be a positive int, got {calibrate_batches!r}"
            )
        if calibrate_batches < 1:
            raise NormSwapError(
                f"NormSwap(calibrate_batches=...) must be a positive int, got {calibrate_batches}"
            )
        if not callable(batch_to_input):
            raise NormSwapError("NormSwap(batch_to_input=...) must be callable: batch -> input")
        if not isinstance(strict, bool):
            raise NormSwapError(f"NormSwap(strict=...) must be True or False, got {strict!r}")
        self.calibrate = calibrate
        self.calibrate_batches = calibrate_batches
        self.batch_to_input = batch_to_input
        self.example_inputs = example_inputs
        self.strict = strict
        self.report: SwapReport | None = None
        self._reference: nn.Module | None = None
        self._calibrated = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(spec=self.spec.name)

    # ------------------------------------------------------------------ the swap

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        applied = getattr(pl_module, _APPLIED, None)
        if applied is not None:
            if applied["spec"] != self.spec.to_dict():
                raise NormSwapError(
                    f"this module was already converted with {applied['spec']}; NormSwap is "
                    f"configured with {self.spec.to_dict()}: build a fresh module to convert it "
                    "differently"
                )
            return  # fit -> validate -> test: swapped once
        if self.calibrate is not None:
            self._reference = _detached_copy(pl_module)
        report = self.convert(pl_module)
        self.report = report
        record = surgery_record(report, self.include, self.exclude, self._progress())
        setattr(pl_module, _APPLIED, record)
        self._log_report(trainer, report)

    def convert(self, pl_module: pl.LightningModule) -> SwapReport:
        """Swap ``pl_module`` in place; override to customize (e.g. convert a submodule).

        Example:
            >>> class BackboneSwap(NormSwap):
            ...     def convert(self, pl_module):
            ...         return normswap.swap(pl_module.backbone, self.spec)
            >>> BackboneSwap("ln").spec.name
            'ln'
        """
        convert = swap_for_training if self.progressive is None else swap_progressive
        return convert(
            pl_module,
            self.spec,
            include=self.include,
            exclude=self.exclude,
            example_inputs=self.example_inputs,
            strict=self.strict,
            replace=self.replace,
        )

    def _log_report(self, trainer: pl.Trainer, report: SwapReport) -> None:
        # trainer.log_dir broadcasts from rank zero: every rank must ask, or DDP deadlocks.
        log_dir = trainer.log_dir if trainer.loggers else None
        if not trainer.is_global_zero:
            return
        rank_zero_info(str(report))
        counts = {f"normswap/{k}": v for k, v in report.counts().items()}
        for logger in trainer.loggers:
            logger.log_hyperparams({"normswap/spec": self.spec.name, **counts})
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("normswap/report", f"```\n{report}\n```")
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, "normswap_report.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(report.to_dict(), f, indent=1)

    # ------------------------------------------------------------------ calibration

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.calibrate is None or self._calibrated or self._reference is None:
            return
        reference = self._reference.to(pl_module.device).eval()
        batches = []
        for batch in trainer.train_dataloader:
            batches.append(trainer.strategy.batch_to_device(batch))
            if len(batches) == self.calibrate_batches:
                break
        if not batches:
            raise NormSwapError("NormSwap(calibrate=...): the training dataloader is empty")
        if self.progressive is None:
            self.calibrate(pl_module, reference, batches, batch_to_input=self.batch_to_input)
        else:  # calibrate the targets (alpha = 1); step 0 stays the pretrained model
            layers = blend_layers(pl_module)
            alphas = [layer._alpha for layer in layers]
            set_blend(pl_module, 1.0)
            self.calibrate(pl_module, reference, batches, batch_to_input=self.batch_to_input)
            for layer, alpha in zip(layers, alphas, strict=True):
                layer.set_alpha(alpha)
            anchor_blend(pl_module)
        broadcast_module(pl_module)
        self._calibrated = True
        self._reference = None  # free the copy

    # ------------------------------------------------------------------ progressive conversion

    def _progress(self) -> dict[str, Any] | None:
        if self.progressive is None:
            return None
        return {**self.progressive.to_dict(), "finished": self._finished}

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.progressive is None or self._finished:
            return
        alpha = self.progressive.alpha(trainer.global_step)
        if alpha != self._alpha:  # one Python comparison per step while nothing changes
            set_blend(pl_module, alpha)
            self._alpha = alpha

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.progressive is None or self._finished:
            return
        if trainer.global_step < self.progressive.end:
            rank_zero_warn(
                f"NormSwap(progressive=...): training stopped at step {trainer.global_step}, "
                f"before the schedule's end ({self.progressive.end}); the model still holds "
                "blends (resume from a checkpoint to continue, or call normswap.finish_blend)"
            )
            return
        set_blend(pl_module, 1.0)
        finish_blend(pl_module)
        self._finished = True
        record = getattr(pl_module, _APPLIED, None)
        if record is not None:
            record["progressive"] = self._progress()

    # ------------------------------------------------------------------ checkpoint state

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.report is None:
            return {}
        state = surgery_record(self.report, self.include, self.exclude, self._progress())
        state["calibrated"] = self._calibrated or self.calibrate is None
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("format") != RECORD_FORMAT:
            raise NormSwapError(
                f"unknown NormSwap checkpoint state format {state_dict.get('format')!r}"
            )
        if state_dict["spec"] != self.spec.to_dict():
            raise NormSwapError(
                f"the checkpoint was converted with {state_dict['spec']}, but this NormSwap is "
                f"configured with {self.spec.to_dict()}: configure the callback as it was"
            )
        if self.report is not None:
            want = [(r["path"], r["action"]) for r in state_dict["report"]["records"]]
            got = [(r.path, r.action) for r in self.report]
            if want != got:
                raise NormSwapError(
                    "the checkpoint's swap plan differs from the one applied to this model "
                    "(different include/exclude or architecture)"
                )
        saved = state_dict.get("progressive")
        mine = self._progress()
        if (saved is None) != (mine is None) or (
            saved is not None and mine is not None and _without(saved) != _without(mine)
        ):
            raise NormSwapError(
                f"the checkpoint's progressive schedule is {saved and _without(saved)}, but this "
                f"NormSwap is configured with {mine and _without(mine)}: configure it as it was"
            )
        if saved is not None and saved.get("finished"):
            raise NormSwapError(
                "the checkpoint was saved after its progressive conversion finished (plain "
                "norms): resume it with NormSwap(progressive=None)"
            )
        self._alpha = None  # set from the restored global step at the next batch
        # Calibrated weights come from the checkpoint: never calibrate a resumed model again.
        self._calibrated = bool(state_dict.get("calibrated", True))
        if self._calibrated:
            self._reference = None


def _without(progress: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in progress.items() if k != "finished"}


def _schedule(value: BlendSchedule | Mapping[str, Any] | int | None) -> BlendSchedule | None:
    if value is None or isinstance(value, BlendSchedule):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return BlendSchedule(end=value)
    if isinstance(value, Mapping):
        unknown = set(value) - {"end", "start", "shape"}
        if unknown:
            raise NormSwapError(
                f"NormSwap(progressive=...): unknown schedule field(s) {sorted(unknown)}; "
                "valid: end, start, shape"
            )
        return BlendSchedule(**value)
    raise NormSwapError(
        "NormSwap(progressive=...) takes a BlendSchedule, a mapping of its fields "
        f"(end, start, shape) or the end step (an int), got {value!r}"
    )


def _detached_copy(module: nn.Module) -> nn.Module:
    """A deep copy of a LightningModule without its Trainer reference."""
    trainer = getattr(module, "_trainer", None)
    try:
        if trainer is not None:
            module._trainer = None
        return copy.deepcopy(module)
    finally:
        if trainer is not None:
            module._trainer = trainer
