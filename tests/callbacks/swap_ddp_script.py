"""Run by test_swap_callback.test_ddp_two_processes: NormSwap under DDP with 2 CPU processes.

Lightning's "ddp" strategy starts rank 1 by running this script again; each rank writes what
it holds to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from swap_lit import LitClassifier, loader
from torch import nn

import normswap
from normswap.callbacks import NormSwap


def calibrate(model: nn.Module, reference: nn.Module, batches: list, *, batch_to_input) -> None:
    # A deliberately rank-dependent result: NormSwap must broadcast rank zero's.
    with torch.no_grad():
        model.model.bn1.bias.fill_(float(torch.distributed.get_rank()))


class Dump(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calibrated_bias = pl_module.model.bn1.bias[0].item()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        kinds = {
            name: type(m).__name__
            for name, m in pl_module.named_modules()
            if normswap.is_source_norm(m) or isinstance(m, normswap.GroupNorm)
        }
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(
            {"kinds": kinds, "state": state, "calibrated_bias": self.calibrated_bias},
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main(out: Path) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        # A logger makes NormSwap ask for trainer.log_dir, a collective: all ranks must call it.
        logger=pl.loggers.CSVLogger(str(out), name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            NormSwap("gn", exclude="model.layer4.1.bn2", calibrate=calibrate),
            Dump(out),
        ],
    )
    trainer.fit(LitClassifier(), loader(n=16, batch_size=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
