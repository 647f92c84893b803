"""Small models and LightningModules for the NormMonitor tests (and its DDP script)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normswap

COND_DIM = 4


class AllNorms(nn.Module):
    """One layer of every family (two BNs) on (N, 3, 8, 8) input, in this forward order:
    bn, bn2, gn, ln, ln2d, inorm, adalin, adaln, wconv. ``bn2`` is skipped when
    ``skip_bn2`` is set. In-place ReLUs follow the BNs (they break full backward hooks)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        c = 8
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.bn2 = nn.BatchNorm2d(c)
        self.gn = normswap.GroupNorm(c, num_groups=4)
        self.ln = normswap.LayerNorm(c)
        self.ln2d = normswap.LayerNorm2d(c)
        self.inorm = normswap.InstanceNorm(c)
        self.adalin = normswap.AdaLIN(c, rho_init=0.7)
        self.adaln = normswap.AdaLN(c, cond_dim=COND_DIM, gate=True)
        nn.init.normal_(self.adaln.modulation[-1].weight, std=0.3)  # not the zero init
        self.wconv = normswap.weight_norm(nn.Conv2d(c, c, 3, padding=1))
        self.head = nn.Linear(c, 10)
        self.skip_bn2 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        if not self.skip_bn2:
            x = self.relu(self.bn2(x))
        for norm in (self.gn, self.ln, self.ln2d, self.inorm, self.adalin, self.adaln):
            x = F.relu(norm(x))
        x = self.wconv(x)
        return self.head(x.mean(dim=(2, 3)))


def condition_of(x: torch.Tensor) -> torch.Tensor:
    """The AdaLN condition used for a batch."""
    return x.mean(dim=(1, 2, 3))[:, None] * torch.arange(1.0, COND_DIM + 1)


class LitModel(pl.LightningModule):
    """Classifies with ``model``; passes the AdaLN condition when the model has AdaLN.

    With ``skip_bn2_on_rank`` set, the process of that global rank skips ``model.bn2``.
    """

    def __init__(self, model: nn.Module | None = None, skip_bn2_on_rank: int | None = None) -> None:
        super().__init__()
        self.model = AllNorms() if model is None else model
        self.skip_bn2_on_rank = skip_bn2_on_rank

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.skip_bn2_on_rank is not None:
            self.model.skip_bn2 = self.global_rank == self.skip_bn2_on_rank
        if any(isinstance(m, normswap.AdaLN) for m in self.model.modules()):
            with normswap.condition(self.model, condition_of(x)):
                logits = self.model(x)
        else:
            logits = self.model(x)
        return F.cross_entropy(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def dataset(n: int = 32, size: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 2 + 0.5
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x, y)


def loader(n: int = 32, batch_size: int = 8, size: int = 8) -> DataLoader:
    return DataLoader(dataset(n, size), batch_size=batch_size, shuffle=False)


def trainer_kwargs() -> dict[str, Any]:
    return {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
