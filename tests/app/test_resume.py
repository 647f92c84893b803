"""Resuming ``normswap-train``: a run killed mid-training and continued with ``resume=auto``
ends exactly where an uninterrupted run ends; bad checkpoints are refused before training."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from normswap.app.loaders import EpochShuffle, ResumableLoader
from normswap.app.resume import RandomState, checkpoint_to_resume, run_dir
from normswap.errors import NormSwapError

TRAIN = [sys.executable, "-m", "normswap.app.train"]
TESTS = Path(__file__).resolve().parents[1]

# 3 epochs of 20 batches; last.ckpt every `every` steps, so the final step writes one.
RUN = [
    "data=digits",
    "data.batch_size=8",
    "model.input_size=16",
    "trainer.max_epochs=3",
    "++trainer.limit_train_batches=20",
    "++trainer.limit_val_batches=2",
    "callbacks.norm_monitor=null",
    "callbacks.progress_bar=null",
    "logger=csv",
    "run_test=false",
    "+callbacks.stall._target_=helpers.StallAt",
]
STEPS = 60


def _train(args: list[str], cwd: Path, norm: str = "norm=gn", **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*TRAIN, norm, *RUN, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(TESTS), "HYDRA_FULL_ERROR": "0", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _last(folder: Path) -> Path:
    """The newest last checkpoint: ``last.ckpt`` (every n steps) or ``last-v1.ckpt`` (after
    each validation), as ``resume=auto`` picks it."""
    return max((folder / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    _finish(
        _train(
            ["callbacks.last_checkpoint.every_n_train_steps=20", f"hydra.run.dir={folder}"], folder
        )
    )
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("every", "kill_at", "resumes_at"),
    [(5, 7, 5), (20, 27, 20)],  # mid-epoch; at an epoch's end
    ids=["mid-epoch", "epoch-end"],
)
def test_a_killed_run_resumes_to_the_same_weights(
    uninterrupted: Path, tmp_path: Path, every: int, kill_at: int, resumes_at: int
) -> None:
    args = ["resume=auto", f"callbacks.last_checkpoint.every_n_train_steps={every}"]
    marker = tmp_path / "stalled"
    proc = _train(args, tmp_path, NORMSWAP_TEST_STALL=f"{kill_at}:{marker}")
    while not marker.exists():  # the run holds at step kill_at; then it is killed
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"the run ended before it was killed: {proc.stderr.read()[-3000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    folder = next(tmp_path.glob("outputs/resume/*"))
    assert not (folder / "metrics.json").exists()
    assert _load(_last(folder))["global_step"] == resumes_at

    out = _finish(_train(args, tmp_path))  # the same command again
    assert f"continuing from {folder / 'checkpoints'}" in out
    want, got = _load(_last(uninterrupted)), _load(_last(folder))
    assert got["global_step"] == want["global_step"] == STEPS
    assert want["state_dict"].keys() == got["state_dict"].keys()
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    for a, b in zip(
        want["optimizer_states"][0]["state"].values(),
        got["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert want["lr_schedulers"] == got["lr_schedulers"]
    # The history covers the whole run: the validations and every step's time.
    full = json.loads((uninterrupted / "history.json").read_text())
    resumed = json.loads((folder / "history.json").read_text())
    assert resumed["val"] == full["val"] and len(resumed["val"]) == 3
    assert len(resumed["step_times"]) == STEPS
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["score"] == full["val"][-1]["val_acc"]

    # Once more: the run is finished, so nothing trains and the result stays.
    before = (folder / "metrics.json").stat().st_mtime_ns
    assert "already finished; not training again" in _finish(_train(args, tmp_path))
    assert (folder / "metrics.json").stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ckpt_path=missing.ckpt"], "ckpt_path='missing.ckpt' does not exist"),
        (["norm=bn", "ckpt_path={ckpt}"], "holds a model trained with norm=gn"),
        (["norm=gn", "norm.num_groups=8", "ckpt_path={ckpt}"], "pass the same norm options"),
        (["resume=yes"], "resume='yes' is not a choice: use resume=auto"),
        (["resume=auto", "ckpt_path={ckpt}"], "not both"),
    ],
)
def test_bad_checkpoints_are_refused_before_training(
    uninterrupted: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    ckpt = _last(uninterrupted)
    args = [a.format(ckpt=ckpt) for a in args]
    if not any(a.startswith("norm=") for a in args):
        args.append("norm=gn")
    proc = subprocess.run(
        [*TRAIN, *RUN, *args, f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(TESTS), "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.slow
def test_resume_auto_refuses_a_folder_of_another_configuration(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    args = ["resume=auto", f"hydra.run.dir={folder}", "++trainer.fast_dev_run=true"]
    _finish(_train(args, tmp_path))
    proc = _train([*args, "task.lr=0.5"], tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2
    assert "holds a run started with other settings (task.lr: 0.05 -> 0.5)" in err


def test_epoch_shuffle_depends_only_on_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochShuffle(50, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    sampler = EpochShuffle(50, seed=3)
    passes = []
    for epoch in range(4):  # the order an uninterrupted run sees, epoch after epoch
        sampler.set_epoch(epoch)
        passes.append(list(sampler))
    for epoch in (3, 0, 2):  # a fresh process, any epoch first
        assert order(3, epoch) == passes[epoch]
    assert all(sorted(p) == list(range(50)) for p in passes)
    assert len({tuple(p) for p in passes}) == 4 and order(4, 0) != passes[0]


def test_resumable_loader_skips_the_finished_batches_of_its_epoch() -> None:
    data = TensorDataset(torch.arange(20))
    reference = EpochShuffle(20, seed=1)
    reference.set_epoch(2)
    order = list(reference)
    loader = ResumableLoader(data, batch_size=4, sampler=EpochShuffle(20, seed=1))
    loader.load_state_dict({"epoch": 2, "batches": 3})
    assert [b[0].tolist() for b in loader] == [order[12:16], order[16:20]]
    assert next(iter(loader))[0].tolist() == order[:4]  # later passes start at the top
    loader.load_state_dict({"epoch": 2, "batches": 5})  # the epoch was over: the next one
    reference.set_epoch(3)
    assert next(iter(loader))[0].tolist() == list(reference)[:4]


def test_random_state_round_trips_through_a_safe_checkpoint(tmp_path: Path) -> None:
    callback = RandomState()
    torch.save({"state": callback.state_dict()}, tmp_path / "state.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    callback.load_state_dict(_load(tmp_path / "state.pt")["state"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_run_dir_is_fixed_per_command_with_resume_auto() -> None:
    a = run_dir("multirun", "auto", ["seed=0,1", "norm=bn,gn", "resume=auto"], "stamp")
    b = run_dir("multirun", "auto", ["norm=bn,gn", "seed=0,1"], "other")
    assert a == b == "multirun/resume/norm=bn,gn,seed=0,1"
    assert run_dir("outputs", "auto", "", "stamp") == "outputs/resume/default"
    assert run_dir("outputs", "auto", "data.root=/x/y", "s") == "outputs/resume/data.root=_x_y"
    assert run_dir("outputs", None, "norm=gn", "2026/1") == "outputs/2026/1"


def test_checkpoint_to_resume_without_a_checkpoint_starts_from_scratch(tmp_path: Path) -> None:
    assert checkpoint_to_resume(None, "auto", tmp_path, {"name": "gn"}) is None
    assert checkpoint_to_resume(None, None, tmp_path, None) is None
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(NormSwapError, match="is not a Lightning checkpoint"):
        checkpoint_to_resume(None, "auto", tmp_path, None)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_run_resumed_from_a_mid_epoch_checkpoint_ends_with_the_same_weights(
    tmp_path: Path,
) -> None:
    """Under DDP Lightning rebuilds the training loader with a distributed sampler; the
    restored position must reach the rebuilt loader (2 gloo processes on CPU)."""
    ddp = [
        "trainer=ddp_sim",
        "model.name=shufflenet_v2_x0_5",  # 1.4M parameters: 14 checkpoints of 11 MB, not 89
        "trainer.max_epochs=2",
        "++trainer.limit_train_batches=10",
        "callbacks.last_checkpoint.every_n_train_steps=5",
        "callbacks.last_checkpoint.save_top_k=-1",  # keep each one: epoch=E-step=S.ckpt
    ]
    _finish(_train([*ddp, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path))
    full = tmp_path / "full" / "checkpoints"
    start = tmp_path / "step5.ckpt"  # a plain name: '=' needs quoting in a Hydra override
    start.write_bytes((full / "epoch=0-step=5.ckpt").read_bytes())
    resumed = tmp_path / "resumed"
    out = _finish(_train([*ddp, f"hydra.run.dir={resumed}", f"ckpt_path={start}"], tmp_path))
    assert f"continuing from {start}" in out
    want = _load(full / "epoch=1-step=20.ckpt")
    got = _load(resumed / "checkpoints" / "epoch=1-step=20.ckpt")
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
