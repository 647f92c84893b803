"""Source kinds: what each norm class is read as, replace=, frozen-BN look-alikes (Hugging
Face's DETR family) and the refusals that keep a conversion faithful."""

from __future__ import annotations

import pytest
import timm.layers
import torch
import torchvision
from helpers import (
    LookalikeFrozenBatchNorm2d,
    assert_all_grads,
    assert_others_identical,
    snapshot,
    sum_outputs,
)
from torch import nn

import normswap
from normswap import SpecError, SwapError, UnsupportedModuleError
from normswap.sources import (
    SOURCE_KINDS,
    describe_source,
    register_source,
    resolve_replace,
    source_kind,
)
from normswap.sources.lookalike import measure_eps
from normswap.sources.norms import describe_layer_norm

transformers = pytest.importorskip("transformers")  # a dev dependency: always there in CI

#: (module, kind, over, groups, centre, channels last, channels, eps)
RECORDS = [
    (nn.BatchNorm2d(8, eps=1e-3), "bn", "batch", None, True, False, 8, 1e-3),
    (nn.LayerNorm(8, eps=1e-6), "ln", "channels", None, True, True, 8, 1e-6),
    (nn.GroupNorm(4, 8), "gn", "groups", 4, True, False, 8, 1e-5),
    (nn.InstanceNorm2d(8), "in", "groups", 8, True, False, 8, 1e-5),
    (nn.RMSNorm(8), "rms", "channels", None, False, True, 8, torch.finfo(torch.float32).eps),
    (torchvision.models.convnext.LayerNorm2d(8), "ln2d", "channels", None, True, False, 8, 1e-5),
    (timm.layers.LayerNorm2d(8), "ln2d", "channels", None, True, False, 8, 1e-6),
    (timm.layers.RmsNorm2d(8), "rms", "channels", None, False, False, 8, 1e-6),
    (timm.layers.GroupNorm1(8), "gn", "groups", 1, True, False, 8, 1e-5),
    (normswap.LayerNorm(8), "ln", "groups", 1, True, False, 8, 1e-5),
    (normswap.RMSNorm(8, channels_last=True), "rms", "channels", None, False, True, 8, 1e-6),
    (normswap.FrozenAffine(8), "frozen", "batch", None, True, False, 8, 0.0),
    (LookalikeFrozenBatchNorm2d(8), "bn", "batch", None, True, False, 8, 1e-5),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r[0]).__qualname__)
def test_each_norm_is_read_as_what_it_computes(record: tuple) -> None:
    module, kind, over, groups, center, last, channels, eps = record
    src = describe_source(module)
    assert (src.source, src.over, src.groups, src.center, src.channels_last) == (
        kind,
        over,
        groups,
        center,
        last,
    )
    assert src.num_channels == channels and src.eps == pytest.approx(eps)
    assert source_kind(module) == kind


def test_replace_selects_kinds_and_names_the_valid_ones() -> None:
    assert resolve_replace(None) == ("bn",)
    assert resolve_replace("any") == tuple(SOURCE_KINDS)
    with pytest.raises(SpecError, match="unknown source kind replace='layernorm'; choose from"):
        resolve_replace("layernorm")
    with pytest.raises(SpecError, match="unknown source kind"):
        normswap.swap(nn.Sequential(nn.LayerNorm(4)), "rms", replace=("ln", "batchnorm"))


def test_the_default_finds_no_batchnorm_and_says_which_norms_there_are() -> None:
    report = normswap.swap(torchvision.models.vit_b_16(), "gn", dry_run=True)
    (note,) = report.notes
    assert "holds no BatchNorm-family module" in note
    assert "'ln' x25" in note and "replace='ln'" in note
    assert not report.converted


def test_a_layernorm_subclass_with_its_own_forward_is_refused_until_registered() -> None:
    class ScaledLN(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(4, 8), ScaledLN(8))
    with pytest.raises(SwapError, match=r"overrides forward\(\) of LayerNorm.*register_source"):
        normswap.swap(model, "rms", replace="ln")
    register_source(ScaledLN, kind="ln")(describe_layer_norm)
    try:
        assert normswap.swap(model, "rms", replace="ln").counts() == {"ScaledLN -> RMSNorm": 1}
    finally:
        normswap.sources.SOURCES.unregister(ScaledLN)


class _NotFrozen(nn.Module):
    """Named and built like a frozen BatchNorm, computing something else."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)


_NotFrozen.__name__ = _NotFrozen.__qualname__ = "MyFrozenBatchNorm2d"


def test_a_lookalike_that_does_not_compute_a_frozen_batchnorm_is_refused() -> None:
    with pytest.raises(UnsupportedModuleError, match="does not compute"):
        measure_eps(_NotFrozen(3))
    with pytest.raises(SwapError, match="looks like a frozen BatchNorm"):
        normswap.swap(nn.Sequential(_NotFrozen(3)), "gn")


# --------------------------------------------------------------------------- DETR's look-alikes


def _detr() -> nn.Module:
    config = transformers.DetrConfig(
        use_timm_backbone=False,
        backbone_config=transformers.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
            layer_type="basic", out_features=["stage4"],
        ),
        use_pretrained_backbone=False, num_queries=5, d_model=32, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DetrForObjectDetection(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random running statistics and affine, as a trained backbone has
        for m in model.modules():
            if type(m).__name__ == "DetrFrozenBatchNorm2d":
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _lookalikes(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if type(m).__name__ == "DetrFrozenBatchNorm2d"]


def test_detr_frozen_batchnorms_are_found_and_strict_sees_them() -> None:
    model = _detr()
    paths = _lookalikes(model)
    assert len(paths) == 12
    assert all(describe_source(model.get_submodule(p)).eps == 1e-5 for p in paths)
    with pytest.raises(SwapError, match="strict=True"):
        normswap.swap(model, "gn", exclude=paths[0], strict=True)


@pytest.mark.parametrize("spec", [{"name": "frozen"}, {"name": "wn", "bn": "fold", "layers": ()}])
def test_detr_frozen_and_fold_are_exact(spec: dict) -> None:
    model = _detr()
    x = {"pixel_values": torch.randn(1, 3, 64, 64)}
    with torch.no_grad():
        expected = model(**x)
    options = {k: v for k, v in spec.items() if k != "name"}
    normswap.swap(model, spec["name"], example_inputs=x, strict=True, **options)
    assert not _lookalikes(model)
    with torch.no_grad():
        got = model(**x)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, rtol=1e-4, atol=1e-5)


def test_detr_gn_trains() -> None:
    model = _detr()
    before = snapshot(model)
    report = normswap.swap(model, "gn", num_groups=8, strict=True)
    assert report.counts() == {"DetrFrozenBatchNorm2d -> GroupNorm": 12}
    assert_others_identical(before, model, [r.path for r in report.converted])
    model.train()
    sum_outputs(model(pixel_values=torch.randn(2, 3, 64, 64))).backward()
    # the look-alikes' γ/β were buffers (frozen): the GroupNorms keep them frozen
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    frozen_gn = [m for m in model.modules() if isinstance(m, normswap.GroupNorm)]
    assert all(not m.weight.requires_grad for m in frozen_gn)
    assert_all_grads(model)


def test_detr_gn_trainable_when_asked() -> None:
    model = _detr()
    normswap.swap(model, "gn", num_groups=8, trainable=True)
    model.train()
    sum_outputs(model(pixel_values=torch.randn(2, 3, 64, 64)).logits).backward()
    gns = [m for m in model.modules() if isinstance(m, normswap.GroupNorm)]
    assert all(m.weight.grad is not None for m in gns)
