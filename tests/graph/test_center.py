"""LayerNorm -> RMSNorm exactly (``swap(model, "rms", center="fold", replace="ln")``): writers
centred and γ/β folded into the layers that read the norms, found by walking the value graph.

Exactness is judged against the model before the swap, with random non-trivial γ/β (pretrained
LayerNorms are not γ = 1, β = 0): relative max difference of the outputs <= 1e-5 in float32.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import assert_all_grads, sum_outputs
from torch import nn

import normswap
from normswap import SwapError
from normswap.norms import RMSNorm

transformers = pytest.importorskip("transformers")  # a dev dependency: always there in CI


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            if isinstance(m, nn.Linear) and not m.weight.abs().sum():  # zero-initialized heads
                m.weight.normal_(0, 0.05, generator=g)
    return model.eval()


def _logits(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out  # type: ignore[return-value]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _exact(model: nn.Module, x: object, **kwargs: object) -> normswap.SwapReport:
    with torch.no_grad():
        expected = _logits(model(**x) if isinstance(x, dict) else model(x))
    report = normswap.swap(
        model, "rms", center="fold", replace="ln", example_inputs=x, strict=True, **kwargs
    )
    with torch.no_grad():
        got = _logits(model(**x) if isinstance(x, dict) else model(x))
    assert _relative(got, expected) <= 1e-5, _relative(got, expected)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    return report


def test_torchvision_vit_b_16_is_exact() -> None:
    model = _randomize_norms(torchvision.models.vit_b_16())
    report = _exact(model, torch.randn(1, 3, 224, 224))
    assert report.counts()["LayerNorm -> RMSNorm"] == 25
    # γ/β went into the layers reading each norm: the RMSNorms keep a weight of ones, no bias
    rms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert all(m.bias is None and bool((m.weight == 1).all()) for m in rms)
    # every writer of the residual stream is centred over its output channels
    out_proj = model.encoder.layers[0].self_attention.out_proj
    assert float(out_proj.weight.sum(0).abs().max()) < 1e-4
    assert float(model.class_token.sum(-1).abs().max()) < 1e-5


def test_hugging_face_gpt2_is_exact_and_its_tied_head_is_untied() -> None:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _randomize_norms(transformers.GPT2LMHeadModel(config))
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 100, (2, 16))
    report = _exact(model, ids)
    assert model.lm_head.weight is not model.transformer.wte.weight
    untie = [r for r in report if r.action == "untie"]
    assert [r.path for r in untie] == ["lm_head"]
    # Conv1D (transposed) writers are centred along their output dim
    c_proj = model.transformer.h[0].attn.c_proj
    assert float(c_proj.weight.sum(1).abs().max()) < 1e-4
    # and the model still trains: every parameter gets a gradient
    model.train()
    sum_outputs(model(ids).logits).backward()
    assert_all_grads(model)


def test_hugging_face_vit_is_exact() -> None:
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_labels=5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _randomize_norms(transformers.ViTForImageClassification(config))
    _exact(model, {"pixel_values": torch.randn(2, 3, 32, 32)})


def test_swin_t_keeps_what_cannot_be_centred_and_is_exact() -> None:
    """Swin's stem LayerNorm writes into stage 1's stream and its patch merging joins the
    channels of four positions: those streams cannot be centred. uncentrable='keep' leaves
    their LayerNorms and makes the rest RMSNorms; the model computes what it computed."""
    model = _randomize_norms(torchvision.models.swin_t())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    report = normswap.swap(
        model, "rms", center="fold", uncentrable="keep", replace="ln", example_inputs=x
    )
    with torch.no_grad():
        assert _relative(model(x), expected) <= 1e-5
    kept = {r.path: r.reason for r in report.skipped}
    assert "features.1.0.norm1" in kept and "features.0.2" in kept["features.1.0.norm1"]
    assert any("patch merging" in reason for reason in kept.values())
    assert report.counts()["LayerNorm -> RMSNorm"] == 6


def test_convnext_is_refused_with_the_path_and_nothing_changes() -> None:
    model = torchvision.models.convnext_tiny().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SwapError) as err:
        normswap.swap(
            model, "rms", center="fold", replace="ln", example_inputs=torch.randn(1, 3, 64, 64)
        )
    assert "features.1.0.block.2: cannot centre what it reads" in str(err.value)
    assert "grouped (depthwise) convolution" in str(err.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


class _Scaled(nn.Module):
    """A pre-norm block whose residual branch is scaled per channel (a LayerScale)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.out = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.gamma * self.fc(self.ln(h))
        return self.out(h)


def test_a_layer_scale_cannot_be_centred() -> None:
    with pytest.raises(SwapError, match="LayerScale"):
        normswap.swap(
            _Scaled(), "rms", center="fold", replace="ln", example_inputs=torch.randn(3, 4)
        )


def test_center_fold_needs_example_inputs() -> None:
    with pytest.raises(SwapError, match="pass example_inputs"):
        normswap.swap(_Scaled(), "rms", center="fold", replace="ln")


def test_a_norm_read_by_a_layer_that_is_not_linear_keeps_its_affine() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU()).eval()
    _randomize_norms(model)
    x = torch.randn(3, 4)
    expected = model(x)
    report = normswap.swap(model, "rms", center="fold", replace="ln", example_inputs=x)
    assert "γ and β stay in the RMSNorm" in report[0].note
    assert model[1].bias is not None and not bool((model[1].weight == 1).all())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_the_rewrite_is_checked_and_rolled_back_when_not_exact(monkeypatch) -> None:
    """A wrong rewrite (here: centring disabled) fails the output check; the model is
    restored."""
    from normswap.graph import center

    monkeypatch.setattr(center, "apply_module_edits", lambda module, edits: None)
    model = _Scaled()
    model.gamma = None  # no LayerScale: centrable
    model.forward = lambda x: model.out(  # type: ignore[method-assign]
        model.embed(x) + model.fc(model.ln(model.embed(x)))
    )
    x = torch.randn(3, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(normswap.ApplyError, match="not exact"):
        normswap.swap(model, "rms", center="fold", replace="ln", example_inputs=x)
    assert isinstance(model.ln, nn.LayerNorm)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
