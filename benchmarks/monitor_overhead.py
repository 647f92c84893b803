"""Training-step overhead of NormMonitor on the CPU, side by side with no monitor.

Models: torchvision resnet18 (10 classes) with its BatchNorms, and the same network swapped to
GroupNorm (``normswap.swap(model, "gn")``); fp32, batch 8x3x64x64, SGD, cross-entropy.
Configurations: no monitor, and ``NormMonitor(every_n_steps=n)`` for n in 1, 10, 50.

Method. Lightning's fit loop adds its own per-step work and noise, so the step is run by hand
and the callback's hooks are called where the fit loop calls them: ``setup`` and
``on_fit_start`` once, then per step ``on_train_batch_start``, forward + backward,
``on_before_optimizer_step``, ``optimizer.step()``, ``on_train_batch_end``. The Trainer is a
stand-in exposing what NormMonitor reads (``global_step``, ``loggers`` (one that discards),
``strategy.reduce`` (identity, as on one device) and ``strategy.root_device``,
``is_global_zero``). The ratios are therefore relative to a bare training step, an upper
bound on the overhead in a real fit.

Configurations are interleaved step by step: each has its own copy of the model and
optimizer (same initial weights), and the runs take one step each in turn, in a rotating
order, so load from other processes on a shared machine falls on all of them alike. A round
is ``--steps`` steps of every configuration (50, a multiple of every n, so each round of
every_n_steps=50 holds exactly one collecting step); every step is timed on its own.
Reported per model and n, each a median over rounds:

* ``average``: mean step time of the round / the baseline's mean step time in that round
  (the overhead averaged over training);
* ``non-collecting``: median time of the steps that do not collect / the baseline's median;
* ``collecting``: median time of the collecting steps / the baseline's median;
* ``average (medians)``: ``((n - 1) * non-collecting + collecting) / n``, the average
  overhead rebuilt from the two medians; on a shared machine the mean step time also carries
  other processes' load spikes, which this estimate does not.

Clock: ``--clock wall`` (default) times steps with ``time.perf_counter``; ``--clock cpu`` with
``time.process_time``, the CPU time of this process, which other processes' load on a shared
machine barely changes. With ``--threads 1`` the CPU time is exactly the work of the step (with
several threads it also counts OpenMP spin-waiting).

A markdown table is printed and the numbers are written to
``benchmarks/results/monitor_overhead.json``.

Run: ``python benchmarks/monitor_overhead.py [--rounds 5] [--steps 50] [--threads 2]
[--clock wall|cpu]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import normswap
from normswap.callbacks import NormMonitor

RESULTS = Path(__file__).resolve().parent / "results" / "monitor_overhead.json"
EVERY = (1, 10, 50)
BATCH = (8, 3, 64, 64)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _NullLogger:
    """Receives the metrics like a Lightning logger and drops them."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


def _stand_in_trainer() -> Any:
    strategy = SimpleNamespace(
        reduce=lambda tensor, reduce_op="sum": tensor, root_device=torch.device("cpu")
    )
    return SimpleNamespace(
        global_step=0, loggers=[_NullLogger()], strategy=strategy, is_global_zero=True
    )


class _Run:
    """One configuration: its own model, optimizer, monitor and step counter."""

    def __init__(self, model: nn.Module, every: int | None, clock: str) -> None:
        self.clock = clock
        self.model = copy.deepcopy(model).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.every = every
        self.monitor = None if every is None else NormMonitor(every_n_steps=every, plot_stats=())
        self.trainer = _stand_in_trainer()
        if self.monitor is not None:
            self.monitor.setup(self.trainer, self.model, "fit")
            self.monitor.on_fit_start(self.trainer, self.model)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(BATCH, generator=g)
        self.y = torch.randint(0, 10, (BATCH[0],), generator=g)

    def step(self) -> tuple[float, bool]:
        """One timed training step; returns (seconds, whether it collected)."""
        trainer, monitor, model = self.trainer, self.monitor, self.model
        collecting = self.every is not None and trainer.global_step % self.every == 0
        clock = CLOCKS[self.clock]
        start = clock()
        if monitor is not None:
            monitor.on_train_batch_start(trainer, model, (self.x, self.y), 0)
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(self.x), self.y).backward()
        if monitor is not None:
            monitor.on_before_optimizer_step(trainer, model, self.optimizer)
        self.optimizer.step()
        trainer.global_step += 1
        if monitor is not None:
            monitor.on_train_batch_end(trainer, model, None, (self.x, self.y), 0)
        return clock() - start, collecting


def _measure(model: nn.Module, rounds: int, steps: int, warmup: int, clock: str) -> dict[str, Any]:
    configs: list[int | None] = [None, *EVERY]
    runs = {every: _Run(model, every, clock) for every in configs}
    for run in runs.values():
        for _ in range(warmup):
            run.step()
        run.trainer.global_step = 0  # so every round starts on a collecting step
    times: dict[int | None, list[list[tuple[float, bool]]]] = {c: [] for c in configs}
    for _ in range(rounds):
        for every in configs:
            times[every].append([])
        for s in range(steps):  # one step of each configuration in turn, rotating the order
            for every in configs[s % len(configs) :] + configs[: s % len(configs)]:
                times[every][-1].append(runs[every].step())
    out: dict[str, Any] = {}
    base_rounds = times[None]
    base_mean = [statistics.fmean(t for t, _ in rnd) for rnd in base_rounds]
    base_median = [statistics.median(t for t, _ in rnd) for rnd in base_rounds]
    out["baseline_ms"] = 1e3 * statistics.median(base_median)
    for every in EVERY:
        avg, other, collect = [], [], []
        for i, rnd in enumerate(times[every]):
            avg.append(statistics.fmean(t for t, _ in rnd) / base_mean[i])
            rest = [t for t, c in rnd if not c]
            hits = [t for t, c in rnd if c]
            if rest:
                other.append(statistics.median(rest) / base_median[i])
            if hits:
                collect.append(statistics.median(hits) / base_median[i])
        non = statistics.median(other) if other else None
        col = statistics.median(collect) if collect else None
        from_medians = None
        if col is not None:
            from_medians = ((every - 1) * (non if non is not None else 1.0) + col) / every
        out[f"every_{every}"] = {
            "average": statistics.median(avg),
            "average_from_medians": from_medians,
            "non_collecting": non,
            "collecting": col,
            "collecting_steps_per_round": sum(c for _, c in times[every][0]),
        }
    return out


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    bn = torchvision.models.resnet18(num_classes=10)
    gn = copy.deepcopy(bn)
    normswap.swap(gn, "gn")
    return {"resnet18 BN": bn, "resnet18 GN": gn}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, Any] = {
        "setup": {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": args.threads,
            "clock": args.clock,
            "batch": list(BATCH),
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "method": "hand-run steps calling NormMonitor's hooks as the fit loop does; "
            "steps interleaved across configurations; medians over rounds",
        },
        "models": {},
    }
    print(
        "| model | every_n_steps | average (mean step time) | average (medians) "
        "| non-collecting steps | collecting steps |"
    )
    print("|---|---|---|---|---|---|")
    for name, model in _models().items():
        measured = _measure(model, args.rounds, args.steps, args.warmup, args.clock)
        results["models"][name] = measured
        for every in EVERY:
            row = measured[f"every_{every}"]
            print(
                f"| {name} | {every} | {_fmt(row['average'])} | "
                f"{_fmt(row['average_from_medians'])} | "
                f"{_fmt(row['non_collecting'])} | {_fmt(row['collecting'])} |"
            )
        print(f"| {name} | (baseline step, median) | {measured['baseline_ms']:.1f} ms | | | |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\nratios = step time with NormMonitor / without ({args.clock} clock, "
        f"{args.threads} threads); written to {RESULTS}"
    )


if __name__ == "__main__":
    main()
