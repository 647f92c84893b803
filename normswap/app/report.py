"""``normswap report DIR``: one table and three plots from the runs under a (multi)run folder.

Each run of ``normswap-train`` leaves ``metrics.json`` (one row) and ``history.json`` (its
curves) in its output folder; this module reads them back, ranks the runs by their score, and
writes ``report.md``, ``accuracy_per_norm.png``, ``accuracy_vs_batch.png`` and
``training_curves.png`` into the chosen folder (nothing is written anywhere else).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from normswap.errors import NormSwapError

__all__ = ["collect_runs", "markdown_table", "write_report"]


def _overrides(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    items = [line[2:].strip() for line in path.read_text().splitlines() if line.startswith("- ")]
    return " ".join(i for i in items if not i.startswith(("hydra.", "+recipe")))


def collect_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every run under ``root`` (its ``metrics.json``, plus ``overrides`` and ``history``).

    Raises:
        NormSwapError: ``root`` is not a folder or holds no finished run.

    Example:
        >>> runs = collect_runs("multirun/2026-11-26/10-00-00")  # doctest: +SKIP
    """
    root = Path(root)
    if not root.is_dir():
        raise NormSwapError(f"{str(root)!r} is not a folder: pass a run or multirun directory")
    runs = []
    for metrics in sorted(root.rglob("metrics.json")):
        row = json.loads(metrics.read_text())
        row["overrides"] = _overrides(metrics.parent)
        row["run"] = str(metrics.parent.relative_to(root)) or "."
        history = metrics.parent / "history.json"
        row["history"] = json.loads(history.read_text()) if history.is_file() else {}
        runs.append(row)
    if not runs:
        raise NormSwapError(
            f"no finished run under {str(root)!r} (looked for metrics.json): run normswap-train "
            "first, e.g. normswap-train -m norm=bn,gn"
        )
    return runs


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """The runs as a markdown table, best score first.

    Example:
        >>> print(markdown_table([{"model": "resnet18", "norm": "gn", "score": 0.9,
        ...                        "score_name": "val_acc"}]))
        | rank | model | norm | ...
    """
    score = runs[0].get("score_name", "val_acc")
    test = "test_acc" if score == "val_acc" else score.replace("val_", "test_")
    ranked = sorted(runs, key=lambda r: -(r.get("score") if r.get("score") is not None else -1e9))
    header = (
        f"| rank | model | norm | batch | {score} | {test} | step time (ms) | params (M) | "
        "overrides |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for i, r in enumerate(ranked, 1):
        step = r.get("step_time_s")
        params = r.get("params")
        lines.append(
            f"| {i} | {r.get('model', '')} | {r.get('norm', '')} | {r.get('batch_size', '')} | "
            f"{_fmt(r.get('score'), '.4f')} | {_fmt(r.get(test), '.4f')} | "
            f"{_fmt(None if step is None else step * 1000, '.1f')} | "
            f"{_fmt(None if params is None else params / 1e6, '.2f')} | "
            f"{r.get('overrides', '')} |"
        )
    return "\n".join(lines)


def _plots(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = runs[0].get("score_name", "val_acc")
    written = []

    by_norm: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        if r.get("score") is not None:
            by_norm[r["norm"]].append(r["score"])
    norms = sorted(by_norm, key=lambda n: -max(by_norm[n]))
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(norms) + 2), 3.5))
    ax.bar(norms, [max(by_norm[n]) for n in norms], color="tab:blue")
    ax.set_ylabel(f"{score} (best run)")
    ax.set_title(f"{score} per norm")
    lo = min((min(v) for v in by_norm.values()), default=0)
    ax.set_ylim(bottom=max(0.0, lo - 0.1) if score.endswith("acc") else None)
    fig.tight_layout()
    written.append(out / "accuracy_per_norm.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for norm in sorted({r["norm"] for r in runs}):
        points = sorted(
            (r["batch_size"], r["score"])
            for r in runs
            if r["norm"] == norm and r.get("score") is not None
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("per-device batch size")
    ax.set_ylabel(score)
    ax.set_title(f"{score} vs batch size")
    ax.legend()
    fig.tight_layout()
    written.append(out / "accuracy_vs_batch.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in runs:
        label = f"{r['norm']} b{r.get('batch_size')} {r.get('overrides', '')}".strip()
        loss = r.get("history", {}).get("train_loss", [])
        if loss:
            ax_loss.plot(*zip(*loss, strict=True), label=label, linewidth=1)
        val = [(v["step"], v[score]) for v in r.get("history", {}).get("val", []) if score in v]
        if val:
            ax_val.plot(*zip(*val, strict=True), marker="o", label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss")
    ax_loss.set_yscale("log")
    ax_val.set_xlabel("step")
    ax_val.set_ylabel(score)
    ax_val.legend(fontsize=6)
    fig.suptitle("training curves")
    fig.tight_layout()
    written.append(out / "training_curves.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def write_report(root: str | Path, out: str | Path | None = None) -> tuple[str, list[Path]]:
    """Write ``report.md`` and the plots for the runs under ``root`` into ``out`` (``root``).

    Returns:
        The markdown table and the files written.

    Example:
        >>> table, files = write_report("multirun/2026-11-26/10-00-00")  # doctest: +SKIP
    """
    runs = collect_runs(root)
    out = Path(root if out is None else out)
    if not out.is_dir():
        raise NormSwapError(f"output folder {str(out)!r} does not exist; create it first")
    table = markdown_table(runs)
    report = out / "report.md"
    report.write_text(f"# normswap report: {Path(root).resolve().name}\n\n{table}\n")
    files = [report]
    try:
        files += _plots(runs, out)
    except ImportError:
        print("normswap report: matplotlib is not installed; wrote the table only")
    return table, files
