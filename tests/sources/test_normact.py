"""Norm + activation sources: timm's BatchNormAct2d family and users' own declared layers.

The converted layer normalizes with the target norm and then applies the very same modules the
source applied after normalizing, in its order; it computes ``act(drop(target_norm(x)))``.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys

import pytest
import timm
import torch
from families_matrix import FAMILIES, cond_dim, options
from helpers import assert_all_grads, assert_others_identical, snapshot
from timm.layers import GroupNormAct as TimmGroupNormAct
from timm.layers.activations import GELU as TimmGELU
from timm.layers.activations import GELUTanh
from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from torch import nn

import normswap
from normswap.norms import AfterNorm, NormThen

ACTS = {
    "identity": lambda: nn.Identity(),
    "relu_inplace": lambda: nn.ReLU(inplace=True),
    "relu": lambda: nn.ReLU(inplace=False),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "hardswish": lambda: nn.Hardswish(inplace=True),
    "leaky": lambda: nn.LeakyReLU(0.1, inplace=True),
    "gelu": lambda: nn.GELU(),
    "timm_gelu": lambda: TimmGELU(),
    "gelu_tanh": lambda: GELUTanh(),
    "prelu": lambda: nn.PReLU(8),  # an activation with a parameter
}


def _bn_act(act: str, *, drop: float = 0.0) -> BatchNormAct2d:
    layer = BatchNormAct2d(8, act_layer=lambda **_: ACTS[act](), drop_layer=None)
    if drop:
        layer.drop = nn.Dropout(drop)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(8, generator=g))
        layer.running_var.copy_(torch.rand(8, generator=g) + 0.5)
        layer.weight.copy_(torch.rand(8, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(8, generator=g))
    return layer


def _sync(layer: BatchNormAct2d) -> SyncBatchNormAct:
    sync = timm.layers.convert_sync_batchnorm(nn.Sequential(layer))[0]
    assert isinstance(sync, SyncBatchNormAct)
    return sync


def _frozen(layer: BatchNormAct2d) -> FrozenBatchNormAct2d:
    frozen = timm.layers.freeze_batch_norm_2d(nn.Sequential(layer))[0]
    assert isinstance(frozen, FrozenBatchNormAct2d)
    return frozen


SOURCES = {"bn_act": lambda a: _bn_act(a), "sync": lambda a: _sync(_bn_act(a))}
SOURCES["frozen"] = lambda a: _frozen(_bn_act(a))


# SyncBatchNormAct runs in train mode only inside torch.distributed: eval mode here.
CASES = [(s, m) for s in SOURCES for m in ("train", "eval") if (s, m) != ("sync", "train")]


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize(("source", "mode"), CASES)
def test_converted_layer_is_act_of_drop_of_the_target_norm(
    source: str, mode: str, act: str
) -> None:
    """gn: act(drop(group_norm(x))) by hand, with the same act/drop objects."""
    layer = SOURCES[source](act)
    old_act, old_drop = layer.act, layer.drop
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layer).train(mode == "train")
    report = normswap.swap(model, "gn", num_groups=4)
    new = model[1]
    assert type(new).__name__ == "GroupNormAct"
    assert new.act is old_act and new.drop is old_drop  # the same objects, flags and all
    assert "then its drop (Identity), act" in report[0].note
    x = torch.randn(2, 8, 5, 5)
    by_hand = old_act(
        old_drop(nn.functional.group_norm(x.clone(), 4, new.weight, new.bias, new.eps))
    )
    torch.testing.assert_close(new(x.clone()), by_hand)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_keeps_the_activation(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn_act("silu"), nn.Conv2d(8, 4, 1))
    model.eval()
    act = model[1].act
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    before = snapshot(model)
    normswap.swap(model, name, example_inputs=x, **options(name))
    norm = model[1]
    assert norm.act is act, f"{name} dropped the activation: {norm}"
    if name == "wn":  # folded: the activation is all that is left of the layer
        assert isinstance(norm, AfterNorm)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    if name == "frozen":  # exact for a pretrained model
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    if name not in ("wn", "ws_gn"):
        assert_others_identical(before, model, ["1"])
    dim = cond_dim(name)
    model.train()
    with normswap.condition(model, torch.randn(2, dim)) if dim else torch.enable_grad():
        out = model(x)
    out.square().sum().backward()
    assert_all_grads(model)


def test_a_converted_timm_model_loads_into_timm_built_with_group_norm_act() -> None:
    """The converted state dict has timm GroupNormAct's layout: a converted checkpoint loads
    into a timm model built with that norm layer and computes the same."""
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).eval()
    normswap.swap(model, "gn", num_groups=8)
    timm_gn = timm.create_model(
        "efficientnet_b0",
        pretrained=False,
        num_classes=10,
        norm_layer=functools.partial(TimmGroupNormAct, num_groups=8),
    ).eval()
    assert timm_gn.load_state_dict(model.state_dict()) is not None  # every key matched
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_gn(x), rtol=1e-4, atol=1e-4)


def test_calibration_fits_the_normalization_before_the_activation() -> None:
    """The fitter matches the new norm to the source's normalized output, before its act."""
    reference = nn.Sequential(nn.Conv2d(3, 8, 3), _bn_act("relu_inplace")).eval()
    model = copy.deepcopy(reference)
    normswap.swap(model, "frozen")
    report = normswap.calibrate(model, reference, torch.randn(8, 3, 8, 8))
    assert report[0].error_before < 1e-5  # frozen is exact: fitted before the ReLU (after: ~0.3)
    gn = copy.deepcopy(reference)
    normswap.swap(gn, "gn", num_groups=8)
    report = normswap.calibrate(gn, reference, torch.randn(32, 3, 8, 8))
    assert report[0].error_after < report[0].error_before


def test_monitor_families_of_norm_act_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _bn_act("silu"))
    assert normswap.family_of(model[1]) == "bn"
    normswap.swap(model, "ln")
    assert normswap.family_of(model[1]) == "ln"


def test_users_declare_their_own_norm_plus_something() -> None:
    class BNScaleAct(nn.BatchNorm2d):
        def __init__(self, c: int) -> None:
            super().__init__(c)
            self.scale = nn.Conv2d(c, c, 1, groups=c, bias=False)
            self.act = nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.scale(super().forward(x)))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), BNScaleAct(4))
    with pytest.raises(normswap.SwapError, match="register_source"):
        normswap.swap(model, "gn", num_groups=2)  # refused until declared
    normswap.sources.register_norm_act(BNScaleAct, "scale", "act")
    try:
        scale, act = model[1].scale, model[1].act
        normswap.swap(model, "gn", num_groups=2)
        assert model[1].scale is scale and model[1].act is act
        assert [n for n, _ in model[1].named_children()] == ["scale", "act"]
        x = torch.randn(2, 3, 4, 4)
        by_hand = act(
            scale(nn.functional.group_norm(model[0](x), 2, model[1].weight, model[1].bias))
        )
        torch.testing.assert_close(model(x), by_hand)
    finally:
        normswap.sources.SOURCES.unregister(BNScaleAct)


def test_an_undeclared_child_is_refused() -> None:
    class BNActExtra(nn.BatchNorm2d):
        def __init__(self, c: int) -> None:
            super().__init__(c)
            self.act, self.extra = nn.ReLU(), nn.Identity()

    normswap.sources.register_norm_act(BNActExtra, "act")
    try:
        with pytest.raises(normswap.SwapError, match=r"child module\(s\) \['extra'\]"):
            normswap.swap(nn.Sequential(BNActExtra(4)), "gn", num_groups=2)
    finally:
        normswap.sources.SOURCES.unregister(BNActExtra)


def test_a_family_layer_without_an_act_variant_is_wrapped() -> None:
    wrapped = normswap.norms.with_after(nn.GroupNorm(2, 8), [("act", nn.ReLU())])
    assert isinstance(wrapped, NormThen) and isinstance(wrapped.norm, nn.GroupNorm)


def test_normswap_imports_and_converts_without_timm() -> None:
    """timm is a test dependency only: normswap neither imports it nor needs it."""
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "import torchvision, normswap\n"
        "assert 'timm' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "m = torchvision.models.resnet18()\n"
        "print(normswap.swap(m, 'gn').counts())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'BatchNorm2d -> GroupNorm': 20" in out.stdout


def test_monitor_statistics_of_a_timm_model_before_and_after() -> None:
    from normswap.monitor.collector import NormStatsCollector, unpack
    from normswap.monitor.families import find_norm_layers
    from normswap.monitor.stats import STATS

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=4)
    for expected in ("bn", "gn"):
        layers = find_norm_layers(model)
        assert {layer.family for layer in layers} == {expected}
        collector = NormStatsCollector(layers)
        collector.reset(torch.device("cpu"))
        collector.attach()
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        collector.detach()
        table = unpack(collector.pack(), collector.num_layers)
        gap = table.counts[:, STATS.index("bn_mean_gap")]
        assert bool((gap > 0).all()) == (expected == "bn")  # running-stats gap for BN only
        assert bool((table.calls == 1).all())
        normswap.swap(model, "gn", num_groups=4)
        model.zero_grad()


def test_distillation_with_feature_matching_on_a_timm_model() -> None:
    torch.manual_seed(0)
    teacher = timm.create_model("test_efficientnet", pretrained=False, num_classes=4).eval()
    student = copy.deepcopy(teacher)
    normswap.swap(student, "gn", num_groups=4)
    report = normswap.distill(
        student,
        teacher,
        torch.randn(24, 3, 32, 32),
        steps=3,
        batch_size=8,
        eval_every=3,
        feature_weight=1.0,
        progress=False,
    )
    assert report.steps == 3 and all(torch.isfinite(torch.tensor(c.kl)) for c in report.checks)
