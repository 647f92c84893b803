"""normswap.pretrained.calibrate: closed-form re-fitting of converted norms onto the reference
BatchNorms."""

from __future__ import annotations

import contextlib
import copy
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, run_ddp_script, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normswap
from normswap.errors import CalibrationError, NormSwapError
from normswap.inputs import iter_inputs
from normswap.pretrained.calibrate import CalibrationReport, calibrate
from normswap.pretrained.structure import converted_layers


class Tiny(nn.Module):
    """conv-BN-ReLU ×2, a residual BN, pooling and a linear head (every BN has its own stats)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x + self.bn3(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def _reference(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            c = bn.num_features
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 3)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            bn.num_batches_tracked.fill_(c)
    return model.eval()


def _data(n: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Per-sample brightness and contrast vary, as in real images: that is what per-sample
    # normalization removes and calibration must compensate.
    x = torch.randn(n, 3, 12, 12, generator=g)
    return x * torch.rand(n, 1, 1, 1, generator=g) * 2 + torch.randn(n, 1, 1, 1, generator=g)


def _converted(target: str, **overrides: object) -> tuple[nn.Module, nn.Module]:
    reference = _reference()
    model = copy.deepcopy(reference)
    normswap.swap(model, target, **overrides)
    return model, reference


def _capture(model: nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(p).register_forward_hook(
            lambda _m, _i, o, p=p: out.__setitem__(p, o.detach())
        )
        for p in paths
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


PATHS = ["bn1", "bn2", "bn3"]


def test_lstsq_fit_is_the_per_channel_least_squares_optimum():
    model, reference = _converted("gn", num_groups=4)
    x = _data()
    report = calibrate(model, reference, x, match="lstsq")
    # The first layer sees the same input in both models: check it against an independent
    # per-channel least-squares solve of  a·x̂ + b ≈ BN_ref(conv(x)).
    with torch.no_grad():
        h = reference.conv1(x)
        target = reference.bn1(h)
        xhat = nn.functional.group_norm(h, 4, eps=model.bn1.eps)
    for c in range(8):
        design = torch.stack([xhat[:, c].flatten(), torch.ones(xhat[:, c].numel())], 1).double()
        sol = torch.linalg.lstsq(design, target[:, c].flatten().double().unsqueeze(1)).solution
        torch.testing.assert_close(model.bn1.weight[c].double(), sol[0, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.bn1.bias[c].double(), sol[1, 0], rtol=1e-4, atol=1e-5)
    # Every layer: per-channel means land on the reference's (least squares with an intercept),
    # and the error went down.
    got, want = _capture(model, PATHS, x), _capture(reference, PATHS, x)
    for path in PATHS:
        torch.testing.assert_close(
            got[path].mean((0, 2, 3)), want[path].mean((0, 2, 3)), atol=1e-4, rtol=1e-4
        )
    assert [f.path for f in report] == PATHS
    assert all(f.error_after < f.error_before for f in report)
    assert all(f.error_after < 0.5 for f in report)


def test_moments_match_per_channel_mean_and_std():
    model, reference = _converted("ln")
    x = _data()
    calibrate(model, reference, x, match="moments")
    got, want = _capture(model, PATHS, x), _capture(reference, PATHS, x)
    for path in PATHS:
        for stat in (lambda t: t.mean((0, 2, 3)), lambda t: t.std((0, 2, 3))):
            torch.testing.assert_close(stat(got[path]), stat(want[path]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("target", "overrides"),
    [
        ("gn", {"num_groups": 4}),
        ("ln", {}),
        ("ln2d", {}),
        ("in", {}),
        ("adalin", {}),
        ("adaln", {"cond_dim": 3}),
        ("ws_gn", {"num_groups": 4}),
    ],
)
def test_every_target_gets_closer_to_the_reference(target: str, overrides: dict):
    model, reference = _converted(target, **overrides)
    x = _data(24)
    context = (
        normswap.condition(model, torch.randn(3)) if target == "adaln" else contextlib.nullcontext()
    )
    with context:
        with torch.no_grad():
            before = (model(x) - reference(x)).square().mean()
        report = calibrate(model, reference, list(x.split(8)))
        with torch.no_grad():
            after = (model(x) - reference(x)).square().mean()
    assert len(report) == 3
    assert all(f.error_after < f.error_before for f in report), str(report)
    assert after < 0.5 * before
    if target == "adalin":
        assert report[0].params == ("weight", "bias", "rho")
        rho = torch.cat([model.get_submodule(p).rho.detach() for p in PATHS])
        assert bool(((rho >= 0) & (rho <= 1)).all())
        assert not torch.allclose(rho, torch.full_like(rho, 0.9))


def test_calibration_keeps_parameter_objects_flags_and_grad_mode():
    model, reference = _converted("gn", num_groups=2)
    model.train()
    reference.train()
    params = [id(p) for p in model.parameters()]
    model.bn2.weight.requires_grad_(False)
    calibrate(model, reference, _data())
    assert [id(p) for p in model.parameters()] == params
    assert model.training and model.bn1.training and reference.training
    assert not model.bn2.weight.requires_grad
    assert model.bn1.weight.requires_grad
    assert torch.is_grad_enabled()
    # Reference untouched (its BN statistics were not updated by the passes).
    fresh = _reference()
    for (k, v), w in zip(reference.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_data_forms_give_the_same_fit():
    x = _data(16)
    y = torch.zeros(16, dtype=torch.long)
    forms = [
        list(x.split(8)),
        DataLoader(TensorDataset(x, y), batch_size=8),
        [(b, torch.zeros(8)) for b in x.split(8)],
    ]
    results = []
    for data in forms:
        model, reference = _converted("gn", num_groups=4)
        report = calibrate(model, reference, data)
        assert report.batches == 2 and report.samples == 16
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0])
    one = list(iter_inputs(x))
    assert len(one) == 1 and one[0] is x


def test_a_shared_norm_is_fitted_over_all_its_calls():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(self.bn(x)))

    torch.manual_seed(0)
    reference = Twice().eval()
    with torch.no_grad():
        reference.bn.running_mean.fill_(0.5)
        reference.bn.running_var.fill_(2.0)
    model = copy.deepcopy(reference)
    normswap.swap(model, "gn", num_groups=2)
    report = calibrate(model, reference, torch.randn(4, 4, 6, 6) * 3 + 1)
    assert len(report) == 1 and report[0].calls == 2
    assert report[0].error_after < report[0].error_before


def test_bad_input_is_refused_before_anything_changes():
    model, reference = _converted("gn", num_groups=4)
    before = snapshot(model)
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(model, reference, [])
    with pytest.raises(CalibrationError, match=r"cannot run on the calibration data.*\(5, 12\)"):
        calibrate(model, reference, torch.randn(5, 12))
    with pytest.raises(CalibrationError, match="DataLoader"):
        calibrate(model, reference, {"x": torch.randn(2, 3, 8, 8)})
    with pytest.raises(CalibrationError, match="model itself"):
        calibrate(model, model, _data())
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(CalibrationError, match="not the model before its swap"):
        calibrate(model, other, _data())
    shapes = _reference()
    shapes.fc = nn.Linear(16, 7)
    with pytest.raises(CalibrationError, match="'fc' has parameters of other shapes"):
        calibrate(model, shapes, _data())
    with pytest.raises(CalibrationError, match="passes"):
        calibrate(model, reference, _data(), passes=0)
    with pytest.raises(CalibrationError, match="match"):
        calibrate(model, reference, _data(), match="mse")
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert issubclass(CalibrationError, NormSwapError)


def test_layers_without_a_fitter_or_affine_are_refused():
    class Custom(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale.view(1, -1, 1, 1)

    model, reference = _converted("gn", num_groups=4)
    model.bn2 = Custom(16)
    before = snapshot(model)
    with pytest.raises(CalibrationError, match=r"no calibration fitter for 'bn2' \(Custom\)"):
        calibrate(model, reference, _data())
    model, reference = _converted("gn", num_groups=4)
    model.bn3 = normswap.GroupNorm(16, 4, affine=False)
    before = snapshot(model)
    with pytest.raises(CalibrationError, match="affine=False"):
        calibrate(model, reference, _data())
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_excluded_folded_and_removed_norms_are_left_alone():
    model, reference = _converted("gn", num_groups=4, exclude="bn3")
    assert list(converted_layers(model, reference)) == ["bn1", "bn2"]
    folded = copy.deepcopy(reference)
    normswap.swap(folded, "wn", example_inputs=_data(2))
    report = calibrate(folded, reference, _data())
    assert len(report) == 0 and report.skipped
    assert isinstance(report, CalibrationReport) and "0 layer(s)" in str(report)


def test_real_mobilenet_v2_sanity(mobilenet_v2_checkpoint: Path, fashion_mnist_dir: Path):
    """A handful of real images through the real checkpoint: every layer's error drops."""
    import torchvision

    from normswap.data import load_fashion_mnist, to_imagenet

    reference = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    model = copy.deepcopy(reference)
    normswap.swap(model, "gn")
    images, _ = load_fashion_mnist("train", limit=8, root=fashion_mnist_dir)
    x = to_imagenet(images, 64)
    report = calibrate(model, reference, x)
    assert len(report) == 52
    assert all(f.error_after < f.error_before for f in report)
    test, _ = load_fashion_mnist("test", limit=8, root=fashion_mnist_dir)
    xt = to_imagenet(test, 64)
    copied = copy.deepcopy(reference)
    normswap.swap(copied, "gn")
    with torch.no_grad():
        ref = reference(xt).log_softmax(-1)

        def kl(m: nn.Module) -> float:
            return float((ref.exp() * (ref - m(xt).log_softmax(-1))).sum(-1).mean())

        assert kl(model) < 0.85 * kl(copied)  # measured: 7.8 vs 10.8 at 64 px


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, copy, torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.path[:0] = [{tests!r}, {here!r}]
    import normswap
    from normswap.pretrained.calibrate import calibrate
    from test_calibrate import _reference, _data

    def worker(rank, init, out):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        reference = _reference()
        model = copy.deepcopy(reference)
        normswap.swap(model, "adalin")
        data = list(_data(16, seed=10 + rank).split(8))  # each rank its own data
        report = calibrate(model, reference, data)
        state = {{"state": model.state_dict(), "samples": report.samples}}
        torch.save(state, f"{{out}}/rank{{rank}}.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        out = sys.argv[1]
        mp.spawn(worker, args=(f"file://{{out}}/init", out), nprocs=2, join=True)
    """
)


@pytest.mark.ddp
def test_ddp_ranks_end_with_identical_parameters_fitted_to_all_ranks_data(tmp_path: Path):
    ranks = run_ddp_script(
        DDP_SCRIPT.format(tests=str(REPO_ROOT / "tests"), here=str(Path(__file__).parent)), tmp_path
    )
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    # Equal to one process calibrating on both ranks' data, batch by batch.
    reference = _reference()
    model = copy.deepcopy(reference)
    normswap.swap(model, "adalin")
    both = [
        torch.cat([a, b])
        for a, b in zip(_data(16, seed=10).split(8), _data(16, seed=11).split(8), strict=True)
    ]
    calibrate(model, reference, both)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, atol=1e-5, rtol=1e-5)
