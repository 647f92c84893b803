"""One compact table from ``step_time.py`` results: a row per configuration, a column per cell.

``step_time.py --full`` writes one row per (cell, layout, configuration), which is long; the
whole grid takes hours on a small CPU, so it is often run in parts (``--sizes 64 --name A``,
``--sizes 224 --name B``), and some configurations re-run after a fix (``--configs gn
--name C``). This script reads any number of those JSON files, later ones replacing the
configurations they re-measured, and writes
``results/<name>.md`` with each configuration's CPU-time ratio to BN (wall-time ratio on a GPU)
per cell as ``contiguous / channels_last``, the worst cell against issue 6's target, and the
rounds and steps each part was measured with. It measures nothing itself.

Run: ``python benchmarks/step_grid.py results/step_time_full_64.json
results/step_time_full_224.json [--name step_time_grid]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _bench import RESULTS, markdown, write
from step_time import CONFIGS, target

LAYOUTS = ("contiguous", "channels_last")


def _cell_key(cell: dict[str, Any]) -> tuple[int, int, int]:
    """Order cells by model size, then batch, then image size."""
    return (int(cell["model"].removeprefix("resnet")), cell["batch"], cell["size"])


def _cpu_or_wall(ratio: dict[str, Any], device: str) -> float:
    return ratio["cpu"] if device == "cpu" else ratio["wall"]


def summarize(paths: list[Path]) -> tuple[dict[str, Any], str, str]:
    """Merge the result files; return (merged JSON, markdown table, note)."""
    cells: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    parts = []
    device = "cpu"
    for path in paths:
        data = json.loads(path.read_text())
        setup = data["setup"]
        device = setup.get("device", "cpu")
        parts.append(
            f"{path.name}: {setup['rounds']} rounds x {setup['steps_per_round']} steps, "
            f"{setup['threads']} thread(s)"
        )
        for cell in data["cells"]:
            key = (cell["model"], cell["batch"], cell["size"])
            # A later file's configurations replace an earlier one's in the same cell and layout
            # (a re-run of a few configurations after a fix), the others stay.
            cells.setdefault(key, {}).setdefault(cell["format"], {}).update(cell["ratios"])
    order = sorted(cells, key=lambda k: _cell_key({"model": k[0], "batch": k[1], "size": k[2]}))
    header = ["config", *(f"{m} b{b} {s}px" for m, b, s in order), "worst vs target"]
    body = []
    for config in CONFIGS:
        if config == "bn":
            continue
        row: list[Any] = [config]
        misses, worst_gap = [], None
        for key in order:
            texts = []
            for layout in LAYOUTS:
                ratio = cells[key].get(layout, {}).get(config)
                if ratio is None:
                    texts.append("-")
                    continue
                value = _cpu_or_wall(ratio, device)
                texts.append(f"{value:.2f}")
                ceiling = target(config, layout, key[2])
                if ceiling is not None:
                    gap = value - ceiling
                    worst_gap = gap if worst_gap is None else max(worst_gap, gap)
                    if gap > 0:
                        misses.append(f"{key[0]} b{key[1]} {key[2]}px {layout} {value:.2f}")
            row.append(" / ".join(texts))
        if worst_gap is None:
            row.append("-")
        elif misses:
            row.append("MISSED: " + "; ".join(misses))
        else:
            row.append("met")
        body.append(row)
    merged = {"parts": parts, "cells": [{"cell": list(k)} | cells[k] for k in order]}
    clock = "thread CPU-time" if device == "cpu" else "wall-time"
    note = (
        f"cells: training-step {clock} ratio to native BatchNorm2d in the same layout, "
        "contiguous / channels_last. Targets (issue 6): gn, ln <= 1.00 / 1.05; in <= 1.05 / 1.15; "
        "ln2d <= 1.25; wn_remove <= 1.00 at 224 px, <= 1.15 at 64 px. Parts: " + "; ".join(parts)
    )
    return merged, markdown(header, body), note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="step_time.py JSON result files")
    parser.add_argument("--name", default="step_time_grid")
    args = parser.parse_args()
    paths = [p if p.exists() else RESULTS / p.name for p in args.paths]
    merged, table, note = summarize(paths)
    write(args.name, merged, table, note)


if __name__ == "__main__":
    main()
