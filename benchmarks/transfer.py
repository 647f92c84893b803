"""Transfer: fine-tune the real pretrained MobileNetV2 on Fashion-MNIST from each starting point.

The question a user converting a pretrained BatchNorm checkpoint asks is what accuracy they
get after fine-tuning at their small batch. Each *method* is a starting point (and, for the
progressive ones, a schedule during fine-tuning); every method gets the same fine-tuning:
``--steps`` AdamW steps at per-step batch ``B`` (``--batches``), cosine learning rate, a fresh
10-class head, ``--size`` px inputs drawn from labeled Fashion-MNIST TRAIN images that no
conversion saw. Every method runs at every learning rate of ``--lrs`` and every seed of
``--seeds``; the report picks, per method and batch, the learning rate with the best mean
*validation* accuracy (a split of TRAIN) and reports *test* accuracy (Fashion-MNIST TEST) at
that learning rate: mean ± standard deviation over seeds. ``bn`` at ``--reference-batch``
(32) is the large-batch reference.

Runs go to ``<out>/transfer_runs.jsonl`` (``transfer_small_runs.jsonl`` with ``--small``), one
line each, and are skipped when already there, so an interrupted benchmark resumes and two
processes can share the grid (``--shard 0/2`` and ``--shard 1/2``, one thread each; a method's
conversion is cached in ``<out>/transfer_cache``). ``--report`` only aggregates: ``transfer.md``,
``transfer.json`` and ``transfer.png`` (accuracy per method with error bars).

``--small`` is the CI mode: a few steps on tiny inputs of a randomly initialized MobileNetV2
(no checkpoint), every method once; it checks that the whole pipeline runs, not accuracy.

Run: ``TORCH_HOME=.cache/torch .venv/bin/python benchmarks/transfer.py`` (``make
bench-fidelity`` runs it with fidelity.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from normswap.data import load_fashion_mnist, to_imagenet
from normswap.pretrained.calibrate import calibrate
from normswap.pretrained.convert import convert_pretrained
from normswap.pretrained.hybrid import LayerCost, conversion_costs
from normswap.progressive import (
    BlendSchedule,
    calibrate_blend,
    finish_blend,
    set_blend,
    swap_progressive,
)
from normswap.surgery import swap

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Context:
    """What every method may use: the pretrained model and unlabeled target-domain images."""

    reference: nn.Module
    unlabeled: Tensor  # conversion data: TRAIN images no fine-tuning run draws
    steps: int
    cache: Path
    budget: float
    small: bool


@dataclass
class Start:
    """A method's starting model, and the blend schedule its fine-tuning follows (if any)."""

    model: nn.Module
    schedule: BlendSchedule | None = None


def _copy(ctx: Context) -> nn.Module:
    return copy.deepcopy(ctx.reference).eval()


def _converted(ctx: Context, key: str, make: Callable[[nn.Module], None]) -> nn.Module:
    """A conversion made once per benchmark (cached on disk): it costs minutes."""
    path = ctx.cache / f"{key}.pt"
    model = _copy(ctx)
    swap(model, "gn")
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    model = _copy(ctx)
    make(model)
    if not ctx.small:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model


def bn(ctx: Context, batch: int) -> Start:
    """The pretrained model as it is: BatchNorm in train mode (batch statistics)."""
    return Start(_copy(ctx))


def frozen(ctx: Context, batch: int) -> Start:
    """BatchNorm frozen to its eval-mode affine (normswap's ``frozen`` family)."""
    model = _copy(ctx)
    swap(model, "frozen")
    return Start(model)


def gn_scratch(ctx: Context, batch: int) -> Start:
    """GroupNorm, every weight randomly initialized."""
    model = torchvision.models.mobilenet_v2(weights=None)
    swap(model, "gn")
    return Start(model)


def gn_copy(ctx: Context, batch: int) -> Start:
    """GroupNorm with the BatchNorms' γ/β copied (``normswap.swap``)."""
    model = _copy(ctx)
    swap(model, "gn")
    return Start(model)


def gn_convert(ctx: Context, batch: int) -> Start:
    """``convert_pretrained``: calibrated and distilled on the unlabeled images."""

    def make(model: nn.Module) -> None:
        convert_pretrained(
            model, "gn", ctx.unlabeled, budget=ctx.budget, clock=time.process_time, progress=False
        )

    return Start(_converted(ctx, f"gn_convert_{ctx.budget:g}", make))


def gn_cal(ctx: Context, batch: int) -> Start:
    """GroupNorm with γ/β calibrated (closed form) to reproduce the BatchNorms on the
    unlabeled target-domain images (``normswap.calibrate``), then plain fine-tuning."""
    model = _copy(ctx)
    swap(model, "gn")
    calibrate(model, ctx.reference, _calibration_batches(ctx))
    return Start(model)


def _calibration_batches(ctx: Context) -> list[Tensor]:
    return list(ctx.unlabeled[:256].split(32))


def gn_progressive(ctx: Context, batch: int) -> Start:
    """Progressive conversion (``NormSwap("gn", progressive=...)``): blends that start as the
    pretrained BatchNorms and end, at 60% of fine-tuning, as GroupNorms calibrated on the
    unlabeled images (``calibrate_blend``); pure GroupNorm for the rest."""
    model = _copy(ctx)
    swap_progressive(model, "gn")
    calibrate_blend(model, ctx.reference, _calibration_batches(ctx))
    return Start(model, BlendSchedule(end=max(1, round(0.6 * ctx.steps))))


def gn_hybrid(ctx: Context, batch: int) -> Start:
    """``frozen`` on the 5 layers whose conversion alone costs the most (KL to the original,
    measured after calibration on the unlabeled images: ``normswap.conversion_costs``), the
    rest converted by ``convert_pretrained``: batch-independent, but not pure GroupNorm."""
    path = ctx.cache / "gn_hybrid_costs.json"
    if path.exists():
        costs = [LayerCost(**c) for c in json.loads(path.read_text())]
    else:
        costs = conversion_costs(
            ctx.reference,
            "gn",
            ctx.unlabeled[:256],
            calibrate_data=list(ctx.unlabeled[:64].split(32)),
        )
        if not ctx.small:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps([vars(c) for c in costs]))
    costly = [c.path for c in costs[: min(5, len(costs) - 1)]]

    def make(model: nn.Module) -> None:
        convert_pretrained(
            model,
            "gn",
            ctx.unlabeled,
            budget=ctx.budget,
            exclude=costly,
            clock=time.process_time,
            progress=False,
        )
        swap(model, "frozen")

    model = _copy(ctx)
    cached = ctx.cache / f"gn_hybrid_{ctx.budget:g}.pt"
    if cached.exists():
        swap(model, "gn", exclude=costly)
        swap(model, "frozen")
        model.load_state_dict(torch.load(cached, weights_only=True))
        return Start(model)
    make(model)
    if not ctx.small:
        torch.save(model.state_dict(), cached)
    return Start(model)


def gn_progressive_copy(ctx: Context, batch: int) -> Start:
    """As ``gn_progressive``, ending at GroupNorms with the BatchNorms' γ/β (no calibration)."""
    model = _copy(ctx)
    swap_progressive(model, "gn")
    return Start(model, BlendSchedule(end=max(1, round(0.6 * ctx.steps))))


METHODS: dict[str, Callable[[Context, int], Start]] = {
    "bn": bn,
    "frozen": frozen,
    "gn_scratch": gn_scratch,
    "gn_copy": gn_copy,
    "gn_convert": gn_convert,
    "gn_cal": gn_cal,
    "gn_progressive": gn_progressive,
    "gn_progressive_copy": gn_progressive_copy,
    "gn_hybrid": gn_hybrid,
}


def _fresh_head(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model.classifier[1] = nn.Linear(model.classifier[1].in_features, 10)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in eval mode, in batches of 100."""
    model.eval()
    pred = torch.cat([model(b).argmax(-1) for b in x.split(100)])
    return float((pred == y).float().mean())


def fine_tune(
    start: Start,
    pool: tuple[Tensor, Tensor],
    *,
    size: int,
    batch: int,
    lr: float,
    steps: int,
    seed: int,
    head_lr_mult: float,
) -> tuple[nn.Module, list[float]]:
    """Fine-tune in place; returns the model (blends finished) and the loss every 10 steps."""
    model = _fresh_head(start.model, seed).train()
    head = list(model.classifier.parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    groups = [{"params": body, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    x_u8, y = pool
    losses, running = [], 0.0
    for step in range(steps):
        if start.schedule is not None:
            set_blend(model, start.schedule.alpha(step))
        idx = torch.randint(0, x_u8.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(model(to_imagenet(x_u8[idx], size)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if (step + 1) % 10 == 0:
            losses.append(round(running / 10, 4))
            running = 0.0
    if start.schedule is not None:
        set_blend(model, 1.0)
        finish_blend(model)
    return model, losses


def _norm_classes(model: nn.Module) -> list[str]:
    names = {type(m).__name__ for m in model.modules()}
    return sorted(n for n in names if n.endswith(("Norm", "Norm2d", "Affine")))


def _runs_file(args: argparse.Namespace) -> str:
    return "transfer_small_runs.jsonl" if args.small else "transfer_runs.jsonl"


def _key(r: dict) -> tuple:
    return (r["method"], r["batch"], r["lr"], r["seed"])


def run_grid(args: argparse.Namespace) -> None:
    """Run every (method, batch, lr, seed) not yet in the runs file (this shard's share)."""
    runs_path = args.out / _runs_file(args)
    done = set()
    if runs_path.exists():
        done = {_key(json.loads(line)) for line in runs_path.read_text().splitlines() if line}
    # Seed-major: a grid stopped early has every method at the same seeds.
    grid = [
        (m, b, lr, s)
        for s in args.seeds
        for b in args.batches
        for m in args.methods
        for lr in args.lrs
    ]
    if "bn" in args.methods and args.reference_batch:
        grid += [("bn", args.reference_batch, lr, s) for lr in args.lrs for s in args.seeds]
    index, count = args.shard
    grid = [g for i, g in enumerate(grid) if i % count == index and g not in done]
    print(f"{len(grid)} runs to do (shard {index}/{count})", flush=True)
    if not grid:
        return

    reference = (
        torchvision.models.mobilenet_v2(weights=None)
        if args.small
        else torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    ).eval()
    u8, labels = load_fashion_mnist("train", limit=args.unlabeled + args.val + args.pool)
    unlabeled = to_imagenet(u8[: args.unlabeled], args.size)
    val = slice(args.unlabeled, args.unlabeled + args.val)
    val_u8, val_y = u8[val], labels[val]
    pool = (u8[args.unlabeled + args.val :], labels[args.unlabeled + args.val :])
    test_u8, test_y = load_fashion_mnist("test", limit=args.test)
    val_x, test_x = to_imagenet(val_u8, args.size), to_imagenet(test_u8, args.size)
    ctx = Context(
        reference, unlabeled, args.steps, args.out / "transfer_cache", args.budget, args.small
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for method, batch, lr, seed in grid:
        wall, cpu = time.perf_counter(), time.process_time()
        torch.manual_seed(seed)
        start = METHODS[method](ctx, batch)
        prepared = time.process_time() - cpu
        model, losses = fine_tune(
            start,
            pool,
            size=args.size,
            batch=batch,
            lr=lr,
            steps=args.steps,
            seed=seed,
            head_lr_mult=args.head_lr_mult,
        )
        row = {
            "method": method,
            "batch": batch,
            "lr": lr,
            "seed": seed,
            "val": round(accuracy(model, val_x, val_y), 4),
            "test": round(accuracy(model, test_x, test_y), 4),
            "norms": _norm_classes(model),
            "prepare_cpu_s": round(prepared, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
            "wall_s": round(time.perf_counter() - wall, 1),
            "losses": losses,
            "steps": args.steps,
            "size": args.size,
            "head_lr_mult": args.head_lr_mult,
        }
        with runs_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{method:<22} b={batch:<3} lr={lr:<7g} seed={seed}  val {row['val']:.1%}  "
            f"test {row['test']:.1%}  ({row['cpu_s']} CPU-s)",
            flush=True,
        )


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (method, batch): the learning rate with the best mean validation accuracy, and the
    test accuracy there (mean, std over seeds), beside every learning rate's figures."""
    table: dict[tuple[str, int], dict[float, list[dict]]] = {}
    for r in rows:
        table.setdefault((r["method"], r["batch"]), {}).setdefault(r["lr"], []).append(r)
    out = []
    for (method, batch), by_lr in table.items():
        per_lr = {}
        for lr, runs in sorted(by_lr.items()):
            vals, tests = [r["val"] for r in runs], [r["test"] for r in runs]
            per_lr[lr] = {
                "seeds": len(runs),
                "val": statistics.fmean(vals),
                "test": statistics.fmean(tests),
                "test_std": statistics.stdev(tests) if len(tests) > 1 else math.nan,
            }
        best = max(per_lr, key=lambda lr: per_lr[lr]["val"])
        row = {"method": method, "batch": batch, "best_lr": best, **per_lr[best]}
        out.append({**row, "per_lr": per_lr})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batches", default="2,4")
    parser.add_argument("--reference-batch", type=int, default=32)
    parser.add_argument("--lrs", default="3e-4,1e-4,3e-5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--unlabeled", type=int, default=2000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--pool", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--budget", type=float, default=600.0, help="conversion CPU-seconds")
    parser.add_argument("--head-lr-mult", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--report", action="store_true", help="only aggregate the runs file")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.lrs = [float(v) for v in args.lrs.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.shard = tuple(int(v) for v in args.shard.split("/"))
    if args.small:  # the pipeline in seconds: tiny inputs, one of everything
        args.steps, args.size, args.unlabeled, args.val, args.pool, args.test = (
            3,
            32,
            64,
            32,
            64,
            32,
        )
        args.lrs, args.seeds, args.batches, args.reference_batch, args.budget = (
            [1e-4],
            [0],
            [2],
            4,
            5.0,
        )
    os.environ.setdefault("TORCH_HOME", str(Path(__file__).resolve().parents[1] / ".cache/torch"))
    torch.set_num_threads(args.threads)
    if not args.report:
        run_grid(args)
    runs_path = args.out / _runs_file(args)
    rows = [json.loads(line) for line in runs_path.read_text().splitlines() if line]
    table = sorted(aggregate(rows), key=lambda a: (a["batch"], -a["test"]))
    for a in table:
        print(
            f"{a['method']:<22} b={a['batch']:<3} best lr {a['best_lr']:<7g} val {a['val']:.1%} "
            f"test {a['test']:.1%} ± {a['test_std']:.1%} ({a['seeds']} seeds)"
        )
    stem = "transfer_small" if args.small else "transfer"
    (args.out / f"{stem}.json").write_text(json.dumps(table, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(table, args))
    plot(table, args.out / f"{stem}.png")


def markdown(table: list[dict], args: argparse.Namespace) -> str:
    """Per batch: every method at its best learning rate (by validation), test mean ± std."""
    lines = [
        "# Transfer: fine-tuning the pretrained MobileNetV2 on Fashion-MNIST",
        "",
        f"{args.steps} AdamW steps, cosine, {args.size} px, fresh head; learning rate chosen per "
        "method and batch by mean validation accuracy (a split of TRAIN); test accuracy "
        "(Fashion-MNIST TEST) at that learning rate, mean ± std over seeds.",
        "",
        "| batch | method | best lr | val | test | seeds | test at each lr |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in table:
        each = ", ".join(
            f"{lr:g}: {v['test']:.1%}" + (f" ± {v['test_std']:.1%}" if v["seeds"] > 1 else "")
            for lr, v in a["per_lr"].items()
        )
        std = f" ± {a['test_std']:.1%}" if a["seeds"] > 1 else ""
        lines.append(
            f"| {a['batch']} | {a['method']} | {a['best_lr']:g} | {a['val']:.1%} | "
            f"{a['test']:.1%}{std} | {a['seeds']} | {each} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    """Test accuracy per method with error bars (std over seeds), one panel per batch."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    batches = sorted({a["batch"] for a in table})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        rows = sorted((a for a in table if a["batch"] == batch), key=lambda a: -a["test"])
        names = [a["method"] for a in rows]
        means = [100 * a["test"] for a in rows]
        errs = [0.0 if math.isnan(a["test_std"]) else 100 * a["test_std"] for a in rows]
        ax.barh(names[::-1], means[::-1], xerr=errs[::-1], capsize=3)
        ax.set_xlabel("test accuracy (%), best lr by validation")
        ax.set_title(f"batch {batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
