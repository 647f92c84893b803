"""``RunLog``: what ``normswap report`` reads — step time, curves and final metrics of a run.

Independent of the logger chosen (TensorBoard or CSV), every run writes two small files into
its output directory on rank zero: ``history.json`` (training curves) and ``metrics.json``
(one row of the report table).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

__all__ = ["RunLog"]


def _scalar(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class RunLog(Callback):
    """Record step times, per-epoch validation metrics and the final result of a run.

    Args:
        out_dir: where ``history.json`` and ``metrics.json`` go (the run's output directory).
        info: fixed facts of the run to put in ``metrics.json`` (model, norm, batch size, ...).
        score: the validation metric that ranks runs (``val_acc``, or ``val_psnr``).

    Example:
        >>> RunLog("outputs/run", {"model": "resnet18", "norm": "gn"}).score
        'val_acc'
    """

    def __init__(self, out_dir: str | Path, info: dict[str, Any], score: str = "val_acc") -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.info = dict(info)
        self.score = score
        self.step_times: list[float] = []
        self.train_loss: list[tuple[int, float]] = []
        self.val: list[dict[str, float]] = []
        self._t0: float | None = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._t0 is not None:
            self.step_times.append(time.perf_counter() - self._t0)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self.train_loss.append((trainer.global_step, float(loss.detach())))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val_") and (v := _scalar(value)) is not None:
                row[key] = v
        self.val.append(row)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The history so far: a resumed run's files cover the whole run."""
        return {
            "step_times": list(self.step_times),
            "train_loss": [list(item) for item in self.train_loss],
            "val": [dict(row) for row in self.val],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step_times = list(state_dict["step_times"])
        self.train_loss = [(int(s), float(v)) for s, v in state_dict["train_loss"]]
        self.val = [dict(row) for row in state_dict["val"]]

    def finish(self, trainer: pl.Trainer, test_metrics: dict[str, float] | None = None) -> dict:
        """Write ``history.json`` and ``metrics.json`` (rank zero) and return the metrics row."""
        times = self.step_times[2:] or self.step_times  # the first steps include warm-up
        row = dict(self.info)
        row["score_name"] = self.score
        row["score"] = self.val[-1].get(self.score) if self.val else None
        row["best_score"] = max((v[self.score] for v in self.val if self.score in v), default=None)
        row["step_time_s"] = statistics.median(times) if times else None
        row["steps"] = trainer.global_step
        row.update({k: v for k, v in (test_metrics or {}).items()})
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            history = {
                "train_loss": self.train_loss,
                "val": self.val,
                "step_times": self.step_times,
            }
            (self.out_dir / "history.json").write_text(json.dumps(history))
            (self.out_dir / "metrics.json").write_text(json.dumps(row, indent=1))
        return row
