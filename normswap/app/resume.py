"""Resuming ``normswap-train`` runs: ``ckpt_path=FILE`` and ``resume=auto``.

* :func:`run_dir` names the run folder. With ``resume=auto`` it is a fixed folder per command
  (``outputs/resume/<overrides>``, ``multirun/resume/<overrides>``) instead of a timestamp, so
  running the same command again finds the killed run.
* :func:`checkpoint_to_resume` picks the checkpoint (the folder's newest ``last*.ckpt`` or
  SLURM ``hpc_ckpt_*.ckpt``, or the ``ckpt_path`` given) and refuses, before anything trains,
  a file that does not exist or that holds another norm than the one configured (the surgery
  record in the checkpoint says which).
* :class:`RandomState` saves the random generators in every checkpoint, so dropout and random
  augmentation continue as they would have; :class:`~normswap.app.loaders.ResumableLoader`
  continues the data order.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

from normswap.errors import NormSwapError

__all__ = [
    "RESUME_CHOICES",
    "RandomState",
    "check_resume_options",
    "check_run_config",
    "checkpoint_norm",
    "checkpoint_to_resume",
    "run_dir",
]

RESUME_CHOICES = (None, "auto")
"""Values of the ``resume`` option."""

#: Overrides that do not change what a run computes: left out of the resume folder's name.
_NOT_THE_RUN = ("resume=", "ckpt_path=")

#: The checkpoints ``resume=auto`` continues from, the newest first: ``ModelCheckpoint``'s
#: ``last.ckpt`` (and ``last-v1.ckpt``...) and the one Lightning writes when SLURM signals a job
#: before requeuing it (``hpc_ckpt_N.ckpt`` in the trainer's ``default_root_dir``, the run folder).
CHECKPOINT_PATTERNS = ("last*.ckpt", "hpc_ckpt_*.ckpt")

#: The file in a run folder that records the configuration a ``resume=auto`` run started with.
RUN_CONFIG = "run_config.yaml"


def _slug(overrides: Iterable[str]) -> str:
    kept = sorted(o for o in overrides if not o.startswith(_NOT_THE_RUN))
    name = ",".join(kept) or "default"
    return re.sub(r"[^A-Za-z0-9_.,=+\-]", "_", name)[:200]


def run_dir(base: str, resume: Any, overrides: Any, stamp: str) -> str:
    """The run (or sweep) folder: ``base/stamp``, or ``base/resume/<overrides>`` with
    ``resume=auto``. Registered as the OmegaConf resolver ``normswap.run_dir``.

    Args:
        base: ``outputs`` or ``multirun``.
        resume: the ``resume`` option.
        overrides: the command's overrides (a list, or Hydra's ``override_dirname`` string).
        stamp: the timestamp folder used without ``resume=auto``.

    Example:
        >>> run_dir("outputs", None, ["norm=gn"], "2026-12-02/10-00-00")
        'outputs/2026-12-02/10-00-00'
        >>> run_dir("multirun", "auto", ["norm=bn,gn", "resume=auto", "seed=0,1"], "x")
        'multirun/resume/norm=bn,gn,seed=0,1'
    """
    if resume != "auto":
        return f"{base}/{stamp}"
    items = overrides.split(",") if isinstance(overrides, str) else [str(o) for o in overrides]
    return f"{base}/resume/{_slug(items)}"


def checkpoint_norm(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The norm spec recorded in a Lightning checkpoint (``None``: no ``NormSwap``, i.e. BN).

    Example:
        >>> checkpoint_norm({"callbacks": {"NormSwap{'spec': 'gn'}": {"spec": {"name": "gn"}}}})
        {'name': 'gn'}
        >>> checkpoint_norm({"callbacks": {}}) is None
        True
    """
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).startswith("NormSwap") and isinstance(state, dict) and "spec" in state:
            return dict(state["spec"])
    return None


def _describe(spec: dict[str, Any] | None) -> str:
    if spec is None:
        return "norm=bn (no conversion)"
    fields = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"norm={spec.get('name')}" + (f" ({fields})" if fields else "")


def check_resume_options(ckpt_path: str | None, resume: Any) -> None:
    """Refuse a ``resume`` value that is not a choice, or ``ckpt_path`` and ``resume`` together.

    Example:
        >>> check_resume_options(None, "auto")
        >>> check_resume_options(None, "yes")
        Traceback (most recent call last):
        ...
        normswap.errors.NormSwapError: resume='yes' is not a choice: ...
    """
    if resume not in RESUME_CHOICES:
        raise NormSwapError(
            f"resume={resume!r} is not a choice: use resume=auto (continue this command's run "
            "from its last checkpoint) or leave it out"
        )
    if ckpt_path is not None and resume is not None:
        raise NormSwapError("pass ckpt_path=FILE or resume=auto, not both")


def checkpoint_to_resume(
    ckpt_path: str | None, resume: Any, out_dir: str | Path, norm: dict[str, Any] | None
) -> str | None:
    """The checkpoint a run continues from, checked against the configured norm.

    Args:
        ckpt_path: the ``ckpt_path`` option (a file), or ``None``.
        resume: the ``resume`` option: ``None`` or ``"auto"`` (the newest of
            :data:`CHECKPOINT_PATTERNS` under ``out_dir``; none there: start from scratch).
        out_dir: the run folder.
        norm: the configured norm's spec as a dict (``None`` for ``norm=bn``).

    Returns:
        The checkpoint path, or ``None`` to start from scratch.

    Raises:
        NormSwapError: a bad ``resume`` value, both options at once, a ``ckpt_path`` that does
            not exist or is not a Lightning checkpoint, or one that holds another norm.

    Example:
        >>> checkpoint_to_resume(None, "auto", "/nonexistent", None) is None
        True
    """
    check_resume_options(ckpt_path, resume)
    if ckpt_path is None:
        if resume is None:
            return None
        found = sorted(
            (p for pattern in CHECKPOINT_PATTERNS for p in Path(out_dir).rglob(pattern)),
            key=lambda p: p.stat().st_mtime,
        )
        if not found:
            return None
        ckpt_path = str(found[-1])
    path = Path(ckpt_path)
    if not path.is_file():
        raise NormSwapError(
            f"ckpt_path={ckpt_path!r} does not exist: pass a checkpoint file of a run (its "
            "checkpoints/last.ckpt), or resume=auto to continue this command's own run"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise NormSwapError(
            f"ckpt_path={ckpt_path!r} is not a Lightning checkpoint torch can load safely: {err}"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise NormSwapError(
            f"ckpt_path={ckpt_path!r} is not a Lightning checkpoint (no state_dict)"
        )
    saved = checkpoint_norm(checkpoint)
    if saved != norm:
        raise NormSwapError(
            f"ckpt_path={ckpt_path!r} holds a model trained with {_describe(saved)}, but this "
            f"run is configured with {_describe(norm)}: pass the same norm options as that run, "
            "or start without ckpt_path/resume"
        )
    return str(path)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: node}


def check_run_config(cfg: DictConfig, out_dir: str | Path) -> None:
    """With ``resume=auto``: refuse a run folder that holds a run of another configuration,
    else record this one in it (``run_config.yaml``).

    Raises:
        NormSwapError: the folder's run was started with other settings (a recipe file or a
            default changed since); it names the settings that differ.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> check_run_config(OmegaConf.create({"seed": 0, "resume": "auto"}), folder)
        >>> check_run_config(OmegaConf.create({"seed": 1, "resume": "auto"}), folder)
        Traceback (most recent call last):
        ...
        normswap.errors.NormSwapError: resume=auto: ... (seed: 0 -> 1): delete that folder ...
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    for key in ("resume", "ckpt_path", "out_dir"):
        container.pop(key, None)
    path = Path(out_dir) / RUN_CONFIG
    if path.is_file():
        before = _flat(OmegaConf.to_container(OmegaConf.load(path)))
        now = _flat(container)
        differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if differ:
            shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:5])
            raise NormSwapError(
                f"resume=auto: {str(out_dir)!r} holds a run started with other settings "
                f"({shown}): delete that folder to start over, or pass hydra.run.dir=<another "
                "folder>"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(container), path)


class RandomState(Callback):
    """Save torch's, NumPy's and Python's random generators in checkpoints; restore them on
    resume, so random layers (dropout) and augmentation continue as they would have.

    The states are stored as tensors and lists, so the checkpoint still loads with
    ``torch.load(..., weights_only=True)``.

    Example:
        >>> callback = RandomState()
        >>> state = callback.state_dict()
        >>> a = torch.rand(1); callback.load_state_dict(state); torch.equal(a, torch.rand(1))
        True
    """

    @override
    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": [
                name,
                torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                pos,
                has_gauss,
                gauss,
            ],
            "python": [version, list(internal), gauss_next],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state_dict["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
