"""Shared method of the benchmarks: interleaved rounds, medians of ratios, two clocks.

Not a benchmark itself (``make bench`` runs the scripts listed in the Makefile). The method is
the one of ``monitor_overhead.py``: every configuration is measured in the same run as its
baseline, in rounds; within a round the configurations take turns in a rotating order, so load
from other processes on a shared machine falls on all of them alike. A ratio is computed per
round (configuration / baseline in that round) and the median over rounds is reported. The
order is reversed every other round, so no configuration always runs after the same one.

Each measurement is taken with two clocks: ``time.perf_counter`` (wall) and
``time.thread_time`` (CPU time of the calling thread). With ``torch.set_num_threads(1)`` every
ATen kernel runs in the calling thread, so the thread CPU time is exactly the work done and
other processes barely change it; ``load`` = wall / CPU time of the baseline (about 1.0 on an
idle core) tells how contended a run was. Rows with a load above ``CONTENDED`` are flagged.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
#: A baseline whose wall time exceeds its CPU time by this factor ran on a contended core.
CONTENDED = 1.15


@dataclass(frozen=True)
class Ratio:
    """One configuration against its baseline: medians over rounds of per-round ratios."""

    wall: float
    cpu: float
    base_wall_ms: float
    base_cpu_ms: float
    load: float

    @property
    def contended(self) -> bool:
        """Whether the baseline's wall time exceeded its CPU time by more than ``CONTENDED``."""
        return self.load > CONTENDED

    def as_dict(self) -> dict[str, float | bool]:
        """The fields plus ``contended``, for the JSON results."""
        return {
            "wall": self.wall,
            "cpu": self.cpu,
            "base_wall_ms": self.base_wall_ms,
            "base_cpu_ms": self.base_cpu_ms,
            "load": self.load,
            "contended": self.contended,
        }


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Run ``fn`` ``reps`` times; return (wall seconds, thread CPU seconds) per call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - wall) / reps, (time.thread_time() - cpu) / reps


def rounds_of(
    fns: dict[str, Callable[[], object]], *, rounds: int, reps: int, warmup: int = 1
) -> dict[str, list[tuple[float, float]]]:
    """Time every function in interleaved rounds: per name, (wall, CPU) seconds per call.

    Each round runs every function ``reps`` times in a row, the functions in a rotating order,
    reversed every other round (so a function that warms the cache for the next one does not
    always favour the same one).
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    per_round: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:  # reversed every other round: no function always follows the same one
            order.reverse()
        for name in order:
            per_round[name].append(timed(fns[name], reps))
    return per_round


def ratio(times: dict[str, list[tuple[float, float]]], name: str, baseline: str) -> Ratio:
    """``name`` against ``baseline``: medians over rounds of the per-round ratios."""
    rows, base = times[name], times[baseline]
    return Ratio(
        wall=statistics.median(t[0] / b[0] for t, b in zip(rows, base, strict=True)),
        cpu=statistics.median(t[1] / b[1] for t, b in zip(rows, base, strict=True)),
        base_wall_ms=1e3 * statistics.median(b[0] for b in base),
        base_cpu_ms=1e3 * statistics.median(b[1] for b in base),
        load=statistics.median(b[0] / b[1] for b in base),
    )


def interleaved(
    fns: dict[str, Callable[[], object]],
    baseline: str,
    *,
    rounds: int,
    reps: int,
    warmup: int = 1,
) -> dict[str, Ratio]:
    """Time every function in interleaved rounds; return each one's :class:`Ratio` to baseline."""
    times = rounds_of(fns, rounds=rounds, reps=reps, warmup=warmup)
    return {name: ratio(times, name, baseline) for name in fns}


def setup(threads: int, **extra: Any) -> dict[str, Any]:
    """Set the thread count and return the ``setup`` record of a results file."""
    torch.set_num_threads(threads)
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "threads": threads,
        "clocks": "wall = time.perf_counter, cpu = time.thread_time (this thread)",
        **extra,
    }


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats are shown with 2 decimals."""

    def cell(value: object) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write(name: str, results: dict[str, Any], table: str, note: str = "") -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md``, and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    setup_line = ", ".join(f"{k}={v}" for k, v in results.get("setup", {}).items())
    text = f"# {name}\n\n{table}\n\n{note}\n\nSetup: {setup_line}\n".replace("\n\n\n", "\n\n")
    (RESULTS / f"{name}.md").write_text(text)
    print(table)
    if note:
        print(f"\n{note}")
    print(f"\nwritten to {RESULTS / name}.json and .md")


def ratio_cells(r: Ratio) -> list[object]:
    """Table cells for a ratio: wall, CPU, and a contention flag."""
    return [r.wall, r.cpu, f"{r.load:.2f}" + (" (contended)" if r.contended else "")]
