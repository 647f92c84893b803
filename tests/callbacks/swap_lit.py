"""A small LightningModule around a torchvision model, for the NormSwap tests."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normswap


class LitClassifier(pl.LightningModule):
    """resnet18 (10 classes) on 3x64x64 inputs; feeds a condition when the model has AdaLN."""

    def __init__(self, arch: str = "resnet18", compile: bool = False, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        if arch == "tiny":  # small enough for torch.compile to be quick on a CPU
            net = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1, bias=False),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(8, 10),
            )
        elif arch == "tiny_vit":  # LayerNorms over tokens: 16 patches of 16 px
            net = normswap.tiny_vit(
                10,
                image_size=64,
                patch_size=16,
                num_layers=1,
                num_heads=2,
                hidden_dim=16,
                mlp_dim=32,
            )
        else:
            net = torchvision.models.get_model(arch, weights=None, num_classes=10)
        self.model: nn.Module = torch.compile(net) if compile else net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = {m.cond_dim for m in self.model.modules() if isinstance(m, normswap.AdaLN)}
        if dims:
            cond = x.mean(dim=(1, 2, 3), keepdim=False)[:, None].expand(-1, dims.pop())
            with normswap.condition(self.model, cond):
                return self.model(x)
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader(n: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "logger": pl.loggers.CSVLogger(str(tmp_path), name="logs"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**defaults, **kwargs})
