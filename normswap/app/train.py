"""``normswap-train``: train a model with a chosen normalization, configured with Hydra.

Examples::

    normswap-train                                   # resnet18 + BN on Fashion-MNIST, 1 epoch
    normswap-train norm=gn norm.num_groups=16 data.batch_size=4
    normswap-train -m norm=bn,gn,ln                  # a sweep; then: normswap report multirun/...
    normswap-train +recipe=norm_shootout             # a ready experiment from recipes/
    normswap-train norm=gn resume=auto               # again after a kill: continues the run
    normswap-train norm=gn ckpt_path=outputs/.../checkpoints/last.ckpt

Everything is validated before training starts; a bad override exits with status 2 and one
message naming the fix.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from normswap.app.resume import (
    RandomState,
    check_resume_options,
    check_run_config,
    checkpoint_to_resume,
    run_dir,
)
from normswap.app.runlog import RunLog
from normswap.errors import NormSwapError
from normswap.finalize import finalize

__all__ = ["build_norm_callback", "main", "register_configs", "register_recipes", "run"]

log = logging.getLogger(__name__)


def register_configs() -> list[str]:
    """Register the config groups' schemas and the recipes with Hydra's ConfigStore.

    Example:
        >>> "norm_shootout" in register_configs()
        True
    """
    from normswap.app.schema import register_schemas

    OmegaConf.register_new_resolver("normswap.run_dir", run_dir, replace=True)
    register_schemas()
    return register_recipes()


def register_recipes() -> list[str]:
    """Register every ``recipes/*.yaml`` as the Hydra group ``recipe`` (``+recipe=NAME``).

    Recipes live in the top-level ``recipes/`` folder (installed as ``normswap.recipes``);
    each is a ``# @package _global_`` file, stored here under the same package.

    Example:
        >>> "norm_shootout" in register_recipes()
        True
    """
    store = ConfigStore.instance()
    names = []
    for entry in sorted(resources.files("normswap.recipes").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            name = entry.name[: -len(".yaml")]
            node = OmegaConf.create(entry.read_text(encoding="utf-8"))
            store.store(group="recipe", name=name, node=node, package="_global_")
            names.append(name)
    return names


def build_norm_callback(norm_cfg: DictConfig, example_inputs: Any = None) -> pl.Callback | None:
    """The ``NormSwap`` callback for the ``norm`` group entry (``None`` for ``norm=bn``).

    Example:
        >>> build_norm_callback(OmegaConf.create({"spec": "bn"})) is None
        True
    """
    fields = OmegaConf.to_container(norm_cfg, resolve=True)
    assert isinstance(fields, dict)
    spec = fields.pop("spec", None)
    fields.pop("_target_", None)
    if spec == "bn":
        return None
    from normswap.callbacks import NormSwap

    include, exclude = fields.pop("include", None), fields.pop("exclude", None)
    replace = fields.pop("replace", None)
    calibrate_batches = fields.pop("calibrate_batches", None)
    distill_steps = fields.pop("distill_steps", None)
    if distill_steps:
        if not fields.get("calibrate"):
            raise NormSwapError(
                f"norm.distill_steps={distill_steps} distills after calibrating: set "
                "norm.calibrate=true too"
            )
        from normswap.pretrained.convert import calibrate_and_distill

        fields["calibrate"] = functools.partial(calibrate_and_distill, steps=distill_steps)
    kwargs: dict[str, Any] = {
        "include": include,
        "exclude": exclude,
        "replace": replace,
        "example_inputs": example_inputs,
    }
    if calibrate_batches is not None:
        kwargs["calibrate_batches"] = calibrate_batches
    return NormSwap(spec, **kwargs, **fields)  # SpecError names valid norms/fields/values


def _instantiate(cfg: DictConfig, what: str, **kwargs: Any) -> Any:
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, NormSwapError):
            raise cause from None
        raise NormSwapError(f"{what}: {cause}") from err


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate the whole configuration, train, test and write the run's files.

    With ``ckpt_path=FILE`` the run continues from that checkpoint; with ``resume=auto`` from
    the run folder's last checkpoint (none: from scratch; a finished run is not trained again).
    Weights, optimizer, scheduler, data order and position, random generators and the run's
    history all continue, so the result is that of an uninterrupted run.

    Returns:
        The run's ``metrics.json`` row.

    Raises:
        NormSwapError: a bad override (unknown model or weights, bad norm field, missing
            data, a checkpoint that does not exist or holds another norm, ...), raised before
            any training starts.

    Example:
        >>> run(cfg)  # doctest: +SKIP
    """
    out_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else cfg.out_dir
    resume = cfg.get("resume")
    check_resume_options(cfg.get("ckpt_path"), resume)
    if resume == "auto":
        check_run_config(cfg, out_dir)
        finished = Path(out_dir) / "metrics.json"
        if finished.is_file():
            print(f"normswap-train: resume=auto: {out_dir} already finished; not training again")
            return json.loads(finished.read_text())
    configured = build_norm_callback(cfg.norm)  # validates the norm options, too
    norm = configured.spec.to_dict() if configured is not None else None
    ckpt_path = checkpoint_to_resume(cfg.get("ckpt_path"), resume, out_dir, norm)
    if ckpt_path is not None:
        print(f"normswap-train: continuing from {ckpt_path}")
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate(cfg.data, "data")
    datamodule.prepare()
    build_model = _instantiate(cfg.model, "model")
    model = build_model(num_classes=datamodule.num_classes, in_channels=datamodule.in_channels)
    task = _instantiate(cfg.task, "task")(model=model)
    # One real (small) batch lets the swap trace the model: input ranks, BN producers.
    example = task.example_inputs(next(iter(datamodule.train_dataloader())))
    norm_cb = build_norm_callback(cfg.norm, example)
    info = {
        "model": cfg.model.name,
        "source": cfg.model.get("source", "torchvision"),
        "norm": cfg.norm.spec,
        "data": type(datamodule).__name__,
        "batch_size": datamodule.batch_size,
        "task": type(task).__name__,
        "weights": cfg.model.get("weights"),
        "out_dir": str(out_dir),
    }
    runlog = RunLog(out_dir, info, score=cfg.score)
    callbacks = [_instantiate(c, f"callbacks.{k}") for k, c in cfg.callbacks.items() if c]
    callbacks = [*([norm_cb] if norm_cb else []), *callbacks, runlog, RandomState()]
    logger = _instantiate(cfg.logger, "logger") if cfg.get("logger") else False
    # Lightning's own files (a SLURM requeue's hpc_ckpt_N.ckpt) go to the run folder too.
    defaults: dict[str, Any] = (
        {} if cfg.trainer.get("default_root_dir") else {"default_root_dir": str(out_dir)}
    )
    # Checkpoints come from the callbacks group only: without a ModelCheckpoint there
    # (callbacks=minimal) Lightning's implicit one, a full checkpoint per epoch, is off too.
    if cfg.trainer.get("enable_checkpointing") is None:
        defaults["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = _instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=logger, **defaults)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    runlog.info["params"] = _params(task.model)  # after the swap (weight norm adds g)
    test_metrics: dict[str, float] = {}
    if cfg.run_test and not trainer.fast_dev_run:
        results = trainer.test(task, datamodule=datamodule, verbose=False)
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if cfg.get("finalize") and trainer.is_global_zero:
        runlog.info["finalized"] = save_final(task, example, Path(out_dir))
    return runlog.finish(trainer, test_metrics)


def save_final(task: pl.LightningModule, example: Any, out_dir: Path) -> bool:
    """Write the trained model's inference form (:func:`normswap.finalize`) to ``out_dir``.

    ``model_final.pt`` holds the surgery record (marked finalized) and the state dict, for
    :func:`normswap.restore`; when every layer became plain, ``model_final.pt2`` is a
    ``torch.export`` program of ``task.model`` for the example input that needs nothing but
    torch. Returns whether the model is plain.

    Example:
        >>> save_final(task, example, out_dir)  # doctest: +SKIP
        True
    """
    task.eval()
    report = finalize(task)
    print(report)
    record = getattr(task, "_normswap_record", None)
    record = dict(record) if record is not None else None
    if record is not None:
        record["finalized"] = True
    torch.save({"normswap": record, "state_dict": task.state_dict()}, out_dir / "model_final.pt")
    if report.plain:
        args = example if isinstance(example, tuple) else (example,)
        try:
            program = torch.export.export(task.model, args)
        except Exception as err:  # the state dict is saved; say why there is no program
            print(f"normswap-train: model_final.pt2 not written: torch.export failed: {err}")
            return True
        torch.export.save(program, out_dir / "model_final.pt2")
    return report.plain


@hydra.main(config_path="pkg://normswap.conf", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except NormSwapError as err:
        print(f"normswap-train: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point of ``normswap-train``.

    Example:
        >>> main()  # doctest: +SKIP
    """
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
