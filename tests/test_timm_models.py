"""Coverage over timm: one model of every timm architecture module that holds a BatchNorm.

* Structure (meta device): the smallest model of each such module converts to every registered
  family; no BatchNorm-family layer is left unless the report says why.
* Real forward + backward with ``gn`` on a sample covering every norm/activation class timm
  builds (BatchNorm1d/2d and BatchNormAct2d with each activation it uses): every trainable
  parameter gets a finite gradient, and after each converted norm run the source's activation
  objects.
* timm's other ways to build the same models: ``norm_layer=`` and ``features_only=True``.
"""

from __future__ import annotations

import pytest
import timm
import torch
from families_matrix import FAMILIES, options
from helpers import assert_all_grads, sum_outputs
from torch import nn

import normswap

#: The timm version the table below was made with (a census of all 1,371 models on the meta
#: device): each architecture module's smallest model that holds a BatchNorm-family layer, or
#: None where no model of the module holds one (ViTs, ConvNeXt, ...).
TIMM_VERSION = "1.0.31"
REPRESENTATIVE: dict[str, str | None] = {
    "beit": None,
    "byoanet": "halonet_h1",
    "byobnet": "test_byobnet",
    "cait": None,
    "coat": None,
    "convit": None,
    "convmixer": "convmixer_768_32",
    "convnext": None,
    "cpubone": "cpubone_nano",
    "crossvit": None,
    "csatv2": None,
    "cspnet": "cs3darknet_focus_s",
    "cspnext": "cspnext_tiny",
    "davit": None,
    "deepseek_vit": None,
    "deit": None,
    "densenet": "densenet121",
    "dla": "dla46x_c",
    "dpn": "dpn48b",
    "edgenext": None,
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "test_efficientnet",
    "efficientvim": "efficientvim_m1",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0",
    "eva": None,
    "fasternet": "fasternet_t0",
    "fastvit": "fastvit_t8",
    "focalnet": None,
    "gcvit": None,
    "gemma4_vit": None,
    "ghostnet": "ghostnet_050",
    "hardcorenas": "hardcorenas_b",
    "hgnet": "hgnetv2_b0",
    "hiera": None,
    "hieradet_sam2": None,
    "hrnet": "hrnet_w18_small",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "lcnetv2": "lcnetv2_small",
    "levit": "levit_128s",
    "lowformer": "lowformer_b0",
    "mambaout": None,
    "maxxvit": "test_coatnet",
    "metaformer": None,
    "mlp_mixer": None,
    "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv5": None,
    "mobilevit": "mobilevit_xxs",
    "mvitv2": None,
    "naflexvit": None,
    "nasnet": "nasnetalarge",
    "nest": None,
    "nextvit": "nextvit_small",
    "nfnet": None,
    "pit": None,
    "pnasnet": "pnasnet5large",
    "pvt_v2": None,
    "qwen3_vit": None,
    "rdnet": None,
    "regnet": "regnetx_002",
    "repghost": "repghostnet_050",
    "repvit": "repvit_m1",
    "res2net": "res2next50",
    "resnest": "resnest14d",
    "resnet": "test_resnet",
    "resnetv2": "resnetv2_18",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42",
    "senet": "legacy_seresnet18",
    "sequencer": None,
    "shvit": "shvit_s1",
    "sknet": "skresnet18",
    "starnet": "starnet_s050",
    "swiftformer": "swiftformer_xs",
    "swin_transformer": None,
    "swin_transformer_v2": None,
    "swin_transformer_v2_cr": None,
    "tiny_vit": "tiny_vit_5m_224",
    "tnt": None,
    "tresnet": "tresnet_m",
    "twins": None,
    "vgg": "vgg11_bn",
    "visformer": "visformer_tiny",
    "vision_transformer": None,
    "vision_transformer_hybrid": "vit_small_resnet50d_s16_224",
    "vision_transformer_relpos": None,
    "vision_transformer_sam": None,
    "vitamin": None,
    "volo": "volo_d1_224",
    "vovnet": "ese_vovnet19b_slim_dw",
    "xception": "legacy_xception",
    "xception_aligned": "xception41p",
    "xcit": "xcit_nano_12_p8_224",
}
BN_MODULES = sorted(m for m, name in REPRESENTATIVE.items() if name)

#: The real-input sample: (model, input side). Together they hold every BatchNorm-family
#: class and every activation timm puts in BatchNormAct2d (see the census).
REAL = {
    "test_efficientnet": 64,  # BatchNormAct2d + SiLU (in place), Identity
    "mobilenetv3_small_050": 64,  # + Hardswish, ReLU (in place)
    "mobilenetv2_035": 64,  # + ReLU6
    "dpn48b": 64,  # + SiLU (not in place)
    "dpn68": 64,  # + ReLU (not in place)
    "darknet17": 64,  # + LeakyReLU
    "efficientformerv2_s0": 224,  # + timm GELU
    "maxvit_tiny_tf_224": 224,  # + timm GELUTanh
    "vit_base_mci_224": 224,  # + nn.GELU
    "test_resnet": 64,  # BatchNorm2d
    "efficientvit_m0": 224,  # BatchNorm1d
}


def _meta(name: str, **kwargs: object) -> nn.Module:
    """The model on the meta device (every timm 1.0.31 model builds this way: the census)."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def _left(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if normswap.is_source_norm(m)]


def test_the_table_covers_every_timm_architecture_module() -> None:
    assert timm.__version__ == TIMM_VERSION, "re-take the census for another timm version"
    assert set(REPRESENTATIVE) == set(timm.list_modules())


@pytest.mark.parametrize("module", sorted(m for m, name in REPRESENTATIVE.items() if not name))
def test_modules_without_batchnorm_hold_none(module: str) -> None:
    """A spot check of the census: the module's first model holds no BatchNorm."""
    assert not _left(_meta(timm.list_models(module=module)[0]))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("module", BN_MODULES)
def test_every_module_converts_to_every_family(module: str, name: str) -> None:
    model = _meta(REPRESENTATIVE[module])
    assert _left(model), f"{REPRESENTATIVE[module]} holds no BatchNorm any more"
    kwargs = options(name, traced=False)
    try:
        report = normswap.swap(model, name, **kwargs)
    except normswap.SwapError as err:
        # Refused layers (instance statistics over one position, ...) are named with the fix;
        # excluding them is that fix, and then the report says why they stay.
        paths = [path for path, _ in err.problems]
        assert all(not path.startswith("<") for path in paths), err.problems
        report = normswap.swap(model, name, exclude=paths, **kwargs)
    reasons = {r.path: r.reason for r in report.skipped}
    assert not [p for p in _left(model) if not reasons.get(p)], "BN left without a reason"
    assert all(t.device.type == "meta" for t in model.state_dict().values())


def _acts(model: nn.Module) -> dict[str, nn.Module]:
    """The activation module of every norm + activation layer, by path."""
    return {
        p: m.act
        for p, m in model.named_modules()
        if hasattr(m, "act") and normswap.is_source_norm(m)
    }


@pytest.mark.parametrize(("name", "size"), list(REAL.items()))
def test_real_forward_backward_with_group_norm(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    acts = _acts(model)
    normswap.swap(model, "gn", strict=True)
    assert not _left(model)
    for path, act in acts.items():  # the very same activation objects follow every norm
        assert model.get_submodule(path).act is act
    model.train()
    out = model(torch.randn(2, 3, size, size))
    loss = sum_outputs(out)
    assert torch.isfinite(loss)
    loss.backward()
    assert_all_grads(model)


def test_the_real_sample_covers_every_norm_and_activation_class() -> None:
    seen = set()
    for name in REAL:
        model = _meta(name)
        for m in model.modules():
            if normswap.is_source_norm(m):
                act = getattr(m, "act", None)
                kind = None if act is None else f"{type(act).__module__}.{type(act).__name__}"
                seen.add((type(m).__name__, kind, getattr(act, "inplace", None)))
    assert ("BatchNorm1d", None, None) in seen and ("BatchNorm2d", None, None) in seen
    acts = {(a, i) for kind, a, i in seen if kind == "BatchNormAct2d"}
    torch_act, timm_act = "torch.nn.modules.activation", "timm.layers.activations"
    expected = {
        ("torch.nn.modules.linear.Identity", None),
        (f"{torch_act}.SiLU", True),
        (f"{torch_act}.SiLU", False),
        (f"{torch_act}.ReLU", True),
        (f"{torch_act}.ReLU", False),
        (f"{torch_act}.Hardswish", True),
        (f"{torch_act}.ReLU6", True),
        (f"{torch_act}.LeakyReLU", True),
        (f"{torch_act}.GELU", None),
        (f"{timm_act}.GELU", None),
        (f"{timm_act}.GELUTanh", None),
    }
    assert expected <= acts, expected - acts


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("efficientnet_b0", {"features_only": True}),
        ("resnet18", {"features_only": True, "out_indices": (1, 2, 3)}),
        ("resnet18", {"norm_layer": nn.BatchNorm2d}),
        ("efficientnet_b0", {"norm_layer": "batchnorm"}),
    ],
    ids=["efficientnet-features", "resnet-features", "resnet-norm-layer", "effnet-norm-layer"],
)
def test_timm_builds_features_only_and_norm_layer(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    report = normswap.swap(model, "frozen", strict=True)  # exact: outputs unchanged
    assert report.converted and not _left(model)
    with torch.no_grad():
        got = model(x)
    for a, b in zip(
        expected if isinstance(expected, list) else [expected],
        got if isinstance(got, list) else [got],
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
