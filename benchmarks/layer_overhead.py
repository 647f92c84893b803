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
  -> our GroupNorm / LayerNorm: the speed-up of ours over "what a user would write";
* the layers that need no LayerNorm statistics, on the same CNN maps: ``DyT(C)``, ``Derf(C)``
  and ``RMSNorm(C)`` (channels in dim 1) -> our ``LayerNorm2d(C)`` (LayerNorm over the channels
  at each position, what they replace point for point), and for information -> a training-mode
  ``nn.BatchNorm2d``;
* the same layers on transformer tokens ``(N, L, C)``, the normalized dim last (ViT-S and ViT-B
  at 197 tokens, a GPT-like 256-token sequence): ``DyT(C, channels_last=True)``,
  ``Derf(C, channels_last=True)`` and ``RMSNorm(C, channels_last=True)`` -> ``nn.LayerNorm(C)``,
  and for information ``RMSNorm(C, channels_last=True)`` -> ``nn.RMSNorm(C)``;
* with ``--compile``, on the token shapes: ``torch.compile``'d DyT, Derf, RMSNorm and
  ``nn.LayerNorm`` -> eager ``nn.LayerNorm``, with each module's compile time (its first
  forward+backward, inductor's caches disabled, after a warm-up compile that pays inductor's
  one-time start-up) in a table of its own; written to
  ``results/layer_overhead_compile.{md,json}``.

Targets of issue 6: every layer within 5% of its reference (ratio <= 1.05), and at least 3x
faster than the seed-style versions (seed ratio >= 3). The goal for DyT, Derf and RMSNorm:
forward+backward no slower than LayerNorm (ratio <= 1.0). Verdicts use the CPU-time ratio of
the worst shape.

Method (see ``_bench.py``): for each shape and layout, all pairs run in the same interleaved
rounds (``--reps`` calls per function per round, by default as many as take about
``--budget-ms`` for the slowest function; rotating order); each ratio is the median over rounds
of layer time / reference time in that round.

Default shapes: resnet18's norm inputs at batch 8 and 64 px, plus one 56x56 map, and the
three token shapes (about a minute on one thread; ``--compile`` adds about a minute).
``--full`` adds batch-32 shapes at 224 px.

Run: ``python benchmarks/layer_overhead.py [--full] [--compile] [--rounds 7]
[--reps N | --budget-ms 20] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import time
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
    Derf,
    DyT,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    standardize_weight,
    weight_norm,
)

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
SHAPES = [(8, 64, 16, 16), (8, 128, 8, 8), (8, 256, 4, 4), (8, 512, 2, 2), (8, 64, 56, 56)]
FULL_SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7)]
#: Transformer tokens (N, L, C): ViT-S/16 and ViT-B/16 at 224 px (197 tokens), a GPT-2-like
#: 256-token sequence.
TOKEN_SHAPES = [(8, 197, 384), (8, 197, 768), (4, 256, 768)]
COND_DIM = 16
WITHIN = 1.05
SEED_SPEEDUP = 3.0
#: The issue's goal for the layers without LayerNorm statistics: no slower than LayerNorm.
GOAL = 1.0
GOAL_LAYERS = ("DyT", "Derf", "RMSNorm")
#: Rows shown for information only (no verdict).
INFO_ROWS = (
    "vs nn.InstanceNorm2d",
    "vs timm",
    "vs BatchNorm2d",
    "vs nn.RMSNorm",
    "LayerNorm compiled vs eager LayerNorm",
)


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


def replacement_pairs(c: int) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Per row: DyT, Derf or RMSNorm (channels in dim 1) and the norm it would replace."""
    ln2d, bn = _randomized(LayerNorm2d(c)), _randomized(nn.BatchNorm2d(c))
    layers = {"DyT": DyT(c), "Derf": Derf(c), "RMSNorm": RMSNorm(c)}
    return {
        f"{name} vs {reference_name}": (_randomized(layer), reference)
        for reference_name, reference in (("LayerNorm2d", ln2d), ("BatchNorm2d", bn))
        for name, layer in layers.items()
    }


def token_layers(c: int) -> dict[str, nn.Module]:
    """The layers compared on transformer tokens, the normalized dim last (same parameters)."""
    rms = _randomized(RMSNorm(c, channels_last=True))
    native_rms = nn.RMSNorm(c, eps=rms.eps)
    native_rms.load_state_dict(rms.state_dict())
    return {
        "LayerNorm": _randomized(nn.LayerNorm(c)),
        "DyT": _randomized(DyT(c, channels_last=True)),
        "Derf": _randomized(Derf(c, channels_last=True)),
        "RMSNorm": rms,
        "nn.RMSNorm": native_rms,
    }


def token_pairs(c: int) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Per row: (our layer, the reference module) on ``(N, L, C)`` tokens."""
    layers = token_layers(c)
    ln = layers["LayerNorm"]
    return {
        "DyT vs LayerNorm": (layers["DyT"], ln),
        "Derf vs LayerNorm": (layers["Derf"], ln),
        "RMSNorm vs LayerNorm": (layers["RMSNorm"], ln),
        "RMSNorm vs nn.RMSNorm": (layers["RMSNorm"], layers["nn.RMSNorm"]),
    }


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: list) -> Any:
    out = fn(x)
    grad = torch.ones_like(out)
    return lambda: torch.autograd.grad(fn(x), [x, *params], grad)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _reps(fns: dict[str, Callable[[], object]], args: argparse.Namespace) -> int:
    """``--reps``, or as many calls as take about ``--budget-ms`` for the slowest function."""
    if args.reps is not None:
        return args.reps
    slowest = max(timed(fn, 1)[1] for fn in fns.values())
    return min(200, max(3, round(args.budget_ms / 1e3 / slowest)))


def measure(shape: tuple[int, ...], fmt: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every pair on one input shape and layout: the pairs of :func:`pairs` in the same
    interleaved rounds, then those of :func:`replacement_pairs` in rounds of their own (in the
    same rounds, their allocations shifted the rows above: GroupNorm(32) measured 1.01-1.05
    without them and 1.14-1.17 with them at 8x64x16x16)."""
    x = torch.randn(shape).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    ratios = _ratios(pairs(shape[0], shape[1]), x, fmt, args)
    return ratios | _ratios(replacement_pairs(shape[1]), x, fmt, args)


def _ratios(
    table: dict[str, tuple], x: torch.Tensor, fmt: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The pairs of ``table`` on ``x``, in the same interleaved rounds."""
    fns = {}
    for row, (ours, reference) in table.items():
        ours = ours.to(memory_format=FORMATS[fmt])
        if isinstance(reference, nn.Module):
            reference = reference.to(memory_format=FORMATS[fmt])
        params = _trainable(ours)
        ref_params = params  # inline references compute with our layer's parameters
        if isinstance(reference, nn.Module):
            ref_params = _trainable(reference)
        fns[f"{row}|ours"] = _fwd_bwd(ours, x, params)
        fns[f"{row}|ref"] = _fwd_bwd(reference, x, ref_params)
    times = rounds_of(fns, rounds=args.rounds, reps=_reps(fns, args), warmup=2)
    # Seed rows hold the seed layer in the "ours" slot: their ratio is seed time / ours.
    return {row: ratio(times, f"{row}|ours", f"{row}|ref").as_dict() for row in table}


def measure_tokens(shape: tuple[int, ...], args: argparse.Namespace) -> dict[str, Any]:
    """Every token pair on one ``(N, L, C)`` shape, in the same interleaved rounds."""
    x = torch.randn(shape).requires_grad_()
    fns = {}
    table = token_pairs(shape[-1])
    for row, (ours, reference) in table.items():
        fns[f"{row}|ours"] = _fwd_bwd(ours, x, _trainable(ours))
        fns[f"{row}|ref"] = _fwd_bwd(reference, x, _trainable(reference))
    times = rounds_of(fns, rounds=args.rounds, reps=_reps(fns, args), warmup=2)
    return {row: ratio(times, f"{row}|ours", f"{row}|ref").as_dict() for row in table}


def measure_compiled(
    shape: tuple[int, ...], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, float]]:
    """``torch.compile``'d layers against eager ``nn.LayerNorm`` on one token shape.

    Returns the ratios and each module's compile time in seconds (its first forward+backward,
    which compiles the forward and the backward graph; dynamo reset and inductor's caches off,
    so every shape compiles from scratch).
    """
    torch._dynamo.reset()
    x = torch.randn(shape).requires_grad_()
    layers = token_layers(shape[-1])
    eager_ln = layers.pop("LayerNorm")
    layers.pop("nn.RMSNorm")
    layers["LayerNorm"] = _randomized(nn.LayerNorm(shape[-1]))
    fns, seconds = {}, {}
    for name, layer in layers.items():
        compiled = torch.compile(layer, dynamic=False)
        params = _trainable(layer)
        start = time.perf_counter()
        torch.autograd.grad(compiled(x).sum(), [x, *params])
        seconds[name] = time.perf_counter() - start
        fns[f"{name} compiled|ours"] = _fwd_bwd(compiled, x, params)
        fns[f"{name} compiled|ref"] = _fwd_bwd(eager_ln, x, _trainable(eager_ln))
    times = rounds_of(fns, rounds=args.rounds, reps=_reps(fns, args), warmup=2)
    rows = [name.removesuffix("|ours") for name in fns if name.endswith("|ours")]
    return {row: ratio(times, f"{row}|ours", f"{row}|ref").as_dict() for row in rows}, seconds


def _verdict(row: str, cpu: list[float]) -> tuple[float, str]:
    """The worst CPU-time ratio over the shapes and whether it meets the row's target."""
    if row.startswith("seed"):
        return min(cpu), "met" if min(cpu) >= SEED_SPEEDUP else "MISSED"
    worst = max(cpu)
    if row.endswith(INFO_ROWS):
        return worst, "-"
    target = GOAL if row.startswith(GOAL_LAYERS) else WITHIN
    return worst, "met" if worst <= target else "MISSED"


def _table(rows: dict[tuple[str, str], list[dict[str, Any]]], columns: list[str]) -> str:
    header = ["layer / reference", "layout", *columns, "worst (CPU)", "verdict"]
    body = []
    for (row, fmt), cells in rows.items():
        worst, verdict = _verdict(row, [c["cpu"] for c in cells])
        body.append([row, fmt, *(f"{c['cpu']:.2f} ({c['wall']:.2f})" for c in cells)])
        body[-1] += [worst, verdict]
    return markdown(header, body)


def _loads(cells: list[dict[str, Any]]) -> str:
    loads = [r["load"] for cell in cells for r in cell["ratios"].values()]
    return f"{min(loads):.2f}-{max(loads):.2f}"


def _shape_name(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def run_compiled(args: argparse.Namespace) -> None:
    """The ``--compile`` comparison on the token shapes, to ``results/layer_overhead_compile``."""
    import torch._inductor.config  # only with --compile: importing inductor takes seconds

    torch._inductor.config.force_disable_caches = True  # compile times from scratch
    warm_up = torch.compile(nn.LayerNorm(8), dynamic=False)  # inductor's one-time start-up
    torch.autograd.grad(warm_up(torch.randn(2, 8, requires_grad=True)).sum(), warm_up.weight)
    results: dict[str, Any] = {
        "setup": setup(
            args.threads,
            rounds=args.rounds,
            reps=args.reps or f"auto, about {args.budget_ms} ms per function per round",
            shapes=TOKEN_SHAPES,
            compile="torch.compile(module, dynamic=False), inductor caches disabled",
        ),
        "cells": [],
    }
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    compile_rows: dict[str, list[float]] = {}
    for shape in TOKEN_SHAPES:
        cell, seconds = measure_compiled(shape, args)
        results["cells"].append({"shape": list(shape), "ratios": cell, "compile_s": seconds})
        for row, r in cell.items():
            rows.setdefault((f"{row} vs eager LayerNorm", "tokens"), []).append(r)
        for name, s in seconds.items():
            compile_rows.setdefault(name, []).append(s)
        print(f"done {shape} compiled", flush=True)
    columns = [_shape_name(s) for s in TOKEN_SHAPES]
    compile_table = markdown(
        ["compile time (s)", *columns],
        [[name, *(f"{s:.1f}" for s in seconds)] for name, seconds in compile_rows.items()],
    )
    note = (
        "cells: CPU-time ratio (wall-time ratio), forward+backward, the compiled module / eager "
        f"nn.LayerNorm (the issue's goal: <= {GOAL:.1f}). Median of {args.rounds} interleaved "
        f"rounds, {args.threads} thread(s); baseline load (wall/CPU) {_loads(results['cells'])}. "
        "Compile time: wall time of each module's first forward+backward (forward and backward "
        "graphs, dynamo reset per shape, inductor caches disabled, after one warm-up compile "
        "that pays inductor's one-time start-up)."
    )
    write("layer_overhead_compile", results, f"{_table(rows, columns)}\n\n{compile_table}", note)


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
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile'd DyT/Derf/RMSNorm/LayerNorm on the token shapes (slow)",
    )
    args = parser.parse_args()
    shapes = SHAPES + (FULL_SHAPES if args.full else [])
    results: dict[str, Any] = {
        "setup": setup(
            args.threads,
            rounds=args.rounds,
            reps=args.reps or f"auto, about {args.budget_ms} ms per function per round",
            shapes=shapes,
            token_shapes=TOKEN_SHAPES,
        ),
        "cells": [],
        "token_cells": [],
    }
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for fmt in args.formats:
        for shape in shapes:
            cell = measure(shape, fmt, args)
            results["cells"].append({"shape": list(shape), "format": fmt, "ratios": cell})
            for row, r in cell.items():
                rows.setdefault((row, fmt), []).append(r)
            print(f"done {shape} {fmt}", flush=True)
    token_rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for shape in TOKEN_SHAPES:
        cell = measure_tokens(shape, args)
        results["token_cells"].append({"shape": list(shape), "ratios": cell})
        for row, r in cell.items():
            token_rows.setdefault((row, "tokens"), []).append(r)
        print(f"done {shape} tokens", flush=True)
    tables = (
        "## CNN maps (N, C, H, W)\n\n"
        + _table(rows, [_shape_name(s) for s in shapes])
        + "\n\n## Transformer tokens (N, L, C), normalized over the last dim\n\n"
        + _table(token_rows, [_shape_name(s) for s in TOKEN_SHAPES])
    )
    note = (
        "cells: CPU-time ratio (wall-time ratio), forward+backward, ours / reference; seed rows: "
        f"seed / ours (>= {SEED_SPEEDUP:.0f} wanted); DyT, Derf and RMSNorm against LayerNorm: "
        f"<= {GOAL:.1f} wanted. Median of {args.rounds} interleaved rounds of "
        f"{args.reps or 'auto'} calls, {args.threads} thread(s); baseline load (wall/CPU) "
        f"{_loads(results['cells'] + results['token_cells'])}."
    )
    write("layer_overhead", results, tables, note)
    if args.compile:
        run_compiled(args)


if __name__ == "__main__":
    main()
