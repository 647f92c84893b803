"""Every target trains under mixed precision (CPU bfloat16 autocast, as AMP does on a GPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torchvision
from families_matrix import FAMILIES, cond_dim, options

import normswap

TARGETS = {name: options(name, traced=False) for name in FAMILIES}


@pytest.mark.parametrize("target", list(TARGETS))
def test_converted_resnet18_trains_under_bf16_autocast(target: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    normswap.swap(model, target, **TARGETS[target])
    model.train()
    x = torch.randn(2, 3, 64, 64)
    dim = cond_dim(target)
    ctx = normswap.condition(model, torch.randn(2, dim)) if dim else contextlib.nullcontext()
    with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name  # master weights stay float32
        if p.requires_grad:  # a frozen family's affine takes no gradient
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
