"""The pretrained-conversion benchmarks' small modes run end to end (CI), and the transfer
report picks each method's learning rate on validation, not test."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT

BENCH = REPO_ROOT / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(script: str, out: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--small", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_transfer_small_mode_runs_every_method(tmp_path: Path) -> None:
    transfer = _module("transfer")
    _run("transfer.py", tmp_path)
    table = json.loads((tmp_path / "transfer_small.json").read_text())
    assert {(a["method"], a["batch"]) for a in table} == {
        *((m, 2) for m in transfer.METHODS),
        ("bn", 4),
    }
    runs = (tmp_path / "transfer_small_runs.jsonl").read_text().splitlines()
    assert len(runs) == len(transfer.METHODS) + 1
    text = (tmp_path / "transfer_small.md").read_text()
    assert all(f"| {m} |" in text for m in transfer.METHODS)
    assert (tmp_path / "transfer_small.png").stat().st_size > 0
    # A rerun finds every run done and only aggregates.
    _run("transfer.py", tmp_path)
    assert len((tmp_path / "transfer_small_runs.jsonl").read_text().splitlines()) == len(runs)


def test_transfer_report_picks_the_learning_rate_by_validation() -> None:
    transfer = _module("transfer")
    rows = [
        # lr 1e-3: best on test, worse on validation -> not chosen.
        {"method": "m", "batch": 2, "lr": 1e-3, "seed": 0, "val": 0.50, "test": 0.90},
        {"method": "m", "batch": 2, "lr": 1e-3, "seed": 1, "val": 0.60, "test": 0.80},
        {"method": "m", "batch": 2, "lr": 1e-4, "seed": 0, "val": 0.70, "test": 0.60},
        {"method": "m", "batch": 2, "lr": 1e-4, "seed": 1, "val": 0.72, "test": 0.64},
        {"method": "m", "batch": 4, "lr": 1e-4, "seed": 0, "val": 0.1, "test": 0.3},
    ]
    table = {(a["method"], a["batch"]): a for a in transfer.aggregate(rows)}
    best = table[("m", 2)]
    assert best["best_lr"] == 1e-4 and best["seeds"] == 2
    assert best["test"] == pytest.approx(0.62)
    assert best["test_std"] == pytest.approx(math.sqrt((0.60 - 0.62) ** 2 + (0.64 - 0.62) ** 2))
    assert best["per_lr"][1e-3]["test"] == pytest.approx(0.85)
    assert math.isnan(table[("m", 4)]["test_std"])  # one seed: no spread to report


def test_ood_small_mode_separates_the_domains(tmp_path: Path) -> None:
    ood = _module("ood")
    _run("ood.py", tmp_path)
    data = json.loads((tmp_path / "ood_small.json").read_text())
    assert [r["method"] for r in data["rows"]] == list(ood.METHODS)
    judged = data["rows"][0]["judged"]
    assert sum(k.startswith("in-domain") for k in judged) == 2
    assert sum(k.startswith("out-of-domain") for k in judged) == 2
    assert "out-of-domain: flower.jpg crops" in (tmp_path / "ood_small.md").read_text()
