"""AdaLIN and conditional AdaLN against formulas written from separate reductions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from normswap.errors import ConditionError, NormSwapError
from normswap.norms import AdaLIN, AdaLN, LayerNorm, condition


def _normalize(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0] if t.dim() == 2 else 1, -1, *([1] * (x.dim() - 2)))


# --------------------------------------------------------------------------- AdaLIN


def _adalin(channels: int = 6, **kwargs: object) -> AdaLIN:
    norm = AdaLIN(channels, **kwargs)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        norm.rho.uniform_(0, 1)
    return norm


@pytest.mark.parametrize("shape", [(3, 6, 7), (2, 6, 4, 5), (2, 6, 3, 2, 4)])
def test_adalin_matches_textbook_formula(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = _adalin(eps=1e-4)
    x = torch.randn(shape) * 2 + 1
    spatial = tuple(range(2, x.dim()))
    inst = _normalize(x, spatial, 1e-4)
    layer = _normalize(x, (1, *spatial), 1e-4)
    rho = _per_channel(norm.rho, x)
    expected = _per_channel(norm.weight, x) * (rho * inst + (1 - rho) * layer)
    expected = expected + _per_channel(norm.bias, x)
    assert_close(norm(x), expected)


def test_adalin_extremes_are_instance_and_layer_norm() -> None:
    torch.manual_seed(0)
    norm = _adalin()
    x = torch.randn(2, 6, 5, 5)
    ref_in = nn.InstanceNorm2d(6, affine=True)
    ref_ln = nn.GroupNorm(1, 6)
    for ref in (ref_in, ref_ln):
        ref.load_state_dict({"weight": norm.weight, "bias": norm.bias})
    with torch.no_grad():
        norm.rho.fill_(1.0)
    assert_close(norm(x), ref_in(x))
    with torch.no_grad():
        norm.rho.fill_(0.0)
    assert_close(norm(x), ref_ln(x))


def test_adalin_clamps_rho_to_unit_interval() -> None:
    torch.manual_seed(0)
    norm = _adalin()
    x = torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        norm.rho.fill_(1.0)
    at_one = norm(x)
    with torch.no_grad():
        norm.rho.fill_(0.0)
    at_zero = norm(x)
    with torch.no_grad():
        norm.rho.copy_(torch.tensor([1.7, -0.4, 3.0, -2.0, 1.01, -0.01]))
    out = norm(x)
    take_one = torch.tensor([True, False, True, False, True, False]).view(1, 6, 1, 1)
    assert_close(out, torch.where(take_one, at_one, at_zero))
    assert norm.rho.shape == (6,)


def test_adalin_rho_init_and_refusals() -> None:
    assert torch.equal(AdaLIN(3).rho, torch.full((3,), 0.9))
    assert torch.equal(AdaLIN(3, rho_init=0.0).rho, torch.zeros(3))
    with pytest.raises(NormSwapError, match=r"rho_init must be in \[0, 1\]"):
        AdaLIN(3, rho_init=1.5)
    with pytest.raises(NormSwapError, match=r"AdaLIN expects input of shape .*\(4, 3\)"):
        AdaLIN(3)(torch.randn(4, 3))
    with pytest.raises(NormSwapError, match=r"\(4, 3, 1\) with a single spatial element"):
        AdaLIN(3)(torch.randn(4, 3, 1))


# --------------------------------------------------------------------------- AdaLN


def _randomize_modulation(norm: AdaLN) -> None:
    with torch.no_grad():
        for p in norm.modulation.parameters():
            p.normal_(0, 0.5)


def _adaln_reference(norm: AdaLN, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The formula with its own LN and its own MLP evaluation."""
    dims = tuple(range(1, x.dim()))
    h = _normalize(x, dims, norm.eps) * _per_channel(norm.weight, x) + _per_channel(norm.bias, x)
    if norm.hidden_dim is None:
        last = norm.modulation[1]
        params = F.linear(F.silu(c), last.weight, last.bias)
    else:
        first, last = norm.modulation[0], norm.modulation[2]
        params = F.linear(F.silu(F.linear(c, first.weight, first.bias)), last.weight, last.bias)
    channels = norm.num_channels
    shift = params[:, :channels]
    scale = params[:, channels : 2 * channels]
    y = h * (1 + _per_channel(scale, x)) + _per_channel(shift, x)
    if norm.gate:
        y = y * (1 + _per_channel(params[:, 2 * channels :], x))
    return y


def test_adaln_at_init_is_exactly_layer_norm() -> None:
    torch.manual_seed(0)
    norm = AdaLN(6, cond_dim=5, hidden_dim=7, gate=True)
    ln = LayerNorm(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    ln.load_state_dict({"weight": norm.weight, "bias": norm.bias})
    last = norm.modulation[-1]
    assert torch.equal(last.weight, torch.zeros_like(last.weight))
    assert torch.equal(last.bias, torch.zeros_like(last.bias))
    x = torch.randn(3, 6, 4, 4)
    with condition(norm, torch.randn(3, 5) * 10):
        out = norm(x)
    assert torch.equal(out, ln(x))


@pytest.mark.parametrize(
    ("hidden_dim", "gate", "shape"),
    [
        (None, False, (3, 6, 4, 4)),
        (None, True, (3, 6, 5)),
        (8, False, (3, 6)),
        (8, True, (3, 6, 2, 3, 2)),
    ],
)
def test_adaln_matches_formula(hidden_dim: int | None, gate: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = AdaLN(6, cond_dim=5, hidden_dim=hidden_dim, gate=gate)
    assert len(norm.modulation) == (2 if hidden_dim is None else 3)
    assert norm.modulation[-1].out_features == (3 if gate else 2) * 6
    _randomize_modulation(norm)
    x = torch.randn(shape)
    c = torch.randn(3, 5)
    with condition(norm, c):
        out = norm(x)
    assert_close(out, _adaln_reference(norm, x, c))


def test_adaln_broadcasts_a_single_condition() -> None:
    torch.manual_seed(0)
    norm = AdaLN(4, cond_dim=3, gate=True)
    _randomize_modulation(norm)
    x = torch.randn(5, 4, 3, 3)
    c = torch.randn(3)
    with condition(norm, c):
        out = norm(x)
    assert_close(out, _adaln_reference(norm, x, c.expand(5, 3)))


def test_adaln_without_condition_names_the_fix() -> None:
    norm = AdaLN(4, cond_dim=3)
    norm.normswap_path = "blocks.2.norm1"
    expected = (
        "AdaLN at blocks.2.norm1 has no condition: call the model inside "
        "`with normswap.condition(model, c):`"
    )
    with pytest.raises(ConditionError) as info:
        norm(torch.randn(2, 4, 3, 3))
    assert str(info.value) == expected


def test_adaln_wrong_condition_shape_names_expected_and_got() -> None:
    norm = AdaLN(4, cond_dim=3)
    norm.condition = torch.randn(5, 3)  # batch mismatch
    with pytest.raises(
        ConditionError, match=r"condition of shape \(5, 3\) .* expected \(2, 3\) or \(3,\)"
    ):
        norm(torch.randn(2, 4, 3, 3))
    norm.condition = torch.randn(2, 7)  # cond_dim mismatch
    with pytest.raises(ConditionError, match=r"\(2, 7\) .* expected \(2, 3\)"):
        norm(torch.randn(2, 4, 3, 3))
    refusal = r"expects a condition of shape \(N, 3\) or \(3,\), got \(2, 7\)"
    with pytest.raises(ConditionError, match=refusal), condition(norm, torch.randn(2, 7)):
        pass


def test_condition_nests_and_restores_on_exception() -> None:
    shared = AdaLN(4, cond_dim=3)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), shared, nn.Sequential(shared, AdaLN(4, cond_dim=3)))
    layers = [m for m in model.modules() if isinstance(m, AdaLN)]
    assert len(layers) == 2
    outer, inner = torch.randn(2, 3), torch.randn(2, 3)
    with condition(model, outer):
        assert all(m.condition is outer for m in layers)
        with pytest.raises(RuntimeError, match="boom"), condition(model, inner):
            assert all(m.condition is inner for m in layers)
            raise RuntimeError("boom")
        assert all(m.condition is outer for m in layers)
        y = model(torch.randn(2, 2, 3, 3))
        assert y.shape == (2, 4, 3, 3)
    assert all(m.condition is None for m in layers)


def test_condition_refuses_models_without_adaln() -> None:
    plain = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4))
    refusal = r"^no AdaLN layers in this model; swap to 'adaln' first$"
    with pytest.raises(ConditionError, match=refusal), condition(plain, torch.randn(3)):
        pass
    not_a_tensor = [1.0, 2.0, 3.0]
    with (
        pytest.raises(ConditionError, match=r"must be a torch\.Tensor, got list"),
        condition(AdaLN(4, cond_dim=3), not_a_tensor),  # type: ignore[arg-type]
    ):
        pass


def test_adaln_gradient_reaches_modulation() -> None:
    torch.manual_seed(0)
    norm = AdaLN(4, cond_dim=3, hidden_dim=5, gate=True)
    x = torch.randn(2, 4, 3, 3)
    c = torch.randn(2, 3, requires_grad=True)
    with condition(norm, c):
        (norm(x) * torch.randn(2, 4, 3, 3)).sum().backward()
    last = norm.modulation[-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert last.bias.grad is not None and last.bias.grad.abs().sum() > 0
    # Zero-initialized last layer: nothing flows further back yet (adaLN-Zero), but it is wired.
    first = norm.modulation[0]
    assert first.weight.grad is not None and torch.equal(first.weight.grad, torch.zeros(5, 3))
    _randomize_modulation(norm)
    norm.zero_grad()
    with condition(norm, c):
        (norm(x) * torch.randn(2, 4, 3, 3)).sum().backward()
    assert first.weight.grad.abs().sum() > 0 and c.grad is not None
