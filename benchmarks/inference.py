"""Inference: eval-mode BN vs ``fold_bn``, and ``torch.compile`` of every converted model.

Part 1, folding: torchvision resnet18 / resnet50 in eval mode, forward under
``torch.inference_mode``, the BN model against a copy with every BN folded into its conv by
``normswap.fold_bn`` (same layout). Target of issue 6: fold_bn <= 0.92x BN eval.

Part 2, ``torch.compile``: every target's converted model (as in ``step_time.py``:
gn, ln, ln2d, in, adalin, adaln, wn_keep, wn_remove, wn_fold, ws_gn, and bn) is compiled with
``fullgraph=True`` (any graph break is an error) and run for one training step (forward and
backward; ``--check-backend``, default ``aot_eager``, which traces forward and backward through
AOTAutograd like inductor does but skips code generation, so the check stays fast on a small
CPU). Target: every target's converted resnet50 compiles. Then, for ``--compile-targets``,
inference time of the eager model against the inductor-compiled one (ratio compiled / eager).

Method (see ``_bench.py``): configurations of one cell run in interleaved rounds of ``--reps``
forward passes each, rotating order; per-round ratios, median over rounds, wall and thread CPU
time. Default cells: batch 8, 64 px, both layouts (about 6 minutes on one thread, most of it
compiling); ``--full`` adds 224 px and resnet50 for the compiled timings.

Run: ``python benchmarks/inference.py [--full] [--rounds 5] [--reps 5] [--threads 1]
[--check-backend aot_eager] [--compile-targets bn gn]``.
"""

from __future__ import annotations

import argparse
import copy
import time
import traceback
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from _bench import interleaved, markdown, ratio_cells, setup, write
from step_time import COND_DIM, CONFIGS, convert
from torch import nn

import normswap

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
TARGETS = [c for c in CONFIGS if not c.startswith("seed")]
FOLD_CEILING = 0.92


def _base(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, num_classes=10)


def _forward(model: nn.Module, x: torch.Tensor, config: str) -> Any:
    cond = torch.randn(x.shape[0], COND_DIM)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            if config == "adaln":
                with normswap.condition(model, cond):
                    return model(x)
            return model(x)

    return run


def folding(
    models: list[str], sizes: list[int], args: argparse.Namespace
) -> tuple[list[list], list[dict]]:
    """BN eval vs fold_bn, per model, size and layout."""
    rows, records = [], []
    for name in models:
        for size in sizes:
            for fmt, memory_format in FORMATS.items():
                bn = _base(name).eval()
                x = torch.randn(args.batch, 3, size, size)
                folded = copy.deepcopy(bn)
                normswap.fold_bn(folded, x[:1])
                bn, folded = (m.to(memory_format=memory_format) for m in (bn, folded))
                x = x.contiguous(memory_format=memory_format)
                ratios = interleaved(
                    {"bn": _forward(bn, x, "bn"), "fold": _forward(folded, x, "fold")},
                    "bn",
                    rounds=args.rounds,
                    reps=args.reps,
                    warmup=2,
                )
                r = ratios["fold"]
                verdict = "met" if r.cpu <= FOLD_CEILING else "MISSED"
                cell = f"{name} b{args.batch} {size}px"
                rows.append([cell, fmt, *ratio_cells(r), FOLD_CEILING, verdict])
                records.append({"cell": cell, "format": fmt, **r.as_dict(), "verdict": verdict})
                print(f"fold {cell} {fmt}: {r.cpu:.2f}", flush=True)
    return rows, records


def fullgraph_check(name: str, args: argparse.Namespace) -> tuple[list[list], list[dict]]:
    """Compile every target's converted ``name`` with fullgraph=True; one training step."""
    torch._dynamo.reset()
    base = _base(name)
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 10, (2,))
    rows, records = [], []
    for config in TARGETS:
        model = convert(base, config, x)
        compiled = torch.compile(model, fullgraph=True, backend=args.check_backend)
        start = time.perf_counter()
        try:
            if config == "adaln":
                with normswap.condition(model, torch.randn(2, COND_DIM)):
                    loss = F.cross_entropy(compiled(x), y)
            else:
                loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            ok, error = True, ""
        except Exception as err:  # any failure to compile is the finding
            ok, error = False, traceback.format_exception_only(err)[-1].strip()[:300]
        seconds = time.perf_counter() - start
        rows.append([name, config, "yes" if ok else "NO", f"{seconds:.1f}", error])
        records.append({"model": name, "config": config, "ok": ok, "s": seconds, "error": error})
        print(f"fullgraph {name} {config}: {'ok' if ok else error}", flush=True)
        torch._dynamo.reset()
    return rows, records


def compiled_vs_eager(
    models: list[str], sizes: list[int], args: argparse.Namespace
) -> tuple[list[list], list[dict]]:
    """Inference time of the inductor-compiled converted model / the eager one."""
    rows, records = [], []
    for name in models:
        base = _base(name)
        for size in sizes:
            for fmt, memory_format in FORMATS.items():
                x = torch.randn(args.batch, 3, size, size)
                fns = {}
                for config in args.compile_targets:
                    model = convert(base, config, x).eval().to(memory_format=memory_format)
                    xc = x.contiguous(memory_format=memory_format)
                    fns[f"{config}|eager"] = _forward(model, xc, config)
                    fns[f"{config}|compiled"] = _forward(
                        torch.compile(model, fullgraph=True), xc, config
                    )
                    fns[f"{config}|compiled"]()  # compile outside the timed rounds
                for config in args.compile_targets:
                    pair = {k: fns[f"{config}|{k}"] for k in ("eager", "compiled")}
                    r = interleaved(pair, "eager", rounds=args.rounds, reps=args.reps)
                    cell = f"{name} b{args.batch} {size}px"
                    rows.append([cell, fmt, config, *ratio_cells(r["compiled"])])
                    records.append(
                        {"cell": cell, "format": fmt, "config": config} | r["compiled"].as_dict()
                    )
                    print(f"compiled {cell} {fmt} {config}: {r['compiled'].cpu:.2f}", flush=True)
                torch._dynamo.reset()
    return rows, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5, help="forward passes per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check-backend", default="aot_eager")
    parser.add_argument("--check-models", nargs="+", default=["resnet50"])
    parser.add_argument("--compile-targets", nargs="+", choices=TARGETS, default=["bn", "gn"])
    args = parser.parse_args()
    sizes = [64, 224] if args.full else [64]
    results: dict[str, Any] = {
        "setup": setup(args.threads, batch=args.batch, rounds=args.rounds, reps=args.reps)
    }

    fold_rows, results["fold"] = folding(["resnet18", "resnet50"], sizes, args)
    check_rows, results["fullgraph"] = [], []
    for name in args.check_models:
        rows, records = fullgraph_check(name, args)
        check_rows += rows
        results["fullgraph"] += records
    compile_models = ["resnet18", "resnet50"] if args.full else ["resnet18"]
    compile_rows, results["compiled"] = compiled_vs_eager(compile_models, sizes, args)

    tables = [
        "## fold_bn vs BN eval (ratio = folded / BN, inference forward)",
        markdown(
            ["cell", "layout", "ratio (wall)", "ratio (CPU)", "load", "target", "verdict"],
            fold_rows,
        ),
        f"## torch.compile(fullgraph=True), one training step, backend {args.check_backend}",
        markdown(["model", "target", "compiles", "s", "error"], check_rows),
        "## inductor-compiled / eager, inference forward",
        markdown(["cell", "layout", "target", "ratio (wall)", "ratio (CPU)", "load"], compile_rows),
    ]
    note = (
        f"Medians of {args.rounds} interleaved rounds of {args.reps} forward passes, "
        f"{args.threads} thread(s); verdicts on the CPU-time ratio."
    )
    write("inference", results, "\n\n".join(tables), note)


if __name__ == "__main__":
    main()
