"""``NormSwap``: the swap as a Lightning callback, done in ``setup()``.

``Callback.setup`` runs before the checkpoint restore, the strategy's set-up (SyncBatchNorm
conversion, device move, DDP wrapping) and ``configure_optimizers``, so the converted model
is what gets restored, wrapped and optimized (Lightning#16170 is what happens otherwise).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from normswap.distributed import broadcast_module
from normswap.errors import NormSwapError
from normswap.inputs import BatchToInput, default_batch_to_input
from normswap.record import RECORD_FORMAT, surgery_record, swap_for_training
from normswap.report import SwapReport
from normswap.specs import NormSpec, get_spec

__all__ = ["CalibrateFn", "NormSwap"]

#: ``calibrate(model, reference, batches, *, batch_to_input)``: re-fit the converted ``model``
#: so it behaves like ``reference`` (the model before the swap) on ``batches`` (training batches,
#: on the device), each made model inputs by ``batch_to_input`` (:mod:`normswap.inputs`).
#: :func:`normswap.calibrate` and :func:`normswap.distill` take exactly these arguments.
CalibrateFn = Callable[..., Any]

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
        strict: fail if any BatchNorm-family module would remain.
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
        **overrides: Any,
    ) -> None:
        super().__init__()
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
        record = surgery_record(report, self.include, self.exclude)
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
        return swap_for_training(
            pl_module,
            self.spec,
            include=self.include,
            exclude=self.exclude,
            example_inputs=self.example_inputs,
            strict=self.strict,
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
        self.calibrate(pl_module, reference, batches, batch_to_input=self.batch_to_input)
        broadcast_module(pl_module)
        self._calibrated = True
        self._reference = None  # free the copy

    # ------------------------------------------------------------------ checkpoint state

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.report is None:
            return {}
        state = surgery_record(self.report, self.include, self.exclude)
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
        # Calibrated weights come from the checkpoint: never calibrate a resumed model again.
        self._calibrated = bool(state_dict.get("calibrated", True))
        if self._calibrated:
            self._reference = None


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
