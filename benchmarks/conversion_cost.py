"""Conversion cost: time and memory to swap torchvision models, against two baselines.

Methods, each converting every BatchNorm of a fresh copy of the same model:

* ``normswap``: ``normswap.swap(model, TARGET)`` (default target ``gn``): plan, then surgery;
* ``sync_bn``: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (a recursive walk that builds
  a new module per BN and copies its parameters across): the cost of a bare walk + copy;
* ``opacus_style``: a clone-then-replace loop written here in the style of Opacus'
  ``ModuleValidator.fix`` (``copy.deepcopy`` of the model, collect the BN names, replace each
  by ``nn.GroupNorm(min(32, C), C)``), not a dependency.

Method. The copy each method converts is made outside the timed region. On the meta device
every ``torchvision.models.list_models()`` model is converted (models without a BatchNorm
included: their cost is the walk); on real CPU tensors, a subset (``--real``). Methods are
interleaved per model over ``--rounds`` rounds in a rotating order and the median is kept;
the wall clock (``time.perf_counter``) and this thread's CPU time (``time.thread_time``) are
both recorded. Memory: every tensor allocated during the conversion is counted by a
``TorchDispatchMode`` (outputs of ATen ops that do not alias an input), so ``allocated`` is the
bytes a method allocates (an upper bound on its peak increase), deterministic on a shared
machine; ``shared`` says whether every non-norm parameter of the result is still the same
storage as before (no copy of the weights).

Growth: ``nn.Sequential`` of k (conv, BN, ReLU) blocks on the meta device for k = 64 ... 1024;
for linear growth the time per module stays flat and doubling k doubles the time.

Run: ``python benchmarks/conversion_cost.py [--target gn] [--rounds 3] [--real resnet18 ...]
[--full] [--threads 1]`` (``--full``: every classification model on CPU tensors).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from _bench import markdown, setup, write
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import normswap
from normswap.zoo import build_model

REAL = [
    "resnet18",
    "resnet50",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "regnet_y_800mf",
]
BLOCKS = [64, 128, 256, 512, 1024]


class AllocationCounter(TorchDispatchMode):
    """Counts the bytes of every new (non-aliasing, non-meta) tensor an ATen op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and t.device.type != "meta"
                and t.untyped_storage().data_ptr() not in inputs
            ):
                self.bytes += t.untyped_storage().nbytes()
        return out


def opacus_style_fix(model: nn.Module) -> nn.Module:
    """Clone, collect the BN names, replace each by GroupNorm (Opacus ``ModuleValidator.fix``)."""
    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in names:
        bn = model.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        # Opacus' min(32, C) raises for C not divisible by it (72, 120, ...); gcd keeps going.
        new = nn.GroupNorm(math.gcd(32, bn.num_features), bn.num_features, affine=bn.affine)
        setattr(model.get_submodule(parent), attr, new)
    return model


def methods(target: str) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """The conversions compared, each returning the converted model."""

    def ours(model: nn.Module) -> nn.Module:
        normswap.swap(model, target)
        return model

    return {
        "normswap": ours,
        "sync_bn": nn.SyncBatchNorm.convert_sync_batchnorm,
        "opacus_style": opacus_style_fix,
    }


def _norm_like(module: nn.Module) -> bool:
    return isinstance(
        module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, *normswap.families.family_layers())
    )


def _non_norm_storages(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per non-norm parameter: (object id, storage address); meta tensors have address 0."""
    return {
        f"{mn}.{pn}": (id(p), p.untyped_storage().data_ptr())
        for mn, m in model.named_modules()
        if not _norm_like(m)
        for pn, p in m.named_parameters(recurse=False)
    }


def measure_model(
    base: nn.Module, fns: dict[str, Callable[[nn.Module], nn.Module]], rounds: int
) -> dict[str, Any]:
    """Median wall/CPU seconds and allocated bytes of each method on copies of ``base``.

    The timed rounds run without the allocation counter (its dispatch adds per-op cost); one
    more, untimed run per method counts the allocations and checks the weights' sharing.
    """
    names = list(fns)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model = copy.deepcopy(base)
            wall, cpu = time.perf_counter(), time.thread_time()
            fns[name](model)
            times[name].append((time.perf_counter() - wall, time.thread_time() - cpu))
            del model
    out: dict[str, Any] = {}
    for name in names:
        model = copy.deepcopy(base)
        before = _non_norm_storages(model)
        with AllocationCounter() as counter:
            result = fns[name](model)
        after = _non_norm_storages(result)
        out[name] = {
            "wall_s": statistics.median(t[0] for t in times[name]),
            "cpu_s": statistics.median(t[1] for t in times[name]),
            "allocated": counter.bytes,
            "shared": all(after.get(k) == v for k, v in before.items()),
        }
        del model, result
    return out


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (real tensors)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def growth(fns: dict[str, Callable[[nn.Module], nn.Module]], rounds: int) -> list[dict]:
    """Conversion time of k (conv, BN, ReLU) blocks on meta, for each k in ``BLOCKS``."""
    rows = []
    for k in BLOCKS:
        with torch.device("meta"):
            base = nn.Sequential(
                *(
                    layer
                    for _ in range(k)
                    for layer in (nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
                )
            )
        measured = measure_model(base, fns, rounds)
        rows.append({"blocks": k, "modules": 3 * k} | {n: measured[n] for n in fns})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="gn", help="normswap target for the conversion")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--real", nargs="*", default=None, help="models to convert on CPU")
    parser.add_argument(
        "--full", action="store_true", help="every classification model on CPU tensors"
    )
    parser.add_argument("--models", nargs="*", default=None, help="meta models (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "setup": setup(args.threads, target=args.target, rounds=args.rounds),
    }
    fns = methods(args.target)
    names = args.models if args.models is not None else torchvision.models.list_models()

    meta: dict[str, Any] = {}
    for name in names:
        with warnings.catch_warnings():  # constructors' own deprecation notices
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            base = build_model(name, meta=True)
        modules = sum(1 for _ in base.modules())
        bns = sum(1 for m in base.modules() if normswap.is_source_norm(m))
        meta[name] = {"modules": modules, "bn": bns} | measure_model(base, fns, args.rounds)
    results["meta"] = meta
    totals = {m: sum(r[m]["wall_s"] for r in meta.values()) for m in fns}
    cpu_totals = {m: sum(r[m]["cpu_s"] for r in meta.values()) for m in fns}
    print(f"meta: {len(meta)} models, totals {totals}", flush=True)

    real_names = args.real
    if real_names is None:
        classification = torchvision.models.list_models(module=torchvision.models)
        real_names = classification if args.full else REAL
    real: dict[str, Any] = {}
    for name in real_names:
        torch.manual_seed(0)
        base = build_model(name)
        real[name] = {"model_bytes": model_bytes(base)} | measure_model(base, fns, args.rounds)
    results["real"] = real
    results["growth"] = growth(fns, args.rounds)

    rows = [
        [f"all {len(meta)} models, meta (total s)", *(f"{totals[m]:.2f}" for m in fns)],
        ["same, thread CPU (total s)", *(f"{cpu_totals[m]:.2f}" for m in fns)],
        [
            "slowest model, meta (s)",
            *(
                "{:.3f} ({})".format(*max((r[m]["wall_s"], n) for n, r in meta.items()))
                for m in fns
            ),
        ],
    ]
    for name, r in real.items():
        size = r["model_bytes"]
        rows.append(
            [
                f"{name}, CPU tensors: ms / allocated MB (x model) / weights shared",
                *(
                    f"{1e3 * r[m]['wall_s']:.1f} / {r[m]['allocated'] / 2**20:.1f} "
                    f"({r[m]['allocated'] / size:.3f}) / {'yes' if r[m]['shared'] else 'no'}"
                    for m in fns
                ),
            ]
        )
    first = results["growth"][0]
    for g in results["growth"]:
        per_module = {m: g[m]["wall_s"] / g["modules"] for m in fns}
        first_per_module = {m: first[m]["wall_s"] / first["modules"] for m in fns}
        rows.append(
            [
                f"{g['blocks']} blocks ({g['modules']} modules), meta: ms (x per module vs "
                f"{first['blocks']})",
                *(
                    f"{1e3 * g[m]['wall_s']:.1f} ({per_module[m] / first_per_module[m]:.2f})"
                    for m in fns
                ),
            ]
        )
    table = markdown(["measure", *fns], rows)
    note = (
        f"normswap = swap(model, {args.target!r}); sync_bn = convert_sync_batchnorm; "
        "opacus_style = deepcopy + replace loop. Medians of "
        f"{args.rounds} interleaved rounds, {args.threads} thread(s), wall clock unless noted; "
        "'x per module' near 1.00 = linear growth; allocated = bytes of new tensors counted "
        "by a TorchDispatchMode; 'weights shared' = every non-norm parameter is the same "
        "storage after the conversion."
    )
    write("conversion_cost", results, table, note)


if __name__ == "__main__":
    main()
