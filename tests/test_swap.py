"""The converter on synthetic models: what it finds, what it carries, what it refuses."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torchvision
from families_matrix import FAMILIES, cond_dim, options
from helpers import assert_all_grads, assert_others_identical, assert_untouched, snapshot
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import normswap
from normswap import SpecError, SwapError
from normswap.meta import init_on_meta

TARGETS = FAMILIES
KW = {name: options(name, traced=False) for name in FAMILIES}


def _is_bn(m: nn.Module) -> bool:
    return normswap.is_source_norm(m)


def _conv_net(norm: type[nn.Module] = nn.BatchNorm2d, **kw) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        norm(8, **kw),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        norm(16, **kw),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if _is_bn(m):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _condition(model: nn.Module, n: int, target: str = "adaln"):
    dim = cond_dim(target, **KW.get(target, {}))
    return normswap.condition(model, torch.randn(n, dim)) if dim else contextlib.nullcontext()


# --------------------------------------------------------------------------- every target


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_converts_trains_and_keeps_the_rest(target: str) -> None:
    torch.manual_seed(0)
    model = _conv_net()
    _randomize_bn(model)
    before = snapshot(model)
    report = normswap.swap(model, target, **KW.get(target, {}))
    assert not any(_is_bn(m) for m in model.modules())
    # Every non-norm parameter and buffer is bit-identical (WN/WS reparameterize the convs).
    reparameterized = {
        "wn": ["0.weight", "3.weight", "7.weight"],
        "ws_gn": ["0.weight", "3.weight"],
    }
    assert_others_identical(before, model, ["1", "4", *reparameterized.get(target, [])])
    if target == "wn":  # right after weight norm, g·v/‖v‖ reproduces the weight
        torch.testing.assert_close(model[0].weight, before["0.weight"])
    assert {r.path for r in report.converted} >= {"1", "4"}
    x = torch.randn(2, 3, 8, 8)
    with _condition(model, 2, target):
        out = model(x)
    out.square().sum().backward()
    assert_all_grads(model)


@pytest.mark.parametrize("target", ["gn", "ln", "ln2d", "in", "adalin", "adaln"])
def test_gamma_beta_eps_dtype_training_carried(target: str) -> None:
    model = _conv_net(eps=1e-3).double().eval()
    _randomize_bn(model)
    gammas = [model[1].weight, model[4].weight]
    normswap.swap(model, target, **KW.get(target, {}))
    for i, gamma in zip((1, 4), gammas, strict=True):
        new = model[i]
        assert new.weight is gamma, "γ should move over as the same Parameter object"
        assert new.eps == 1e-3
        assert new.weight.dtype == torch.float64
        assert not new.training
        assert new.normswap_path == str(i)


def test_gn_matches_native_groupnorm_model() -> None:
    """A converted resnet18 computes what a resnet18 built with nn.GroupNorm computes."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _randomize_bn(model)
    normswap.swap(model, "gn", num_groups=16)
    reference = torchvision.models.resnet18(
        num_classes=10, norm_layer=lambda c: nn.GroupNorm(16, c)
    )
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x))


# --------------------------------------------------------------------------- structure


def test_shared_instance_stays_shared() -> None:
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.Conv2d(4, 4, 1), bn)
    report = normswap.swap(model, "gn", num_groups=2)
    assert model[1] is model[3]
    assert isinstance(model[1], normswap.GroupNorm)
    assert len(report.converted) == 1
    assert report[0].path == "1" and report[0].aliases == ("3",)


def test_containers_and_dotted_paths() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4))])
    model.heads = nn.ModuleDict({"a": nn.BatchNorm3d(4), "b": nn.Linear(2, 2)})
    report = normswap.swap(model, "gn", num_groups=2)
    assert [r.path for r in report] == ["blocks.0", "blocks.1.0", "heads.a"]
    assert all(isinstance(m, normswap.GroupNorm) for m in (model.blocks[0], model.heads["a"]))
    assert isinstance(model.blocks[1][0], normswap.GroupNorm)


def test_include_exclude_globs() -> None:
    model = torchvision.models.resnet18()
    report = normswap.swap(model, "gn", include="layer4.*", exclude="*.downsample.*")
    converted = {r.path for r in report.converted}
    assert converted and all(p.startswith("layer4.") and "downsample" not in p for p in converted)
    assert isinstance(model.layer4[0].downsample[1], nn.BatchNorm2d)
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert all(r.reason == "excluded by include/exclude" for r in report.skipped)


def test_include_matching_nothing_is_an_error() -> None:
    model = torchvision.models.resnet18()
    with pytest.raises(SwapError, match="layer5"):
        normswap.swap(model, "gn", include="layer5.*")


def test_bn1d_ranks_from_tracing() -> None:
    flat = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
    seq = nn.Sequential(nn.Conv1d(6, 8, 3), nn.BatchNorm1d(8))
    # (N, C, L): InstanceNorm is fine.
    normswap.swap(seq, "in", example_inputs=torch.randn(2, 6, 10))
    assert isinstance(seq[1], normswap.InstanceNorm)
    # (N, C): refused at plan time, nothing modified.
    before = snapshot(flat)
    with pytest.raises(SwapError, match=r"\(N, C\)") as err:
        normswap.swap(flat, "in", example_inputs=torch.randn(2, 6))
    assert err.value.problems[0][0] == "1"
    assert isinstance(flat[1], nn.BatchNorm1d)
    assert_untouched(before, flat)
    # GroupNorm with one channel per group on (N, C) is the opacus#567 trap: refused.
    with pytest.raises(SwapError, match="constant"):
        normswap.swap(flat, "gn", num_groups=8, example_inputs=torch.randn(2, 6))
    # LayerNorm over C on (N, C) works.
    normswap.swap(flat, "ln", example_inputs=torch.randn(2, 6))
    flat(torch.randn(3, 6)).sum().backward()


def test_bn1d_unknown_rank_is_reported_and_refused_at_run_time() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
    report = normswap.swap(model, "in")
    assert "rank unknown" in report[0].note
    with pytest.raises(normswap.NormSwapError, match="1"):
        model(torch.randn(2, 6))


def test_affine_false_and_frozen_bn() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.BatchNorm2d(4))
    model[2].requires_grad_(False)
    report = normswap.swap(model, "gn", num_groups=2)
    assert model[1].weight is None and not model[1].affine
    assert not model[2].weight.requires_grad and not model[2].bias.requires_grad
    assert [r.frozen for r in report] == [False, True]
    # trainable=True unfreezes on request.
    model = nn.Sequential(nn.BatchNorm2d(4).requires_grad_(False))
    normswap.swap(model, "gn", num_groups=2, trainable=True)
    assert model[0].weight.requires_grad


def test_frozen_batchnorm2d_resnet50() -> None:
    model = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    gammas = {
        n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)
    }
    before = snapshot(model)
    report = normswap.swap(model, "gn")
    assert len(report.converted) == 53
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    for path, gamma in gammas.items():
        new = model.get_submodule(path)
        assert torch.equal(new.weight, gamma)
        assert not new.weight.requires_grad, "a frozen BN becomes a frozen norm"
    assert_others_identical(before, model, gammas)
    out = model(torch.randn(1, 3, 64, 64))
    out.sum().backward()
    assert_all_grads(model)


def test_frozen_batchnorm2d_detection_model() -> None:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    backbone = _resnet_fpn_extractor(
        torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d), trainable_layers=3
    )
    model = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64).eval()
    report = normswap.swap(model, "gn", strict=True)
    assert len(report.converted) == 20
    out = model([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "labels", "scores"}


def test_syncbatchnorm() -> None:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_conv_net())
    report = normswap.swap(model, "gn", num_groups=4)
    assert report.counts() == {"SyncBatchNorm -> GroupNorm": 2}
    model(torch.randn(2, 3, 8, 8)).sum().backward()


def test_lazy_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    lazy = model[1]
    with pytest.raises(SwapError, match="lazy"):
        normswap.swap(model, "gn")
    assert model[1] is lazy and lazy.has_uninitialized_params()
    model(torch.randn(2, 3, 4, 4))  # initializes it (it becomes a BatchNorm2d)
    normswap.swap(model, "gn", num_groups=2)
    assert isinstance(model[1], normswap.GroupNorm)


class BNReLU(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class QuietBN(nn.BatchNorm2d):
    """A subclass that does not change forward: converted like any BN."""


def test_subclasses() -> None:
    model = nn.Sequential(QuietBN(4), BNReLU(4), BNReLU(4))
    with pytest.raises(SwapError) as err:
        normswap.swap(model, "gn", num_groups=2)
    assert [p for p, _ in err.value.problems] == ["1", "2"]
    assert "register_source" in str(err.value)
    assert type(model[0]) is QuietBN
    report = normswap.swap(model, "gn", num_groups=2, exclude=["1", "2"])
    assert isinstance(model[0], normswap.GroupNorm)
    assert [r.action for r in report] == ["replace", "skip", "skip"]


def test_all_problems_listed_and_nothing_modified() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 45, 1), nn.BatchNorm2d(45), nn.BatchNorm2d(64), nn.BatchNorm2d(921)
    )
    before = snapshot(model)
    with pytest.raises(SwapError) as err:
        normswap.swap(model, "gn", policy="error")
    assert [p for p, _ in err.value.problems] == ["1", "3"]
    assert "45" in str(err.value) and "921" in str(err.value)
    assert "nothing was modified" in str(err.value)
    assert_untouched(before, model)
    assert all(isinstance(m, nn.BatchNorm2d) for m in list(model)[1:])
    # The divisor policy decides per layer and says so.
    report = normswap.swap(model, "gn")
    by_path = {r.path: r for r in report}
    assert by_path["1"].groups == 15 and "15" in by_path["1"].note
    assert by_path["2"].groups == 32 and by_path["2"].note is None
    assert 921 % by_path["3"].groups == 0 and by_path["3"].groups <= 32


def test_root_norm_refused() -> None:
    with pytest.raises(SwapError, match="wrap it"):
        normswap.swap(nn.BatchNorm2d(4), "gn")


def test_spec_errors() -> None:
    model = _conv_net()
    with pytest.raises(SpecError, match="choose one of: adalin, adaln, derf, dyt, frozen, gn"):
        normswap.swap(model, "batchnorm")
    with pytest.raises(SpecError, match=r"valid fields: .*num_groups"):
        normswap.swap(model, "gn", groups=4)
    with pytest.raises(SpecError, match="positive integer"):
        normswap.swap(model, "gn", num_groups=0)
    with pytest.raises(SpecError, match="cond_dim"):
        normswap.swap(model, "adaln")
    with pytest.raises(SpecError, match="bn must be one of"):
        normswap.swap(model, "wn", bn="drop")
    assert all(isinstance(model[i], nn.BatchNorm2d) for i in (1, 4))


def test_spec_objects_and_round_trip() -> None:
    spec = normswap.GroupNormSpec(group_size=4)
    model = _conv_net()
    report = normswap.swap(model, spec)
    assert [r.groups for r in report] == [2, 4]
    assert normswap.spec_from_dict(spec.to_dict()) == spec
    assert normswap.get_spec(spec, group_size=8).group_size == 8


def test_dry_run_and_strict() -> None:
    model = _conv_net()
    before = snapshot(model)
    report = normswap.swap(model, "ln", dry_run=True)
    assert report.dry_run and len(report.converted) == 2
    assert_untouched(before, model)
    assert isinstance(model[1], nn.BatchNorm2d)
    with pytest.raises(SwapError, match="strict"):
        normswap.swap(model, "wn", bn="keep", strict=True)
    with pytest.raises(SwapError, match="strict"):
        normswap.swap(model, "gn", exclude="4", strict=True)


def test_second_swap() -> None:
    model = _conv_net()
    normswap.swap(model, "gn", num_groups=4)
    report = normswap.swap(model, "ln")
    assert len(report) == 0
    assert "no BatchNorm" in report.notes[0]
    assert "no BatchNorm" in str(report)
    normswap.swap(model, "wn", bn="remove")
    report = normswap.swap(model, "wn", bn="remove")
    assert all("weight already has a parametrization (_WeightNorm)" in r.reason for r in report)
    assert {r.action for r in report} == {"skip"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype: torch.dtype) -> None:
    model = _conv_net().to(dtype)
    normswap.swap(model, "gn", num_groups=4)
    assert all(p.dtype == dtype for p in model.parameters())
    out = model(torch.randn(2, 3, 8, 8, dtype=dtype))
    assert out.dtype == dtype


def test_meta_device_allocates_nothing() -> None:
    with init_on_meta():  # RegNet's constructor computes with tensors: no device context
        model = torchvision.models.regnet_y_128gf()
    report = normswap.swap(model, "gn")
    assert len(report.converted) == 86
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    assert not any(_is_bn(m) for m in model.modules())


def test_report_rendering() -> None:
    model = _conv_net()
    report = normswap.swap(model, "gn", num_groups=32)
    text = str(report)
    assert "BatchNorm2d" in text and "GroupNorm" in text and "using 8" in text
    data = report.to_dict()
    json.dumps(data)
    assert data["counts"] == {"BatchNorm2d -> GroupNorm": 2}
    assert data["records"][0]["channels"] == 8


# --------------------------------------------------------------------------- weight norm / WS


def test_wn_fold_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    report = normswap.swap(model, "wn", bn="fold")
    assert not any(_is_bn(m) for m in model.modules())
    assert sum(r.action == "fold" for r in report) == 20
    assert sum(r.action == "weight_norm" for r in report) == 21
    assert "parametrizations.weight.original0" in dict(
        model.conv1.named_parameters(prefix="", recurse=True)
    ) or any(k.endswith("conv1.parametrizations.weight.original0") for k in model.state_dict())
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_wn_fold_refuses_training_mode_and_unfoldable() -> None:
    model = torchvision.models.resnet18()
    before = snapshot(model)
    with pytest.raises(SwapError, match=r"model\.eval"):
        normswap.swap(model, "wn", bn="fold", example_inputs=torch.randn(1, 3, 32, 32))
    assert_untouched(before, model)
    dense = torchvision.models.densenet121().eval()
    with pytest.raises(SwapError, match="cannot fold"):
        normswap.swap(dense, "wn", bn="fold", example_inputs=torch.randn(1, 3, 32, 32))
    report = normswap.swap(
        dense, "wn", bn="fold", unfoldable="keep", example_inputs=torch.randn(1, 3, 32, 32)
    )
    assert report.skipped and all(
        r.reason.startswith("not foldable") for r in report.skipped if r.source.startswith("Batch")
    )


def test_ws_gn_standardizes_convs() -> None:
    model = _conv_net()
    report = normswap.swap(model, "ws_gn", num_groups=4)
    assert [r.action for r in report] == ["replace", "replace", "standardize", "standardize"]
    w = model[0].weight
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(8), atol=1e-5, rtol=0)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert_all_grads(model)


def test_instance_statistics_refused_on_a_single_spatial_position() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4))
    for target in ("in", "adalin"):
        with pytest.raises(SwapError, match="single one") as err:
            normswap.swap(model, target, example_inputs=torch.randn(2, 3, 8, 8))
        assert err.value.problems[0][0] == "2"
    assert isinstance(model[2], nn.BatchNorm2d)
    normswap.swap(model, "gn", num_groups=2, example_inputs=torch.randn(2, 3, 8, 8))
