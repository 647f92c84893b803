"""InstanceNorm against torch.nn.InstanceNorm*d and GroupNorm(C, C); running stats too."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from normswap.errors import NormSwapError
from normswap.norms import InstanceNorm


def _randomized(norm: InstanceNorm) -> InstanceNorm:
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


@pytest.mark.parametrize(
    ("shape", "reference"),
    [
        ((3, 6, 7), nn.InstanceNorm1d),
        ((2, 6, 4, 5), nn.InstanceNorm2d),
        ((2, 6, 3, 2, 4), nn.InstanceNorm3d),
    ],
)
def test_instance_norm_matches_torch_and_group_norm(
    shape: tuple[int, ...], reference: type[nn.Module]
) -> None:
    torch.manual_seed(0)
    norm = _randomized(InstanceNorm(6, eps=1e-4))
    ref = reference(6, eps=1e-4, affine=True)
    gn = nn.GroupNorm(6, 6, eps=1e-4)
    ref.load_state_dict(norm.state_dict())
    gn.load_state_dict(norm.state_dict())
    x = torch.randn(shape) * 2 + 1
    out = norm(x)
    assert_close(out, ref(x))
    assert_close(out, gn(x))
    norm.eval()  # without running stats, eval still uses instance statistics
    assert_close(norm(x), out)


def test_instance_norm_state_dict_names_match_batch_norm() -> None:
    tracked = InstanceNorm(4, track_running_stats=True)
    assert set(tracked.state_dict()) == set(nn.BatchNorm2d(4).state_dict())
    assert set(InstanceNorm(4).state_dict()) == {"weight", "bias"}
    assert repr(InstanceNorm(4)) == (
        "InstanceNorm(4, eps=1e-05, momentum=0.1, affine=True, track_running_stats=False)"
    )


def test_instance_norm_running_stats_match_torch() -> None:
    torch.manual_seed(0)
    norm = _randomized(InstanceNorm(5, momentum=0.3, track_running_stats=True))
    ref = nn.InstanceNorm2d(5, momentum=0.3, affine=True, track_running_stats=True)
    ref.load_state_dict(norm.state_dict())
    for _ in range(3):
        x = torch.randn(4, 5, 6, 6) * 3 + 2
        assert_close(norm(x), ref(x))
    assert_close(norm.running_mean, ref.running_mean)
    assert_close(norm.running_var, ref.running_var)
    assert int(norm.num_batches_tracked) == 3
    assert not torch.equal(norm.running_mean, torch.zeros(5))
    norm.eval()
    ref.eval()
    x = torch.randn(2, 5, 1, 1)  # one spatial element is fine with running statistics
    assert_close(norm(x), ref(x))
    x = torch.randn(2, 5, 3, 3)
    assert_close(norm(x), ref(x))


def test_instance_norm_momentum_none_is_a_cumulative_average() -> None:
    torch.manual_seed(0)
    norm = InstanceNorm(3, momentum=None, track_running_stats=True)
    batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(3)]
    for x in batches:
        norm(x)
    means = torch.stack([x.mean(dim=(2, 3)).mean(0) for x in batches])
    variances = torch.stack([x.var(dim=(2, 3), correction=1).mean(0) for x in batches])
    assert_close(norm.running_mean, means.mean(0))
    assert_close(norm.running_var, variances.mean(0))


def test_instance_norm_refuses_nc_input() -> None:
    norm = InstanceNorm(4)
    norm.normswap_path = "fc.bn"
    with pytest.raises(
        NormSwapError, match=r"^fc\.bn: InstanceNorm expects input of shape .*\(8, 4\)"
    ):
        norm(torch.randn(8, 4))


@pytest.mark.parametrize("track", [False, True])
def test_instance_norm_refuses_single_spatial_element_with_instance_stats(track: bool) -> None:
    norm = InstanceNorm(4, track_running_stats=track)
    with pytest.raises(NormSwapError) as info:
        norm(torch.randn(2, 4, 1, 1))
    message = str(info.value)
    assert "(2, 4, 1, 1)" in message and "constant bias" in message and "LayerNorm" in message


def test_instance_norm_refuses_bad_momentum() -> None:
    with pytest.raises(NormSwapError, match="momentum must be a float in"):
        InstanceNorm(4, momentum=1.5)
