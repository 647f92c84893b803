"""``normswap report DIR``: tables and plots from the runs under a (multi)run folder.

Each run of ``normswap-train`` leaves ``metrics.json`` (one row) and ``history.json`` (its
curves) in its output folder; this module reads them back and aggregates them: runs that differ
only in their seed form a group (mean ± std and n); when the sweep also varies another setting
(a grid, e.g. ``task.lr``), each norm's setting is chosen by its *validation* mean and the
table reports that setting's *test* mean ± std. It writes ``report.md`` (the aggregated table,
then every run), ``accuracy_per_norm.png``, ``accuracy_vs_batch.png``,
``accuracy_vs_step_time.png`` and ``training_curves.png`` into the chosen folder (nothing is
written anywhere else).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normswap.errors import NormSwapError

__all__ = ["Group", "aggregate", "collect_runs", "markdown_table", "summary_table", "write_report"]

#: Override keys that are not part of a run's configuration for grouping: the seed.
SEED_KEYS = ("seed",)
#: Override keys that are axes of the report rather than settings to choose (the batch size).
AXIS_KEYS = ("norm", "data.batch_size")


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
    names = sorted({str(r.get("score_name", "val_acc")) for r in runs})
    if len(names) > 1:
        raise NormSwapError(
            f"the runs under {str(root)!r} are scored by different metrics ({', '.join(names)}): "
            "report the runs of one task at a time (pass their own folder)"
        )
    return runs


def _items(overrides: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in overrides.split() if "=" in item)


@dataclass(frozen=True)
class Group:
    """Runs that differ only in their seed.

    Attributes:
        model: the model name.
        norm: the norm.
        batch_size: the per-device batch size.
        setting: the other overrides that vary across the sweep (the grid), ``key=value``.
        runs: the runs, in folder order.
        score_name: the validation metric (``val_acc``).
        test_name: the matching test metric (``test_acc``).
    """

    model: str
    norm: str
    batch_size: Any
    setting: str
    runs: tuple[dict[str, Any], ...]
    score_name: str
    test_name: str

    def _values(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.runs if r.get(key) is not None]

    def mean_std(self, key: str) -> tuple[float, float, int]:
        """Mean, sample standard deviation (``nan`` for one run) and count of ``key``.

        Example:
            >>> g = Group("m", "gn", 2, "", ({"x": 1.0}, {"x": 3.0}), "val_acc", "test_acc")
            >>> g.mean_std("x")
            (2.0, 1.4142135623730951, 2)
        """
        values = self._values(key)
        if not values:
            return math.nan, math.nan, 0
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return mean, std, len(values)

    @property
    def val(self) -> tuple[float, float, int]:
        """The validation score: mean, std, n."""
        return self.mean_std("score")

    @property
    def test(self) -> tuple[float, float, int]:
        """The test metric: mean, std, n."""
        return self.mean_std(self.test_name)


def aggregate(runs: list[dict[str, Any]]) -> tuple[list[Group], list[Group]]:
    """Group the runs (seeds together) and choose each norm's grid setting on validation.

    Returns:
        ``(chosen, groups)``: per (model, norm, batch size), the group whose validation mean is
        best (every group when the sweep has no grid), ranked by validation mean; and every
        group.

    Example:
        >>> runs = [{"model": "m", "norm": "gn", "batch_size": 2, "score": 0.5,
        ...          "overrides": f"norm=gn seed={s}"} for s in (0, 1)]
        >>> chosen, groups = aggregate(runs)
        >>> len(chosen), len(groups[0].runs)
        (1, 2)
    """
    score = str(runs[0].get("score_name", "val_acc"))
    test = "test_acc" if score == "val_acc" else score.replace("val_", "test_")
    parsed = [_items(str(r.get("overrides", ""))) for r in runs]
    keys = {k for items in parsed for k in items} - set(SEED_KEYS) - set(AXIS_KEYS)
    grid = sorted(k for k in keys if len({items.get(k) for items in parsed}) > 1)
    table: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for run, items in zip(runs, parsed, strict=True):
        setting = " ".join(f"{k}={items[k]}" for k in grid if k in items)
        key = (str(run.get("model", "")), str(run.get("norm", "")), run.get("batch_size"))
        table[(*key, setting)].append(run)
    groups = [
        Group(model, norm, batch, setting, tuple(members), score, test)
        for (model, norm, batch, setting), members in table.items()
    ]

    def by_val(g: Group) -> float:
        mean = g.val[0]
        return -math.inf if math.isnan(mean) else mean

    best: dict[tuple[Any, ...], Group] = {}
    for g in groups:
        key = (g.model, g.norm, g.batch_size)
        if key not in best or by_val(g) > by_val(best[key]):
            best[key] = g
    chosen = sorted(best.values(), key=lambda g: -by_val(g))
    return chosen, groups


def _pm(stats: tuple[float, float, int], spec: str = ".4f") -> str:
    mean, std, n = stats
    if n == 0:
        return "n/a"
    return format(mean, spec) + ("" if n < 2 else f" ± {format(std, spec)}")


def summary_table(runs: list[dict[str, Any]]) -> str:
    """The aggregated table: per model, norm and batch size, the setting chosen on validation
    (when the sweep has a grid), its validation and test mean ± std over seeds, and n.

    Example:
        >>> runs = [{"model": "m", "norm": "gn", "batch_size": 2, "score": v, "test_acc": t,
        ...          "overrides": f"seed={s}"} for s, v, t in ((0, .5, .4), (1, .7, .6))]
        >>> print(summary_table(runs).splitlines()[2])
        | 1 | m | gn | 2 |  | 2 | 0.6000 ± 0.1414 | 0.5000 ± 0.1414 | n/a |
    """
    chosen, _ = aggregate(runs)
    score, test = chosen[0].score_name, chosen[0].test_name
    header = (
        f"| rank | model | norm | batch | setting (chosen on {score}) | n | {score} | "
        f"{test} | step time (ms) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for i, g in enumerate(chosen, 1):
        step = g.mean_std("step_time_s")
        lines.append(
            f"| {i} | {g.model} | {g.norm} | {g.batch_size} | {g.setting} | {len(g.runs)} | "
            f"{_pm(g.val)} | {_pm(g.test)} | "
            f"{_pm((step[0] * 1000, step[1] * 1000, step[2]), '.1f')} |"
        )
    return "\n".join(lines)


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


def _all_groups(groups: list[Group]) -> str:
    header = "| model | norm | batch | setting | n | val | test |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for g in sorted(groups, key=lambda g: (g.norm, str(g.batch_size), g.setting)):
        lines.append(
            f"| {g.model} | {g.norm} | {g.batch_size} | {g.setting} | {len(g.runs)} | "
            f"{_pm(g.val)} | {_pm(g.test)} |"
        )
    return "\n".join(lines)


def _plots(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = runs[0].get("score_name", "val_acc")
    written = []
    chosen, _ = aggregate(runs)
    test = chosen[0].test_name
    # Test figures where the runs were tested, else the validation score.
    shown = test if any(g.test[2] for g in chosen) else "score"
    label = test if shown == test else score

    def stats(g: Group) -> tuple[float, float, int]:
        mean, std, n = g.mean_std(shown)
        return mean, (0.0 if math.isnan(std) else std), n

    several = len({g.batch_size for g in chosen}) > 1
    bars = [g for g in chosen if stats(g)[2]]
    counts = sorted({stats(g)[2] for g in bars}) or [0]
    if counts[-1] <= 1:
        spread = "one seed per point: no spread"
    else:
        seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        spread = f"mean ± std over {seeds} seeds"
    names = [f"{g.norm} b{g.batch_size}" if several else g.norm for g in bars]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(bars) + 2), 3.5))
    means = [stats(g)[0] for g in bars]
    ax.bar(names, means, yerr=[stats(g)[1] for g in bars], capsize=4, color="tab:blue")
    for i, g in enumerate(bars):
        ax.annotate(f"n={stats(g)[2]}", (i, means[i]), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel(label)
    ax.set_title(f"{label} per norm ({spread}; setting chosen on {score})", fontsize=9)
    if means and label.endswith("acc"):
        ax.set_ylim(bottom=max(0.0, min(means) - 0.1))
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    written.append(out / "accuracy_per_norm.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for norm in sorted({g.norm for g in bars}):
        points = sorted((g.batch_size, *stats(g)[:2]) for g in bars if g.norm == norm)
        xs, ys, es = zip(*points, strict=True)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("per-device batch size")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs batch size ({spread})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    written.append(out / "accuracy_vs_batch.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for g, name in zip(bars, names, strict=True):
        t_mean, t_std, t_n = g.mean_std("step_time_s")
        if t_n:
            y, e, _ = stats(g)
            std = 0.0 if math.isnan(t_std) else t_std * 1000
            ax.errorbar(t_mean * 1000, y, xerr=std, yerr=e, marker="o", capsize=3, label=name)
    ax.set_xlabel("training step time (ms, median per run)")
    ax.set_ylabel(label)
    ax.set_title(f"which norm, at what cost ({spread})", fontsize=9)
    if ax.has_data():
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "accuracy_vs_step_time.png")
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
        The aggregated markdown table and the files written.

    Example:
        >>> table, files = write_report("multirun/2026-11-26/10-00-00")  # doctest: +SKIP
    """
    runs = collect_runs(root)
    out = Path(root if out is None else out)
    if not out.is_dir():
        raise NormSwapError(f"output folder {str(out)!r} does not exist; create it first")
    summary = summary_table(runs)
    _, groups = aggregate(runs)
    table = markdown_table(runs)
    report = out / "report.md"
    text = [
        f"# normswap report: {Path(root).resolve().name}",
        "",
        f"Runs that differ only in their seed are grouped (mean ± std over n); {len(runs)} "
        f"run(s) in {len(groups)} group(s). Where the sweep varies another setting, each "
        "norm's setting is the one with the best validation mean, and its test figures are "
        "reported.",
        "",
        summary,
    ]
    if len(groups) > len(aggregate(runs)[0]):
        text += ["", "## Every setting", "", _all_groups(groups)]
    text += ["", "## Every run", "", table, ""]
    report.write_text("\n".join(text))
    files = [report]
    try:
        files += _plots(runs, out)
    except ImportError:
        print("normswap report: matplotlib is not installed; wrote the table only")
    return summary, files
