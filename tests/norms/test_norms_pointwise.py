"""DyT, Derf and RMSNorm against their textbook formulas, on both code paths: the plain ops
(small inputs, scripting, tracing, export) and the eager CPU autograd functions (large float
inputs; forced on tiny inputs here by lowering the size threshold)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.norms import Derf, DyT, RMSNorm, set_kernel_dispatch
from normswap.norms import dispatch as kernel_dispatch


@pytest.fixture(params=["plain", "kernel"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the plain ops and on the eager CPU autograd functions."""
    if request.param == "kernel":
        monkeypatch.setitem(kernel_dispatch.EAGER_CPU_MIN_NUMEL, "pointwise", 0)
        monkeypatch.setitem(kernel_dispatch.EAGER_CPU_MIN_NUMEL, "rms", 0)
    else:
        monkeypatch.setitem(kernel_dispatch.EAGER_CPU_MIN_NUMEL, "pointwise", 1 << 40)
        monkeypatch.setitem(kernel_dispatch.EAGER_CPU_MIN_NUMEL, "rms", 1 << 40)
    return request.param


def _along(t: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    return t.view([-1] + [1] * (rank - 1 - dim))


def reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The textbook formula, in float64."""
    dim = x.dim() - 1 if module.channels_last else 1
    x64 = x.double()
    p = {n: t.double() for n, t in module.named_parameters()}
    if isinstance(module, DyT):
        y = torch.tanh(p["alpha"] * x64)
    elif isinstance(module, Derf):
        y = torch.erf(p["alpha"] * x64 + p["shift"])
    else:
        y = x64 * torch.rsqrt(x64.pow(2).mean(dim, keepdim=True) + module.eps)
    if "weight" in p:
        y = y * _along(p["weight"], dim, x.dim())
    if "bias" in p:
        y = y + _along(p["bias"], dim, x.dim())
    return y


def _random(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    module.to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, dtype=dtype) + 0.5)
    return module


LAYERS = {
    "dyt": lambda c, last: DyT(c, channels_last=last),
    "derf": lambda c, last: Derf(c, channels_last=last),
    "rms": lambda c, last: RMSNorm(c, channels_last=last),
    "rms_bias": lambda c, last: RMSNorm(c, bias=True, channels_last=last),
}
SHAPES = [((4, 7, 16), True), ((3, 16), True), ((3, 16), False), ((2, 16, 5, 6), False)]
SHAPES += [((2, 6, 5, 16), True), ((2, 16, 3, 4, 5), False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "last"), SHAPES)
@pytest.mark.parametrize("layer", LAYERS)
def test_forward_and_gradients_match_the_formula(
    layer: str, shape: tuple[int, ...], last: bool, dtype: torch.dtype, path: str
) -> None:
    torch.manual_seed(0)
    c = shape[-1] if last else shape[1]
    module = _random(LAYERS[layer](c, last), dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    g = torch.randn(shape, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 0}
    out = module(x)
    ref = reference(module, x)
    torch.testing.assert_close(out.double(), ref, **tol)
    params = [x, *module.parameters()]
    got = torch.autograd.grad(out, params, g)
    expected = torch.autograd.grad(ref, params, g.double())
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize(("shape", "last"), [((2, 3, 4), True), ((2, 4, 3), False)])
def test_gradcheck_double_backward_forward_ad_and_vmap(
    layer: str, shape: tuple[int, ...], last: bool, path: str
) -> None:
    torch.manual_seed(0)
    c = shape[-1] if last else shape[1]
    module = _random(LAYERS[layer](c, last), torch.float64)
    names = [n for n, _ in module.named_parameters()]

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x,))

    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    inputs = (x, *module.parameters())
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs)
    xs = torch.randn(3, *shape, dtype=torch.float64)
    batched = torch.func.vmap(module)(xs)
    torch.testing.assert_close(batched, torch.stack([reference(module, t) for t in xs]))
    jrev = torch.func.jacrev(module)(x.detach())
    torch.testing.assert_close(jrev, torch.func.jacfwd(module)(x.detach()))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("last", [False, True])
def test_script_trace_and_export_compute_the_same(layer: str, last: bool, path: str) -> None:
    module = _random(LAYERS[layer](8, last), torch.float32)
    x = torch.randn(2, 3, 8) if last else torch.randn(2, 8, 3)
    expected = module(x)
    torch.testing.assert_close(torch.jit.script(module)(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.jit.trace(module, x)(x), expected, rtol=1e-5, atol=1e-6)
    program = torch.export.export(module, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-6)


def test_channels_last_rms_is_torchs(path: str) -> None:
    x = torch.randn(4, 9, 32)
    ours = _random(RMSNorm(32, eps=1e-5, channels_last=True), torch.float32)
    torch_rms = nn.RMSNorm(32, eps=1e-5)
    torch_rms.weight = ours.weight
    torch.testing.assert_close(ours(x), torch_rms(x), rtol=1e-5, atol=1e-6)


def test_dyt_without_affine_gives_an_inplace_activation_a_tensor_of_its_own(path: str) -> None:
    """tanh's output is saved for backward: a ReLU(inplace=True) after the layer must not
    overwrite it (RAFT's InstanceNorms have no affine)."""
    model = nn.Sequential(DyT(8, affine=False), nn.ReLU(inplace=True))
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    model(x).sum().backward()
    expected = torch.autograd.grad(torch.relu(torch.tanh(0.5 * x)).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_the_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(kernel_dispatch.EAGER_CPU_MIN_NUMEL, "pointwise", 0)
    x = torch.randn(4, 8, requires_grad=True)
    on = DyT(8)(x)
    set_kernel_dispatch(False)
    try:
        off = DyT(8)(x)
    finally:
        set_kernel_dispatch(True)
    assert "DyTFunction" in type(on.grad_fn).__name__
    assert "DyTFunction" not in type(off.grad_fn).__name__
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-6)
