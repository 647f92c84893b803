"""Layer overhead: each normswap layer against the native op it wraps, on the same tensor.

Pairs (layer -> reference, forward + backward, fp32, ``torch.autograd.grad`` w.r.t. the input
and every parameter so nothing accumulates):

* ``GroupNorm(C, 32)`` -> ``F.group_norm(x, 32, w, b)``; ``LayerNorm`` -> ``F.group_norm(x, 1)``;
  ``InstanceNorm`` -> ``F.group_norm(x, C)``; for information also ours against the native
  modules ``nn.GroupNorm`` and ``nn.InstanceNorm2d`` (a module call costs a few microseconds
  more than a functional call, which shows at the smallest shapes), and against the ATen op
  ``torch.group_norm`` that ``F.group_norm`` wraps and our layers call (what is left of our
  overhead once the functional wrapper's Python checks are not counted);
* ``LayerNorm2d`` -> ConvNeXt/timm's ``F.layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)``
  (for contiguous input timm returns a channels_last-strided tensor, ours a contiguous one), and
  -> the same followed by ``.contiguous(memory_format=<input's>)``, the same output contract;
* ``AdaLIN`` / ``AdaLN`` -> their own computation written inline with the functional ops (two
  ``group_norm`` + ``lerp`` + ``addcmul``; ``group_norm`` + the modulation MLP + ``addcmul``):
  the cost of the module around the kernels;
* a 3x3 conv with our ``weight_norm`` -> the same conv with torch's
  ``parametrizations.weight_norm``; with ``standardize_weight`` -> timm's ``StdConv2d``
  formulation (``F.batch_norm`` over the weight viewed as ``(1, O, -1)``);
* for information, GroupNorm(32), LayerNorm, InstanceNorm and LayerNorm2d against a training-mode
  ``nn.BatchNorm2d`` on the same tensor: what explains a target's step time in
  ``step_time.py`` layer by layer (PyTorch's BN kernels are the baseline there);
* the seed articles' Python GroupNorm(32) / LayerNorm (view/mean/var, see ``step_time.py``)
  -> our GroupNorm / LayerNorm: the speed-up of ours over "what a user would write".

Targets of issue 6: every layer within 5% of its reference (ratio <= 1.05), and at least 3x
faster than the seed-style versions (seed ratio >= 3). Verdicts use the CPU-time ratio of the
worst shape.

Method (see ``_bench.py``): for each shape and layout, all pairs run in the same interleaved
rounds (``--reps`` calls per function per round, by default as many as take about
``--budget-ms`` for the slowest function; rotating order); each ratio is the median over rounds
of layer time / reference time in that round.

Default shapes: resnet18's norm inputs at batch 8 and 64 px, plus one 56x56 map (about
2 minutes on one thread). ``--full`` adds batch-32 shapes at 224 px.

Run: ``python benchmarks/layer_overhead.py [--full] [--rounds 7] [--reps N | --budget-ms 20]
[--threads 1]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _bench import markdown, ratio, rounds_of, setup, timed, write
from step_time import SeedGroupNorm, SeedLayerNorm
from torch import nn

from normswap.norms import (
    AdaLIN,
    AdaLN,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    standardize_weight,
    weight_norm,
)

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
SHAPES = [(8, 64, 16, 16), (8, 128, 8, 8), (8, 256, 4, 4), (8, 512, 2, 2), (8, 64, 56, 56)]
FULL_SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7)]
COND_DIM = 16
WITHIN = 1.05
SEED_SPEEDUP = 3.0


def _randomized(module: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return module


class TimmStdConv2d(nn.Conv2d):
    """timm's ``StdConv2d``: the weight standardized by ``F.batch_norm`` in every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = F.batch_norm(
            w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=1e-6
        )
        return self._conv_forward(x, w.reshape_as(self.weight), self.bias)


def _timm_ln2d(ln2d: LayerNorm2d, x: torch.Tensor) -> torch.Tensor:
    """ConvNeXt/timm's LayerNorm2d: permute, ``F.layer_norm`` over C, permute back."""
    out = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), ln2d.weight, ln2d.bias, ln2d.eps)
    return out.permute(0, 3, 1, 2)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def pairs(n: int, c: int) -> dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
    """Per row: (our layer, the reference computation on the same parameters)."""
    gn = _randomized(GroupNorm(c, num_groups=32))
    ln = _randomized(LayerNorm(c))
    inorm = _randomized(InstanceNorm(c))
    ln2d = _randomized(LayerNorm2d(c))
    adalin = _randomized(AdaLIN(c))
    adaln = _randomized(AdaLN(c, COND_DIM))
    adaln.condition = torch.randn(n, COND_DIM)
    native_in = _randomized(nn.InstanceNorm2d(c, affine=True))
    native_gn = _randomized(nn.GroupNorm(32, c))
    bn = _randomized(nn.BatchNorm2d(c))
    torch.manual_seed(0)
    wn_conv = weight_norm(nn.Conv2d(c, c, 3, padding=1))
    torch_wn_conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(c, c, 3, padding=1))
    torch_wn_conv.load_state_dict(wn_conv.state_dict())
    ws_conv = standardize_weight(nn.Conv2d(c, c, 3, padding=1))
    timm_conv = TimmStdConv2d(c, c, 3, padding=1)
    timm_conv.load_state_dict(
        {"weight": ws_conv.parametrizations.weight.original, "bias": ws_conv.bias}
    )

    def adalin_inline(x: torch.Tensor) -> torch.Tensor:
        view = (1, -1, 1, 1)
        inst = F.group_norm(x, c, None, None, adalin.eps)
        layer = F.group_norm(x, 1, None, None, adalin.eps)
        out = torch.lerp(layer, inst, adalin.rho.clamp(0, 1).view(view))
        return torch.addcmul(adalin.bias.view(view), out, adalin.weight.view(view))

    def adaln_inline(x: torch.Tensor) -> torch.Tensor:
        h = F.group_norm(x, 1, adaln.weight, adaln.bias, adaln.eps)
        shift, scale = adaln.modulation(adaln.condition).chunk(2, dim=1)
        return torch.addcmul(shift[:, :, None, None], h, 1 + scale[:, :, None, None])

    return {
        "GroupNorm(32)": (gn, lambda x: F.group_norm(x, 32, gn.weight, gn.bias, gn.eps)),
        "GroupNorm(32) vs nn.GroupNorm": (gn, native_gn),
        "GroupNorm(32) vs torch.group_norm": (
            gn,
            lambda x: torch.group_norm(x, 32, gn.weight, gn.bias, gn.eps),
        ),
        "LayerNorm": (ln, lambda x: F.group_norm(x, 1, ln.weight, ln.bias, ln.eps)),
        "InstanceNorm": (inorm, lambda x: F.group_norm(x, c, inorm.weight, inorm.bias, 1e-5)),
        "InstanceNorm vs nn.InstanceNorm2d": (inorm, native_in),
        "LayerNorm2d vs timm": (ln2d, lambda x: _timm_ln2d(ln2d, x)),
        "LayerNorm2d vs timm + output in input's format": (
            ln2d,
            lambda x: _timm_ln2d(ln2d, x).contiguous(memory_format=_format_of(x)),
        ),
        "AdaLIN": (adalin, adalin_inline),
        "AdaLN": (adaln, adaln_inline),
        "weight_norm conv": (wn_conv, torch_wn_conv),
        "standardize_weight conv": (ws_conv, timm_conv),
        "GroupNorm(32) vs BatchNorm2d": (gn, bn),
        "LayerNorm vs BatchNorm2d": (ln, bn),
        "InstanceNorm vs BatchNorm2d": (inorm, bn),
        "LayerNorm2d vs BatchNorm2d": (ln2d, bn),
        "seed GroupNorm(32) / ours": (SeedGroupNorm(c), gn),
        "seed LayerNorm / ours": (SeedLayerNorm(c), ln),
    }


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: list) -> Any:
    out = fn(x)
    grad = torch.ones_like(out)
    return lambda: torch.autograd.grad(fn(x), [x, *params], grad)


def measure(shape: tuple[int, ...], fmt: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every pair on one input shape and layout, in the same interleaved rounds."""
    table = pairs(shape[0], shape[1])
    x = torch.randn(shape).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    fns = {}
    for row, (ours, reference) in table.items():
        ours = ours.to(memory_format=FORMATS[fmt])
        if isinstance(reference, nn.Module):
            reference = reference.to(memory_format=FORMATS[fmt])
        params = [p for p in ours.parameters() if p.requires_grad]
        ref_params = params  # inline references compute with our layer's parameters
        if isinstance(reference, nn.Module):
            ref_params = [p for p in reference.parameters() if p.requires_grad]
        fns[f"{row}|ours"] = _fwd_bwd(ours, x, params)
        fns[f"{row}|ref"] = _fwd_bwd(reference, x, ref_params)
    reps = args.reps
    if reps is None:  # about --budget-ms per function per round, from one timed call each
        slowest = max(timed(fn, 1)[1] for fn in fns.values())
        reps = min(200, max(3, round(args.budget_ms / 1e3 / slowest)))
    times = rounds_of(fns, rounds=args.rounds, reps=reps, warmup=2)
    # Seed rows hold the seed layer in the "ours" slot: their ratio is seed time / ours.
    return {row: ratio(times, f"{row}|ours", f"{row}|ref").as_dict() for row in table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="add batch-32 shapes at 224 px")
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=list(FORMATS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=None, help="calls per function per round")
    parser.add_argument(
        "--budget-ms", type=float, default=20.0, help="without --reps: ms per function per round"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    shapes = SHAPES + (FULL_SHAPES if args.full else [])
    results: dict[str, Any] = {
        "setup": setup(
            args.threads,
            rounds=args.rounds,
            reps=args.reps or f"auto, about {args.budget_ms} ms per function per round",
            shapes=shapes,
        ),
        "cells": [],
    }
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for fmt in args.formats:
        for shape in shapes:
            cell = measure(shape, fmt, args)
            results["cells"].append({"shape": list(shape), "format": fmt, "ratios": cell})
            for row, r in cell.items():
                rows.setdefault((row, fmt), []).append(r)
            print(f"done {shape} {fmt}", flush=True)
    header = ["layer / reference", "layout", *("x".join(map(str, s)) for s in shapes)]
    header += ["worst (CPU)", "verdict"]
    body = []
    for (row, fmt), cells in rows.items():
        cpu = [c["cpu"] for c in cells]
        if row.startswith("seed"):
            worst = min(cpu)
            verdict = "met" if worst >= SEED_SPEEDUP else "MISSED"
        elif row.endswith(("vs nn.InstanceNorm2d", "vs timm", "vs BatchNorm2d")):
            worst, verdict = max(cpu), "-"
        else:
            worst = max(cpu)
            verdict = "met" if worst <= WITHIN else "MISSED"
        body.append([row, fmt, *(f"{c['cpu']:.2f} ({c['wall']:.2f})" for c in cells)])
        body[-1] += [worst, verdict]
    loads = [c["load"] for cell in results["cells"] for c in cell["ratios"].values()]
    note = (
        "cells: CPU-time ratio (wall-time ratio), forward+backward, ours / reference; seed rows: "
        f"seed / ours (>= {SEED_SPEEDUP:.0f} wanted). Median of {args.rounds} interleaved rounds "
        f"of {args.reps or 'auto'} calls, {args.threads} thread(s); baseline load (wall/CPU) "
        f"{min(loads):.2f}-{max(loads):.2f}."
    )
    write("layer_overhead", results, markdown(header, body), note)


if __name__ == "__main__":
    main()
