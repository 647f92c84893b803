"""Parametrizations that change one module only (``normswap.norms.reparam``).

The first two tests pin the torch behaviour the module exists for and relies on: if an upgrade of
torch changes it, they fail and say what to revisit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import normswap
from normswap.journal import Journal
from normswap.norms.reparam import own_class, register_parametrization, remove_parametrizations
from normswap.norms.weight import WeightStandardization


def test_torch_deep_copies_share_the_parametrized_class_and_removal_breaks_the_other() -> None:
    """Why normswap gives a module its own class before changing its parametrizations. If this
    fails, torch no longer shares the class between copies: ``own_class`` is then no longer
    needed (it stays harmless)."""
    conv = torch_weight_norm(nn.Conv2d(2, 4, 3))
    twin = copy.deepcopy(conv)
    assert type(twin) is type(conv)
    parametrize.remove_parametrizations(twin, "weight")
    with pytest.raises(AttributeError, match="weight"):
        conv(torch.randn(1, 2, 5, 5))


def test_torch_changes_the_class_of_the_module_it_is_given() -> None:
    """What ``own_class`` relies on: torch registers and removes through ``type(module)`` and
    restores the class's first base when the last parametrization goes."""
    conv = torch_weight_norm(nn.Conv2d(2, 4, 3))
    own_class(conv)
    assert parametrize.type_before_parametrizations(conv) is nn.Conv2d
    parametrize.register_parametrization(conv, "bias", nn.Identity())
    assert isinstance(vars(type(conv))["bias"], property)
    parametrize.remove_parametrizations(conv, "bias")
    parametrize.remove_parametrizations(conv, "weight")
    assert type(conv) is nn.Conv2d


def test_own_class_keeps_what_the_module_is_and_computes() -> None:
    conv = normswap.weight_norm(nn.Conv2d(2, 4, 3))
    x = torch.randn(2, 2, 5, 5)
    expected = conv(x)
    shared = type(conv)
    own_class(conv)
    assert type(conv) is not shared
    assert type(conv).__name__ == shared.__name__ == "ParametrizedConv2d"
    assert type(conv).__qualname__ == shared.__qualname__
    assert isinstance(conv, nn.Conv2d)
    assert parametrize.type_before_parametrizations(conv) is nn.Conv2d
    assert sorted(vars(type(conv))) == sorted(vars(shared))
    assert torch.equal(conv(x), expected)
    assert list(conv.state_dict()) == [
        "bias",
        "parametrizations.weight.original0",
        "parametrizations.weight.original1",
    ]


def test_own_class_leaves_a_plain_module_alone() -> None:
    conv = nn.Conv2d(2, 4, 3)
    own_class(conv)
    assert type(conv) is nn.Conv2d


@pytest.mark.parametrize("changed", ["copy", "original"])
def test_removing_on_one_copy_keeps_the_other(changed: str) -> None:
    conv = normswap.weight_norm(nn.Conv2d(2, 4, 3))
    twin = copy.deepcopy(conv)
    x = torch.randn(1, 2, 5, 5)
    expected = conv(x)
    target, other = (twin, conv) if changed == "copy" else (conv, twin)
    remove_parametrizations(target, "weight")
    assert type(target) is nn.Conv2d
    assert torch.equal(other(x), expected)
    assert parametrize.is_parametrized(other, "weight")
    remove_parametrizations(other, "weight")  # and the other can be finalized in turn
    torch.testing.assert_close(other(x), expected)


def test_registering_on_a_parametrized_copy_keeps_the_original() -> None:
    conv = torch_weight_norm(nn.Linear(3, 4))
    twin = copy.deepcopy(conv)
    register_parametrization(twin, "bias", nn.Identity())
    assert "bias" not in vars(type(conv))
    assert isinstance(conv.bias, nn.Parameter)  # a plain parameter, not the twin's property
    conv(torch.randn(2, 3))


def test_a_rolled_back_change_leaves_the_copy_and_the_original_intact() -> None:
    model = nn.Sequential(torch_weight_norm(nn.Conv2d(2, 4, 3)))
    twin = copy.deepcopy(model)
    journal = Journal(twin)
    register_parametrization(twin[0], "bias", nn.Identity())
    journal.rollback()
    assert type(twin[0]) is type(model[0])
    assert sorted(vars(type(model[0]))) == sorted(vars(type(twin[0])))
    assert "bias" not in vars(type(twin[0]))


def test_weight_standardization_on_a_copy_of_a_parametrized_model() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3))
    register_parametrization(model[0], "weight", WeightStandardization())
    twin = copy.deepcopy(model)
    normswap.standardize_weight(twin[1])
    normswap.finalize(twin)
    x = torch.randn(1, 2, 7, 7)
    assert parametrize.is_parametrized(model[0], "weight")
    assert not parametrize.is_parametrized(model[1])
    model(x)
