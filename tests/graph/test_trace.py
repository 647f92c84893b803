"""Tracing (normswap.graph.record, normswap.graph.fx): producers, ranks and foldability of
norms, from one real forward pass."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import normswap
from normswap.errors import TraceError
from normswap.graph import GraphFacts, trace
from normswap.graph.rules import producer_problem

# ----------------------------------------------------------------------------------------------
# small synthetic models


class Residual(nn.Module):
    """conv -> bn, and the conv output is also added to the bn output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class AfterCat(nn.Module):
    """Two convs, concatenated, then one BN (DenseNet's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.a(x), self.b(x)], dim=1))


class SharedBN(nn.Module):
    """One BN instance registered at two paths and applied twice, after two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = self.bn1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


class SharedConv(nn.Module):
    """One conv instance at two paths, run twice, each time followed by its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.alias = self.conv
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.alias(self.bn1(self.conv(x))))


class TwoInputs(nn.Module):
    """Takes (image, scale) positionally or by keyword; BN follows the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, image: torch.Tensor, scale: float = 1.0) -> dict[str, list[torch.Tensor]]:
        return {"out": [self.bn(self.conv(image)) * scale]}


class ListInput(nn.Module):
    """Takes a list of images as one argument, like torchvision's detection models."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.bn(self.conv(im[None])) for im in images[:1]]


class StdConv2d(nn.Conv2d):
    """A weight-standardized conv: its output is not conv(x, weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def conv_bn(*, inplace_relu: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)]
    if inplace_relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers).eval()


# ----------------------------------------------------------------------------------------------
# synthetic cases


def test_conv_bn_is_foldable() -> None:
    facts = trace(conv_bn(), torch.randn(2, 3, 8, 8))
    assert isinstance(facts, GraphFacts)
    f = facts["1"]
    assert (f.path, f.paths, f.kind, f.calls) == ("1", ("1",), "BatchNorm2d", 1)
    assert f.input_shapes == ((2, 8, 8, 8),)
    assert (f.input_rank, f.producer, f.producer_kind) == (4, "0", "Conv2d")
    assert f.foldable and f.reason is None
    assert facts.ranks() == {"1": 4}
    assert facts.producers() == {"1": "0"}
    assert facts.foldable_pairs() == [("1", "0")]
    assert list(facts) == ["1"] and len(facts) == 1


def test_inplace_relu_after_bn_does_not_confuse_the_walk() -> None:
    facts = trace(conv_bn(inplace_relu=True), torch.randn(1, 3, 8, 8))
    assert facts["1"].producer == "0"
    assert facts["1"].foldable, facts["1"].reason


def test_linear_bn1d_on_features_is_foldable() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)).eval()
    f = trace(model, torch.randn(3, 5))["1"]
    assert (f.producer, f.producer_kind, f.input_rank, f.foldable) == ("0", "Linear", 2, True)


def test_linear_bn1d_on_rank3_output_is_not_foldable() -> None:
    # (N, L, C) Linear output: BatchNorm1d(L) normalizes dim 1, which is not the out-features.
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(7)).eval()
    f = trace(model, torch.randn(2, 7, 5))["1"]
    assert f.producer == "0" and f.input_rank == 3
    assert not f.foldable
    assert "Linear output has rank 3" in f.reason


def test_conv1d_bn1d_rank3() -> None:
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)).eval()
    f = trace(model, torch.randn(2, 3, 10))["1"]
    assert (f.input_rank, f.producer, f.foldable) == (3, "0", True)
    assert f.input_shapes == ((2, 4, 8),)


def test_residual_use_of_conv_output_is_not_foldable() -> None:
    f = trace(Residual().eval(), torch.randn(1, 4, 6, 6))["bn"]
    assert f.producer == "conv"
    assert not f.foldable
    assert f.reason == "Conv2d output is also used by 1 other operation (add)"


class HiddenRead(nn.Module):
    """conv -> bn, and the conv output also decides, without autograd, what is returned."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out = self.bn(y)
        if self.how == "mask":
            return out * (y > 0)  # a comparison has no autograd edge
        if self.how == "detach":
            return out + y.detach().mean()
        self.last_max = y.amax()  # kept, not returned: unreachable from the outputs
        return out


@pytest.mark.parametrize(
    ("how", "ops"), [("mask", "gt"), ("detach", "detach"), ("unreachable", "amax")]
)
def test_reads_autograd_does_not_record_make_it_not_foldable(how: str, ops: str) -> None:
    f = trace(HiddenRead(how).eval(), torch.randn(1, 3, 4, 4))["bn"]
    assert f.producer == "conv"
    assert not f.foldable
    assert f.reason == (
        f"Conv2d output is also read by 1 operation outside autograd's graph from the outputs "
        f"({ops}); folding would change what they see"
    )


def test_bn_after_cat_has_no_producer() -> None:
    f = trace(AfterCat().eval(), torch.randn(1, 3, 4, 4))["bn"]
    assert f.producer is None and f.producer_kind is None
    assert not f.foldable
    assert f.reason == "input is produced by cat, not a conv/linear"


def test_shared_bn_runs_twice_and_is_reported_once_with_all_paths() -> None:
    facts = trace(SharedBN().eval(), torch.randn(1, 3, 4, 4))
    assert list(facts) == ["bn1"]
    f = facts["bn1"]
    assert facts["bn2"] is f  # an alias path resolves to the canonical record
    assert f.paths == ("bn1", "bn2")
    assert f.calls == 2 and f.input_shapes == ((1, 4, 4, 4), (1, 4, 4, 4))
    assert f.input_rank == 4
    assert f.producer is None  # conv1 in one call, conv2 in the other
    assert not f.foldable
    assert f.reason.startswith("norm runs 2 times per forward")


def test_shared_producer_is_not_foldable() -> None:
    facts = trace(SharedConv().eval(), torch.randn(1, 4, 4, 4))
    for path in ("bn1", "bn2"):
        f = facts[path]
        assert f.producer == "conv"  # the canonical path, even when called as `alias`
        assert not f.foldable
        assert "Conv2d conv runs 2 times per forward" in f.reason
        assert "Conv2d conv is shared: the same module is also at alias" in f.reason


def test_frozen_model_is_traced_and_left_frozen() -> None:
    model = conv_bn()
    model.requires_grad_(False)
    x = torch.randn(1, 3, 8, 8)
    facts = trace(model, x)
    assert facts["1"].producer == "0" and facts["1"].foldable
    assert not any(p.requires_grad for p in model.parameters())
    assert not x.requires_grad


def test_integer_inputs_with_frozen_model() -> None:
    # No floating-point input to require grad: the producer's own parameters provide the graph.
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3), nn.BatchNorm1d(3))
    model.eval().requires_grad_(False)
    f = trace(model, torch.tensor([[1, 2], [3, 4]]))["3"]
    assert (f.producer, f.foldable) == ("2", True)
    assert not any(p.requires_grad for p in model.parameters())


def test_frozen_batchnorm_after_conv() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 1), FrozenBatchNorm2d(5), nn.ReLU(inplace=True))
    f = trace(model, torch.randn(1, 3, 4, 4))["1"]
    assert (f.kind, f.producer, f.input_rank, f.foldable) == ("FrozenBatchNorm2d", "0", 4, True)


class InputBN(nn.Module):
    """A BN on the model input, then a conv; a second BN is registered but never called."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.unused = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_bn_on_model_input_and_unused_bn() -> None:
    facts = trace(InputBN().eval(), torch.randn(1, 3, 4, 4))
    assert facts["bn"].producer is None
    assert facts["bn"].reason == (
        "input is a leaf tensor (a model input or a parameter), not a conv/linear output"
    )
    assert facts["unused"].calls == 0 and facts["unused"].input_rank is None
    assert facts["unused"].reason == "norm did not run in the forward with these example inputs"
    assert facts.ranks() == {"bn": 4}


def test_conv_subclass_with_its_own_forward_is_not_foldable() -> None:
    model = nn.Sequential(StdConv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    f = trace(model, torch.randn(1, 3, 6, 6))["1"]
    assert f.producer == "0"
    assert not f.foldable
    assert "StdConv2d overrides Conv2d.forward" in f.reason
    assert producer_problem(nn.Conv2d(1, 1, 1)) is None


def test_bn_without_running_stats_is_not_foldable() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    f = trace(model.eval(), torch.randn(2, 3, 4, 4))["1"]
    assert f.producer == "0" and not f.foldable
    assert f.reason is not None and f.reason.startswith(
        "BatchNorm2d has no running statistics (track_running_stats=False)"
    )


def test_custom_norm_types() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1))
    model.append(nn.BatchNorm2d(4))
    facts = trace(model, torch.randn(1, 3, 4, 4), norm_types=(nn.GroupNorm,))
    assert list(facts) == ["1"]
    assert facts["1"].producer == "0" and not facts["1"].foldable
    assert facts["1"].reason == (
        "GroupNorm normalizes each sample with its own statistics: only a BatchNorm (a fixed "
        "affine map in eval mode) folds into a conv/linear"
    )
    with pytest.raises(TraceError, match="norm_types must be a non-empty tuple of classes"):
        trace(model, torch.randn(1, 3, 4, 4), norm_types=())


def test_example_inputs_conventions() -> None:
    model = TwoInputs().eval()
    x = torch.randn(1, 3, 4, 4)
    assert trace(model, x)["bn"].foldable  # a tensor: the single argument
    assert trace(model, (x, 2.0))["bn"].foldable  # a tuple: *args
    assert trace(model, {"image": x, "scale": 2.0})["bn"].foldable  # a dict: **kwargs
    assert trace(ListInput().eval(), [torch.rand(3, 4, 4)])["bn"].foldable  # a list: one arg
    with pytest.raises(TraceError, match="non-string keys"):
        trace(model, {0: x})


def test_trace_leaves_model_and_inputs_as_they_were() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 4, 4)
    x_before = x.clone()
    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    facts = trace(model, x)
    assert torch.equal(torch.rand(3), expected_draw)  # RNG state restored (dropout drew)
    assert facts["1"].foldable  # a graph fact; the training mode is fold_bn's business
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():  # running stats restored
        assert torch.equal(value, before[key]), key
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())


def test_trace_under_no_grad_inference_mode_and_on_meta() -> None:
    model = conv_bn(inplace_relu=True)
    with torch.no_grad():
        assert trace(model, torch.randn(1, 3, 4, 4))["1"].foldable
    with torch.inference_mode():
        x = torch.randn(1, 3, 4, 4)  # an inference tensor
        assert trace(model, x)["1"].foldable
    meta = conv_bn().to("meta")
    facts = trace(meta, torch.randn(1, 3, 4, 4, device="meta"))
    assert facts["1"].foldable and facts["1"].input_shapes == ((1, 8, 4, 4),)


def test_lazy_modules_are_materialized_and_traced() -> None:
    model = nn.Sequential(nn.LazyConv2d(4, 1), nn.LazyBatchNorm2d()).eval()
    f = trace(model, torch.randn(2, 3, 4, 4))["1"]
    assert (f.producer, f.foldable) == ("0", True)
    assert type(model[0]) is nn.Conv2d and model[0].weight.shape == (4, 3, 1, 1)


def test_forward_failure_is_a_trace_error_and_removes_hooks() -> None:
    model = conv_bn()
    with pytest.raises(TraceError, match=r"tracing Sequential failed .* torch\.randn") as info:
        trace(model, torch.randn(1, 5, 8, 8))  # 5 channels for a 3-channel conv
    assert isinstance(info.value.__cause__, RuntimeError)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_str_is_a_table() -> None:
    text = str(trace(Residual().eval(), torch.randn(1, 4, 4, 4)))
    lines = text.splitlines()
    assert lines[0] == "GraphFacts of Residual: 1 norms, 0 foldable"
    assert lines[1].split() == ["path", "type", "calls", "rank", "producer", "foldable", "reason"]
    assert lines[2].split()[:6] == ["bn", "BatchNorm2d", "1", "4", "conv", "no"]
    assert "also used by 1 other operation (add)" in lines[2]


# ----------------------------------------------------------------------------------------------
# real torchvision models


def test_resnet18_every_bn_has_its_conv() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    facts = trace(model, torch.randn(1, 3, 64, 64))
    assert len(facts) == 20
    for path, f in facts.items():
        expected = path.replace("downsample.1", "downsample.0").replace(".bn", ".conv")
        expected = "conv1" if path == "bn1" else expected
        assert f.producer == expected, path
        assert f.foldable, (path, f.reason)
        assert f.input_rank == 4
    assert sum(p.endswith("downsample.1") for p in facts) == 3


def test_densenet121_norms_after_cat_are_not_foldable() -> None:
    model = torchvision.models.densenet121(weights=None).eval()
    facts = trace(model, torch.randn(1, 3, 64, 64))
    assert len(facts) == 121
    cat_fed = {p for p, f in facts.items() if not f.foldable}
    # every dense layer's norm1, the three transitions' norms and the final norm5
    expected = {p for p in facts if p.endswith((".norm1", "transition1.norm", ".norm5"))}
    expected |= {f"features.transition{i}.norm" for i in (1, 2, 3)}
    assert cat_fed == expected and len(cat_fed) == 62
    for p in cat_fed:
        assert facts[p].reason == "input is produced by cat, not a conv/linear"
        assert facts[p].producer is None
    for p in set(facts) - cat_fed:  # norm0 after conv0, each dense layer's norm2 after its conv1
        assert facts[p].producer == p.replace("norm2", "conv1").replace("norm0", "conv0"), p


def test_mobilenet_v2_all_foldable() -> None:
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    facts = trace(model, torch.randn(1, 3, 64, 64))
    assert len(facts) == 52
    assert all(f.foldable for f in facts.values()), str(facts)
    # Conv2dNormActivation is Sequential(conv, bn, relu6): the producer is the sibling "0".
    assert all(f.producer == p[: -len("1")] + "0" for p, f in facts.items() if p.endswith(".1"))


def test_fasterrcnn_mobilenet_is_traced_where_fx_fails() -> None:
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3
    ).eval()
    with pytest.raises(Exception):  # noqa: B017 - whatever fx raises; it cannot trace this model
        torch.fx.symbolic_trace(model)
    facts = trace(model, [torch.rand(3, 128, 128)])
    n_bn = sum(normswap.is_source_norm(m) for m in model.modules())
    assert len(facts) == n_bn == 46
    assert all(f.calls == 1 and f.input_rank == 4 for f in facts.values())
    assert all(f.foldable for f in facts.values()), str(facts)
    assert facts["backbone.body.0.1"].producer == "backbone.body.0.0"


def test_raft_large_context_encoder_bns() -> None:
    # raft_large mixes norms: InstanceNorm in the feature encoder, BatchNorm in the context
    # encoder (raft_small has no BN). Its correlation pyramid needs H, W >= 128.
    model = torchvision.models.optical_flow.raft_large(weights=None).eval()
    with pytest.raises(Exception):  # noqa: B017 - whatever fx raises; it cannot trace this model
        torch.fx.symbolic_trace(model)
    image = torch.rand(1, 3, 128, 128)
    facts = trace(model, (image, image.flip(-1), 2))  # (image1, image2, num_flow_updates)
    n_bn = sum(normswap.is_source_norm(m) for m in model.modules())
    assert len(facts) == n_bn == 15
    assert all(p.startswith("context_encoder.") for p in facts)
    assert all(f.calls == 1 and f.foldable for f in facts.values()), str(facts)
    for path, f in facts.items():
        assert f.producer == path[: -len("1")] + "0", path  # Sequential(conv, bn, relu)
