"""Targets decide per source kind and layout: what converts, what is refused and why, which
conversions are exact renames, and calibration of the new families."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normswap
from normswap import SwapError
from normswap.norms import Derf, DyT, GroupNorm, LayerNorm2d, RMSNorm


class Tokens(nn.Module):
    """(N, L, C) tokens through a LayerNorm, as a transformer block's."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(4, c)
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(x)))


class ChannelsLastMap(nn.Module):
    """A (N, H, W, C) map through a LayerNorm, as a ConvNeXt block's."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


def _random(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight.uniform_(0.5, 1.5)
            if getattr(m, "bias", None) is not None and m.bias.dim() == 1:
                m.bias.normal_()
    return module.eval()


@pytest.mark.parametrize("target", ["gn", "in", "ln", "ws_gn"])
def test_statistics_over_positions_are_refused_for_tokens(target: str) -> None:
    x = torch.randn(2, 5, 4)
    with pytest.raises(SwapError, match=r"each token of a \(N, L, C\) sequence"):
        normswap.swap(Tokens(), target, replace="ln", example_inputs=x)
    with pytest.raises(SwapError, match="input rank is unknown: pass example_inputs"):
        normswap.swap(Tokens(), target, replace="ln")


@pytest.mark.parametrize("target", ["ln2d", "rms", "dyt", "derf"])
def test_per_token_targets_convert_tokens_without_a_trace(target: str) -> None:
    model = Tokens()
    report = normswap.swap(model, target, replace="ln")
    assert report.converted and model.norm.channels_last
    model(torch.randn(2, 5, 4)).sum().backward()


def test_group_norm_of_a_channels_last_map_is_group_norm_of_the_map() -> None:
    model = _random(ChannelsLastMap())
    x = torch.randn(2, 3, 6, 6)
    normswap.swap(model, "gn", num_groups=2, replace="ln", example_inputs=x)
    assert isinstance(model.norm, GroupNorm) and model.norm.channels_last
    feats = model.conv(x)
    expected = F.group_norm(feats, 2, model.norm.weight, model.norm.bias, model.norm.eps)
    torch.testing.assert_close(model(x), expected.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("source", "target", "options", "x"),
    [
        (nn.GroupNorm(1, 8), "ln", {}, torch.randn(2, 8, 4, 4)),
        (normswap.LayerNorm(8), "gn", {"num_groups": 1}, torch.randn(2, 8, 4, 4)),
        (nn.GroupNorm(8, 8), "in", {}, torch.randn(2, 8, 4, 4)),
        (nn.InstanceNorm2d(8, affine=True), "gn", {"group_size": 1}, torch.randn(2, 8, 4, 4)),
        (nn.LayerNorm(8), "ln2d", {}, torch.randn(2, 5, 8)),
        (nn.RMSNorm(8, eps=1e-5), "rms", {}, torch.randn(2, 5, 8)),
    ],
    ids=["gn1->ln", "ln->gn1", "gnC->in", "in->gn(C)", "ln->ln2d", "rms->rms"],
)
def test_renames_are_exact_and_say_so(
    source: nn.Module, target: str, options: dict, x: torch.Tensor
) -> None:
    model = _random(nn.Sequential(source))
    expected = model(x)
    report = normswap.swap(model, target, replace="any", example_inputs=x, **options)
    assert "exact: the same statistics as the source" in (report[0].note or "")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_frozen_refuses_statistics_over_positions() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8))
    with pytest.raises(SwapError, match="which no fixed affine reproduces"):
        normswap.swap(model, "frozen", replace="gn")


def test_adalin_refuses_a_channels_last_norm() -> None:
    with pytest.raises(SwapError, match=r"channels-first \(N, C, \*S\) maps only"):
        normswap.swap(
            ChannelsLastMap(), "adalin", replace="ln", example_inputs=torch.randn(1, 3, 4, 4)
        )


def test_a_layernorm_over_several_dims_has_no_channel_axis() -> None:
    model = nn.Sequential(nn.LayerNorm((4, 5)))
    with pytest.raises(SwapError, match="elementwise affine"):
        normswap.swap(model, "dyt", replace="ln")


def test_rms_from_batchnorm_keeps_gamma_and_beta_per_position() -> None:
    model = _random(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    gamma, beta = model[1].weight, model[1].bias
    normswap.swap(model, "rms")
    layer = model[1]
    assert isinstance(layer, RMSNorm) and not layer.channels_last
    assert layer.weight is gamma and layer.bias is beta
    x = torch.randn(2, 3, 6, 6)
    h = model[0](x)
    expected = F.rms_norm(h.movedim(1, -1), (8,), gamma, layer.eps) + beta
    torch.testing.assert_close(model(x), expected.movedim(-1, 1), rtol=1e-5, atol=1e-6)


def test_dyt_alpha_by_path_pattern() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8))
    report = normswap.swap(model, "dyt", replace="ln", alpha_init=0.3, alpha_paths={"3": 0.8})
    assert float(model[1].alpha) == pytest.approx(0.3)
    assert float(model[3].alpha) == pytest.approx(0.8)
    assert "alpha_init 0.8 (alpha_paths)" in report[1].note
    with pytest.raises(normswap.SpecError, match=r"alpha_paths\['\*'\] must be a finite number"):
        normswap.get_spec("dyt", alpha_paths={"*": 0.0})


def test_dyt_from_batchnorm_says_what_its_authors_found() -> None:
    report = normswap.swap(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "dyt")
    assert "does not replace BatchNorm without loss" in report[0].note


@pytest.mark.parametrize("target", ["dyt", "derf", "rms"])
def test_calibration_fits_the_new_layers_to_a_layernorm(target: str) -> None:
    torch.manual_seed(0)
    reference = _random(Tokens(16))
    model = copy.deepcopy(reference)
    normswap.swap(model, target, replace="ln")
    x = torch.randn(64, 7, 4) * 3
    report = normswap.calibrate(model, reference, x)
    (fit,) = report
    assert fit.error_after < fit.error_before
    if target != "rms":  # α searched on the grid: it moved off its initial 0.5
        assert fit.error_after < 0.5 * fit.error_before
        assert float(model.norm.alpha) != pytest.approx(0.5)
        assert "alpha" in fit.params


def test_calibration_of_dyt_from_batchnorm_channels_first() -> None:
    torch.manual_seed(0)
    reference = _random(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    with torch.no_grad():
        reference[1].running_mean.uniform_(-1, 1)
        reference[1].running_var.uniform_(0.5, 2)
    model = copy.deepcopy(reference)
    normswap.swap(model, "dyt")
    report = normswap.calibrate(model, reference, torch.randn(32, 3, 8, 8))
    assert report[0].error_after < report[0].error_before
    assert isinstance(model[1], DyT)


def test_derf_and_dyt_layers_are_what_the_monitor_reports() -> None:
    from normswap.monitor.families import family_of

    assert family_of(DyT(4)) == "dyt" and family_of(Derf(4)) == "derf"
    assert family_of(RMSNorm(4)) == "rms" and family_of(LayerNorm2d(4)) == "ln2d"


def test_a_converted_model_converts_again_keeping_the_modules_after_its_norms() -> None:
    import timm

    model = timm.create_model("test_efficientnet", pretrained=False).eval()
    first = normswap.swap(model, "gn", num_groups=8)
    second = normswap.swap(model, "ln", replace="gn", strict=True)
    assert len(second.converted) == len(first.converted)
    acts = [m for m in model.modules() if type(m).__name__ == "LayerNormAct"]
    assert acts and all(hasattr(m, "act") for m in acts)
    model(torch.randn(1, 3, 32, 32)).sum().backward()


def test_frozen_from_a_layernorm_is_the_layernorm_with_its_scale_fixed() -> None:
    """'frozen' from a LayerNorm: the mean still subtracted per token, the division by each
    token's deviation replaced by a fixed per-channel scale that calibration fits on data."""
    reference = _random(Tokens(16))
    model = copy.deepcopy(reference)
    report = normswap.swap(model, "frozen", replace="ln")
    assert "scale fixed" in report[0].note
    layer = model.norm
    assert isinstance(layer, normswap.FrozenAffine) and layer.center and layer.channels_last
    h = torch.randn(3, 5, 16)
    expected = (h - h.mean(-1, keepdim=True)) * layer.weight + layer.bias
    torch.testing.assert_close(layer(h), expected)
    x = torch.randn(256, 7, 4) * 3
    fit = normswap.calibrate(model, reference, x)[0]
    assert fit.error_after < 0.5 * fit.error_before
    assert "a frozen LayerNorm" in normswap.finalize(model.eval()).kept()["norm"]


@pytest.mark.parametrize("target", ["dyt", "derf", "rms", "frozen", "gn"])
def test_progressive_from_a_layernorm_starts_as_the_pretrained_model(target: str) -> None:
    reference = _random(ChannelsLastMap()) if target == "gn" else _random(Tokens())
    x = torch.randn(2, 3, 6, 6) if target == "gn" else torch.randn(3, 5, 4)
    model = copy.deepcopy(reference)
    options = {"num_groups": 2, "example_inputs": x} if target == "gn" else {}
    if target == "frozen":
        options["trainable"] = True  # the staged removal of the LN-free GPT-2 trains it
    normswap.swap_progressive(model, target, replace="ln", **options)
    assert isinstance(model.norm, normswap.BlendNorm) and not model.norm.mixes_statistics
    torch.testing.assert_close(model(x), reference(x))  # alpha = 0: the pretrained model
    normswap.set_blend(model, 0.5)
    model(x).sum().backward()
    assert model.norm.target.weight.grad is not None  # the target trains during the ramp
    assert all(p.grad is None for p in model.norm.frozen.parameters())  # the start is frozen
    normswap.set_blend(model, 1.0)
    normswap.finish_blend(model)
    assert not isinstance(model.norm, normswap.BlendNorm)
