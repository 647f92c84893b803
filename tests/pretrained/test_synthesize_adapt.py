"""Data-free conversion (synthesize) and AdaBN (adapt_statistics)."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, run_ddp_script, snapshot
from test_distill import _inputs, _teacher
from torch import nn

import normswap
from normswap import CalibrationError, adapt_statistics, statistics_gap, synthesize
from normswap.pretrained.fidelity import fidelity


def _layer_gaps(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Per BatchNorm: relative distance of x's batch statistics from the running ones."""
    gaps, hooks = [], []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):

            def hook(mod, inputs, out):
                y = inputs[0].double()
                mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
                rm, rv = mod.running_mean.double(), mod.running_var.double()
                gaps.append(
                    float(((mean - rm).norm() + (var - rv).norm()) / (rm.norm() + rv.norm()))
                )

            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return gaps


def _domain(n: int, seed: int) -> torch.Tensor:
    """The inputs the 'pretrained' teacher's statistics come from."""
    return _inputs(n, seed) * 1.5 + 0.7


def _pretrained() -> nn.Module:
    """A teacher whose running statistics are those of its training domain (as after
    pretraining; random running statistics need not be reachable by any input)."""
    model = _teacher()
    adapt_statistics(model, _domain(512, 11))
    return model


def test_synthesized_statistics_approach_the_running_statistics():
    model = _pretrained()
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    noise = torch.randn(32, 3, 8, 8)
    short = synthesize(model, 32, 8, steps=5, batch_size=32, seed=1)
    images = synthesize(model, 32, 8, steps=150, batch_size=32, seed=1)
    assert images.shape == (32, 3, 8, 8)
    # Every layer's statistics end closer to its running statistics than noise's, and the
    # gap keeps shrinking with more steps.
    for layer_gap, noise_gap, data_gap in zip(
        _layer_gaps(model, images),
        _layer_gaps(model, noise),
        _layer_gaps(model, _domain(32, 12)),
        strict=True,
    ):
        assert layer_gap < 0.2 * noise_gap
        assert layer_gap < data_gap  # as close as a real batch of the domain, or closer
    assert statistics_gap(model, images) < statistics_gap(model, short)
    assert statistics_gap(model, images) < 0.25 * statistics_gap(model, noise)
    # The model is used, not changed.
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_data_free_conversion_beats_copying():
    teacher = _pretrained()
    images = synthesize(teacher, 256, 8, steps=100, batch_size=64)
    copied, converted = copy.deepcopy(teacher), copy.deepcopy(teacher)
    normswap.swap(copied, "gn", num_groups=4)
    normswap.convert_pretrained(
        converted, "gn", images, distill_steps=60, lr=3e-3, progress=False, num_groups=4
    )
    held_out = _domain(256, 7)  # real inputs of the domain, never seen
    assert (
        fidelity(converted, teacher, held_out).agreement
        > fidelity(copied, teacher, held_out).agreement + 0.1
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"samples": 0}, "samples must be a positive int"), ({"steps": 1.5}, "steps must be")],
)
def test_synthesize_bad_arguments(kwargs, match):
    args = {"samples": 4, "steps": 2} | kwargs
    with pytest.raises(CalibrationError, match=match):
        synthesize(_teacher(), args.pop("samples"), 8, **args)
    with pytest.raises(CalibrationError, match="no BatchNorm with running statistics"):
        synthesize(nn.Sequential(nn.Conv2d(3, 3, 1)), 4, 8)


def test_adapt_statistics_equals_the_data_statistics():
    model = _teacher()
    before = snapshot(model)
    model.train()  # flags restored afterwards
    data = torch.randn(128, 3, 8, 8) * 2 + 1
    assert adapt_statistics(model, data, batch_size=32) == 128
    bn = model[1]
    y = model[0](data).double()
    torch.testing.assert_close(bn.running_mean.double(), y.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    # Cumulative average of each batch's unbiased variance (what BatchNorm accumulates).
    per_batch = torch.stack([b.var((0, 2, 3), unbiased=True) for b in y.split(32)])
    torch.testing.assert_close(bn.running_var.double(), per_batch.mean(0), atol=1e-4, rtol=1e-4)
    assert bn.momentum == 0.1 and all(m.training for m in model.modules())
    others = [k for k in before if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in others)


def test_adapt_statistics_errors_restore_the_model():
    model = _teacher()
    before = snapshot(model)
    with pytest.raises(CalibrationError):
        adapt_statistics(model, torch.empty(0, 3, 8, 8))
    with pytest.raises(CalibrationError, match="no BatchNorm"):
        adapt_statistics(nn.Sequential(nn.Conv2d(3, 3, 1)), torch.randn(4, 3, 8, 8))

    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.calls = _teacher(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("interrupted")
            return self.net(x)

    boom = Boom()
    boom.net.load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="interrupted"):
        adapt_statistics(boom, torch.randn(64, 3, 8, 8), batch_size=32)
    for k, v in before.items():
        assert torch.equal(boom.net.state_dict()[k], v), k
    assert boom.net[1].momentum == 0.1


def test_adapt_statistics_pools_ranks(tmp_path: Path):
    """2 gloo processes with different data and counts: both hold the pooled statistics."""
    script = textwrap.dedent(
        f"""
        import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
        sys.path.insert(0, {str(REPO_ROOT / "tests")!r})
        sys.path.insert(0, {str(REPO_ROOT / "tests" / "pretrained")!r})
        from test_distill import _teacher
        from normswap import adapt_statistics

        def data(rank):
            g = torch.Generator().manual_seed(rank)
            return torch.randn(32 * (rank + 1), 3, 8, 8, generator=g) * (rank + 1) + 3 * rank

        def main(rank, out):
            dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533",
                                    rank=rank, world_size=2)
            model = _teacher()
            adapt_statistics(model, data(rank), batch_size=1000)
            bn = model[1]
            state = {{"mean": bn.running_mean, "var": bn.running_var}}
            torch.save(state, f"{{out}}/rank{{rank}}.pt")
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.spawn(main, args=(sys.argv[1],), nprocs=2)
        """
    )
    ranks = run_ddp_script(script, tmp_path)
    torch.testing.assert_close(ranks[0]["mean"], ranks[1]["mean"])
    torch.testing.assert_close(ranks[0]["var"], ranks[1]["var"])
    # The reference: all samples of both ranks in one pass (each rank one batch here).
    conv = _teacher()[0]
    g = [torch.Generator().manual_seed(r) for r in (0, 1)]
    x = [torch.randn(32 * (r + 1), 3, 8, 8, generator=g[r]) * (r + 1) + 3 * r for r in (0, 1)]
    with torch.no_grad():
        y = torch.cat([conv(v) for v in x]).double()
    torch.testing.assert_close(ranks[0]["mean"].double(), y.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    # Each rank's variance is unbiased within the rank, so the pooled value is close to, not
    # exactly, the pooled sample variance.
    torch.testing.assert_close(
        ranks[0]["var"].double(), y.var((0, 2, 3), unbiased=False), atol=0.05, rtol=0.02
    )
