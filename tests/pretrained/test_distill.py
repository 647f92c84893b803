"""normswap.pretrained.distill: self-distillation of a converted model back to its teacher, and
fidelity."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, run_ddp_script, snapshot
from torch import nn

import normswap
from normswap.errors import CalibrationError
from normswap.pretrained.calibrate import calibrate
from normswap.pretrained.distill import DistillReport, distill, hflip
from normswap.pretrained.fidelity import Fidelity, fidelity
from normswap.progressive import BlendSchedule


def _teacher(seed: int = 0) -> nn.Module:
    """A small CNN classifier whose BatchNorms hold non-trivial running statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _inputs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return x * torch.rand(n, 1, 1, 1, generator=g) * 2 + torch.randn(n, 1, 1, 1, generator=g)


def _student(teacher: nn.Module, calibrated: bool = True) -> nn.Module:
    student = copy.deepcopy(teacher)
    normswap.swap(student, "gn", num_groups=4)
    if calibrated:
        calibrate(student, teacher, _inputs(64, seed=5))
    return student


def test_fidelity_of_identical_and_different_models():
    teacher = _teacher()
    x = _inputs(32, 1)
    same = fidelity(teacher, copy.deepcopy(teacher), list(x.split(8)))
    assert same == Fidelity(1.0, same.kl, 0.0, 32) and abs(same.kl) < 1e-6
    other = fidelity(_student(teacher, calibrated=False), teacher, x)
    assert other.samples == 32 and other.kl > 0 and other.max_abs_diff > 0
    assert "agreement" in str(other)
    with pytest.raises(CalibrationError, match=r"logits of shape \(N, classes\)"):
        fidelity(nn.Flatten(0), teacher, x)


def test_distillation_improves_agreement_within_a_bounded_number_of_steps():
    teacher = _teacher()
    student = _student(teacher, calibrated=False)  # γ/β copied: agreement about 10%
    train, held_out = _inputs(512, seed=2), _inputs(256, seed=3)
    before = fidelity(student, teacher, held_out)
    report = distill(
        student,
        teacher,
        train,
        steps=50,
        lr=3e-3,
        batch_size=32,
        val_data=held_out[:128],
        eval_every=25,
        patience=10,
        progress=False,
    )
    after = fidelity(student, teacher, held_out)
    assert isinstance(report, DistillReport) and report.steps <= 150
    assert after.kl < 0.5 * before.kl
    assert before.agreement < 0.5 and after.agreement > 0.9, (before, after)
    # The kept parameters are those of the best check.
    assert fidelity(student, teacher, held_out[:128]).agreement == report.best.agreement
    assert report.samples_seen == report.steps * 32
    assert report.to_dict()["checks"][0]["step"] == 0 and "agreement" in str(report)


def test_feature_loss_trains_and_requires_the_pre_swap_teacher():
    teacher = _teacher()
    student = _student(teacher)
    held_out = _inputs(128, seed=3)
    before = fidelity(student, teacher, held_out).kl
    distill(
        student,
        teacher,
        _inputs(256, seed=2),
        steps=60,
        lr=3e-3,
        feature_weight=1.0,
        val_data=held_out,
        eval_every=30,
        progress=False,
    )
    assert fidelity(student, teacher, held_out).kl < before
    stranger = nn.Sequential(nn.Flatten(), nn.Linear(192, 10))
    with pytest.raises(CalibrationError, match="not the model before its swap"):
        distill(student, stranger, _inputs(64, 2), steps=5, feature_weight=1.0, progress=False)


def test_early_stop_and_time_budget():
    teacher = _teacher()
    student = _student(teacher)
    report = distill(
        student,
        teacher,
        _inputs(256, 2),
        steps=400,
        lr=1e-9,  # nothing can improve
        eval_every=5,
        patience=2,
        progress=False,
    )
    assert report.stopped == "no improvement in 2 checks" and report.steps == 10
    assert report.best_step == 0
    timed = distill(
        _student(teacher), teacher, _inputs(256, 2), steps=100_000, max_seconds=1.5, progress=False
    )
    assert timed.stopped == "time budget" and timed.seconds < 10


def test_iterables_of_batches_and_labels():
    teacher = _teacher()
    student = _student(teacher)
    x = _inputs(96, 2)
    batches = [(b, torch.zeros(len(b))) for b in x.split(16)]
    report = distill(student, teacher, batches, steps=8, eval_every=4, progress=False)
    assert report.steps == 8 and report.samples_seen == 8 * 16  # 5 training batches, cycled


def test_bad_input_is_refused_before_training():
    teacher = _teacher()
    student = _student(teacher)
    before = snapshot(student)
    x = _inputs(64, 2)
    with pytest.raises(CalibrationError, match="empty"):
        distill(student, teacher, [], steps=5, val_data=x, progress=False)
    with pytest.raises(CalibrationError, match="cannot run on the distillation data"):
        distill(student, teacher, torch.randn(64, 5), steps=5, progress=False)
    with pytest.raises(CalibrationError, match="steps"):
        distill(student, teacher, x, steps=0, progress=False)
    with pytest.raises(CalibrationError, match="teacher is the model itself"):
        distill(student, student, x, steps=5, progress=False)
    with pytest.raises(CalibrationError, match="only one"):
        distill(student, teacher, [x], steps=5, progress=False)
    for key, value in before.items():
        assert torch.equal(student.state_dict()[key], value), key


def test_hflip_flips_about_half():
    torch.manual_seed(0)
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(64, 3, 2, 4).contiguous()
    y = hflip(x)
    flipped = (y[:, 0, 0, 0] == 3).float().mean()
    assert 0.2 < flipped < 0.8
    assert torch.equal(hflip(torch.ones(3, 4)), torch.ones(3, 4))


@pytest.mark.parametrize(
    "x",
    [
        torch.arange(64).view(4, 16),  # token ids
        torch.arange(4 * 8 * 6.0).view(4, 8, 6),  # (N, T, C) embeddings
        torch.arange(4 * 3 * 5 * 5).view(4, 3, 5, 5),  # integer images
    ],
    ids=["tokens", "sequence", "integer"],
)
def test_hflip_leaves_what_is_not_a_float_image_batch_alone(x):
    torch.manual_seed(0)
    assert torch.equal(hflip(x), x)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.path[:0] = [{tests!r}, {here!r}]
    from normswap.pretrained.distill import distill
    from test_distill import _teacher, _student, _inputs

    def worker(rank, init, out):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        teacher = _teacher()
        student = _student(teacher)
        report = distill(student, teacher, _inputs(128, seed=20 + rank), steps=12,
                         eval_every=4, patience=10, progress=False)
        torch.save({{"state": student.state_dict(), "best": report.best_step}},
                   f"{{out}}/rank{{rank}}.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        out = sys.argv[1]
        mp.spawn(worker, args=(f"file://{{out}}/init", out), nprocs=2, join=True)
    """
)


@pytest.mark.ddp
def test_ddp_ranks_end_with_identical_parameters(tmp_path: Path):
    ranks = run_ddp_script(
        DDP_SCRIPT.format(tests=str(REPO_ROOT / "tests"), here=str(Path(__file__).parent)), tmp_path
    )
    assert ranks[0]["best"] == ranks[1]["best"]
    changed = False
    initial = _student(_teacher()).state_dict()
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
        changed |= not torch.equal(value, initial[key])
    assert changed or ranks[0]["best"] == 0


def test_blend_needs_a_student_with_blends():
    teacher = _teacher()
    student = _student(teacher)
    with pytest.raises(CalibrationError, match="swap_progressive"):
        distill(student, teacher, _inputs(64, 1), steps=2, blend=BlendSchedule(end=2))


def test_report_says_what_its_agreement_was_measured_on():
    teacher = _teacher()
    own = distill(
        _student(teacher), teacher, _inputs(128, 1), steps=2, eval_every=1, progress=False
    )
    given = distill(
        _student(teacher),
        teacher,
        _inputs(128, 1),
        steps=2,
        eval_every=1,
        val_data=_inputs(32, 2),
        progress=False,
    )
    assert own.holdout == "held out from data" and given.holdout == "val_data"
    assert "(in-domain)" in str(own) and own.to_dict()["holdout"] == "held out from data"
