"""normswap report: seeds aggregated (mean ± std, n), grid settings chosen on validation and
reported on test, plots with error bars, one clear message for bad folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from normswap import NormSwapError
from normswap.app.report import aggregate, collect_runs, write_report


def _run(root: Path, name: str, overrides: list[str], **metrics: float | str) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    row = {"model": "resnet18", "batch_size": 8, "score_name": "val_acc", **metrics}
    (run / "metrics.json").write_text(json.dumps(row))


def _grid(root: Path) -> None:
    # gn: lr=0.1 has the best test mean but not the best validation mean -> lr=0.01 is chosen.
    for i, (lr, val, test) in enumerate(
        [
            (0.1, 0.6, 0.9),
            (0.1, 0.7, 0.9),
            (0.1, 0.8, 0.9),
            (0.01, 0.8, 0.5),
            (0.01, 0.8, 0.6),
            (0.01, 0.8, 0.7),
        ]
    ):
        _run(
            root,
            f"gn{i}",
            ["norm=gn", f"seed={i % 3}", f"task.lr={lr}"],
            norm="gn",
            score=val,
            test_acc=test,
            step_time_s=0.010 + 0.001 * i,
        )
    for i, (lr, val, test) in enumerate([(0.1, 0.5, 0.4), (0.1, 0.7, 0.6), (0.01, 0.2, 0.1)]):
        _run(
            root,
            f"bn{i}",
            ["norm=bn", f"seed={i}", f"task.lr={lr}"],
            norm="bn",
            score=val,
            test_acc=test,
            step_time_s=0.008,
        )


def test_seeds_are_aggregated_and_the_grid_is_chosen_on_validation(tmp_path: Path) -> None:
    _grid(tmp_path)
    chosen, groups = aggregate(collect_runs(tmp_path))
    assert len(groups) == 4
    assert [(g.norm, g.setting) for g in chosen] == [("gn", "task.lr=0.01"), ("bn", "task.lr=0.1")]
    gn, bn = chosen
    assert gn.val == (pytest.approx(0.8), pytest.approx(0.0), 3)
    mean, std, n = gn.test
    assert (mean, n) == (pytest.approx(0.6), 3) and std == pytest.approx(0.1)
    assert bn.test[0] == pytest.approx(0.5) and bn.test[1] == pytest.approx(math.sqrt(0.02))
    other = next(g for g in groups if g.norm == "gn" and g.setting == "task.lr=0.1")
    assert other.test[0] == pytest.approx(0.9)  # better on test, not chosen


def test_report_files(tmp_path: Path) -> None:
    _grid(tmp_path)
    table, files = write_report(tmp_path)
    lines = table.splitlines()
    assert "setting (chosen on val_acc)" in lines[0]
    assert lines[2].startswith("| 1 | resnet18 | gn | 8 | task.lr=0.01 | 3 | 0.8000 ± 0.0000")
    assert "0.6000 ± 0.1000" in lines[2]
    text = (tmp_path / "report.md").read_text()
    assert "## Every setting" in text and "## Every run" in text
    names = {f.name for f in files}
    assert {"accuracy_per_norm.png", "accuracy_vs_batch.png", "accuracy_vs_step_time.png"} <= names
    assert all(f.stat().st_size > 1000 for f in files if f.suffix == ".png")


def test_single_seed_runs_have_no_spread(tmp_path: Path) -> None:
    _run(tmp_path, "a", ["norm=gn"], norm="gn", score=0.5, test_acc=0.4)
    table, _ = write_report(tmp_path)
    assert "| 1 | resnet18 | gn | 8 |  | 1 | 0.5000 | 0.4000 |" in table


def test_bad_folders_get_one_clear_message(tmp_path: Path) -> None:
    with pytest.raises(NormSwapError, match="no finished run"):
        write_report(tmp_path)
    _run(tmp_path, "a", ["norm=gn"], norm="gn", score=0.5)
    _run(tmp_path, "b", ["norm=gn"], norm="gn", score=30.0, score_name="val_psnr")
    with pytest.raises(NormSwapError, match="different metrics"):
        write_report(tmp_path)
