"""Every target trains under mixed precision (CPU bfloat16 autocast, as AMP does on a GPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torchvision

import normswap

TARGETS = {
    "gn": {},
    "ln": {},
    "ln2d": {},
    "in": {},
    "adalin": {},
    "adaln": {"cond_dim": 4},
    "wn": {"bn": "remove"},
    "ws_gn": {},
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_converted_resnet18_trains_under_bf16_autocast(target: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    normswap.swap(model, target, **TARGETS[target])
    model.train()
    x = torch.randn(2, 3, 64, 64)
    ctx = (
        normswap.condition(model, torch.randn(2, 4))
        if target == "adaln"
        else contextlib.nullcontext()
    )
    with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name  # master weights stay float32
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
