"""Pretrained LayerNorm transformers converted to DyT, Derf, RMSNorm and frozen: what they keep.

The two models are trained here (``pretrain_transformers.py``, ``make pretrained-transformers``):
a small torchvision ViT on Fashion-MNIST and a small Hugging Face GPT-2 on the Python standard
library's source. Each *target* (``rms_fold``: RMSNorm with ``center="fold"``, exact; ``dyt``;
``derf``; ``frozen``: the LayerNorm's scale fixed from data, its mean still subtracted) is
reached by each *method*:

* ``copy``: :func:`normswap.swap` alone (γ/β copied, DyT's α at its init, frozen's scale 1);
* ``calibrate``: then :func:`normswap.calibrate` (α by a 1-D search, γ/β by least squares,
  layer by layer) on 256 samples of the model's training data;
* ``distill``: :func:`normswap.convert_pretrained` (calibrate, then distill on the training
  data with the per-layer feature loss, early stopping on held-out data of the same domain;
  the ViT's batches are flipped and mixed pairwise, :func:`mix_and_flip`);
* ``progressive``: ``convert_pretrained(..., progressive=0.5)``: blends that start as the
  LayerNorms and are the calibrated target halfway through distillation. In the transfer
  part, ``progressive`` is instead the blend ramped during fine-tuning (60% of its steps),
  starting from the calibrated blend (``swap_progressive`` + ``calibrate_blend``).

Fidelity (``--part fidelity``) is top-1 agreement with the original (ViT: the class; GPT: the
next byte at every position) on held-out data of the training domain and on domains no step
saw (ViT: sklearn's digits and crops of its two photos; GPT: the prose of Python's documentation
topics), and the GPT's per-byte perplexity next to the original's.

Transfer (``--part transfer``) fine-tunes each start on a second task, every learning rate of
``--lrs`` and every seed of ``--seeds``: the ViT on sklearn's digits (a new head; 1,000 train,
300 validation, 497 test images), the GPT on the documentation prose (train, validation and
test parts in order: 80/10/10%). The report picks per start the learning rate with the best mean
validation score (over the seeds every rate ran) and gives test accuracy / perplexity there,
mean ± std over seeds; ``ln`` is the LayerNorm original fine-tuned the same way. With
``--grid-seeds 0`` the grid runs on seed 0 only and the other seeds at the rate seed 0's
validation picked (run ``--seeds 0`` first): how the GPT ran, its fine-tuning costing five
times the ViT's. ``--methods`` limits the methods (the GPT's transfer left out ``calibrate``,
which ``distill`` starts from). ``make bench-transformers`` runs what the results hold.

Rows go to ``results/transformers_runs.jsonl`` and are skipped when already there (resumable;
``--shard 0/2`` and ``--shard 1/2`` share the work); conversions are cached in
``.cache/transformers_fidelity/``. ``--report`` writes ``transformers_fidelity.md``, ``.json``
and ``.png``. ``--small`` is the CI mode: untrained models, a few samples and steps, every
target and method once; it checks the pipeline runs, not what it measures.

Run: ``.venv/bin/python benchmarks/transformers_fidelity.py`` (``make bench-transformers``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normswap.pretrained.calibrate import calibrate
from normswap.pretrained.convert import convert_pretrained
from normswap.pretrained.distill import hflip
from normswap.pretrained.fidelity import fidelity, logits_of
from normswap.progressive import (
    BlendSchedule,
    calibrate_blend,
    finish_blend,
    set_blend,
    swap_progressive,
)
from normswap.specs import NormSpec, get_spec
from normswap.surgery import swap

HERE = Path(__file__).resolve().parent
# The pretraining script is a sibling script, not a package module: importable once its folder
# is on the path (the benchmarks run as scripts, from any working directory).
sys.path.insert(0, str(HERE))
import pretrain_transformers as pt  # noqa: E402  (needs the path set just above)

RESULTS = HERE / "results"
CACHE = pt.REPO / ".cache" / "transformers_fidelity"

#: target name -> (spec name, overrides)
TARGETS: dict[str, tuple[str, dict[str, Any]]] = {
    "rms_fold": ("rms", {"center": "fold"}),
    "dyt": ("dyt", {}),
    "derf": ("derf", {}),
    "frozen": ("frozen", {}),
}
METHODS = ("copy", "calibrate", "distill", "progressive")
EXACT = {"rms_fold"}  # exact without data: only ``copy`` is run


def spec_of(target: str) -> NormSpec:
    name, overrides = TARGETS[target]
    return get_spec(name, **overrides)


# --------------------------------------------------------------------------- the two tasks


@dataclass
class Task:
    """One pretrained model and its data: conversion, fidelity and transfer."""

    name: str
    reference: nn.Module
    convert_data: Tensor  # inputs of the training domain, for calibrate + distill
    stop_data: Tensor  # held-out inputs for distillation's early stopping
    fidelity_sets: dict[str, Tensor]  # name -> inputs (LM: windows of T + 1 bytes)
    example: Tensor
    lm: bool
    transfer: dict[str, Any] = field(default_factory=dict)
    distill_steps: int = 400
    feature_weight: float = 1.0
    augment: Callable[[Tensor], Tensor] | None = None
    tune_steps: int = 150
    tune_batch: int = 32


def mix_and_flip(x: Tensor) -> Tensor:
    """Distillation augmentation for images: random flips, then each image mixed with another
    of the batch at a random ratio (teacher and student see the same mix)."""
    x = hflip(x)
    ratio = torch.rand(x.shape[0], 1, 1, 1, device=x.device)
    return ratio * x + (1 - ratio) * x[torch.randperm(x.shape[0], device=x.device)]


def vit_task(small: bool) -> Task:
    if small:
        reference = pt.BUILDERS["vit"]().eval()
        n = 64
    else:
        reference = pt.load("vit")
        n = None
    train, _ = pt.fmnist("train")
    held, _ = pt.fmnist("held")
    test, _ = pt.fmnist("test")
    digit_x, digit_y = pt.digits()
    photos = pt.photos(64 if small else 1000)
    order = torch.randperm(len(digit_y), generator=torch.Generator().manual_seed(0))
    digit_x, digit_y = digit_x[order], digit_y[order]
    cut = (slice(0, 1000), slice(1000, 1300), slice(1300, None))
    if small:
        cut = (slice(0, 64), slice(64, 96), slice(96, 128))
    return Task(
        name="vit",
        reference=reference,
        convert_data=train[: n or None],
        stop_data=held[: n or 1000],
        fidelity_sets={
            "fmnist": test[:2000][:n],
            "digits": digit_x[: n or None],
            "photos": photos,
        },
        example=held[:2],
        lm=False,
        transfer={
            split: (digit_x[c], digit_y[c])
            for split, c in zip(("train", "val", "test"), cut, strict=True)
        },
        distill_steps=4 if small else 600,
        augment=mix_and_flip,
        tune_steps=3 if small else 150,
        tune_batch=32,
    )


def gpt_task(small: bool) -> Task:
    reference = pt.BUILDERS["gpt"]().eval() if small else pt.load("gpt")
    code = pt.code_corpus()
    prose = pt.prose_corpus()
    n = 16 if small else None
    convert = pt.windows(code["train"], 20000, seed=7)[:, :-1]
    stop = pt.tiling(code["val"], limit=200)[:, :-1]
    return Task(
        name="gpt",
        reference=reference,
        convert_data=convert[: n or None],
        stop_data=stop[: n or None],
        fidelity_sets={
            "code": pt.tiling(code["test"], limit=n or 1000),
            "prose": pt.tiling(prose["test"], limit=n or 1000),
        },
        example=convert[:2],
        lm=True,
        transfer={
            "train": prose["train"],
            "val": pt.tiling(prose["val"], limit=n or None),
            "test": pt.tiling(prose["test"], limit=n or None),
        },
        distill_steps=4 if small else 400,
        tune_steps=3 if small else 150,
        tune_batch=16,
    )


TASKS: dict[str, Callable[[bool], Task]] = {"vit": vit_task, "gpt": gpt_task}


# --------------------------------------------------------------------------- conversions


def _copy(task: Task) -> nn.Module:
    return copy.deepcopy(task.reference).eval()


def _swapped(task: Task, target: str) -> nn.Module:
    model = _copy(task)
    swap(model, spec_of(target), replace="ln", example_inputs=task.example)
    return model


def convert(
    task: Task, target: str, method: str, budget: float, small: bool
) -> tuple[nn.Module, dict]:
    """The converted model (cached on disk) and what its conversion reported."""
    path = CACHE / f"{task.name}_{target}_{method}.pt"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists() and not small:
        model = _swapped(task, target)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), json.loads(meta_path.read_text())
    start = time.process_time()
    info: dict[str, Any] = {}
    if method == "copy":
        model = _swapped(task, target)
    elif method == "calibrate":
        model = _swapped(task, target)
        calibrate(model, task.reference, list(task.convert_data[:256].split(32)))
    else:
        model = _copy(task)
        result = convert_pretrained(
            model,
            spec_of(target),
            task.convert_data,
            replace="ln",
            budget=budget,
            val_data=task.stop_data,
            distill_steps=task.distill_steps,
            progressive=0.5 if method == "progressive" else 0.0,
            feature_weight=task.feature_weight,
            augment=task.augment,
            clock=time.process_time,
            progress=False,
        )
        if result.distillation is not None:
            info["distill_steps"] = result.distillation.steps
            info["distill_best_step"] = result.distillation.best_step
            info["distill_stopped"] = result.distillation.stopped
    info["convert_cpu_s"] = round(time.process_time() - start, 1)
    if not small:
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        meta_path.write_text(json.dumps(info))
    return model.eval(), info


def measure(task: Task, model: nn.Module, target: str) -> dict[str, float]:
    """Agreement and KL with the original on every fidelity set (and the LM's perplexity)."""
    row: dict[str, float] = {}
    for name, data in task.fidelity_sets.items():
        inputs = data[:, :-1] if task.lm else data
        f = fidelity(model, task.reference, list(inputs.split(100)))
        row[f"{name}_agreement"] = round(f.agreement, 5)
        row[f"{name}_kl"] = round(f.kl, 6)
        row.update(_confident(task, model, inputs, name))
        if task.lm:
            row[f"{name}_ppl"] = round(pt.perplexity(model, data), 5)
            row[f"{name}_ppl_ref"] = round(pt.perplexity(task.reference, data), 5)
    # rms_fold changed the layers that write each LayerNorm's input: no layer-by-layer error.
    row.update(limits(task, model, per_layer=target not in EXACT))
    return row


@torch.no_grad()
def _confident(
    task: Task, model: nn.Module, inputs: Tensor, name: str, level: float = 0.8
) -> dict[str, float]:
    """How sure the original is on a set (its mean top-1 probability), the share of
    predictions it makes with probability >= ``level``, and the agreement on those."""
    model.eval()
    sure, agree = [], []
    for x in inputs.split(100):
        ref = logits_of(task.reference(x), "reference").softmax(-1)
        got = logits_of(model(x), "model").argmax(-1)
        top, cls = ref.max(-1)
        sure.append(top)
        agree.append(got == cls)
    top, same = torch.cat(sure), torch.cat(agree)
    confident = top >= level
    return {
        f"{name}_ref_conf": round(float(top.mean()), 4),
        f"{name}_confident": round(float(confident.float().mean()), 4),
        f"{name}_agreement_confident": round(float(same[confident].float().mean()), 5)
        if bool(confident.any())
        else float("nan"),
    }


@torch.no_grad()
def _norm_inputs(reference: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
    """The input of every LayerNorm of ``reference`` on ``inputs``, by module path."""
    seen: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, path=path: seen.__setitem__(path, args[0]))
        for path, m in reference.named_modules()
        if isinstance(m, nn.LayerNorm)
    ]
    try:
        reference(inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def limits(
    task: Task, model: nn.Module, *, per_layer: bool = True, samples: int = 200
) -> dict[str, float]:
    """What limits a pointwise or fixed-scale norm out of domain, measured per fidelity set.

    ``<set>_sigma_out``: the fraction of tokens (over every LayerNorm) whose standard deviation
    over the channels falls outside the 1st-99th percentile range of the training domain's
    tokens at that layer: there a fixed α or scale has never been fitted. ``<set>_layer_err``:
    each converted layer fed the LayerNorm's own input, its squared error against the
    LayerNorm's output relative to that output's variance, averaged over the layers.
    """
    sets = list(task.fidelity_sets.items())
    first = {n: (d[:samples, :-1] if task.lm else d[:samples]) for n, d in sets}
    inputs = {n: _norm_inputs(task.reference, x) for n, x in first.items()}
    home = inputs[sets[0][0]]
    layers = dict(model.named_modules())
    norms = dict(task.reference.named_modules())
    row: dict[str, float] = {}
    for name, seen in inputs.items():
        outside, errors = [], []
        for path, x in seen.items():
            sigma = x.std(-1, unbiased=False).flatten()
            lo, hi = torch.quantile(
                home[path].std(-1, unbiased=False).flatten()[:100_000], torch.tensor([0.01, 0.99])
            )
            outside.append(((sigma < lo) | (sigma > hi)).float().mean())
            if per_layer and path in layers:
                want = norms[path](x)
                got = layers[path](x)
                errors.append(((got - want) ** 2).mean() / want.var().clamp_min(1e-12))
        row[f"{name}_sigma_out"] = round(float(torch.stack(outside).mean()), 4)
        if errors:
            row[f"{name}_layer_err"] = round(float(torch.stack(errors).mean()), 5)
    return row


# --------------------------------------------------------------------------- transfer


@dataclass
class Start:
    """A fine-tuning start and the blend schedule its fine-tuning follows (if any)."""

    model: nn.Module
    schedule: BlendSchedule | None = None


def start_of(task: Task, target: str, method: str, budget: float, small: bool) -> Start:
    if target == "ln":
        return Start(_copy(task))
    if method == "progressive":
        model = _copy(task)
        swap_progressive(model, spec_of(target), replace="ln", example_inputs=task.example)
        calibrate_blend(model, task.reference, list(task.convert_data[:256].split(32)))
        return Start(model, BlendSchedule(end=max(1, round(0.6 * task.tune_steps))))
    return Start(convert(task, target, method, budget, small)[0])


def _head(model: nn.Module) -> nn.Linear:
    return model.heads.head


def fine_tune(task: Task, start: Start, lr: float, seed: int) -> nn.Module:
    """AdamW, cosine schedule; the ViT gets a fresh 10-class head (10x learning rate)."""
    model = start.model
    torch.manual_seed(seed)
    if not task.lm:
        old = _head(model)
        model.heads.head = nn.Linear(old.in_features, 10)
        head = list(model.heads.head.parameters())
    else:
        head = []
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    groups = [{"params": body, "lr": lr}] + ([{"params": head, "lr": 10 * lr}] if head else [])
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, task.tune_steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(task.tune_steps):
        if start.schedule is not None:
            set_blend(model, start.schedule.alpha(step))
        if task.lm:
            w = pt.windows(task.transfer["train"], task.tune_batch, seed=seed * 100_003 + step)
            loss = pt.lm_loss(model, w[:, :-1], w[:, 1:])
        else:
            x, y = task.transfer["train"]
            idx = torch.randint(0, len(y), (task.tune_batch,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if start.schedule is not None:
        set_blend(model, 1.0)
        finish_blend(model)
    return model.eval()


def score(task: Task, model: nn.Module, split: str) -> float:
    """ViT: accuracy; GPT: perplexity (lower is better)."""
    if task.lm:
        return pt.perplexity(model, task.transfer[split])
    x, y = task.transfer[split]
    return pt.accuracy(model, x, y)


# --------------------------------------------------------------------------- the grid


def _pairs(methods: Sequence[str] = METHODS) -> list[tuple[str, str]]:
    return [(t, m) for t in TARGETS for m in methods if t not in EXACT or m == "copy"]


def _key(r: dict) -> tuple:
    return (r["part"], r["model"], r["target"], r["method"], r.get("lr"), r.get("seed"))


def _name(args: argparse.Namespace) -> str:
    return "transformers_small" if args.small else "transformers"


def _best_lrs(
    rows: list[dict],
    model_name: str,
    target: str,
    method: str,
    seeds: Sequence[int],
    lrs: Sequence[float],
) -> list[float]:
    """The learning rate that validation picks on the grid seeds' runs (none while they are
    incomplete): the other seeds run at that rate only."""
    mine = [
        r
        for r in rows
        if r["part"] == "transfer"
        and (r["model"], r["target"], r["method"]) == (model_name, target, method)
        and r["seed"] in seeds
    ]
    if {(r["lr"], r["seed"]) for r in mine} != {(lr, s) for lr in lrs for s in seeds}:
        return []
    return [_pick_lr(mine, lower_better=model_name == "gpt")]


def _pick_lr(rows: list[dict], *, lower_better: bool) -> float:
    """The learning rate with the best mean validation score, over the seeds every rate ran."""
    by_lr: dict[float, list[dict]] = {}
    for r in rows:
        by_lr.setdefault(r["lr"], []).append(r)
    common = set.intersection(*({r["seed"] for r in runs} for runs in by_lr.values()))
    pick = min if lower_better else max
    return pick(
        by_lr,
        key=lambda lr: statistics.fmean(r["val"] for r in by_lr[lr] if r["seed"] in common),
    )


def run(args: argparse.Namespace) -> None:
    runs_path = args.out / f"{_name(args)}_runs.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.small:
        runs_path.unlink(missing_ok=True)
    done, rows = set(), []
    if runs_path.exists() and not args.small:
        rows = [json.loads(line) for line in runs_path.read_text().splitlines() if line]
        done = {_key(r) for r in rows}
    jobs = []
    for model_name in args.models:
        if "fidelity" in args.parts:
            jobs += [("fidelity", model_name, t, m, None, None) for t, m in _pairs(args.methods)]
        if "transfer" in args.parts:
            starts = [("ln", "original"), *_pairs(args.methods)]
            for s in args.seeds:
                for t, m in starts:
                    lrs = args.lrs
                    if args.grid_seeds is not None and s not in args.grid_seeds:
                        lrs = _best_lrs(rows, model_name, t, m, args.grid_seeds, args.lrs)
                    jobs += [("transfer", model_name, t, m, lr, s) for lr in lrs]
    index, count = args.shard
    jobs = [j for i, j in enumerate(jobs) if i % count == index and j not in done]
    print(f"{len(jobs)} runs to do", flush=True)
    tasks: dict[str, Task] = {}
    for part, model_name, target, method, lr, seed in jobs:
        if model_name not in tasks:
            tasks[model_name] = TASKS[model_name](args.small)
        task = tasks[model_name]
        t0 = time.perf_counter()
        row: dict[str, Any] = {
            "part": part,
            "model": model_name,
            "target": target,
            "method": method,
            "lr": lr,
            "seed": seed,
        }
        if part == "fidelity":
            model, info = convert(task, target, method, args.budget, args.small)
            row.update(info)
            row.update(measure(task, model, target))
        else:
            start = start_of(task, target, method, args.budget, args.small)
            model = fine_tune(task, start, lr, seed)
            row["val"] = round(score(task, model, "val"), 5)
            row["test"] = round(score(task, model, "test"), 5)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        with runs_path.open("a") as f:
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _order(target: str, method: str) -> tuple[int, int]:
    """Tables list the original first, then the targets and methods in their declared order."""
    targets, methods = ["ln", *TARGETS], ["original", *METHODS]
    return targets.index(target), methods.index(method)


def aggregate(rows: list[dict]) -> dict[str, Any]:
    fid = sorted(
        (r for r in rows if r["part"] == "fidelity"),
        key=lambda r: (r["model"], *_order(r["target"], r["method"])),
    )
    tr = [r for r in rows if r["part"] == "transfer"]
    transfer = []
    for model_name in sorted({r["model"] for r in tr}):
        lower_better = model_name == "gpt"
        for target, method in sorted(
            {(r["target"], r["method"]) for r in tr if r["model"] == model_name},
            key=lambda tm: _order(*tm),
        ):
            mine = [
                r
                for r in tr
                if (r["model"], r["target"], r["method"]) == (model_name, target, method)
            ]
            lr = _pick_lr(mine, lower_better=lower_better)
            at_lr = [r for r in mine if r["lr"] == lr]
            test_mean, test_std = _mean_std([r["test"] for r in at_lr])
            transfer.append(
                {
                    "model": model_name,
                    "target": target,
                    "method": method,
                    "lr": lr,
                    "seeds": len(at_lr),
                    "test_mean": round(test_mean, 5),
                    "test_std": round(test_std, 5),
                }
            )
    return {"fidelity": fid, "transfer": transfer}


def markdown(table: dict[str, Any]) -> str:
    lines = ["# Pretrained LayerNorm transformers: conversion fidelity and transfer", ""]
    lines += [
        "Generated by `benchmarks/transformers_fidelity.py`. Agreement: top-1 with the LayerNorm "
        "original (GPT: the next byte at every position). Perplexity: per byte, the original's "
        "in brackets.",
        "",
        "## ViT (Fashion-MNIST) fidelity",
        "",
        "| target | method | Fashion-MNIST test | digits (OOD) | photo crops (OOD) | CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for r in table["fidelity"]:
        if r["model"] == "vit":
            lines.append(
                f"| {r['target']} | {r['method']} | {r['fmnist_agreement']:.1%} | "
                f"{r['digits_agreement']:.1%} | {r['photos_agreement']:.1%} | "
                f"{r['convert_cpu_s']} |"
            )
    lines += [
        "",
        "## GPT (Python source) fidelity",
        "",
        "| target | method | code agreement | code perplexity | prose agreement (OOD) "
        "| prose perplexity | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table["fidelity"]:
        if r["model"] == "gpt":
            lines.append(
                f"| {r['target']} | {r['method']} | {r['code_agreement']:.1%} | "
                f"{r['code_ppl']:.4f} ({r['code_ppl_ref']:.4f}) | {r['prose_agreement']:.1%} | "
                f"{r['prose_ppl']:.4f} ({r['prose_ppl_ref']:.4f}) | {r['convert_cpu_s']} |"
            )
    lines += [
        "",
        "## What limits it out of domain",
        "",
        "`σ out`: fraction of tokens whose standard deviation over the channels lies outside "
        "the 1st-99th percentile of the training domain's at the same LayerNorm (where a fixed "
        "α or scale was never fitted). `layer err`: each converted layer fed its LayerNorm's "
        "own input, squared error relative to the LayerNorm output's variance, mean over "
        "layers (after distillation, which trains every layer to compensate). The original's "
        "confidence: its mean top-1 probability on the set; then the share of inputs it "
        "predicts with probability ≥ 0.8, and the agreement on all inputs and on those.",
        "",
        "| model | target | method | set | σ out | layer err | original's confidence | "
        "share ≥ 0.8 | agreement | agreement where ≥ 0.8 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table["fidelity"]:
        if r["method"] not in ("calibrate", "distill"):
            continue
        for key in r:
            if key.endswith("_layer_err"):
                name = key.removesuffix("_layer_err")
                lines.append(
                    f"| {r['model']} | {r['target']} | {r['method']} | {name} | "
                    f"{r[name + '_sigma_out']:.1%} | {r[key]:.3f} | "
                    f"{r.get(name + '_ref_conf', float('nan')):.2f} | "
                    f"{r.get(name + '_confident', float('nan')):.1%} | "
                    f"{r[name + '_agreement']:.1%} | "
                    f"{r.get(name + '_agreement_confident', float('nan')):.1%} |"
                )
    lines += [
        "",
        "## Transfer: after fine-tuning on a second task",
        "",
        "ViT: digits test accuracy; GPT: documentation-prose test perplexity per byte. The "
        "learning rate is picked on validation, compared over the seeds every rate ran (the "
        "ViT ran its whole grid on every seed; the GPT on seed 0, and seeds 1 and 2 at seed "
        "0's pick: `make bench-transformers`); test mean ± std over seeds at that rate.",
        "",
        "| model | start | method | lr | seeds | test |",
        "|---|---|---|---|---|---|",
    ]
    for r in table["transfer"]:
        lines.append(
            f"| {r['model']} | {r['target']} | {r['method']} | {r['lr']:g} | {r['seeds']} | "
            f"{r['test_mean']:.4f} ± {r['test_std']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    panels = [
        (
            "vit",
            ["fmnist_agreement", "digits_agreement", "photos_agreement"],
            "ViT top-1 agreement",
        ),
        ("gpt", ["code_agreement", "prose_agreement"], "GPT next-byte agreement"),
    ]
    for ax, (model_name, keys, title) in zip(axes[0], panels, strict=True):
        rows = [r for r in table["fidelity"] if r["model"] == model_name]
        labels = [f"{r['target']}\n{r['method']}" for r in rows]
        width = 0.8 / len(keys)
        for k, key in enumerate(keys):
            ax.bar(
                [i + k * width for i in range(len(rows))],
                [r[key] for r in rows],
                width,
                label=key.split("_")[0],
            )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=6)
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.legend(fontsize=7)
    for ax, model_name, ylabel in zip(
        axes[1], ("vit", "gpt"), ("digits test accuracy", "prose test perplexity"), strict=True
    ):
        rows = [r for r in table["transfer"] if r["model"] == model_name]
        labels = [f"{r['target']}\n{r['method']}" for r in rows]
        ax.bar(range(len(rows)), [r["test_mean"] for r in rows], yerr=[r["test_std"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=6)
        values = [r["test_mean"] for r in rows] or [0, 1]
        ax.set_ylim(min(values) * 0.97, max(values) * 1.02)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{model_name}: after fine-tuning (best lr, mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(args: argparse.Namespace) -> None:
    name = _name(args)
    rows = [json.loads(line) for line in (args.out / f"{name}_runs.jsonl").read_text().splitlines()]
    table = aggregate(rows)
    (args.out / f"{name}_fidelity.json").write_text(json.dumps(table, indent=1) + "\n")
    text = markdown(table)
    (args.out / f"{name}_fidelity.md").write_text(text)
    plot(table, args.out / f"{name}_fidelity.png")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--parts", nargs="+", default=["fidelity", "transfer"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--budget", type=float, default=600.0, help="CPU seconds per conversion (cap)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        help="the conversion methods to run (all by default)",
    )
    parser.add_argument(
        "--grid-seeds",
        nargs="+",
        type=int,
        default=None,
        help="run the learning-rate grid on these seeds only; the other seeds run at the rate "
        "their validation picked (run these seeds first)",
    )
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    index, count = (int(v) for v in args.shard.split("/"))
    args.shard = (index, count)
    torch.set_num_threads(args.threads)
    if args.report:
        report(args)
        return
    if args.small:
        args.lrs, args.seeds = args.lrs[:1], args.seeds[:1]
    start = time.perf_counter()
    run(args)
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.small or args.shard == (0, 1):
        report(args)


if __name__ == "__main__":
    main()
