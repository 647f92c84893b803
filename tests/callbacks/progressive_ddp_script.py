"""Run by test_progressive_callback.test_ddp_two_processes: NormSwap(progressive=...) under DDP
with 2 CPU processes (gloo). Each rank writes the alpha it used at every step and its final
model to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from swap_lit import LitClassifier, loader

import normswap
from normswap.callbacks import NormSwap


class Alphas(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.alphas: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.alphas.append(float(normswap.blend_layers(pl_module)[0].alpha))

    def on_train_end(self, trainer, pl_module) -> None:
        self.rank = trainer.global_rank

    def on_fit_end(self, trainer, pl_module) -> None:
        kinds = sorted({type(m).__name__ for m in pl_module.modules()})
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(
            {"alphas": self.alphas, "kinds": kinds, "state": state},
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main(out: Path) -> None:
    torch.manual_seed(0)
    module = LitClassifier("tiny")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # The NormSwap callback must come first: the recorder reads alpha after it set it.
        callbacks=[NormSwap("gn", num_groups=4, progressive=4), Alphas(out)],
    )
    # Different data per rank (DistributedSampler): the blends must still agree.
    trainer.fit(module, loader(n=40, batch_size=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
