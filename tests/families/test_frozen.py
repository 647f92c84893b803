"""The ``frozen`` family: BatchNorm → a frozen per-channel affine with the eval statistics in it."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from helpers import assert_others_identical, snapshot
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import normswap
from normswap import FrozenAffine, SwapError
from normswap.meta import init_on_meta


def _pretrained_like(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model


def test_layer_is_the_eval_batchnorm_formula() -> None:
    bn = _pretrained_like(nn.Sequential(nn.BatchNorm2d(6, eps=1e-3)))[0].eval().double()
    layer = FrozenAffine.from_statistics(
        bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    textbook = (x - bn.running_mean[:, None, None]) / torch.sqrt(
        bn.running_var[:, None, None] + bn.eps
    ) * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(layer(x), textbook, rtol=1e-12, atol=1e-12)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    for shape in ((3, 6), (3, 6, 7), (2, 6, 2, 3, 4)):  # any rank >= 2, channels in dim 1
        assert layer(torch.randn(shape, dtype=torch.float64)).shape == shape


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_converted_resnet_computes_what_the_pretrained_one_did_in_eval(mode: str) -> None:
    model = _pretrained_like(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    model.train(mode == "train")
    before = snapshot(model)
    report = normswap.swap(model, "frozen")
    assert report.counts() == {"BatchNorm2d -> FrozenAffine": 20}
    assert all(r.frozen for r in report)
    assert_others_identical(before, model, [r.path for r in report])
    with torch.no_grad():
        got = model(x)  # batch-independent: the same in train mode
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        one = model(x[:1])
    torch.testing.assert_close(one, got[:1], rtol=1e-4, atol=1e-4)


def test_frozen_trains_nothing_unless_trainable() -> None:
    model = _pretrained_like(torchvision.models.resnet18(num_classes=10))
    normswap.swap(model, "frozen")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    frozen = [m for m in model.modules() if isinstance(m, FrozenAffine)]
    assert all(m.weight.grad is None and m.bias.grad is None for m in frozen)
    assert model.conv1.weight.grad is not None

    trainable = _pretrained_like(torchvision.models.resnet18(num_classes=10))
    normswap.swap(trainable, "frozen", trainable=True)
    trainable(torch.randn(2, 3, 32, 32)).sum().backward()
    layers = [m for m in trainable.modules() if isinstance(m, FrozenAffine)]
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in layers)


def test_sources_without_statistics_are_refused_and_frozen_sources_converted() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    before = snapshot(model)
    with pytest.raises(SwapError, match=r"no running statistics.*no eval statistics to freeze"):
        normswap.swap(model, "frozen")
    assert snapshot(model).keys() == before.keys()

    tv = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4))
    with torch.no_grad():
        tv[1].running_var.fill_(4.0)
        tv[1].weight.fill_(3.0)
    x = torch.randn(2, 3, 5, 5)
    expected = tv(x)
    normswap.swap(tv, "frozen")
    torch.testing.assert_close(tv(x), expected)


def test_training_mode_sources_are_noted_and_meta_models_convert() -> None:
    report = normswap.swap(nn.Sequential(nn.BatchNorm1d(3)), "frozen")
    assert "in training mode" in report[0].note
    with init_on_meta():
        model = torchvision.models.regnet_y_400mf()
    report = normswap.swap(model, "frozen", strict=True)
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    assert len(report.converted) > 0


def test_calibration_of_a_frozen_model_is_already_exact() -> None:
    reference = _pretrained_like(torchvision.models.resnet18(num_classes=10)).eval()
    model = copy.deepcopy(reference)
    normswap.swap(model, "frozen")
    report = normswap.calibrate(model, reference, torch.randn(8, 3, 32, 32))
    assert len(report) == 20
    assert max(f.error_before for f in report) < 1e-4  # float32 rounding through 20 layers
    assert normswap.family_of(model.bn1) == "frozen"
