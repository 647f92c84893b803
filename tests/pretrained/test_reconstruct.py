"""normswap.pretrained.reconstruct: block-wise reconstruction from the model's own inputs."""

from __future__ import annotations

import copy
import itertools
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, run_ddp_script
from torch import nn

import normswap
from normswap.errors import CalibrationError
from normswap.pretrained.calibrate import calibrate
from normswap.pretrained.reconstruct import find_blocks, reconstruct
from normswap.pretrained.structure import converted_layers


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TwoInputs(nn.Module):
    """A block with two tensor inputs: reconstruction must look inside it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + skip


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.stages = nn.Sequential(Residual(8), Residual(8), Residual(8))
        self.shared = nn.BatchNorm2d(8)  # called twice: in no block
        self.merge = TwoInputs(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.stages(x)
        x = self.shared(self.shared(x))
        x = self.merge(x, x)
        return self.head(x.mean((2, 3)))


def _pretrained(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _data(n: int = 96, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, 1, 1, generator=g) * 2 + 0.25  # per-image contrast varies
    return torch.randn(n, 3, 12, 12, generator=g) * scale


def _converted() -> tuple[Net, Net]:
    reference = _pretrained()
    model = copy.deepcopy(reference)
    normswap.swap(model, "gn", num_groups=2)
    calibrate(model, reference, list(_data(64).split(32)))
    return model, reference


def test_blocks_follow_the_module_tree_and_skip_what_cannot_be_a_block():
    model, reference = _converted()
    layers = list(converted_layers(model, reference))
    blocks, left_out = find_blocks(model, layers, _data(2), max_layers=2)
    # The stem holds one layer; each residual block two; the shared norm runs twice and the
    # two-input block is looked into (its norm alone is a block).
    assert blocks == ["stem", "stages.0", "stages.1", "stages.2", "merge.bn"]
    assert left_out == ["shared"]
    whole, _ = find_blocks(model, layers, _data(2), max_layers=6)
    assert whole == ["stem", "stages", "merge.bn"]


def _perturbed() -> tuple[Net, Net]:
    """A calibrated conversion whose middle block also had its conv weights damaged: an error
    that reconstruction can remove (the GroupNorm conversion's own error mostly cannot: what the
    per-sample statistics discard is gone, benchmarks/results/ood.md)."""
    model, reference = _converted()
    with torch.no_grad():
        conv = model.stages[1].conv1
        conv.weight.add_(
            torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.3
        )
    return model, reference


def test_reconstruction_lowers_block_errors_and_changes_nothing_else():
    model, reference = _perturbed()
    reference_state = {k: v.clone() for k, v in reference.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _data(128)
    report = reconstruct(model, reference, data, steps=200, lr=3e-3, max_layers=2, samples=128)
    paths = [b.path for b in report.blocks]
    assert paths == ["stem", "stages.0", "stages.1", "stages.2", "merge.bn"]
    assert report.left_out == ("shared",) and report.samples == 128
    for fit in report.blocks:
        assert fit.error_after <= fit.error_before
    # The damaged block comes back most of the way to the error of the undamaged conversion
    # (what reconstruction cannot remove: the per-sample statistics' loss).
    undamaged, _ = _converted()
    floor = reconstruct(undamaged, reference, data, steps=1, lr=1e-12, max_layers=2, samples=128)
    floor_error = floor.blocks[2].error_before
    damaged = report.blocks[2]
    assert damaged.error_before > floor_error + 0.03
    assert damaged.error_after - floor_error < 0.35 * (damaged.error_before - floor_error)
    # The reference is untouched; outside the blocks (the shared norm, the head) nothing moved.
    for k, v in reference.state_dict().items():
        assert torch.equal(v, reference_state[k]), k
    after = model.state_dict()
    for k in before:
        if not any(k.startswith(b.path + ".") for b in report.blocks):
            assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["stages.1.conv1.weight"], before["stages.1.conv1.weight"])
    # Every parameter still gets a gradient.
    model.train()
    model(data[:4]).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_reconstruction_brings_outputs_on_unseen_inputs_closer_to_the_original():
    model, reference = _perturbed()
    data, held = _data(128), _data(64, seed=7)

    def error(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(held) - reference(held)).norm() / reference(held).norm())

    floor = error(_converted()[0])  # the undamaged conversion
    damaged = error(model)
    reconstruct(model, reference, data, steps=200, lr=3e-3, max_layers=2, samples=128)
    assert damaged > floor + 0.005
    assert error(model) - floor < 0.35 * (damaged - floor)


def test_time_budget_shares_the_steps_out():
    model, reference = _converted()
    ticks = iter(range(10**6))
    report = reconstruct(
        model, reference, _data(64), max_seconds=40.0, clock=lambda: float(next(ticks)),
        max_layers=2,
    )  # fmt: skip
    assert all(b.steps >= 0 for b in report.blocks)
    assert report.seconds <= 60  # every tick of the fake clock is one "second"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps must be a positive int"),
        ({"batch_size": True}, "batch_size must be a positive int"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"max_seconds": -1.0}, "max_seconds must be a positive number"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(kwargs: dict, match: str):
    model, reference = _converted()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match=match):
        reconstruct(model, reference, _data(8), **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_empty_data_is_refused():
    model, reference = _converted()
    with pytest.raises(CalibrationError):
        reconstruct(model, reference, [])


def test_convert_pretrained_shares_its_budget_between_reconstruction_and_distillation():
    images = _data(96)
    for share, rebuilt, distilled in ((1.0, True, False), (0.0, False, True), (0.5, True, True)):
        model = _pretrained()
        ticks = itertools.count()  # a clock that is not the machine's load: one tick per call
        result = normswap.convert_pretrained(
            model, "gn", images, budget=150, reconstruct=share, num_groups=2, progress=False,
            distill_steps=None if share >= 1 else 10, batch_size=16,
            clock=lambda ticks=ticks: float(next(ticks)),
        )  # fmt: skip
        assert (result.reconstruction is not None) is rebuilt, share
        assert (result.distillation is not None) is distilled, share
        if rebuilt:
            assert not result.reconstruction.unreached
            assert "reconstruction:" in str(result)
        assert (result.to_dict()["reconstruction"] is None) is not rebuilt


@pytest.mark.parametrize("share", [-0.1, 1.5, True, "all"])
def test_convert_pretrained_refuses_a_bad_share(share: object):
    model = _pretrained()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match="reconstruct must be the share"):
        normswap.convert_pretrained(model, "gn", _data(16), reconstruct=share, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.path[:0] = [{tests!r}, {here!r}]
    from normswap.pretrained.reconstruct import reconstruct
    from test_reconstruct import _perturbed, _data

    def worker(rank, init, out):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        model, reference = _perturbed()
        if rank == 1:  # rank zero's parameters win
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        report = reconstruct(model, reference, _data(64, seed=30 + rank), steps=20, lr=3e-3,
                             max_layers=2, samples=64)
        torch.save({{"state": model.state_dict(), "steps": [b.steps for b in report.blocks]}},
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
    assert ranks[0]["steps"] == ranks[1]["steps"]
    initial = _perturbed()[0].state_dict()
    changed = False
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
        changed |= not torch.equal(value, initial[key])
    assert changed


def test_by_default_convert_pretrained_distills_and_does_not_reconstruct():
    result = normswap.convert_pretrained(
        _pretrained(), "gn", _data(64), num_groups=2, distill_steps=2, progress=False
    )
    assert result.reconstruction is None and result.distillation is not None


def test_only_the_samples_asked_for_are_run_and_never_all_at_once():
    model, reference = _converted()
    sizes: list[int] = []
    hook = reference.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        report = reconstruct(model, reference, _data(500), steps=1, samples=150, max_layers=2)
    finally:
        hook.remove()
    assert report.samples == 150
    assert max(sizes) <= 64 and sum(sizes) == 150 * len(report.blocks)
