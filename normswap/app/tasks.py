"""LightningModules of the app: image classification, and conditional denoising."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from normswap.norms import AdaLN, condition

__all__ = ["ClassificationTask", "DenoiseTask"]


def _cond_dim(model: nn.Module) -> int | None:
    dims = {m.cond_dim for m in model.modules() if isinstance(m, AdaLN)}
    return dims.pop() if len(dims) == 1 else None


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Learning-rate multiplier at ``step`` of ``steps``: linear warm-up over the first
    ``warmup`` fraction, then cosine decay to 0.

    Example:
        >>> [round(lr_factor(s, 10, 0.2), 2) for s in (0, 1, 2, 6, 10)]
        [0.33, 0.67, 1.0, 0.5, 0.0]
    """
    ramp = int(warmup * steps)
    if step < ramp:
        return (step + 1) / (ramp + 1)
    done = min(step - ramp, steps - ramp) / max(steps - ramp, 1)
    return 0.5 * (1 + math.cos(math.pi * done))


class _Task(pl.LightningModule):
    """Shared optimizer set-up: SGD (momentum) or AdamW, linear warm-up then cosine decay.

    ``lr`` is for a batch of ``lr_reference_batch`` images and scaled linearly with the
    actual per-device batch size (the GN paper's rule), so a batch-size sweep compares
    norms, not learning rates. The first ``warmup`` fraction of the steps ramps the learning
    rate up linearly (as the GN paper's training does): without it, channels-only LayerNorm
    (``ln2d``) diverges in its first steps at SGD lr 0.05 and never recovers.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.05,
        optimizer: str = "sgd",
        weight_decay: float = 5e-4,
        lr_reference_batch: int | None = 32,
        warmup: float = 0.1,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"task.optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"task.lr must be positive, got {lr!r}")
        if not 0 <= warmup < 1:
            raise ValueError(
                f"task.warmup must be a fraction of the steps in [0, 1), got {warmup!r}"
            )
        self.warmup = warmup
        self.model = model
        self.lr, self.optimizer_name, self.weight_decay = lr, optimizer, weight_decay
        self.lr_reference_batch = lr_reference_batch
        self.save_hyperparameters(ignore=["model"])

    def example_inputs(self, batch: Any) -> Any:
        """Inputs of ``forward`` for two samples of ``batch`` (for tracing the model)."""
        return batch[0][:2]

    def effective_lr(self) -> float:
        """The learning rate after linear batch-size scaling."""
        batch = getattr(self.trainer.datamodule, "batch_size", None) if self._trainer else None
        if self.lr_reference_batch and batch:
            return self.lr * batch / self.lr_reference_batch
        return self.lr

    def configure_optimizers(self) -> Any:
        lr = self.effective_lr()
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=lr, momentum=0.9, weight_decay=self.weight_decay
            )
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, partial(lr_factor, steps=steps, warmup=self.warmup)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ClassificationTask(_Task):
    """Cross-entropy classification; logs ``train_loss``, ``val_loss``, ``val_acc``, ``test_acc``.

    A model converted to ``adaln`` runs with an all-zero condition here (classification has
    no condition to give it); see :class:`DenoiseTask` for a real one.

    Example:
        >>> import torchvision
        >>> task = ClassificationTask(torchvision.models.resnet18(num_classes=10))
        >>> task(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = _cond_dim(self.model)
        if dim is None:
            return self.model(x)
        with condition(self.model, x.new_zeros(x.shape[0], dim)):
            return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def _evaluate(self, batch: Any, prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y), sync_dist=True)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log(f"{prefix}_acc", acc, prog_bar=prefix == "val", sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")


class DenoiseTask(_Task):
    """Denoise images corrupted with Gaussian noise of a random level σ per image.

    With ``conditional=True`` the noise level is the condition of the model's AdaLN layers
    (``with normswap.condition(model, σ)``); with ``False`` they get zeros, so the same
    architecture must guess σ from the image. Logs ``val_mse`` and ``val_psnr`` (higher is
    better; the app reports ``val_psnr`` as its score).

    Example:
        >>> from normswap.app.models import build_segmenter
        >>> net = build_segmenter("lraspp_mobilenet_v3_large", 10, 1)
        >>> task = DenoiseTask(net, conditional=True)
        >>> task.conditional
        True
    """

    def __init__(
        self,
        model: nn.Module,
        conditional: bool = True,
        sigma_min: float = 0.1,
        sigma_max: float = 1.0,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        weight_decay: float = 0.0,
        lr_reference_batch: int | None = None,
        warmup: float = 0.0,
    ) -> None:
        super().__init__(model, lr, optimizer, weight_decay, lr_reference_batch, warmup)
        if not 0 < sigma_min <= sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
        self.conditional, self.sigma_min, self.sigma_max = conditional, sigma_min, sigma_max

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        dim = _cond_dim(self.model)
        if dim is None:
            out = self.model(noisy)
        else:
            cond = (
                sigma[:, None].expand(-1, dim)
                if self.conditional
                else sigma.new_zeros(sigma.shape[0], dim)
            )
            with condition(self.model, cond):
                out = self.model(noisy)
        out = out["out"] if isinstance(out, dict) else out
        out = out[:, :1]
        if out.shape[-2:] != noisy.shape[-2:]:
            out = F.interpolate(out, size=noisy.shape[-2:], mode="bilinear", align_corners=False)
        return noisy - out  # the network predicts the noise (residual learning)

    def example_inputs(self, batch: Any) -> Any:
        x = batch[0][:2]
        return self._corrupt(x, torch.Generator().manual_seed(0))

    def _corrupt(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[Any, Any]:
        n = x.shape[0]
        u = torch.rand(n, generator=generator).to(x.device)
        sigma = self.sigma_min + (self.sigma_max - self.sigma_min) * u
        noise = torch.randn(x.shape, generator=generator).to(x.device)
        return x + sigma.view(n, 1, 1, 1) * noise, sigma

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        noisy, sigma = self._corrupt(x, None)
        loss = F.mse_loss(self(noisy, sigma), x)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Any, batch_idx: int, prefix: str) -> None:
        x = batch[0]
        noisy, sigma = self._corrupt(x, torch.Generator().manual_seed(batch_idx))
        mse = F.mse_loss(self(noisy, sigma), x)
        self.log(f"{prefix}_mse", mse, sync_dist=True)
        # Images are standardized (std 1 over the data set): PSNR against a peak of 1.
        self.log(f"{prefix}_psnr", -10 * torch.log10(mse), prog_bar=True, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")
