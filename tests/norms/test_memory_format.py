"""Every converted layer returns its output in its input's memory format, for every target.

Under autograd the output must also be a fresh tensor, not a view: resnets follow each norm with
``ReLU(inplace=True)``, and an in-place op on a view makes autograd replay it through copies.

A model with a residual block (BN after a 3x3 and a 1x1 conv, a BN on the sum) is converted to
each target, moved to a memory format and run forward and backward; hooks check every layer the
conversion produced or reparameterized (normswap norms, kept BatchNorms, weight-normalized and
standardized convs). Weight norm's recomputed weight must keep the conv weight's layout.
"""

from __future__ import annotations

import pytest
import torch
from families_matrix import FAMILIES, options
from torch import nn
from torch.nn.utils import parametrize

import normswap
from normswap.families import family_layers
from normswap.norms import weight_norm

COND_DIM = 4


def _mode(name: str, overrides: dict) -> str:
    spec = normswap.get_spec(name, **overrides)
    return "eval" if normswap.get_family(name).target.needs_eval_mode(spec) else "train"


# (id, target, overrides, model mode): every registered family as it comes, then variants.
CASES = [(name, name, options(name), _mode(name, options(name))) for name in FAMILIES] + [
    ("in_tracked", "in", {"track_running_stats": True}, "train"),
    ("in_tracked_eval", "in", {"track_running_stats": True}, "eval"),
    ("adaln_mlp_gate", "adaln", {"cond_dim": COND_DIM, "hidden_dim": 8, "gate": True}, "train"),
    ("wn_keep", "wn", {"bn": "keep"}, "train"),
    ("wn_remove", "wn", {"bn": "remove"}, "train"),
    ("wn_fold", "wn", {"bn": "fold"}, "eval"),
    ("frozen_trainable", "frozen", {"trainable": True}, "train"),
]
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.proj = nn.Conv2d(8, 16, 1, bias=False)
        self.proj_bn = nn.BatchNorm2d(16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.bn(self.conv(h)) + h)
        return self.head(torch.relu(self.proj_bn(self.proj(h))))


def _layout(t: torch.Tensor) -> str:
    """``channels_last`` or ``contiguous`` (tensors here are never ambiguous: H, W, C > 1)."""
    if t.is_contiguous():
        return "contiguous"
    assert t.is_contiguous(memory_format=torch.channels_last), t.stride()
    return "channels_last"


def _is_checked(module: nn.Module) -> bool:
    return (
        isinstance(module, family_layers())
        or normswap.is_source_norm(module)
        or parametrize.is_parametrized(module, "weight")
    )


def _converted(case: str) -> tuple[nn.Module, torch.Tensor]:
    _, target, overrides, mode = next(c for c in CASES if c[0] == case)
    torch.manual_seed(0)
    model = _Block().train(mode == "train")
    x = torch.randn(2, 3, 6, 5)
    normswap.swap(model, target, example_inputs=x, **overrides)
    return model, x


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_every_converted_layer_keeps_the_input_memory_format(case: str, fmt: str) -> None:
    model, x = _converted(case)
    model = model.to(memory_format=FORMATS[fmt])
    x = x.contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    seen: list[tuple[str, str, str]] = []
    views: list[str] = []

    def check(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if args[0].dim() == 4:  # the weight-normalized Linear head sees (N, C)
            seen.append((type(module).__name__, _layout(args[0]), _layout(out)))
        if out._is_view():  # an in-place ReLU after a view is replayed through copies
            views.append(type(module).__name__)

    checked = [m for m in model.modules() if _is_checked(m)]
    assert checked, "the conversion produced nothing to check"
    handles = [m.register_forward_hook(check) for m in checked]
    try:
        dims = {m.cond_dim for m in model.modules() if isinstance(m, normswap.AdaLN)}
        if dims:
            with normswap.condition(model, torch.randn(2, dims.pop())):
                out = model(x)
        else:
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    wrong = [s for s in seen if s[1] != s[2]]
    assert not wrong, f"(layer, input layout, output layout) that changed format: {wrong}"
    assert not views, f"layers whose training output is a view of another tensor: {views}"
    assert {s[1] for s in seen} == {fmt}, seen  # the format reached every checked layer
    out.sum().backward()
    assert x.grad is not None and _layout(x.grad) in FORMATS


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", ["wn_keep", "wn_remove", "wn_fold"])
def test_weight_norm_weight_keeps_the_conv_weight_memory_format(case: str, fmt: str) -> None:
    model, _ = _converted(case)
    model = model.to(memory_format=FORMATS[fmt])
    for name in ("stem.0", "conv"):  # 3x3 kernels: layouts are unambiguous
        conv = model.get_submodule(name)
        stored = conv.parametrizations.weight.original1
        assert _layout(stored) == fmt
        assert _layout(conv.weight) == fmt, name


@pytest.mark.parametrize(
    ("make", "fmt"),
    [
        (lambda: nn.Conv2d(4, 6, 3), torch.contiguous_format),
        (lambda: nn.Conv2d(4, 6, 3), torch.channels_last),
        (lambda: nn.Conv2d(4, 6, (3, 1)), torch.channels_last),
        (lambda: nn.ConvTranspose2d(4, 6, 3), torch.channels_last),
        (lambda: nn.Conv3d(4, 6, 3), torch.channels_last_3d),
    ],
    ids=["conv2d", "conv2d_cl", "conv2d_3x1_cl", "convtranspose2d_cl", "conv3d_cl3d"],
)
def test_weight_norm_weight_matches_torch_and_keeps_the_layout(make, fmt) -> None:
    torch.manual_seed(0)
    conv = weight_norm(make())
    dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0
    reference = nn.utils.parametrizations.weight_norm(make(), "weight", dim=dim)
    reference.load_state_dict(conv.state_dict())
    conv, reference = (m.to(memory_format=fmt) for m in (conv, reference))
    if fmt == torch.contiguous_format:  # torch's own path: bitwise the same weight
        assert torch.equal(conv.weight, reference.weight)
    else:  # the norm is summed in memory order: equal up to rounding
        torch.testing.assert_close(conv.weight, reference.weight, rtol=1e-6, atol=1e-7)
    assert conv.weight.is_contiguous(memory_format=fmt)
    grad = torch.randn(conv.weight.shape)

    def originals(m: nn.Module) -> list[torch.Tensor]:
        return [m.parametrizations.weight.original0, m.parametrizations.weight.original1]

    expected = torch.autograd.grad(reference.weight, originals(reference), grad)
    actual = torch.autograd.grad(conv.weight, originals(conv), grad)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_weight_norm_loads_the_legacy_state_dict_keys() -> None:
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match="deprecated"):
        legacy = nn.utils.weight_norm(nn.Conv2d(4, 6, 3))  # weight_g / weight_v
    conv = weight_norm(nn.Conv2d(4, 6, 3))
    conv.load_state_dict(legacy.state_dict())
    assert torch.equal(conv.weight, legacy.weight)
