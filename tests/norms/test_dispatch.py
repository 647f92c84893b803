"""The CPU layout dispatch of the group-norm family computes what ``F.group_norm`` computes.

``normswap.norms.group._group_norm`` sends some inputs through a copy in the other memory format
where PyTorch's kernel for their own layout is slow (channels_last input with few channels per
group; contiguous input with 2-7 positions per channel under autograd). The detour must not
change values, gradients or the output's memory format, and must be taken only where measured.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from normswap.norms import AdaLIN, GroupNorm, InstanceNorm, LayerNorm
from normswap.norms.dispatch import group_norm as _group_norm
from normswap.norms.dispatch import slow_contiguous_backward as _slow_contiguous_backward

CL = torch.channels_last

# (id, shape, groups, memory format): inside and outside both windows.
CASES = [
    ("contig_2x2_16_per_group", (4, 512, 2, 2), 32, torch.contiguous_format),
    ("contig_1x2_8_per_group", (4, 256, 1, 2), 32, torch.contiguous_format),
    ("contig_2x3_layer_norm", (4, 64, 2, 3), 1, torch.contiguous_format),
    ("contig_3x3_outside", (4, 512, 3, 3), 32, torch.contiguous_format),
    ("contig_2x2_instance_outside", (4, 64, 2, 2), 64, torch.contiguous_format),
    ("cl_8x8_2_per_group", (4, 64, 8, 8), 32, CL),
    ("cl_32x32_2_per_group_outside", (2, 64, 32, 32), 32, CL),
    ("cl_4x4_instance", (4, 32, 4, 4), 32, CL),
    ("cl_2x2_16_per_group", (4, 512, 2, 2), 32, CL),
    ("contig_3d_2x2x2", (2, 128, 2, 2, 1), 16, torch.contiguous_format),
]


@pytest.mark.parametrize(("case", "shape", "groups", "fmt"), CASES, ids=[c[0] for c in CASES])
def test_dispatch_matches_group_norm_values_gradients_and_layout(
    case: str, shape: tuple[int, ...], groups: int, fmt: torch.memory_format
) -> None:
    torch.manual_seed(0)
    base = torch.randn(shape).contiguous(memory_format=fmt)
    channels = shape[1]
    weight = (torch.rand(channels) + 0.5).requires_grad_()
    bias = torch.randn(channels).requires_grad_()
    x = base.clone().requires_grad_()
    x_ref = base.clone().requires_grad_()

    out = _group_norm(x, groups, weight, bias, 1e-5)
    ref = F.group_norm(x_ref, groups, weight, bias, 1e-5)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=fmt)

    probe = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, weight, bias], probe)
    want = torch.autograd.grad(ref, [x_ref, weight, bias], probe)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_contiguous_detour_is_taken_only_in_its_measured_window() -> None:
    def slow(
        shape: tuple[int, ...], groups: int, dtype: torch.dtype = torch.float32, grad: bool = True
    ) -> bool:
        x = torch.randn(shape, dtype=dtype).requires_grad_(grad)
        return _slow_contiguous_backward(x, groups, None)

    assert slow((2, 512, 2, 2), 32)  # 16 channels per group, 4 positions
    assert slow((2, 256, 1, 2), 32)  # 8 per group, 2 positions
    assert slow((2, 128, 2, 2), 32)  # 4 per group, 4 positions
    assert not slow((2, 128, 1, 2), 32)  # 4 per group at 2 positions: measured slower (1.11x)
    assert not slow((2, 64, 2, 2), 32)  # 2 per group: no gain measured
    assert not slow((2, 512, 3, 3), 32)  # 9 positions: the contiguous kernel is fast
    assert not slow((2, 512, 1, 1), 32)  # 1 position: fast too
    assert not slow((2, 512, 4), 32)  # (N, C, L) has no channels_last format
    assert not slow((2, 512, 2, 2), 32, grad=False)  # inference: only the backward is slow
    assert not slow((2, 512, 2, 2), 32, dtype=torch.float64)  # measured for float32 only
    with torch.no_grad():
        assert not slow((2, 512, 2, 2), 32)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GroupNorm(256, 32),
        lambda: LayerNorm(256),
        lambda: InstanceNorm(256),
        lambda: AdaLIN(256),
    ],
    ids=["gn", "ln", "in", "adalin"],
)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["contiguous", "cl"])
def test_layers_on_small_maps_match_their_float64_selves(
    make: Callable[[], nn.Module], fmt: torch.memory_format
) -> None:
    """Layers at a 2x2 map (inside the windows) agree with the same layer run in float64,
    where no detour is taken, and keep the input's layout."""
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand_like(p) * 0.8 + 0.1)
    layer64 = make().double()
    layer64.load_state_dict(layer.state_dict())
    base = torch.randn(4, 256, 2, 2, dtype=torch.float64)
    x = base.float().contiguous(memory_format=fmt).requires_grad_()
    x64 = base.clone().requires_grad_()
    out, out64 = layer(x), layer64(x64)
    assert out.is_contiguous(memory_format=fmt)
    assert_close(out, out64.float(), atol=1e-4, rtol=1e-4)
    probe = torch.randn(out64.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, x, probe.float())
    (g64,) = torch.autograd.grad(out64, x64, probe)
    assert_close(g, g64.float(), atol=1e-3, rtol=1e-3)
