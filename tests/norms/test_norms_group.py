"""GroupNorm and the group-count policy, checked against torch.nn.GroupNorm and brute force."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from normswap.errors import NormSwapError, SpecError
from normswap.norms import GroupNorm, resolve_groups


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------- resolve_groups


def test_resolve_groups_keeps_a_dividing_request() -> None:
    assert resolve_groups(64) == (32, None)
    assert resolve_groups(64, num_groups=8) == (8, None)
    assert resolve_groups(48, group_size=16) == (3, None)


def test_resolve_groups_c45_uses_15_and_says_so() -> None:
    groups, note = resolve_groups(45, 32)
    assert groups == 15
    assert note == "32 groups do not divide 45 channels; using 15"


def test_resolve_groups_c921_uses_largest_divisor_below_request() -> None:
    groups, note = resolve_groups(921, 32)  # 921 = 3 * 307
    assert groups == 3
    assert note is not None and "921" in note and "using 3" in note


def test_resolve_groups_more_groups_than_channels_is_capped() -> None:
    groups, note = resolve_groups(16, 32)
    assert groups == 16
    assert note == "32 groups exceed 16 channels; using 16"


def test_resolve_groups_count_policy_matches_brute_force() -> None:
    for channels in [*range(1, 130), 921, 1024]:
        for requested in (1, 2, 3, 7, 16, 32, 64):
            groups, note = resolve_groups(channels, requested)
            expected = max(d for d in _divisors(channels) if d <= requested)
            assert (channels, requested, groups) == (channels, requested, expected)
            assert groups <= channels
            assert (note is None) == (channels % requested == 0)


def test_resolve_groups_size_policy_matches_brute_force() -> None:
    for channels in [*range(1, 130), 921, 1024]:
        for size in (1, 2, 3, 8, 16, 20, 200):
            groups, note = resolve_groups(channels, group_size=size)
            # Smallest group size >= the request that divides C (all of C when none does).
            sizes = [d for d in _divisors(channels) if d >= size] or [channels]
            assert (channels, size, channels // groups) == (channels, size, min(sizes))
            assert channels % groups == 0
            assert (note is None) == (channels % size == 0)


def test_resolve_groups_group_size_wins_and_is_reported() -> None:
    groups, note = resolve_groups(96, num_groups=32, group_size=20)
    assert groups == 4  # group size 24: the smallest >= 20 that divides 96
    assert note == "group size 20 does not divide 96 channels; using 4 groups of 24"


def test_resolve_groups_error_policy_lists_divisors() -> None:
    with pytest.raises(NormSwapError) as info:
        resolve_groups(45, 32, policy="error")
    message = str(info.value)
    assert "32 groups do not divide 45 channels" in message
    assert "1, 3, 5, 9, 15, 45" in message
    with pytest.raises(NormSwapError, match="valid group sizes for 45 channels: 1, 3, 5, 9, 15"):
        resolve_groups(45, group_size=16, policy="error")
    assert resolve_groups(48, 16, policy="error") == (16, None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_channels": 0}, "num_channels must be a positive int, got 0"),
        ({"num_channels": 12.0}, "num_channels must be a positive int"),
        ({"num_channels": 12, "num_groups": 0}, "num_groups must be a positive int, got 0"),
        ({"num_channels": 12, "num_groups": -4}, "num_groups must be a positive int"),
        ({"num_channels": 12, "num_groups": True}, "num_groups must be a positive int"),
        ({"num_channels": 12, "group_size": 2.5}, "group_size must be a positive int"),
        ({"num_channels": 12, "num_groups": None}, "give num_groups or group_size"),
        ({"num_channels": 12, "policy": "nearest"}, "valid policies: divisor, error"),
    ],
)
def test_resolve_groups_refuses_invalid_values(kwargs: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        resolve_groups(**kwargs)


# --------------------------------------------------------------------------- GroupNorm


@pytest.mark.parametrize("shape", [(3, 8, 5), (2, 8, 4, 5), (2, 8, 3, 4, 2)])
def test_group_norm_matches_torch(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    ours = GroupNorm(8, num_groups=4)
    ref = nn.GroupNorm(4, 8)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape) * 3 + 1
    assert_close(ours(x), ref(x))


def test_group_norm_is_channels_first_and_repr_shows_settings() -> None:
    norm = GroupNorm(64, 16, eps=1e-3, affine=False)
    assert (norm.num_channels, norm.num_groups, norm.eps) == (64, 16, 1e-3)
    assert norm.weight is None and norm.bias is None
    assert repr(norm) == "GroupNorm(num_channels=64, num_groups=16, eps=0.001, affine=False)"
    assert isinstance(norm, nn.GroupNorm)


def test_group_norm_refuses_non_dividing_groups_at_construction() -> None:
    with pytest.raises(NormSwapError, match="valid group counts for 45 channels: 1, 3, 5, 9, 15"):
        GroupNorm(45, 32)


def test_group_norm_refuses_one_element_per_group() -> None:
    norm = GroupNorm(4, num_groups=4)
    norm.normswap_path = "head.bn"
    with pytest.raises(NormSwapError) as info:
        norm(torch.randn(8, 4))
    message = str(info.value)
    assert message.startswith("head.bn: ")
    assert "(8, 4)" in message and "constant bias" in message and "fewer groups" in message
    # Two channels per group on (N, C) input is valid and agrees with torch.
    norm2 = GroupNorm(4, num_groups=2)
    x = torch.randn(8, 4)
    assert_close(norm2(x), nn.GroupNorm(2, 4)(x))


def test_group_norm_refuses_wrong_channels_naming_the_class() -> None:
    with pytest.raises(NormSwapError, match=r"GroupNorm was built for 8 channels .*\(2, 6, 4\)"):
        GroupNorm(8, 4)(torch.randn(2, 6, 4))
