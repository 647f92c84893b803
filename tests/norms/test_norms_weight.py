"""Weight standardization and weight norm parametrizations of conv/linear layers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

import normswap
from normswap.errors import NormSwapError, UnsupportedModuleError
from normswap.norms import (
    WeightStandardization,
    is_weight_parametrized,
    output_channel_dim,
    standardize_weight,
    weight_norm,
)

# --------------------------------------------------------------------------- standardization


def _manual_ws(w: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    rows = w.transpose(0, dim).reshape(w.shape[dim], -1)
    mean = rows.mean(dim=1, keepdim=True)
    var = ((rows - mean) ** 2).mean(dim=1, keepdim=True)
    out = (rows - mean) / torch.sqrt(var + eps)
    return out.reshape(w.transpose(0, dim).shape).transpose(0, dim)


def test_standardized_weight_has_zero_mean_unit_variance_per_output_channel() -> None:
    torch.manual_seed(0)
    conv = standardize_weight(nn.Conv2d(4, 6, 3))
    w = conv.weight
    assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(6), atol=1e-6, rtol=0)
    # PyTorch's default init: var = 1 / (3 * 36); eps = 1e-6 barely changes the unit variance.
    assert_close(w.var(dim=(1, 2, 3), correction=0), torch.ones(6), atol=1e-3, rtol=0)


def test_standardized_conv_equals_conv_with_manual_weight() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    original = conv.weight.detach().clone()
    standardize_weight(conv, eps=1e-5)
    x = torch.randn(2, 4, 5, 5)
    expected = F.conv2d(x, _manual_ws(original, 0, 1e-5), conv.bias, padding=1)
    assert_close(conv(x), expected)
    assert set(conv.state_dict()) == {"bias", "parametrizations.weight.original"}


@pytest.mark.parametrize(
    "module",
    [nn.Linear(5, 3), nn.Conv1d(3, 4, 3), nn.Conv3d(2, 3, 2), nn.ConvTranspose2d(3, 5, 3)],
    ids=["linear", "conv1d", "conv3d", "convtranspose2d"],
)
def test_standardization_uses_the_output_channel_dim(module: nn.Module) -> None:
    dim = output_channel_dim(module)
    assert dim == (1 if isinstance(module, nn.ConvTranspose2d) else 0)
    original = module.weight.detach().clone()
    standardize_weight(module)
    assert module.parametrizations.weight[0].dim == dim
    assert_close(module.weight, _manual_ws(original, dim, 1e-6))


def test_standardization_keeps_channels_last_and_trains_the_original() -> None:
    conv = nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    standardize_weight(conv)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    original = conv.parametrizations.weight.original
    assert original.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    conv(x).square().sum().backward()
    assert original.grad is not None and original.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("make", "fmt"),
    [
        (lambda: nn.Conv2d(3, 5, 3), torch.contiguous_format),
        (lambda: nn.Conv2d(3, 5, 3), torch.channels_last),
        (lambda: nn.Conv3d(2, 4, 2), torch.channels_last_3d),
        (lambda: nn.ConvTranspose2d(3, 5, 3), torch.contiguous_format),
        (lambda: nn.ConvTranspose2d(3, 5, 3), torch.channels_last),
        (lambda: nn.Linear(6, 4), torch.contiguous_format),
    ],
    ids=["conv2d", "conv2d_cl", "conv3d_cl3d", "convT2d", "convT2d_cl", "linear"],
)
def test_standardization_values_gradients_and_layout_match_the_formula(
    make: Callable[[], nn.Module], fmt: torch.memory_format
) -> None:
    """The batch-norm view of the weight gives the reference formula's values and gradients in
    every layout, without changing the weight's memory format."""
    torch.manual_seed(0)
    module = make().double()
    if fmt is not torch.contiguous_format:
        module = module.to(memory_format=fmt)
    original = module.weight.detach().clone().requires_grad_()
    dim = output_channel_dim(module)
    standardize_weight(module, eps=1e-4)
    stored = module.parametrizations.weight.original
    weight = module.weight
    assert weight.is_contiguous(memory_format=fmt)
    expected = _manual_ws(original, dim, 1e-4)
    assert_close(weight, expected, atol=1e-12, rtol=1e-10)
    probe = torch.randn_like(expected)
    (got,) = torch.autograd.grad((weight * probe).sum(), stored)
    (want,) = torch.autograd.grad((expected * probe).sum(), original)
    assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_standardization_accepts_eps_zero() -> None:
    ws = WeightStandardization(eps=0.0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    assert_close(ws(w), _manual_ws(w, 0, 0.0))


@pytest.mark.parametrize(
    "module",
    [nn.Linear(1, 4), nn.Conv2d(4, 4, 1, groups=4)],
    ids=["linear_in1", "depthwise_1x1"],
)
def test_standardization_refuses_fan_in_one(module: nn.Module) -> None:
    with pytest.raises(
        NormSwapError, match="fan-in of 1, so the standardized weight would be all zeros"
    ):
        standardize_weight(module)
    assert not parametrize.is_parametrized(module)


def test_standardization_refuses_double_application_and_weight_norm() -> None:
    conv = standardize_weight(nn.Conv2d(3, 4, 3))
    with pytest.raises(
        NormSwapError, match=r"already has a parametrization \(WeightStandardization\)"
    ):
        standardize_weight(conv)
    normed = weight_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(NormSwapError, match=r"already has a parametrization \(_WeightNorm\)"):
        standardize_weight(normed)


def test_weight_standardization_parametrization_direct_use() -> None:
    ws = WeightStandardization(eps=0.0)
    assert repr(ws) == "WeightStandardization(eps=0.0, dim=0)"
    w = torch.randn(3, 2, 2) * 4 + 1
    assert_close(ws(w), _manual_ws(w, 0, 0.0))
    with pytest.raises(NormSwapError, match="eps must be a float >= 0"):
        WeightStandardization(eps=-1.0)


# --------------------------------------------------------------------------- weight norm


@pytest.mark.parametrize(
    ("module", "x_shape", "g_shape"),
    [
        (nn.Conv2d(3, 4, 3), (2, 3, 5, 5), (4, 1, 1, 1)),
        (nn.Linear(5, 3), (2, 5), (3, 1)),
        (nn.ConvTranspose2d(3, 4, 3), (2, 3, 5, 5), (1, 4, 1, 1)),
    ],
    ids=["conv2d", "linear", "convtranspose2d"],
)
def test_weight_norm_keeps_output_and_uses_output_channel_dim(
    module: nn.Module, x_shape: tuple[int, ...], g_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    x = torch.randn(x_shape)
    before = module(x)
    weight_before = module.weight.detach().clone()
    assert weight_norm(module) is module
    assert_close(module.weight, weight_before)
    assert_close(module(x), before)
    state = module.state_dict()
    assert {"parametrizations.weight.original0", "parametrizations.weight.original1"} <= set(state)
    assert state["parametrizations.weight.original0"].shape == g_shape
    g, v = state["parametrizations.weight.original0"], state["parametrizations.weight.original1"]
    dim = output_channel_dim(module)
    norms = v.transpose(0, dim).reshape(v.shape[dim], -1).norm(dim=1)
    assert_close(g.flatten(), norms)


def test_weight_norm_refuses_double_application() -> None:
    conv = weight_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(NormSwapError, match=r"cannot weight-normalize Conv2d: .*\(_WeightNorm\)"):
        weight_norm(conv)
    with pytest.raises(NormSwapError, match=r"\(WeightStandardization\)"):
        weight_norm(standardize_weight(nn.Conv2d(3, 4, 3)))


def test_is_weight_parametrized_tells_the_kinds_apart() -> None:
    plain, normed = nn.Conv2d(3, 4, 3), weight_norm(nn.Conv2d(3, 4, 3))
    standardized = standardize_weight(nn.Conv2d(3, 4, 3))
    assert [is_weight_parametrized(m) for m in (plain, normed, standardized)] == [False, True, True]
    assert is_weight_parametrized(normed, "weight_norm")
    assert not is_weight_parametrized(normed, "weight_standardization")
    assert is_weight_parametrized(standardized, "weight_standardization")
    assert not is_weight_parametrized(standardized, "weight_norm")
    with pytest.raises(
        NormSwapError, match="valid kinds: any, weight_norm, weight_standardization"
    ):
        is_weight_parametrized(plain, "spectral")  # type: ignore[arg-type]


@pytest.mark.parametrize("apply", [standardize_weight, weight_norm])
def test_reparameterizations_refuse_unsupported_modules(apply: object) -> None:
    with pytest.raises(UnsupportedModuleError, match="BatchNorm2d is not a Conv1d/2d/3d"):
        apply(nn.BatchNorm2d(4))  # type: ignore[operator]
    with pytest.raises(UnsupportedModuleError, match="groups=2"):
        apply(nn.ConvTranspose2d(4, 4, 3, groups=2))  # type: ignore[operator]
    with pytest.raises(UnsupportedModuleError, match="uninitialized"):
        apply(nn.LazyConv2d(4, 3))  # type: ignore[operator]


def test_weight_standardized_resnet_compiles_with_fullgraph() -> None:
    """torch.compile traces a WS resnet18's training step without graph breaks and computes
    the eager gradients (``aot_eager`` traces through AOTAutograd like inductor). The eager
    batch-norm path's reshapes failed here as views in the traced backward."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    normswap.swap(model, "ws_gn")
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(compiled(x).square().sum(), params)
    want = torch.autograd.grad(model(x).square().sum(), params)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, atol=1e-4, rtol=1e-3)
