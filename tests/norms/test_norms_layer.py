"""LayerNorm (over C and S) and LayerNorm2d (over C per position) against references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from normswap.errors import NormSwapError
from normswap.norms import LayerNorm, LayerNorm2d


def _randomize(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def _textbook_ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    dims = tuple(range(1, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    view = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + eps) * w.view(view) + b.view(view)


def _reference_ln2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dim() == 2:
        return F.layer_norm(x, (x.shape[1],), w, b, eps)
    perm = (0, *range(2, x.dim()), 1)
    inverse = (0, x.dim() - 1, *range(1, x.dim() - 1))
    return F.layer_norm(x.permute(perm), (x.shape[1],), w, b, eps).permute(inverse)


# --------------------------------------------------------------------------- LayerNorm


def test_layer_norm_attributes() -> None:
    norm = LayerNorm(6, eps=1e-3)
    assert (norm.num_channels, norm.eps, norm.affine) == (6, 1e-3, True)
    assert norm.weight.shape == (6,) and norm.bias.shape == (6,)
    assert torch.equal(norm.weight, torch.ones(6)) and torch.equal(norm.bias, torch.zeros(6))
    bare = LayerNorm(6, affine=False)
    assert bare.weight is None and bare.bias is None
    assert repr(bare) == "LayerNorm(6, eps=1e-05, affine=False)"


@pytest.mark.parametrize("shape", [(3, 6, 5), (2, 6, 4, 5), (2, 6, 3, 2, 4)])
def test_layer_norm_matches_group_norm_1_and_textbook(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = _randomize(LayerNorm(6, eps=1e-4))
    ref = nn.GroupNorm(1, 6, eps=1e-4)
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(shape) * 2 - 1
    out = norm(x)
    assert_close(out, ref(x))
    assert_close(out, _textbook_ln(x, norm.weight, norm.bias, 1e-4))


def test_layer_norm_without_affine_is_plain_normalization() -> None:
    x = torch.randn(2, 5, 3, 3)
    assert_close(
        LayerNorm(5, affine=False)(x), _textbook_ln(x, torch.ones(5), torch.zeros(5), 1e-5)
    )


def test_layer_norm_on_nc_input_equals_f_layer_norm() -> None:
    torch.manual_seed(0)
    norm = _randomize(LayerNorm(7))
    x = torch.randn(4, 7)
    assert_close(norm(x), F.layer_norm(x, (7,), norm.weight, norm.bias, 1e-5))


def test_layer_norm_refuses_single_element_samples() -> None:
    with pytest.raises(NormSwapError, match=r"1 element per sample .*\(4, 1\)"):
        LayerNorm(1)(torch.randn(4, 1))


# --------------------------------------------------------------------------- LayerNorm2d


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 5), (2, 6, 4, 5), (2, 6, 3, 2, 4)])
def test_layer_norm_2d_matches_permute_reference(
    shape: tuple[int, ...], channels_last: bool
) -> None:
    torch.manual_seed(0)
    norm = _randomize(LayerNorm2d(6, eps=1e-6))
    x = torch.randn(shape) * 3 + 2
    if channels_last and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    elif channels_last:  # no named format for ranks 2/3: channels-innermost strides instead
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    x.requires_grad_(True)
    out = norm(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    ours = (x.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone())

    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = norm.weight.detach().clone().requires_grad_(True)
    b_ref = norm.bias.detach().clone().requires_grad_(True)
    ref = _reference_ln2d(x_ref, w_ref, b_ref, 1e-6)
    ref.backward(grad)
    assert_close(out, ref)
    assert_close(ours, (x_ref.grad, w_ref.grad, b_ref.grad))


def test_layer_norm_2d_normalizes_each_position() -> None:
    x = torch.randn(2, 8, 3, 3) * 5 + 3
    out = LayerNorm2d(8, affine=False)(x)
    assert_close(out.mean(dim=1), torch.zeros(2, 3, 3), atol=1e-5, rtol=0)
    assert_close(out.var(dim=1, correction=0), torch.ones(2, 3, 3), atol=1e-3, rtol=0)


def test_layer_norm_2d_refuses_one_channel() -> None:
    norm = LayerNorm2d(1)
    norm.normswap_path = "stem.norm"
    with pytest.raises(NormSwapError, match=r"^stem\.norm: LayerNorm2d over 1 channel"):
        norm(torch.randn(2, 1, 4, 4))
