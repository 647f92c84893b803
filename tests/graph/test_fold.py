"""Folding eval-mode BatchNorm into conv/linear (normswap.graph.fold, normswap.fold_bn) is exact,
and all-or-nothing."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import assert_untouched, snapshot
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrizations
from torchvision.ops.misc import FrozenBatchNorm2d

import normswap
from normswap.errors import FoldError
from normswap.graph import trace
from normswap.graph.fold import fold_conv_bn
from normswap.graph.rules import fold_problems
from normswap.surgery import fold_bn


def randomize_bn(bn: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random running statistics (and affine parameters where there are some), eval mode."""
    c = bn.running_mean.shape[0]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=generator))
        bn.running_var.copy_(torch.rand(c, generator=generator) * 2 + 0.1)
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(torch.randn(c, generator=generator))
            bn.bias.copy_(torch.randn(c, generator=generator))
    return bn.eval()


def randomize_model(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if normswap.is_source_norm(m):
            randomize_bn(m, g)
    return model.eval()


# (producer, bn, input shape)
PAIRS = {
    "conv1d-groups-dilation-nobias": (
        lambda: nn.Conv1d(4, 6, 3, groups=2, dilation=2, bias=False),
        lambda: nn.BatchNorm1d(6),
        (2, 4, 12),
    ),
    "conv2d-bias": (lambda: nn.Conv2d(3, 5, 3, padding=1), lambda: nn.BatchNorm2d(5), (2, 3, 7, 7)),
    "conv2d-depthwise-nobias": (
        lambda: nn.Conv2d(6, 6, 3, groups=6, stride=2, bias=False),
        lambda: nn.BatchNorm2d(6),
        (2, 6, 9, 9),
    ),
    "conv3d-groups": (
        lambda: nn.Conv3d(4, 6, (1, 3, 3), groups=2),
        lambda: nn.BatchNorm3d(6),
        (1, 4, 3, 6, 6),
    ),
    "convtranspose1d-nobias": (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, bias=False),
        lambda: nn.BatchNorm1d(6),
        (2, 4, 5),
    ),
    "convtranspose2d-groups": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2),
        lambda: nn.BatchNorm2d(6),
        (2, 4, 5, 5),
    ),
    "convtranspose3d-groups-nobias": (
        lambda: nn.ConvTranspose3d(6, 9, 2, groups=3, bias=False),
        lambda: nn.BatchNorm3d(9),
        (1, 6, 2, 3, 3),
    ),
    "linear-bn1d": (lambda: nn.Linear(7, 5), lambda: nn.BatchNorm1d(5), (4, 7)),
    "linear-nobias-bn1d": (lambda: nn.Linear(7, 5, bias=False), lambda: nn.BatchNorm1d(5), (4, 7)),
    "conv2d-frozenbn": (
        lambda: nn.Conv2d(3, 4, 1, bias=False),
        lambda: FrozenBatchNorm2d(4),
        (2, 3, 5, 5),
    ),
    "conv2d-bn-affine-false": (
        lambda: nn.Conv2d(3, 4, 3),
        lambda: nn.BatchNorm2d(4, affine=False, eps=1e-3),
        (2, 3, 5, 5),
    ),
    "conv2d-syncbn": (lambda: nn.Conv2d(3, 4, 1), lambda: nn.SyncBatchNorm(4), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_fold_conv_bn_is_exact(name: str, dtype: torch.dtype) -> None:
    make_producer, make_bn, shape = PAIRS[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    producer = make_producer().to(dtype)
    bn = randomize_bn(make_bn(), g).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        expected = bn(producer(x))
        weight, bias = producer.weight, producer.bias
        fold_conv_bn(producer, bn)
        got = producer(x)
    assert producer.weight is weight  # same Parameter objects, updated in place
    if bias is not None:
        assert producer.bias is bias
    assert isinstance(producer.bias, nn.Parameter) and producer.bias.dtype == dtype
    assert producer.weight.dtype == dtype
    scale = expected.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * scale)


def test_fold_matches_torch_fuse_conv_bn_eval() -> None:
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(3, 8, 3, groups=1).double().eval()
    bn = randomize_bn(nn.BatchNorm2d(8), g).double()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    fold_conv_bn(conv, bn)
    torch.testing.assert_close(conv.weight, fused.weight, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(conv.bias, fused.bias, rtol=1e-13, atol=1e-13)


def test_channels_last_weight_stays_channels_last_and_flags_are_kept() -> None:
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(4, 8, 3, bias=False).to(memory_format=torch.channels_last)
    conv.requires_grad_(False)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    bn = randomize_bn(nn.BatchNorm2d(8), g)
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    expected = bn(conv(x))
    fold_conv_bn(conv, bn)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.requires_grad
    assert not conv.bias.requires_grad  # the new bias follows the weight
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_new_bias_requires_grad_like_the_weight() -> None:
    conv = nn.Conv2d(2, 3, 1, bias=False)
    fold_conv_bn(conv, nn.BatchNorm2d(3).eval())
    assert conv.bias.requires_grad and dict(conv.named_parameters()).keys() == {"weight", "bias"}


def test_bfloat16_weight_is_folded_in_float64_and_rounded_once() -> None:
    g = torch.Generator().manual_seed(4)
    half = nn.Conv2d(3, 4, 1).to(torch.bfloat16)
    bn = randomize_bn(nn.BatchNorm2d(4), g)
    reference = nn.Conv2d(3, 4, 1).double()
    reference.load_state_dict({k: v.double() for k, v in half.state_dict().items()})
    fold_conv_bn(reference, bn)
    fold_conv_bn(half, bn)
    assert half.weight.dtype == half.bias.dtype == torch.bfloat16
    assert torch.equal(half.weight, reference.weight.to(torch.bfloat16))
    assert torch.equal(half.bias, reference.bias.to(torch.bfloat16))


def _refused(producer: nn.Module, bn: nn.Module, match: str) -> None:
    before = {k: v.clone() for k, v in producer.state_dict().items()}
    with pytest.raises(FoldError, match=match):
        fold_conv_bn(producer, bn, path="layer.bn")
    after = producer.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_training_mode_bn_is_refused() -> None:
    _refused(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        r"cannot fold BatchNorm2d 'layer\.bn' into Conv2d: BatchNorm2d is in training mode: "
        r"call model\.eval\(\) first: folding uses running statistics",
    )


def test_bn_without_running_stats_is_refused() -> None:
    bn = nn.BatchNorm2d(4, track_running_stats=False).eval()
    _refused(nn.Conv2d(3, 4, 1), bn, r"'layer\.bn'.*no running statistics")


def test_channel_mismatch_is_refused() -> None:
    _refused(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(5).eval(),
        "channel mismatch: Conv2d has 4 output channels, BatchNorm2d has 5",
    )


def test_unsupported_producers_are_refused() -> None:
    class ScaledConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    with pytest.raises(FoldError, match="PReLU is not a conv/linear layer"):
        fold_conv_bn(nn.PReLU(4), nn.BatchNorm2d(4).eval())
    _refused(ScaledConv(3, 4, 1), nn.BatchNorm2d(4).eval(), "ScaledConv overrides Conv2d.forward")
    _refused(nn.Linear(3, 4), FrozenBatchNorm2d(4), "FrozenBatchNorm2d .* cannot follow a Linear")


def test_parametrized_producer_is_refused() -> None:
    conv = parametrizations.weight_norm(nn.Conv2d(3, 4, 1))
    _refused(conv, nn.BatchNorm2d(4).eval(), r"weight is parametrized.*remove_parametrizations")


def test_fold_problems_lists_everything() -> None:
    src = normswap.describe_source(nn.BatchNorm2d(4, track_running_stats=False))
    problems = fold_problems(src, nn.Conv2d(3, 4, 1))
    assert len(problems) == 2
    assert "no running statistics" in problems[0] and "training mode" in problems[1]
    bn = normswap.describe_source(nn.BatchNorm2d(4).eval())
    assert fold_problems(bn, nn.Conv2d(3, 4, 1)) == []


# ----------------------------------------------------------------------------------------------
# fold_bn on whole models


@pytest.mark.parametrize(
    ("name", "kwargs", "n_bn"),
    [
        ("resnet18", {}, 20),
        ("mobilenet_v2", {}, 52),
        # a detection backbone's set-up: FrozenBatchNorm2d and no trainable parameter
        ("resnet18", {"norm_layer": FrozenBatchNorm2d}, 20),
    ],
    ids=["resnet18", "mobilenet_v2", "resnet18-frozenbn-frozen"],
)
def test_fold_bn_on_torchvision_models(name: str, kwargs: dict, n_bn: int) -> None:
    model = randomize_model(torchvision.models.get_model(name, weights=None, **kwargs))
    if kwargs:
        model.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    pairs = fold_bn(model, x)
    assert len(pairs) == n_bn
    assert not any(normswap.is_source_norm(m) for m in model.modules())
    assert all(isinstance(model.get_submodule(bn), nn.Identity) for bn, _ in pairs)
    if kwargs:
        assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        got = model(x)
    diff = (got - expected).abs().max().item()
    peak = expected.abs().max().item()
    print(f"{name}: folded {len(pairs)} BN, max abs diff {diff:.2e} (max |y| {peak:.2e})")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * peak)


def test_fold_bn_on_resnet18_float64_is_tight() -> None:
    model = randomize_model(torchvision.models.resnet18(weights=None)).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    fold_bn(model, x)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_fold_bn_on_densenet121_lists_every_cat_fed_norm_and_changes_nothing() -> None:
    model = randomize_model(torchvision.models.densenet121(weights=None))
    before = snapshot(model)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(FoldError) as info:
        fold_bn(model, x)
    message = str(info.value)
    cat_fed = [p for p, f in trace(model, x).items() if not f.foldable]
    assert len(cat_fed) == 62
    assert "62 problem(s); nothing was modified" in message
    for path in cat_fed:
        assert f"  - {path}: input is produced by cat, not a conv/linear" in message
    assert_untouched(before, model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 121


def test_fold_bn_include_folds_only_the_selected() -> None:
    model = randomize_model(torchvision.models.densenet121(weights=None))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    foldable = [p for p, f in trace(model, x).items() if f.foldable]
    pairs = fold_bn(model, x, include=foldable)
    assert [bn for bn, _ in pairs] == foldable and len(pairs) == 59
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 121 - 59
    assert isinstance(model.features.denseblock1.denselayer1.norm1, nn.BatchNorm2d)
    assert isinstance(model.features.denseblock1.denselayer1.norm2, nn.Identity)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_fold_bn_refuses_training_mode_and_changes_nothing() -> None:
    model = randomize_model(torchvision.models.resnet18(weights=None))
    model.layer1.train()
    before = snapshot(model)
    with pytest.raises(FoldError) as info:
        fold_bn(model, torch.randn(2, 3, 32, 32))
    message = str(info.value)
    assert "4 problem(s)" in message
    for path in ("layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2"):
        assert f"  - {path}: BatchNorm2d is in training mode" in message
    assert "call model.eval() first" in message
    assert_untouched(before, model)


def test_fold_bn_unknown_include_path() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with pytest.raises(FoldError, match=r"  - 0: is not a BatchNorm-family module"):
        fold_bn(model, torch.randn(1, 3, 4, 4), include=["0"])
    assert isinstance(model[1], nn.BatchNorm2d)
    assert fold_bn(model, torch.randn(1, 3, 4, 4), include=[]) == []


class AliasedBN(nn.Module):
    """A BN registered at two paths but run once; and a conv whose weight another conv shares."""

    def __init__(self, *, tie: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.alias = self.bn
        self.other = nn.Conv2d(3, 4, 1)
        if tie:
            self.other.weight = self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.other(x)


def test_fold_bn_replaces_a_shared_bn_at_every_path() -> None:
    model = randomize_model(AliasedBN())
    x = torch.randn(1, 3, 4, 4)
    expected = model(x)
    assert fold_bn(model, x, include=["alias"]) == [("bn", "conv")]
    assert isinstance(model.bn, nn.Identity) and model.alias is model.bn
    torch.testing.assert_close(model(x), expected)


def test_fold_bn_refuses_a_producer_with_a_shared_weight() -> None:
    model = randomize_model(AliasedBN(tie=True))
    before = snapshot(model)
    with pytest.raises(FoldError, match=r"conv\.weight is shared with other"):
        fold_bn(model, torch.randn(1, 3, 4, 4))
    assert_untouched(before, model)
    assert isinstance(model.bn, _BatchNorm)


FAMILIES = {  # one model per torchvision family with conv -> BN chains: name -> BN count
    "vgg11_bn": 8,
    "googlenet": 57,
    "mobilenet_v3_small": 34,
    "efficientnet_b0": 49,
    "regnet_x_400mf": 71,
    "shufflenet_v2_x0_5": 56,
    "mnasnet0_5": 52,
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fold_bn_is_exact_on_every_family(name: str) -> None:
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = randomize_model(torchvision.models.get_model(name, weights=None, **kwargs)).eval()
    model = model.double()  # float64: the fold itself is exact, so the difference is rounding
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    pairs = fold_bn(model, x)
    assert len(pairs) == FAMILIES[name]
    assert not any(normswap.is_source_norm(m) for m in model.modules())
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
