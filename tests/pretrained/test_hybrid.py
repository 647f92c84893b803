"""Hybrid conversion: per-layer costs, and frozen where conversion costs most."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import pretrained_cnn, snapshot

import normswap
from normswap import CalibrationError, LayerCost, conversion_costs, hybrid_swap
from normswap.pretrained.fidelity import fidelity


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g) * 1.5 + 0.5


def test_costs_are_single_layer_conversions_costliest_first():
    model = pretrained_cnn()
    before = snapshot(model)
    data = _data(64, 1)
    costs = conversion_costs(model, "gn", data, num_groups=4)
    assert sorted(c.path for c in costs) == ["1", "4"]
    assert costs[0].kl >= costs[1].kl
    for cost in costs:  # the figure is what converting that layer alone gives
        single = copy.deepcopy(model)
        normswap.swap(single, "gn", include=cost.path, num_groups=4)
        normswap.calibrate(single, model, data)
        f = fidelity(single, model, data)
        assert cost.kl == pytest.approx(f.kl) and cost.agreement == pytest.approx(f.agreement)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_hybrid_freezes_the_costliest_and_converts_the_rest():
    model = pretrained_cnn()
    reference = copy.deepcopy(model)
    costs = [LayerCost("4", 2.0, 0.3), LayerCost("1", 0.5, 0.8)]
    frozen, converted = hybrid_swap(model, "gn", costs, frozen=1, num_groups=4)
    assert frozen.counts()["BatchNorm2d -> FrozenAffine"] == 1
    assert converted.counts()["BatchNorm2d -> GroupNorm"] == 1
    assert type(model[4]) is normswap.FrozenAffine and type(model[1]) is normswap.GroupNorm
    x = _data(4, 2)
    # The frozen layer computes what the BatchNorm computed in eval mode.
    with torch.no_grad():
        mid = reference[:4](x)
        torch.testing.assert_close(model[4](mid), reference[4](mid), atol=1e-5, rtol=1e-5)
    first, second = hybrid_swap(pretrained_cnn(), "gn", costs, frozen=0, num_groups=4)
    assert first is None and second.counts() == {"BatchNorm2d -> GroupNorm": 2}


@pytest.mark.parametrize("frozen", [-1, 3, 1.5, True])
def test_bad_frozen_count_modifies_nothing(frozen):
    model = pretrained_cnn()
    before = snapshot(model)
    costs = [LayerCost("4", 2.0, 0.3), LayerCost("1", 0.5, 0.8)]
    with pytest.raises(CalibrationError, match="frozen must be an int from 0 to 2"):
        hybrid_swap(model, "gn", costs, frozen=frozen, num_groups=4)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_no_layer_to_convert_is_refused():
    with pytest.raises(CalibrationError, match="no BatchNorm"):
        conversion_costs(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), "gn", _data(4, 0))
