"""Training-step time of every normswap target as a ratio to native BatchNorm, same layout.

Models: torchvision resnet18 / resnet50 (10 classes), fp32, SGD with momentum, cross-entropy.
Configurations, each converted from the same initial weights: ``bn`` (the baseline, native
BatchNorm2d), ``gn``, ``ln``, ``ln2d``, ``in``, ``adalin``, ``adaln`` (cond_dim 16, the
condition set with ``normswap.condition`` every step), ``wn_keep``/``wn_remove``/``wn_fold``
(weight norm with BN kept, removed, or folded into the convs in eval mode before training),
``ws_gn``; and the "what a user would write" baselines from the seed articles: ``seed_gn``
and ``seed_ln``, Python GroupNorm(32)/LayerNorm modules built from ``view``/``mean``/``var``.

Method (see ``_bench.py``): every configuration has its own model and optimizer; all are moved
to the cell's memory format (model and input), take ``--warmup`` steps, then ``--rounds``
rounds in which each runs ``--steps`` steps in turn, in a rotating order. Per round the ratio
is the configuration's mean step time over the baseline's in that round; the table shows the
median over rounds, for wall time and for thread CPU time (``load`` = the baseline's wall /
CPU time, >1.15 flags a contended run). Targets of issue 6 are judged on the CPU-time ratio
(on a GPU, on the wall-time ratio: steps end with a synchronize).

Default grid: resnet18, batch 8, 64 px, contiguous and channels_last (about 3 minutes on one
thread). ``--full``: resnet18 and resnet50 x batch 8 and 32 x 64 and 224 px x both layouts
(hours on a 2-core CPU; minutes on a GPU with ``--device cuda``, where the CPU clock only
measures the launch overhead and the wall ratio is the one to read). The results files are
rewritten after every cell, so a grid cut short keeps the cells it finished.

Run: ``python benchmarks/step_time.py [--full] [--models resnet18] [--batches 8]
[--sizes 64] [--rounds 5] [--steps 5] [--threads 1] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from _bench import Ratio, interleaved, markdown, ratio_cells, setup, write
from torch import nn

import normswap

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
COND_DIM = 16
CONFIGS = (
    "bn",
    "gn",
    "ln",
    "ln2d",
    "in",
    "adalin",
    "adaln",
    "wn_keep",
    "wn_remove",
    "wn_fold",
    "ws_gn",
    "seed_gn",
    "seed_ln",
)


class SeedGroupNorm(nn.Module):
    """GroupNorm as the seed articles write it in Python: view, mean, var, affine.

    ``reshape`` instead of the articles' ``view`` so that channels_last input runs at all.
    """

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_features)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.reshape(n, self.num_groups, -1)
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        x = (x - mean) / (var + self.eps).sqrt()
        return x.reshape(n, c, h, w) * self.weight + self.bias


class SeedLayerNorm(nn.Module):
    """LayerNorm over (C, H, W) as the seed articles write it: mean, var over dims 1-3."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        var = x.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (x - mean) / (var + self.eps).sqrt() * self.weight + self.bias


def replace_bn(model: nn.Module, factory: Callable[[int], nn.Module]) -> nn.Module:
    """Replace every BatchNorm2d by ``factory(C)``, the way a user's own loop would."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name in names:
        parent, _, attr = name.rpartition(".")
        bn = model.get_submodule(name)
        setattr(model.get_submodule(parent), attr, factory(bn.num_features))
    return model


def convert(base: nn.Module, config: str, x: torch.Tensor) -> nn.Module:
    """A converted copy of ``base`` (train mode) for one configuration."""
    model = copy.deepcopy(base)
    if config == "bn":
        pass
    elif config == "adaln":
        normswap.swap(model, "adaln", cond_dim=COND_DIM)
    elif config in ("wn_keep", "wn_remove"):
        normswap.swap(model, "wn", bn=config.removeprefix("wn_"))
    elif config == "wn_fold":
        normswap.swap(model.eval(), "wn", bn="fold", example_inputs=x[:1])
    elif config == "seed_gn":
        replace_bn(model, SeedGroupNorm)
    elif config == "seed_ln":
        replace_bn(model, SeedLayerNorm)
    else:
        normswap.swap(model, config)
    return model.train()


class Trainer:
    """One configuration's model, optimizer and batch; ``step()`` runs one training step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, adaln: bool) -> None:
        self.model, self.x, self.y = model, x, y
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.cond = torch.randn(x.shape[0], COND_DIM, device=x.device) if adaln else None

    def _loss(self) -> torch.Tensor:
        return F.cross_entropy(self.model(self.x), self.y)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.cond is not None:
            with normswap.condition(self.model, self.cond):
                loss = self._loss()
        else:
            loss = self._loss()
        loss.backward()
        self.optimizer.step()
        if self.x.device.type == "cuda":
            torch.cuda.synchronize()


def target(config: str, fmt: str, size: int) -> float | None:
    """Issue 6's ceiling for a configuration's step-time ratio, ``None`` where there is none."""
    contiguous = fmt == "contiguous"
    if config in ("gn", "ln"):
        return 1.00 if contiguous else 1.05
    if config == "in":
        return 1.05 if contiguous else 1.15
    if config == "ln2d":
        return 1.25
    if config == "wn_remove":
        return 1.00 if size >= 224 else 1.15
    return None


def measure_cell(
    model_name: str, batch: int, size: int, fmt: str, args: argparse.Namespace
) -> dict[str, Ratio]:
    """All configurations of one (model, batch, size, layout) cell, side by side."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = torchvision.models.get_model(model_name, num_classes=10)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    trainers = {}
    for config in args.configs:
        model = convert(base, config, x).to(device=device, memory_format=FORMATS[fmt])
        xd = x.to(device).contiguous(memory_format=FORMATS[fmt])
        trainers[config] = Trainer(model, xd, y.to(device), adaln=config == "adaln")
    return interleaved(
        {c: t.step for c, t in trainers.items()},
        "bn",
        rounds=args.rounds,
        reps=args.steps,
        warmup=args.warmup,
    )


def verdict(ratio: Ratio, ceiling: float | None, device: str) -> str:
    """``met``/``MISSED`` against the target, ``-`` without one.

    On the CPU the thread CPU-time ratio is judged (robust to other processes' load); on a GPU
    the wall-time ratio (each step ends with a synchronize; CPU time is only the launches).
    """
    if ceiling is None:
        return "-"
    return "met" if (ratio.cpu if device == "cpu" else ratio.wall) <= ceiling else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="issue 6's whole grid")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--sizes", nargs="+", type=int, default=None)
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=list(FORMATS))
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--name", default="step_time", help="results file name (keep a partial grid apart)"
    )
    args = parser.parse_args()
    if "bn" not in args.configs:
        args.configs.insert(0, "bn")
    models = args.models or (["resnet18", "resnet50"] if args.full else ["resnet18"])
    batches = args.batches or ([8, 32] if args.full else [8])
    sizes = args.sizes or ([64, 224] if args.full else [64])

    results: dict[str, Any] = {
        "setup": setup(
            args.threads,
            device=args.device,
            rounds=args.rounds,
            steps_per_round=args.steps,
            method="interleaved training steps, per-round ratio to BN in the same layout, "
            "median over rounds",
        ),
        "cells": [],
    }
    rows = []
    for model_name in models:
        for batch in batches:
            for size in sizes:
                for fmt in args.formats:
                    cell = measure_cell(model_name, batch, size, fmt, args)
                    ratios = {}
                    for config, ratio in cell.items():
                        ceiling = target(config, fmt, size)
                        ratios[config] = ratio.as_dict() | {
                            "target": ceiling,
                            "verdict": verdict(ratio, ceiling, args.device),
                        }
                        rows.append(
                            [
                                f"{model_name} b{batch} {size}px",
                                fmt,
                                config,
                                *(
                                    ratio_cells(ratio)
                                    if args.device == "cpu"
                                    else [ratio.wall, ratio.cpu, "n/a (GPU)"]
                                ),
                                ceiling,
                                verdict(ratio, ceiling, args.device),
                            ]
                        )
                    results["cells"].append(
                        {"model": model_name, "batch": batch, "size": size, "format": fmt}
                        | {"ratios": ratios}
                    )
                    base = cell["bn"]
                    print(
                        f"{model_name} b{batch} {size}px {fmt}: BN step "
                        f"{base.base_wall_ms:.1f} ms wall, {base.base_cpu_ms:.1f} ms CPU",
                        flush=True,
                    )
                    # After every cell, so that a long grid cut short keeps what it measured.
                    _write(args, results, rows)


def _write(args: argparse.Namespace, results: dict[str, Any], rows: list[list[Any]]) -> None:
    table = markdown(
        ["cell", "layout", "config", "ratio (wall)", "ratio (CPU)", "load", "target", "verdict"],
        rows,
    )
    note = (
        "ratio = training-step time / native BatchNorm2d's in the same layout and run "
        f"(median of {args.rounds} interleaved rounds of {args.steps} steps, "
        f"{args.threads} thread(s), {args.device}); verdicts on the "
        + ("CPU-time ratio." if args.device == "cpu" else "wall-time ratio.")
    )
    write(args.name, results, table, note)


if __name__ == "__main__":
    main()
