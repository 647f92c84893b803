"""normswap.pretrained.convert: swap + calibrate + distill in one call."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import snapshot
from test_distill import _inputs, _teacher
from torch import nn

from normswap.errors import CalibrationError, SpecError
from normswap.pretrained.convert import ConversionResult, convert_pretrained
from normswap.pretrained.fidelity import fidelity


def test_gn_conversion_comes_back_to_the_original():
    model = _teacher()
    original = _teacher()
    held_out = _inputs(128, 3)
    result = convert_pretrained(
        model,
        "gn",
        _inputs(512, 2),
        budget=60,
        distill_steps=40,
        lr=3e-3,
        val_data=held_out,
        progress=False,
        num_groups=4,
        reconstruct=0.0,
    )
    assert isinstance(result, ConversionResult)
    assert result.report.counts() == {"BatchNorm2d -> GroupNorm": 2}
    assert result.report[0].groups == 4
    assert result.calibration is not None and len(result.calibration) == 2
    assert result.distillation is not None and result.distillation.steps <= 40
    assert result.fidelity is not None and result.fidelity.samples == 128
    assert result.fidelity.agreement > 0.9
    assert result.fidelity == fidelity(model, original, held_out)
    assert "fidelity, in-domain (held-out val_data)" in str(result)
    assert result.to_dict()["calibration"]["samples"] == 256


def test_wn_with_fold_is_exact_and_skips_the_data_driven_steps():
    model = _teacher()
    original = _teacher()
    x = _inputs(64, 3)
    result = convert_pretrained(model, "wn", _inputs(64, 2), val_data=x, progress=False)
    assert result.calibration is None and result.distillation is None
    assert result.fidelity is not None
    assert result.fidelity.agreement == 1.0 and result.fidelity.max_abs_diff < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-4, rtol=1e-4)


def test_budget_estimates_the_steps_and_training_flags_are_restored():
    model = _teacher().train()
    start = time.perf_counter()
    result = convert_pretrained(
        model,
        "ln",
        _inputs(256, 2),
        budget=3.0,
        clock=time.process_time,
        progress=False,
        reconstruct=0.0,
    )
    assert time.perf_counter() - start < 30
    assert result.distillation is not None and result.distillation.steps >= 1
    assert result.reconstruction is None
    assert model.training and all(m.training for m in model.modules())


def test_reconstruct_one_gives_the_whole_budget_to_block_wise_reconstruction():
    model = _teacher().train()
    original = _teacher()
    held_out = _inputs(128, 3)
    result = convert_pretrained(
        model, "gn", _inputs(256, 2), budget=3.0, clock=time.process_time, progress=False,
        val_data=held_out, num_groups=4, reconstruct=1.0,
    )  # fmt: skip
    assert result.distillation is None
    rebuilt = result.reconstruction
    assert rebuilt is not None and rebuilt.blocks and rebuilt.samples == 256
    assert all(b.error_after <= b.error_before for b in rebuilt.blocks)
    assert result.fidelity == fidelity(model, original, held_out)
    assert model.training and all(m.training for m in model.modules())


def test_bad_input_is_refused_before_the_model_changes():
    model = _teacher()
    before = snapshot(model)
    with pytest.raises(CalibrationError, match="cannot run"):
        convert_pretrained(model, "gn", torch.randn(8, 7), progress=False, num_groups=4)
    with pytest.raises(CalibrationError, match="empty"):
        convert_pretrained(model, "gn", [], progress=False, num_groups=4)
    with pytest.raises(CalibrationError, match="budget"):
        convert_pretrained(model, "gn", _inputs(8, 1), budget=0, progress=False)
    with pytest.raises(SpecError, match="unknown norm"):
        convert_pretrained(model, "batchnorm", _inputs(8, 1), progress=False)
    assert all(type(m) is not nn.GroupNorm for m in model.modules())
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_the_clock_measures_the_total_and_val_data_drives_early_stopping(monkeypatch):
    """``seconds`` is measured by the clock given (it was wall time whatever the clock), and
    ``val_data`` is what distillation checks agreement on (as documented)."""
    import normswap.pretrained.convert as convert

    ticks = iter(range(0, 10_000, 7))
    seen = {}
    original = convert.distill

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(convert, "distill", recording)
    teacher = _teacher()
    val = _inputs(32, 9)
    result = convert_pretrained(
        teacher,
        "gn",
        _inputs(128, 3),
        val_data=val,
        budget=5000,
        distill_steps=2,
        clock=lambda: float(next(ticks)),
        progress=False,
        num_groups=2,
        reconstruct=0.0,
    )
    assert seen["val_data"] is val
    assert result.seconds % 7 == 0 and result.seconds > 0  # a difference of the fake clock
    assert result.fidelity is not None and result.fidelity.samples == 32


def test_progressive_distillation_starts_at_the_teacher_and_ends_plain():
    model = _teacher()
    original = _teacher()
    result = convert_pretrained(
        model,
        "gn",
        _inputs(512, 2),
        budget=60,
        distill_steps=40,
        lr=3e-3,
        val_data=_inputs(128, 3),
        ood_data=_inputs(64, 9) * 3 + 2,
        progressive=0.5,
        progress=False,
        num_groups=4,
    )
    checks = result.distillation.checks
    assert checks[0].alpha == 0.0 and checks[0].agreement == 1.0  # the student is the teacher
    assert checks[-1].alpha == 1.0
    assert result.distillation.best_step > 0 and checks[-1].step <= 40
    kinds = {type(m).__name__ for m in model}
    assert "GroupNorm" in kinds and "BlendNorm" not in kinds
    assert result.fidelity.agreement > 0.9
    assert result.ood_fidelity == fidelity(model, original, _inputs(64, 9) * 3 + 2)
    text = str(result)
    assert "in-domain (held-out val_data)" in text and "out-of-domain (ood_data)" in text
    assert result.to_dict()["ood_fidelity"]["samples"] == 64


def test_progressive_without_distillation_is_the_calibrated_swap():
    model, plain, original = _teacher(), _teacher(), _teacher()
    data = _inputs(256, 2)
    convert_pretrained(
        model, "gn", data, distill_steps=0, progressive=1.0, progress=False, num_groups=4
    )
    convert_pretrained(
        plain, "gn", data, distill_steps=0, reconstruct=0, progress=False, num_groups=4
    )
    x = _inputs(16, 4)
    assert [type(m) for m in model] == [type(m) for m in plain]
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x), original(x), atol=1e-3)


def test_adapt_teacher_reestimates_the_statistics_first():
    from normswap import adapt_statistics

    model, adapted = _teacher(), _teacher()
    data = _inputs(256, 2) * 2 + 1
    adapt_statistics(adapted, data)
    result = convert_pretrained(
        model,
        "gn",
        data,
        distill_steps=0,
        reconstruct=0,
        adapt_teacher=True,
        val_data=_inputs(64, 3),
        progress=False,
        num_groups=4,
    )
    assert result.fidelity == fidelity(model, adapted, _inputs(64, 3))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"progressive": 1.5}, CalibrationError, "progressive must be a fraction"),
        ({"progressive": True}, CalibrationError, "progressive must be a fraction"),
        ({"adapt_teacher": "yes"}, CalibrationError, "adapt_teacher must be True or False"),
        ({"ood_data": torch.empty(0, 3, 8, 8)}, CalibrationError, "ood_data"),
        ({"progressive": 0.5, "spec": "ws_gn"}, SpecError, "no blend can undo"),
    ],
)
def test_bad_progressive_arguments_modify_nothing(kwargs, error, match):
    model = _teacher()
    before = snapshot(model)
    spec = kwargs.pop("spec", "gn")
    with pytest.raises(error, match=match):
        convert_pretrained(model, spec, _inputs(64, 2), progress=False, num_groups=4, **kwargs)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_ten_distillation_steps_run() -> None:
    """Regression: a 10-step one-cycle schedule at 10% warm-up divided by zero in torch."""
    model = _teacher()
    result = convert_pretrained(
        model, "gn", _inputs(64, 2), distill_steps=10, progress=False, num_groups=4, reconstruct=0.0
    )
    assert result.distillation.steps == 10


def test_augment_reaches_every_distillation_batch() -> None:
    seen: list[tuple[int, ...]] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x

    result = convert_pretrained(
        _teacher(),
        "gn",
        _inputs(64, 2),
        distill_steps=6,
        augment=record,
        progress=False,
        num_groups=4,
        reconstruct=0.0,
    )
    assert result.distillation.steps == 6
    assert len(seen) == 6 and all(len(s) == 4 for s in seen)
