"""BlendNorm and the progressive-conversion functions: exact ends, the textbook mix, gradients,
what stays untouched, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from helpers import assert_all_grads, snapshot
from torch import nn

import normswap
from normswap import SpecError, SwapError
from normswap.norms import (
    BlendNorm,
    FrozenAffine,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
)
from normswap.norms.blend import BLEND_STATISTICS
from normswap.progressive import (
    BlendSchedule,
    anchor_blend,
    blend_layers,
    calibrate_blend,
    finish_blend,
    set_blend,
    swap_progressive,
)

C = 8


def _frozen(seed: int = 0) -> FrozenAffine:
    g = torch.Generator().manual_seed(seed)
    mean, var = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5
    weight, bias = torch.randn(C, generator=g), torch.randn(C, generator=g)
    return FrozenAffine.from_statistics(mean, var, 1e-5, weight, bias)


def _target(kind: str, frozen: FrozenAffine) -> nn.Module:
    layer = {
        "gn": lambda: GroupNorm(C, num_groups=4),
        "torch_gn": lambda: nn.GroupNorm(2, C),
        "ln": lambda: LayerNorm(C),
        "in": lambda: InstanceNorm(C),
        "ln2d": lambda: LayerNorm2d(C),
    }[kind]()
    with torch.no_grad():  # an affine like a BatchNorm's (signs of s kept: exact anchor)
        layer.weight.copy_(frozen.weight.sign() * (torch.rand(C) + 0.5))
        layer.bias.normal_()
    return layer


def _textbook(blend: BlendNorm, x: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """The statistics mix written out in float64 from its definition."""
    x = x.double()
    t = blend.target
    n, c = x.shape[:2]
    if kind == "ln2d":
        mean = x.mean(1, keepdim=True)
        var = ((x - mean) ** 2).mean(1, keepdim=True)
    else:
        groups = {"gn": 4, "torch_gn": 2, "ln": 1, "in": c}[kind]
        xs = x.reshape(n, groups, -1)
        mean_g = xs.mean(-1, keepdim=True)
        var_g = ((xs - mean_g) ** 2).mean(-1, keepdim=True)
        mean = mean_g.repeat_interleave(c // groups, 1).reshape(n, c, 1, 1)
        var = var_g.repeat_interleave(c // groups, 1).reshape(n, c, 1, 1)
    s = blend.frozen.weight.double().view(1, c, 1, 1)
    b = blend.frozen.bias.double().view(1, c, 1, 1)
    gamma, beta = t.weight.double().view(1, c, 1, 1), t.bias.double().view(1, c, 1, 1)
    mean0, var0 = (beta - b) / s, (gamma / s) ** 2
    mu = (1 - alpha) * mean0 + alpha * mean
    sigma2 = (1 - alpha) * var0 + alpha * (var + t.eps)
    return (x - mu) / sigma2.sqrt() * gamma + beta


STATS = ["gn", "torch_gn", "ln", "in", "ln2d"]


@pytest.mark.parametrize("kind", STATS)
def test_exact_ends_and_textbook_mix(kind: str) -> None:
    frozen = _frozen()
    blend = BlendNorm(frozen, _target(kind, frozen))
    assert blend.mixes_statistics and blend.inexact_channels == 0
    x = torch.randn(3, C, 5, 6) * 3 + 1
    torch.testing.assert_close(blend(x), frozen(x), atol=1e-5, rtol=1e-5)  # the pretrained BN
    for alpha in (0.0, 0.3, 0.8):
        blend.set_alpha(alpha)
        torch.testing.assert_close(
            blend(x).double(), _textbook(blend, x, kind, alpha), atol=1e-4, rtol=1e-4
        )
    blend.set_alpha(1.0)
    assert torch.equal(blend(x), blend.target(x))  # the target alone


@pytest.mark.parametrize("kind", STATS)
def test_gradients_reach_the_input_through_both_statistics_and_the_affine(kind: str) -> None:
    frozen = _frozen()
    blend = BlendNorm(frozen, _target(kind, frozen), alpha=0.4)
    x = (torch.randn(2, C, 4, 4) * 2).requires_grad_()
    weights = torch.randn(2, C, 4, 4)
    (blend(x) * weights).sum().backward()
    # Autograd through the float64 textbook formula is the reference gradient.
    x64 = x.detach().double().requires_grad_()
    (_textbook(blend, x64, kind, 0.4) * weights.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    # Neither end alone: the starting statistics' path and the per-sample path both count.
    for end in (0.0, 1.0):
        xe = x.detach().clone().requires_grad_()
        blend.set_alpha(end)
        (blend(xe) * weights).sum().backward()
        assert not torch.allclose(xe.grad, x.grad, atol=1e-3)
    assert blend.target.weight.grad is not None and blend.target.bias.grad is not None


def test_outputs_mix_for_targets_without_statistics() -> None:
    frozen = _frozen()
    frozen.weight.requires_grad_(True)
    target = normswap.AdaLIN(C)
    blend = BlendNorm(frozen, target, alpha=0.25)
    assert not blend.mixes_statistics
    x = torch.randn(2, C, 4, 4)
    expected = 0.75 * frozen(x) + 0.25 * target(x)
    torch.testing.assert_close(blend(x), expected)
    blend(x).sum().backward()
    assert frozen.weight.grad is not None and target.weight.grad is not None  # both sides


def test_inexact_channels_are_counted() -> None:
    frozen = _frozen()
    target = _target("gn", frozen)
    with torch.no_grad():
        target.weight[0] = -target.weight[0]  # a sign a normalization cannot produce
    assert BlendNorm(frozen, target).inexact_channels == 1


def test_instance_norm_with_running_stats_mixes_outputs_in_eval() -> None:
    frozen = _frozen()
    target = InstanceNorm(C, track_running_stats=True).eval()
    blend = BlendNorm(frozen, target, alpha=0.5)
    x = torch.randn(2, C, 4, 4)
    torch.testing.assert_close(blend(x), 0.5 * frozen(x) + 0.5 * target(x))


def test_alpha_is_checked_and_kept_in_state_dicts() -> None:
    frozen = _frozen()
    blend = BlendNorm(frozen, _target("gn", frozen))
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(SpecError, match="alpha must be a number"):
            blend.set_alpha(bad)
    blend.set_alpha(0.7)
    other = BlendNorm(_frozen(1), _target("gn", _frozen(1)))
    other.load_state_dict(blend.state_dict())
    x = torch.randn(2, C, 3, 3)
    assert float(other.alpha) == pytest.approx(0.7)
    torch.testing.assert_close(other(x), blend(x))


def test_statistics_registry_covers_the_norm_layers() -> None:
    for cls in (GroupNorm, nn.GroupNorm, LayerNorm, InstanceNorm, LayerNorm2d):
        assert BLEND_STATISTICS.lookup(cls.__new__(cls)) is not None


# ---------------------------------------------------------------- on whole models


def _pretrained_like(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.2)
    return model


def test_swap_progressive_starts_as_the_model_and_ends_as_swap() -> None:
    model = _pretrained_like()
    reference = copy.deepcopy(model)
    before = snapshot(model)
    x = torch.randn(2, 3, 64, 64)
    report = swap_progressive(model, "gn")
    assert len(blend_layers(model)) == len(report) == 20
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
    # Nothing but the norms changed: every other parameter and buffer bit-identical.
    after = model.state_dict()
    for key, value in before.items():
        parts = key.split(".")
        if not any(p.startswith("bn") for p in parts) and "downsample.1" not in key:
            assert torch.equal(after[key], value), key
    set_blend(model, 0.5)
    model.train()
    out = model(x)
    out.sum().backward()
    assert_all_grads(model)
    assert set_blend(model, 1.0) == finish_blend(model) == 20
    assert not blend_layers(model)
    plain = copy.deepcopy(reference)
    normswap.swap(plain, "gn")
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    model.eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), plain(x))


def test_calibrate_blend_keeps_step_zero_and_ends_calibrated() -> None:
    model = _pretrained_like()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3, 64, 64)
    swap_progressive(model, "gn")
    calibrate_blend(model, reference, x)
    assert all(float(b.alpha) == 0.0 for b in blend_layers(model))
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
    # alpha = 1 is exactly what normswap.calibrate makes of a plain swap.
    plain = copy.deepcopy(reference)
    normswap.swap(plain, "gn")
    normswap.calibrate(plain, reference, x)
    set_blend(model, 1.0)
    torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)
    assert anchor_blend(model) == 0


def test_finish_keeps_timm_style_activations() -> None:
    import timm

    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=4).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(1, 3, 64, 64)
    act = model.bn1.act
    swap_progressive(model, "gn")
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
    set_blend(model, 1.0)
    expected = model(x)
    finish_blend(model)
    assert type(model.bn1).__name__ == "GroupNormAct"
    assert model.bn1.act is act  # the very activation module, in timm's layout
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("name", ["wn", "ws_gn"])
def test_families_that_change_other_layers_are_refused(name: str) -> None:
    model = _pretrained_like()
    before = snapshot(model)
    with pytest.raises(SpecError, match="which no blend can undo"):
        swap_progressive(model, name)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_batchnorm_without_running_statistics_is_refused_untouched() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU()
    )
    before = snapshot(model)
    with pytest.raises(SwapError, match="no running statistics") as info:
        swap_progressive(model, "gn", num_groups=4)
    assert "1" in str(info.value) and "nothing was modified" in str(info.value)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_schedule_values_and_errors() -> None:
    s = BlendSchedule(end=10, start=2, shape="linear")
    assert [s.alpha(t) for t in (0, 2, 6, 10, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    c = BlendSchedule(end=4, shape="cosine")
    assert c.alpha(1) == pytest.approx(0.5 - 0.5 * 0.7071067811865476)
    for kwargs, match in [
        ({"end": 0}, "must come after"),
        ({"end": 5, "start": 5}, "must come after"),
        ({"end": -1}, "int >= 0"),
        ({"end": 3.5}, "int >= 0"),
        ({"end": 5, "shape": "step"}, "linear or cosine"),
    ]:
        with pytest.raises(SpecError, match=match):
            BlendSchedule(**kwargs)
