"""Shared helpers for the tests: state comparison and gradient checks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer, by state-dict key."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_untouched(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    """The model's state equals ``before`` exactly (same keys, bit-identical values)."""
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def assert_others_identical(
    before: dict[str, torch.Tensor], model: nn.Module, changed_prefixes: Iterable[str]
) -> None:
    """Every state entry outside ``changed_prefixes`` (module paths or exact keys) is still
    there, bit-identical."""
    changed = tuple(changed_prefixes)
    prefixes = tuple(p + "." for p in changed)
    after = model.state_dict()
    kept = [k for k in before if k not in changed and not k.startswith(prefixes)]
    assert kept, "nothing left to compare"
    for key in kept:
        assert key in after, f"{key} disappeared"
        assert after[key].dtype == before[key].dtype, key
        assert torch.equal(after[key], before[key]), f"{key} changed"


def sum_outputs(out: object) -> torch.Tensor:
    """Sum every floating tensor in a (nested) model output into one scalar."""
    if isinstance(out, torch.Tensor):
        return out.float().sum() if out.is_floating_point() else torch.zeros(())
    if isinstance(out, dict):
        return sum((sum_outputs(v) for v in out.values()), torch.zeros(()))
    if isinstance(out, (list, tuple)):
        return sum((sum_outputs(v) for v in out), torch.zeros(()))
    return torch.zeros(())


def assert_all_grads(model: nn.Module) -> None:
    """Every trainable parameter received a finite gradient."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for: {missing[:10]} (+{max(0, len(missing) - 10)})"
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not bool(torch.isfinite(p.grad).all())
    ]
    assert not bad, f"non-finite gradient for: {bad[:10]}"


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_ddp(
    script: Path, out: Path, *, ranks: int = 2, timeout: int = 120, cwd: Path = REPO_ROOT
) -> list[dict]:
    """Run ``script out`` (it spawns ``ranks`` gloo processes that each save
    ``<out>/rank<r>.pt``) and load what every rank saved."""
    result = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(ranks)]


def run_ddp_script(text: str, tmp_path: Path, ranks: int = 2) -> list[dict]:
    """:func:`run_ddp` on a script written from ``text`` into ``tmp_path``."""
    script = tmp_path / "ddp_script.py"
    script.write_text(text)
    return run_ddp(script, tmp_path, ranks=ranks)


def pretrained_cnn(seed: int = 0) -> nn.Module:
    """A small CNN classifier in eval mode whose BatchNorms hold non-trivial running
    statistics and affine parameters, as a pretrained model's do."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


class StallAt(pl.Callback):
    """Hold a training run after one step until it is killed (tests of resuming).

    Active only where ``NORMSWAP_TEST_STALL="STEP:MARKER"`` is set: after training step
    ``STEP`` it creates the file ``MARKER`` and waits forever, so a test can kill the process
    at a known step. Add it with ``+callbacks.stall._target_=helpers.StallAt``.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        spec = os.environ.get("NORMSWAP_TEST_STALL")
        if not spec:
            return
        step, marker = spec.split(":", 1)
        if trainer.global_step == int(step):
            Path(marker).touch()
            threading.Event().wait()


class LookalikeFrozenBatchNorm2d(nn.Module):
    """A frozen BatchNorm of its own, as Hugging Face's DETR family carries: four buffers, no
    parameters, its epsilon hard-coded in ``forward`` (not a torchvision subclass)."""

    EPS = 1e-5

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        mean = self.running_mean.reshape(1, -1, 1, 1)
        scale = weight * (self.running_var.reshape(1, -1, 1, 1) + self.EPS).rsqrt()
        return x * scale + (bias - mean * scale)
