"""segmentation_models_pytorch: Unet, FPN and DeepLabV3+ with a torchvision-style encoder and a
timm (``tu-``) encoder, converted and trained for two steps."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch
from helpers import assert_all_grads

import normswap

ARCHS = {"unet": smp.Unet, "fpn": smp.FPN, "deeplabv3plus": smp.DeepLabV3Plus}


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["resnet18", "tu-efficientnet_b0"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_segmentation_models_convert_and_train(arch: str, encoder: str) -> None:
    torch.manual_seed(0)
    model = ARCHS[arch](encoder_name=encoder, encoder_weights=None, classes=3)
    x = torch.randn(2, 3, 64, 64)
    report = normswap.swap(model, "gn", num_groups=8, example_inputs=x, strict=True)
    assert report.converted
    assert not any(normswap.is_source_norm(m) for m in model.modules())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    target = torch.randint(0, 3, (2, 64, 64))
    losses = []
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        assert_all_grads(model)
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
