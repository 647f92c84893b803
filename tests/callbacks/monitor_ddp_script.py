"""Run by test_monitor's DDP tests: NormMonitor with 2 CPU processes (gloo, strategy "ddp").

Rank 1 skips ``model.bn2``. Lightning's "ddp" strategy starts rank 1 by running this script
again. Each rank writes to ``<out>/rank<r>.pt``: the metrics it was asked to log (every rank
computes them; only rank zero sends them to the logger), its history, and the vector it
contributed to each reduction (before the sum).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from monitor_lit import LitModel, loader

from normswap.callbacks import NormMonitor
from normswap.monitor.collector import NormStatsCollector

EVERY_N_STEPS = 2
MAX_STEPS = 4


class RecordingMonitor(NormMonitor):
    """Keeps what each rank computed, written out at the end of fit."""

    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, trainer: pl.Trainer, values: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(values)))
        super().log_metrics(trainer, values, step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        torch.save(
            {
                "logged": self.logged,
                "history": self.history.state_dict(),
                "local": LOCAL,
                "paths": [layer.path for layer in self.layers],
                "log_dir": trainer.log_dir,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


LOCAL: list[torch.Tensor] = []
_pack = NormStatsCollector.pack


def _recording_pack(self: NormStatsCollector) -> torch.Tensor:
    packed = _pack(self)
    LOCAL.append(packed.clone())  # the reduction sums in place
    return packed


def main(out: Path) -> None:
    NormStatsCollector.pack = _recording_pack  # type: ignore[method-assign]  # record what each rank packs
    torch.set_num_threads(1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_find_unused_parameters_true",
        max_steps=MAX_STEPS,
        logger=pl.loggers.CSVLogger(out / "logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordingMonitor(out, every_n_steps=EVERY_N_STEPS, per_layer=True)],
    )
    # Different data per rank (DistributedSampler), so the local statistics differ.
    trainer.fit(LitModel(skip_bn2_on_rank=1), loader(n=32, batch_size=4))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
