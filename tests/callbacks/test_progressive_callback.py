"""NormSwap(progressive=...) in real Trainer runs: starts as the pretrained model, follows the
schedule, ends plain, resumes mid-ramp from a checkpoint, agrees across DDP ranks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import run_ddp
from swap_lit import LitClassifier, loader, trainer
from torch.utils.data import DataLoader, TensorDataset

import normswap
from normswap import NormSwapError, SpecError
from normswap.callbacks import NormSwap

HERE = Path(__file__).parent


class Record(pl.Callback):
    """After NormSwap set alpha: every step's alpha, and the model's output at step 0."""

    def __init__(self, probe: torch.Tensor) -> None:
        self.probe = probe
        self.alphas: list[float] = []
        self.first: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        layers = normswap.blend_layers(pl_module)
        self.alphas.append(float(layers[0].alpha) if layers else -1.0)
        if self.first is None:
            flags = [m.training for m in pl_module.modules()]
            pl_module.eval()
            with torch.no_grad():
                self.first = pl_module(self.probe)
            for m, flag in zip(pl_module.modules(), flags, strict=True):
                m.training = flag


def _pretrained(arch: str = "resnet18") -> LitClassifier:
    """A LightningModule whose BatchNorms hold non-trivial running statistics."""
    module = LitClassifier(arch)
    with torch.no_grad():
        module.train()
        for _ in range(3):
            module(torch.randn(8, 3, 64, 64) * 2 + 0.5)
    return module.eval()


def test_fit_starts_as_the_pretrained_model_and_ends_plain(tmp_path: Path) -> None:
    module = _pretrained()
    probe = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = module(probe)
    record = Record(probe)
    swap = NormSwap("gn", progressive={"end": 4, "shape": "linear"})
    trainer(tmp_path, max_steps=6, callbacks=[swap, record]).fit(module, loader())
    torch.testing.assert_close(record.first, expected, atol=1e-4, rtol=1e-4)
    assert record.alphas == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert not normswap.blend_layers(module)
    kinds = {type(m).__name__ for m in module.modules()}
    assert "GroupNorm" in kinds and "BlendNorm" not in kinds and "BatchNorm2d" not in kinds
    assert swap.state_dict()["progressive"] == {
        "end": 4,
        "start": 0,
        "shape": "linear",
        "finished": True,
    }


def test_calibrated_progressive_still_starts_exactly(tmp_path: Path) -> None:
    module = _pretrained()
    probe = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = module(probe)
    record = Record(probe)
    swap = NormSwap("gn", progressive=3, calibrate=True, calibrate_batches=2)
    trainer(tmp_path, max_steps=3, callbacks=[swap, record]).fit(module, loader())
    torch.testing.assert_close(record.first, expected, atol=1e-4, rtol=1e-4)
    assert record.alphas == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert not normswap.blend_layers(module)


def _same_batches() -> DataLoader:
    """Every batch the same: where Lightning resumes in the data cannot change the result
    (which batch a resumed epoch starts at is Lightning's business, not the schedule's)."""
    x, y = next(iter(loader(n=4, batch_size=4)))
    return DataLoader(TensorDataset(x.repeat(2, 1, 1, 1), y.repeat(2)), batch_size=4)


#: (arch, NormSwap arguments): a BatchNorm model to GroupNorm, a LayerNorm ViT to DyT.
RAMPS = {
    "bn->gn": ("tiny", {"spec": "gn", "num_groups": 4}),
    "ln->dyt": ("tiny_vit", {"spec": "dyt", "replace": "ln"}),
}


def _fit(
    tmp_path: Path,
    steps: int,
    ckpt: Path | None = None,
    save: Path | None = None,
    ramp: str = "bn->gn",
):
    torch.manual_seed(0)
    arch, options = RAMPS[ramp]
    module = LitClassifier(arch)
    swap = NormSwap(**options, progressive=4)
    record = Record(torch.zeros(1, 3, 64, 64))
    trainer_ = trainer(tmp_path, max_steps=steps, callbacks=[swap, record])
    with pytest.warns(UserWarning, match="before the schedule's end") if steps < 4 else _noop():
        trainer_.fit(module, _same_batches(), ckpt_path=ckpt)
    module.alphas = record.alphas
    if save is not None:
        trainer_.save_checkpoint(save)
    return module


class _noop:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("ramp", RAMPS)
def test_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path: Path, ramp: str) -> None:
    whole = _fit(tmp_path / "a", 6, ramp=ramp)
    ckpt = tmp_path / "mid.ckpt"
    half = _fit(tmp_path / "b", 2, save=ckpt, ramp=ramp)  # 2 of 4 ramp steps: still blended
    assert normswap.blend_layers(half)
    saved = torch.load(ckpt, weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("NormSwap"))
    assert state["progressive"]["finished"] is False
    assert any(k.endswith(".alpha") for k in saved["state_dict"])
    resumed = _fit(tmp_path / "c", 6, ckpt=ckpt, ramp=ramp)
    assert whole.alphas == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert half.alphas + resumed.alphas == whole.alphas
    assert not normswap.blend_layers(resumed)
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ramp", RAMPS)
def test_restore_rebuilds_an_unfinished_blend(tmp_path: Path, ramp: str) -> None:
    ckpt = tmp_path / "mid.ckpt"
    half = _fit(tmp_path / "b", 2, save=ckpt, ramp=ramp)
    fresh = LitClassifier(RAMPS[ramp][0])
    normswap.restore(fresh, ckpt)
    x = torch.randn(2, 3, 64, 64)
    half.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), half(x))
    assert float(normswap.blend_layers(fresh)[0].alpha) == 0.25  # set for the last step


def test_resume_with_another_schedule_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "mid.ckpt"
    _fit(tmp_path / "b", 2, save=ckpt)
    module = LitClassifier("tiny")
    swap = NormSwap("gn", num_groups=4, progressive=8)
    with pytest.raises(NormSwapError, match="progressive schedule"):
        trainer(tmp_path, max_steps=6, callbacks=[swap]).fit(
            module, _same_batches(), ckpt_path=ckpt
        )


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("soon", NormSwapError, "takes a BlendSchedule"),
        ({"end": 4, "ramp": 2}, NormSwapError, "unknown schedule field"),
        (0, SpecError, "must come after"),
        ({"end": 4, "shape": "step"}, SpecError, "linear or cosine"),
    ],
)
def test_bad_schedules_are_refused_at_construction(value, error, match) -> None:
    with pytest.raises(error, match=match):
        NormSwap("gn", progressive=value)


def test_families_that_cannot_blend_are_refused_before_training(tmp_path: Path) -> None:
    module = LitClassifier("tiny")
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(SpecError, match="no blend can undo"):
        trainer(
            tmp_path, max_steps=1, callbacks=[NormSwap("ws_gn", num_groups=4, progressive=2)]
        ).fit(module, loader())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_ddp_two_processes(tmp_path: Path) -> None:
    """2 CPU processes (gloo): the same alpha at every step on both ranks, identical final
    plain models."""
    ranks = run_ddp(HERE / "progressive_ddp_script.py", tmp_path, timeout=300, cwd=HERE)
    assert ranks[0]["alphas"] == ranks[1]["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert "BlendNorm" not in ranks[0]["kinds"] and "GroupNorm" in ranks[0]["kinds"]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
