"""Properties every norm layer shares: memory format, meta device, dtypes, gradients, errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from normswap.errors import NormSwapError
from normswap.norms import AdaLIN, AdaLN, GroupNorm, InstanceNorm, LayerNorm, LayerNorm2d

COND_DIM = 3

# name -> (factory(C, **factory_kwargs), needs spatial dims)
LAYERS: dict[str, tuple[Callable[..., nn.Module], bool]] = {
    "gn": (lambda c, **kw: GroupNorm(c, num_groups=2, **kw), False),
    "ln": (lambda c, **kw: LayerNorm(c, **kw), False),
    "ln2d": (lambda c, **kw: LayerNorm2d(c, **kw), False),
    "in": (lambda c, **kw: InstanceNorm(c, **kw), True),
    "in_tracked": (lambda c, **kw: InstanceNorm(c, track_running_stats=True, **kw), True),
    "adalin": (lambda c, **kw: AdaLIN(c, **kw), True),
    "adaln": (lambda c, **kw: AdaLN(c, COND_DIM, **kw), False),
    "adaln_mlp_gate": (lambda c, **kw: AdaLN(c, COND_DIM, hidden_dim=5, gate=True, **kw), False),
}
NAMES = list(LAYERS)


def _make(name: str, channels: int = 4, **factory: object) -> nn.Module:
    module = LAYERS[name][0](channels, **factory)
    if module.weight is None or module.weight.device.type == "meta":
        return module
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random values everywhere, so every gradient path is exercised
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=generator) * 0.5 + 0.25)
    return module


def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, AdaLN):
        c = torch.randn(x.shape[0], COND_DIM, generator=torch.Generator().manual_seed(1))
        module.condition = c.to(device=x.device, dtype=x.dtype)
    return module(x)


def _input(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("shape", "fmt"),
    [
        ((2, 4, 5, 3), torch.channels_last),
        ((2, 4, 3, 2, 3), torch.channels_last_3d),
        ((2, 4, 5, 3), torch.contiguous_format),
    ],
    ids=["channels_last", "channels_last_3d", "contiguous"],
)
def test_output_keeps_the_input_memory_format(
    name: str, shape: tuple[int, ...], fmt: torch.memory_format
) -> None:
    module = _make(name)
    x = _input(shape)
    x_fmt = x.contiguous(memory_format=fmt)
    out = _run(module, x_fmt)
    assert out.is_contiguous(memory_format=fmt)
    assert fmt == torch.contiguous_format or not out.is_contiguous()
    assert_close(out, _run(module, x))  # same values whatever the layout


@pytest.mark.parametrize("name", NAMES)
def test_meta_device_construction_allocates_nothing_and_runs(name: str) -> None:
    module = _make(name, device="meta")
    tensors = list(module.parameters()) + list(module.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    out = _run(module, torch.empty(2, 4, 3, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 4, 3, 3)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-5), (torch.bfloat16, 5e-2)])
def test_forward_in_other_dtypes_agrees_with_float32(
    name: str, dtype: torch.dtype, tol: float
) -> None:
    module32 = _make(name)
    module = _make(name, dtype=dtype)
    assert all(p.dtype == dtype for p in module.parameters())
    assert all(b.dtype == dtype for b in module.buffers() if b.is_floating_point())
    x = _input((2, 4, 4, 3))
    out = _run(module, x.to(dtype))
    assert out.dtype == dtype
    assert_close(out.float(), _run(module32, x), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_and_the_input_get_a_gradient(name: str) -> None:
    module = _make(name)
    x = _input((2, 4, 3, 3)).requires_grad_(True)
    out = _run(module, x)
    (out * _input(out.shape)).sum().backward()
    named = dict(module.named_parameters())
    assert named
    for param_name, p in named.items():
        assert p.grad is not None, param_name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, param_name
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_forward_errors_name_the_module_path_and_shape(name: str) -> None:
    module = _make(name)
    _run(module, _input((2, 4, 3, 3)))
    module.normswap_path = "layer1.0.bn2"
    with pytest.raises(NormSwapError) as info:
        _run(module, _input((2, 5, 3, 3)))
    message = str(info.value)
    assert message.startswith("layer1.0.bn2: ")
    assert "(2, 5, 3, 3)" in message and "built for 4 channels" in message
    module.normswap_path = ""
    with pytest.raises(NormSwapError, match=f"^{type(module).__name__}: "):
        _run(module, _input((2, 5, 3, 3)))


@pytest.mark.parametrize("name", NAMES)
def test_nc_input_is_accepted_or_refused_by_the_math(name: str) -> None:
    module = _make(name)
    needs_spatial = LAYERS[name][1]
    x = _input((3, 4))
    if needs_spatial:
        with pytest.raises(NormSwapError, match=r"at least one spatial dim, got shape \(3, 4\)"):
            _run(module, x)
    else:
        out = _run(module, x)
        assert out.shape == (3, 4) and torch.isfinite(out).all()
        assert out.std() > 0  # not the degenerate constant output


@pytest.mark.parametrize("name", NAMES)
def test_factory_kwargs_and_path_attribute(name: str) -> None:
    module = _make(name, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in module.parameters())
    assert type(module).normswap_path == "" and module.normswap_path == ""
    assert module.num_channels == 4
