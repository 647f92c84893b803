"""convert_pretrained from LayerNorm models: a torchvision ViT and a Hugging Face GPT-2.

The "pretrained" models here are small and briefly trained so that their LayerNorms carry
non-trivial γ/β; the benchmark (benchmarks/transformers_fidelity.py) measures the real ones.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import snapshot
from torch import nn

import normswap
from normswap.pretrained.convert import convert_pretrained
from normswap.pretrained.fidelity import fidelity


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return normswap.tiny_vit(
        4, image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g)


def _labels(x: torch.Tensor) -> torch.Tensor:
    """A learnable rule: which quadrant is brightest."""
    q = x.mean(1).unfold(1, 8, 8).unfold(2, 8, 8).mean((-1, -2)).flatten(1)
    return q.argmax(1)


@pytest.fixture(scope="module")
def pretrained_vit() -> nn.Module:
    model = _vit()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        x = _images(64, 100 + step)
        loss = F.cross_entropy(model(x), _labels(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _outside(state: dict[str, torch.Tensor], paths: list[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not any(k.startswith(p + ".") for p in paths)}


def _layernorms(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, nn.LayerNorm)]


@pytest.mark.parametrize("target", ["dyt", "derf", "frozen", "rms"])
def test_calibration_fits_each_layernorm_in_order_and_nothing_else(
    pretrained_vit: nn.Module, target: str
) -> None:
    model = copy.deepcopy(pretrained_vit)
    paths = _layernorms(model)
    before = _outside(snapshot(model), paths)
    result = convert_pretrained(
        model, target, _images(256, 0), replace="ln", distill_steps=0, reconstruct=0, progress=False
    )
    assert result.report.replace == ("ln",)
    assert len(result.report.converted) == len(paths) == 5
    fits = list(result.calibration)
    assert [f.path for f in fits] == paths  # execution order
    assert all(f.error_after < f.error_before for f in fits)
    after = _outside(snapshot(model), paths)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    for p in model.parameters():
        p.grad = None
    model(_images(4, 5)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("target", ["dyt", "derf", "frozen", "rms"])
def test_distillation_brings_a_vit_closer_than_the_copy(
    pretrained_vit: nn.Module, target: str
) -> None:
    model = copy.deepcopy(pretrained_vit)
    copied = copy.deepcopy(pretrained_vit)
    normswap.swap(copied, target, replace="ln")
    held, ood = _images(128, 1), _images(64, 2) * 2 + 1
    result = convert_pretrained(
        model,
        target,
        _images(512, 0),
        replace="ln",
        distill_steps=30,
        lr=3e-3,
        val_data=held,
        ood_data=ood,
        progress=False,
        reconstruct=0.0,
    )
    assert result.distillation.steps == 30
    assert result.fidelity == fidelity(model, pretrained_vit, held)
    assert result.ood_fidelity == fidelity(model, pretrained_vit, ood)
    assert result.fidelity.kl < fidelity(copied, pretrained_vit, held).kl


def test_frozen_from_layernorm_fits_a_scale_per_channel(pretrained_vit: nn.Module) -> None:
    model = copy.deepcopy(pretrained_vit)
    convert_pretrained(
        model, "frozen", _images(256, 0), replace="ln", distill_steps=0, reconstruct=0
    )
    frozen = [m for m in model.modules() if isinstance(m, normswap.FrozenAffine)]
    assert len(frozen) == 5 and all(m.center for m in frozen)
    # The LayerNorm's 1/std is now a fixed per-channel factor folded into the affine.
    assert all(not torch.allclose(m.weight, torch.ones_like(m.weight)) for m in frozen)


def test_progressive_from_layernorm_starts_at_the_teacher_and_ends_plain(
    pretrained_vit: nn.Module,
) -> None:
    model = copy.deepcopy(pretrained_vit)
    result = convert_pretrained(
        model,
        "dyt",
        _images(512, 0),
        replace="ln",
        distill_steps=20,
        lr=3e-3,
        val_data=_images(64, 1),
        progressive=0.5,
        progress=False,
    )
    checks = result.distillation.checks
    assert checks[0].alpha == 0.0 and checks[0].agreement == 1.0
    assert checks[-1].alpha == 1.0
    kinds = {type(m).__name__ for m in model.modules()}
    assert "DyT" in kinds and "BlendNorm" not in kinds and "LayerNorm" not in kinds


def test_rms_fold_needs_no_data_and_is_exact(pretrained_vit: nn.Module) -> None:
    model = copy.deepcopy(pretrained_vit)
    x = _images(32, 3)
    report = normswap.swap(model, "rms", replace="ln", center="fold", example_inputs=x[:2])
    assert report.counts()["LayerNorm -> RMSNorm"] == 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), pretrained_vit(x), atol=1e-5, rtol=1e-5)


def test_a_gpt2_converts_per_position() -> None:
    """HF GPT-2 (Conv1D projections, logits per position): calibrate + distill to DyT."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    reference = normswap.tiny_gpt(32, context=16, width=32, num_layers=2, num_heads=2).eval()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    model = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (256, 16), generator=g)
    held = torch.randint(0, 32, (32, 16), generator=g)
    result = convert_pretrained(
        model,
        "dyt",
        tokens,
        replace="ln",
        distill_steps=10,
        val_data=held,
        progress=False,
        reconstruct=0.0,
    )
    assert result.report.counts() == {"LayerNorm -> DyT": 5}
    assert len(result.calibration) == 5
    assert result.fidelity.samples == 32 * 16  # every position is a prediction
    assert result.fidelity.agreement > 0.5
