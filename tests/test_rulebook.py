"""One rulebook: a plan that apply can never contradict, and an apply that cannot half-happen.

The five cases of the issue that asked for this (each broke the "untouched on error" promise)
are regression tests here, with the same small models, followed by the guarantees that make
them impossible: plan and executors ask the same rules, and apply restores the model exactly
when anything fails part-way.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_untouched, snapshot
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import normswap
from normswap import ApplyError, CalibrationError, SwapError, UnsupportedModuleError
from normswap.families import get_family


def _random_stats(*bns: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) * 2 - 1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))


def _structure(model: nn.Module) -> list[tuple[str, int, type]]:
    return [(p, id(m), type(m)) for p, m in model.named_modules(remove_duplicate=False)]


def _untouched(model: nn.Module, before: dict, structure: list) -> None:
    assert_untouched(before, model)
    assert _structure(model) == structure


# --------------------------------------------------------------------------- the five cases


def test_a_bn_fed_by_a_weight_normalized_conv_is_refused_before_anything_changes() -> None:
    """Was: FoldError after the first BN had been folded; outputs moved by 0.39."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        torch_weight_norm(nn.Conv2d(8, 8, 3)),
        nn.BatchNorm2d(8),
    ).eval()
    _random_stats(model[1], model[4])
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    before, structure = snapshot(model), _structure(model)
    with pytest.raises(SwapError, match=r"4: cannot fold: Conv2d's weight is parametrized"):
        normswap.swap(model, "wn", example_inputs=x)
    _untouched(model, before, structure)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    report = normswap.swap(model, "wn", example_inputs=x, unfoldable="keep")
    assert {(r.path, r.action) for r in report if r.source == "BatchNorm2d"} == {
        ("1", "fold"),
        ("4", "skip"),
    }
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_a_producer_with_tied_weights_is_not_folded() -> None:
    """Was: the swap succeeded and changed the outputs by 0.56 (fold_bn refused the model)."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
            self.b.weight = self.a.weight
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.a(x)) + self.b(x)

    model = Tied().eval()
    _random_stats(model.bn)
    x = torch.randn(2, 3, 12, 12)
    before, structure = snapshot(model), _structure(model)
    for fold in (
        lambda: normswap.swap(model, "wn", example_inputs=x),
        lambda: normswap.fold_bn(model, x),
    ):
        with pytest.raises(SwapError, match=r"a\.weight is shared with b, which folding"):
            fold()
        _untouched(model, before, structure)
    facts = normswap.trace(model, x)
    assert not facts["bn"].foldable and "shared with b" in facts["bn"].reason
    # Weight norm would untie them too: the plan skips those layers, saying why.
    report = normswap.swap(model, "wn", bn="remove")
    assert all("shared with" in r.reason for r in report if r.path in ("a", "b"))
    assert model.a.weight is model.b.weight


def test_grouped_conv_transpose_is_planned_as_it_is_applied() -> None:
    """Was: the dry run planned weight norm; the real swap raised after folding."""
    model = nn.Sequential(nn.ConvTranspose2d(4, 8, 3, groups=2), nn.BatchNorm2d(8)).eval()
    _random_stats(model[1])
    x = torch.randn(2, 4, 5, 5)
    expected = model(x)
    dry = normswap.swap(model, "wn", example_inputs=x, dry_run=True)
    real = normswap.swap(model, "wn", example_inputs=x)
    assert dry.to_dict()["records"] == real.to_dict()["records"]
    skipped = next(r for r in real if r.path == "0")
    assert skipped.action == "skip" and "groups=2" in skipped.reason
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_convert_pretrained_checks_its_data_before_swapping() -> None:
    """Was: CalibrationError after the model had been swapped."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    model.eval()
    before, structure = snapshot(model), _structure(model)
    for data in (torch.empty(0, 3, 32, 32), [], [torch.empty(0, 3, 8, 8)], {"x": 1}):
        with pytest.raises(CalibrationError):
            normswap.convert_pretrained(
                model, "gn", data, distill_steps=0, reconstruct=0, progress=False
            )
        _untouched(model, before, structure)


def test_torchscript_is_refused_with_the_fix() -> None:
    """Was: a report that converted nothing, silently."""
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    with pytest.raises(UnsupportedModuleError, match="convert the eager model, then script it"):
        normswap.swap(scripted, "gn")


@pytest.mark.parametrize("model", [None, {"weight": torch.zeros(1)}, "resnet18"])
def test_a_model_that_is_not_a_module_gets_one_clear_error(model: object) -> None:
    with pytest.raises(UnsupportedModuleError, match=r"must be a torch\.nn\.Module"):
        normswap.swap(model, "gn")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- apply


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1)
    )
    model[2].register_forward_hook(lambda *_: None)
    _random_stats(model[1])
    return model.eval()


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyboardInterrupt()])
@pytest.mark.parametrize("when", ["build", "apply_layer"])
def test_a_failing_apply_restores_the_model_exactly(
    error: BaseException, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything raising part-way (here: after BN was folded, or during weight norm of the
    second conv) leaves the model as it was: modules, parameters (same objects), buffers,
    parametrizations, hooks, flags."""
    model = _bn_net()
    x = torch.randn(2, 3, 8, 8)
    before, structure = snapshot(model), _structure(model)
    params = {n: p for n, p in model.named_parameters()}
    hooks = [dict(m._forward_hooks) for m in model.modules()]
    the_plan = normswap.plan(model, "wn", example_inputs=x)
    target = get_family("wn").target
    calls = []

    def failing(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if when == "build" or len(calls) == 2:
            raise error
        return original(*args, **kwargs)

    original = getattr(target, when)
    monkeypatch.setattr(target, when, failing)
    expected_type = ApplyError if isinstance(error, Exception) else KeyboardInterrupt
    with pytest.raises(expected_type) as info:
        normswap.apply(model, the_plan)
    if expected_type is ApplyError:
        assert "restored exactly as it was" in str(info.value)
    _untouched(model, before, structure)
    assert {n: p for n, p in model.named_parameters()} == params  # the same objects
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert [dict(m._forward_hooks) for m in model.modules()] == hooks
    monkeypatch.undo()
    normswap.apply(model, the_plan)  # the same plan still applies afterwards


def test_a_plan_for_another_model_is_refused_before_anything_changes() -> None:
    model, other = _bn_net(), _bn_net()
    the_plan = normswap.plan(model, "gn", num_groups=2)
    before = snapshot(other)
    with pytest.raises(SwapError, match="the plan does not fit this model"):
        normswap.apply(other, the_plan)
    assert_untouched(before, other)
    normswap.apply(model, the_plan)
    with pytest.raises(SwapError, match="plan it again"):
        normswap.apply(model, the_plan)  # applied already: the planned BN is gone


def test_an_accepted_plan_applies_for_every_family() -> None:
    """The executors ask the rules the planner asked: no accepted plan raises."""
    for name in normswap.list_norms():
        model = _bn_net()
        x = torch.randn(2, 3, 8, 8)
        the_plan = normswap.plan(model, name, example_inputs=x, **get_family(name).example)
        normswap.apply(model, the_plan)


# --------------------------------------------------------------------------- one registry


def test_a_registered_source_is_traced_planned_and_folded() -> None:
    """Sources come from one registry: a class added with register_source folds too."""

    class MyBN(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # same math, another forward
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )

    normswap.register_source(MyBN)(normswap.sources.describe_batchnorm)
    try:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), MyBN(8)).eval()
        _random_stats(model[1])
        x = torch.randn(2, 3, 8, 8)
        expected = model(x)
        assert normswap.trace(model, x)["1"].foldable
        assert normswap.fold_bn(copy.deepcopy(model), x) == [("1", "0")]
        normswap.swap(model, "wn", example_inputs=x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    finally:
        normswap.sources.SOURCES.unregister(MyBN)


def test_fold_bn_is_the_wn_plan_without_weight_norm() -> None:
    model, twin = _bn_net(), _bn_net()
    x = torch.randn(2, 3, 8, 8)
    assert normswap.fold_bn(model, x) == [("1", "0")]
    normswap.swap(twin, "wn", layers=(), example_inputs=x)
    assert snapshot(model).keys() == snapshot(twin).keys()
    for (key, a), b in zip(snapshot(model).items(), snapshot(twin).values(), strict=True):
        assert torch.equal(a, b), key


def test_zero_gamma_channels_skip_weight_norm_after_folding() -> None:
    """Folding a BN whose γ is 0 for a channel (zero-init residual blocks) zeroes that output
    channel of its conv, where weight norm is NaN: the plan skips weight norm there."""
    model = _bn_net()
    with torch.no_grad():
        model[1].weight[3] = 0.0
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    report = normswap.swap(model, "wn", example_inputs=x)
    conv = next(r for r in report if r.path == "0")
    assert conv.action == "skip" and "γ = 0" in conv.reason
    out = model(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
