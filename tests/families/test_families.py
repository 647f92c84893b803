"""Every registered norm family is complete, and the registries share one convention.

A family is complete when its spec builds by name, its target converts a model, every layer it
builds has a calibration fitter (or the family builds no norm layer: ``wn``) and a monitor family,
and ``conf/norm/<name>.yaml`` says exactly what the spec's defaults say.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from families_matrix import FAMILIES, options
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

import normswap
from normswap import Family, SpecError
from normswap.families import FAMILIES as REGISTRY
from normswap.families import family_layers, get_family, register_family, unregister_family
from normswap.families.gn import GroupNormSpec, GroupNormTarget
from normswap.monitor.families import MONITOR_FAMILIES, family_of
from normswap.pretrained.fitters import FITTERS, AffineFitter, find_fitter
from normswap.specs import SPECS

CONF_NORM = Path(__file__).resolve().parents[2] / "conf" / "norm"
CALLBACK_KEYS = {"spec", "include", "exclude", "calibrate", "calibrate_batches"}


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_is_complete(name: str) -> None:
    family = get_family(name)
    spec = family.example_spec()
    assert family.name == name == spec.name == family.target.name
    assert normswap.get_spec(name, **family.example) == spec
    assert family.summary, "the spec's docstring says what the family is"
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    if family.target.needs_eval_mode(spec):
        model.eval()
    report = normswap.swap(model, spec, example_inputs=x)
    assert report.converted, "the family converts something"
    new = [m for m in model.modules() if isinstance(m, family_layers())]
    reparameterized = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
    assert new or reparameterized, "the family builds layers or reparameterizes them"
    for layer in new:
        assert find_fitter(layer) is not None, f"{type(layer).__name__} has no fitter"
        assert family_of(layer) is not None, f"{type(layer).__name__} has no monitor family"
    if family.layers:
        assert family.fitter is not None
        assert all(family_of(m) == family.monitor for m in new if isinstance(m, family.layers))
    for layer in reparameterized:
        if normswap.norms.is_weight_parametrized(layer, "weight_norm"):
            assert family_of(layer) == "wn"


@pytest.mark.parametrize("name", FAMILIES)
def test_conf_norm_file_says_what_the_spec_says(name: str) -> None:
    path = CONF_NORM / f"{name}.yaml"
    assert path.is_file(), f"add conf/norm/{name}.yaml for the {name!r} family"
    node = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(node, dict)
    assert node.pop("defaults") == [f"{name}_schema", "_self_"]
    assert node.pop("spec") == name
    for key in CALLBACK_KEYS - {"spec"}:
        node.pop(key, None)
    defaults = get_family(name).defaults()
    defaults |= dict(get_family(name).example)
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    assert node == expected, f"conf/norm/{name}.yaml drifted from {get_family(name).spec}"


def test_conf_norm_holds_bn_and_every_family() -> None:
    assert sorted(p.stem for p in CONF_NORM.glob("*.yaml")) == sorted(["bn", *FAMILIES])


def test_normswap_list_shows_every_family() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "normswap.cli", "list"], capture_output=True, text=True, check=True
    ).stdout
    for name in FAMILIES:
        assert f"{name} " in out and get_family(name).summary in out


# --------------------------------------------------------------------------- one convention


def test_registries_refuse_duplicates_naming_the_holder() -> None:
    with pytest.raises(SpecError, match=r"norm family 'gn' is already registered"):
        register_family(Family("gn", GroupNormSpec, GroupNormTarget()))
    with pytest.raises(SpecError, match=r"calibration fitter GroupNorm is already registered"):
        normswap.register_fitter(nn.GroupNorm)(AffineFitter)
    with pytest.raises(SpecError, match=r"source norm adapter _BatchNorm is already"):
        normswap.register_source(nn.modules.batchnorm._BatchNorm)(lambda m: m)
    with pytest.raises(SpecError, match=r"monitored norm class GroupNorm is already registered"):
        normswap.register_monitor_family(nn.GroupNorm, "other")


def test_unknown_names_list_the_valid_ones_exactly_as_given() -> None:
    valid = ", ".join(FAMILIES)
    with pytest.raises(SpecError, match=f"unknown norm 'GN'; choose one of: {valid}"):
        normswap.get_spec("GN")  # names are used as given: no lowercasing anywhere
    with pytest.raises(SpecError, match=f"unknown norm family 'nope'; choose one of: {valid}"):
        get_family("nope")


def test_register_family_is_all_or_nothing() -> None:
    """A family whose layer class already has a fitter registers no part of itself."""

    @dataclasses.dataclass(frozen=True)
    class ClashSpec(GroupNormSpec):
        """A family that claims torch's GroupNorm, which gn owns."""

    clash = Family(
        "clash", ClashSpec, GroupNormTarget(), layers=(nn.GroupNorm,), fitter=AffineFitter()
    )
    sizes = [len(r) for r in (REGISTRY, SPECS, FITTERS, MONITOR_FAMILIES)]
    with pytest.raises(SpecError, match="already registered"):
        register_family(clash)
    assert [len(r) for r in (REGISTRY, SPECS, FITTERS, MONITOR_FAMILIES)] == sizes
    assert "clash" not in normswap.list_norms()
    with pytest.raises(SpecError, match="spec must be a NormSpec subclass"):
        register_family(Family("bad", dict, GroupNormTarget()))  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="monitor family name must be letters"):
        register_family(Family("bad", ClashSpec, GroupNormTarget(), monitor="a/b"))


def test_a_new_family_is_one_registration() -> None:
    """A family registered at run time is a norm everywhere: by name, in swap, calibrate,
    the monitor; unregistering removes every part."""

    class ScaledGroupNorm(normswap.GroupNorm):
        pass

    class ScaledTarget(GroupNormTarget):
        def build(self, src, spec, decision):  # type: ignore[no-untyped-def]
            new = ScaledGroupNorm(src.num_channels, decision.groups, decision.eps, src.affine)
            return normswap.families.base.carry_over(src, new, spec)

    @dataclasses.dataclass(frozen=True)
    class ScaledSpec(GroupNormSpec):
        """GroupNorm in a class of its own."""

    register_family(
        Family(
            "scaled", ScaledSpec, ScaledTarget(), layers=(ScaledGroupNorm,), fitter=AffineFitter()
        )
    )
    try:
        assert "scaled" in normswap.list_norms()
        model = _net().eval()
        reference = __import__("copy").deepcopy(model)
        normswap.swap(model, "scaled", num_groups=4)
        assert isinstance(model[1], ScaledGroupNorm) and family_of(model[1]) == "scaled"
        report = normswap.calibrate(model, reference, torch.randn(8, 3, 8, 8))
        assert len(report) == 2
    finally:
        unregister_family("scaled")
    assert "scaled" not in normswap.list_norms()
    assert family_of(ScaledGroupNorm(4, 2)) == "gn"  # back to its base class's family
    assert options("gn") == {}
