"""The Hydra app: every config option composes and instantiates, every recipe runs, a sweep
is reported, and bad overrides fail before training with one clear message."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf, open_dict

import normswap
from normswap.app.schema import NORM_CALLBACK_OPTIONS
from normswap.app.train import build_norm_callback, register_configs

CONF = Path(normswap.__file__).parent.parent / "conf"
RECIPES = sorted(p.stem for p in (CONF.parent / "recipes").glob("*.yaml"))
TRAIN = [sys.executable, "-m", "normswap.app.train"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def recipe_sweep(recipe: str) -> list[dict[str, str]]:
    """Every run a recipe's sweep makes, as ``{key: value}`` (config-group globs resolved over
    the group's YAML options, as Hydra resolves them)."""
    sweep = OmegaConf.load(CONF.parent / "recipes" / f"{recipe}.yaml").get("hydra", {})
    params = sweep.get("sweeper", {}).get("params", {})
    parser = OverridesParser.create()
    runs: list[dict[str, str]] = [{}]
    for key, values in params.items():
        override = parser.parse_override(f"{key}={values}")
        value = override.value()
        if isinstance(value, Glob):
            choices = list(value.filter(options(key)))
        else:
            choices = [str(v) for v in override.sweep_string_iterator()]
        runs = [{**run, key: choice} for run in runs for choice in choices]
    return runs


def test_the_shootout_sweeps_every_family_that_trains_from_scratch() -> None:
    norms = {run["norm"] for run in recipe_sweep("norm_shootout")}
    scratch = [n for n in normswap.list_norms() if normswap.get_family(n).from_scratch]
    assert sorted(norms) == sorted(["bn", *scratch])
    assert "frozen" in normswap.list_norms() and "frozen" not in norms


@pytest.mark.parametrize("recipe", ["norm_shootout", "small_batch", "vit_norms"])
def test_comparison_recipes_run_every_setting_with_three_seeds(recipe: str) -> None:
    runs = recipe_sweep(recipe)
    settings = {tuple(sorted((k, v) for k, v in run.items() if k != "seed")) for run in runs}
    assert len(runs) == 3 * len(settings)
    for setting in settings:
        seeds = sorted(
            run["seed"]
            for run in runs
            if tuple(sorted((k, v) for k, v in run.items() if k != "seed")) == setting
        )
        assert seeds == ["0", "1", "2"]


def _compose(overrides: list[str], tmp_path: Path):
    register_configs()
    with initialize_config_module("normswap.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _bindable(node) -> None:
    """The node's _target_ accepts its keys (the YAML matches the real signature)."""
    target = get_method(node._target_)
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    inspect.signature(target).bind_partial(**kwargs)


def test_groups_have_the_documented_options() -> None:
    assert options("norm") == sorted(["bn", *normswap.list_norms()])
    assert options("data") == ["digits", "fake", "fashion_mnist", "imagefolder"]
    assert options("trainer") == ["cpu", "ddp", "ddp_sim", "gpu", "multinode"]
    assert options("logger") == ["csv", "tensorboard"]
    assert options("task") == ["classify", "denoise"]
    assert RECIPES == [
        "adaln_conditional",
        "fold_wn",
        "norm_shootout",
        "pretrained_gn",
        "small_batch",
        "vit_norms",
    ]


@pytest.mark.parametrize("norm", options("norm"))
def test_norm_options_match_the_specs(norm: str, tmp_path: Path) -> None:
    cfg = _compose([f"norm={norm}"], tmp_path)
    callback = build_norm_callback(cfg.norm)
    if norm == "bn":
        assert callback is None
        return
    fields = {f.name for f in dataclasses.fields(normswap.get_spec(callback.spec))}
    callback_keys = {"spec", *NORM_CALLBACK_OPTIONS}
    assert set(cfg.norm) - callback_keys == fields, "YAML drifted from the spec"
    assert callback.spec.name == norm


def test_norm_replace_reaches_the_callback(tmp_path: Path) -> None:
    cfg = _compose(["norm=rms", "norm.replace=[ln,bn]"], tmp_path)
    assert build_norm_callback(cfg.norm).replace == ("ln", "bn")
    cfg = _compose(["norm=dyt", "norm.replace=any", "norm.alpha_init=0.2"], tmp_path)
    callback = build_norm_callback(cfg.norm)
    assert "rms" in callback.replace and callback.spec.alpha_init == 0.2
    with pytest.raises(normswap.SpecError, match="unknown source kind"):
        build_norm_callback(_compose(["norm=gn", "norm.replace=layer"], tmp_path).norm)


@pytest.mark.parametrize("data", options("data"))
def test_data_options_instantiate(data: str, tmp_path: Path) -> None:
    overrides = [f"data={data}"]
    if data == "imagefolder":
        from PIL import Image

        for cls in ("a", "b"):
            (tmp_path / "img" / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 20), (40 * i, 80, 120)).save(
                    tmp_path / "img" / cls / f"{i}.png"
                )
        overrides.append(f"data.root={tmp_path / 'img'}")
    if data == "fashion_mnist":
        overrides += ["data.train_size=64", "data.test_size=32", "data.val_size=32"]
    cfg = _compose(overrides, tmp_path)
    dm = instantiate(cfg.data)
    dm.prepare()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1] == dm.in_channels and y.max() < dm.num_classes


@pytest.mark.parametrize("model", options("model"))
def test_model_options_instantiate(model: str, tmp_path: Path) -> None:
    cfg = _compose([f"model={model}"], tmp_path)
    net = instantiate(cfg.model)(num_classes=10, in_channels=1)
    out = net(torch.randn(2, 1, 28, 28))
    out = out["out"] if isinstance(out, dict) else out
    assert out.shape[0] == 2


def test_a_timm_model_trains_with_a_swapped_norm(tmp_path: Path) -> None:
    """model.source=timm: the app builds a timm model (pretrained=False), swaps its
    BatchNormAct2d layers and trains; a timm name under torchvision names the choices."""
    cfg = _compose(["model.source=timm", "model.name=test_efficientnet"], tmp_path)
    net = instantiate(cfg.model)(num_classes=10, in_channels=1)
    assert type(net.net).__module__.startswith("timm.")
    proc = _train(
        [
            "model.source=timm",
            "model.name=test_efficientnet",
            "norm=gn",
            "norm.num_groups=8",
            "data=digits",
            "callbacks=minimal",
            "logger=csv",
            "++trainer.fast_dev_run=true",
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BatchNormAct2d -> GroupNorm" in proc.stdout + proc.stderr  # the logged report
    assert json.loads(next(tmp_path.rglob("metrics.json")).read_text())["steps"] == 1
    with pytest.raises(normswap.NormSwapError, match="unknown model 'test_efficientnet'"):
        cfg = _compose(["model.name=test_efficientnet"], tmp_path)
        instantiate(cfg.model)(num_classes=10, in_channels=1)


@pytest.mark.parametrize("task", options("task"))
def test_task_options_instantiate(task: str, tmp_path: Path) -> None:
    cfg = _compose([f"task={task}"], tmp_path)
    module = instantiate(cfg.task)(model=torch.nn.Linear(2, 2))
    assert isinstance(module, normswap.app.tasks._Task)


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_options(trainer: str, tmp_path: Path) -> None:
    cfg = _compose([f"trainer={trainer}"], tmp_path)
    _bindable(cfg.trainer)
    if cfg.trainer.accelerator == "cpu":  # GPU trainers cannot be built on this machine
        instantiate(cfg.trainer, logger=False)


@pytest.mark.parametrize("group", ["callbacks", "logger"])
def test_callbacks_and_loggers_instantiate(group: str, tmp_path: Path) -> None:
    for option in options(group):
        cfg = _compose([f"{group}={option}"], tmp_path)
        if group == "logger":
            assert instantiate(cfg.logger).save_dir == str(tmp_path)
        else:
            for node in cfg.callbacks.values():
                instantiate(node)


def test_launchers(tmp_path: Path) -> None:
    cfg = _compose(["hydra/launcher=parallel"], tmp_path)
    assert cfg.hydra.launcher.n_jobs == 2
    assert "joblib" in cfg.hydra.launcher._target_.lower()
    # The SLURM example needs hydra-submitit-launcher (not installed here): check what it is.
    slurm = yaml.safe_load((CONF / "hydra" / "launcher" / "slurm.yaml").read_text())
    assert slurm["defaults"] == ["submitit_slurm"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}


def _train(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env()
    )


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_fast_dev_run(recipe: str, tmp_path: Path) -> None:
    proc = _train(
        [
            f"+recipe={recipe}",
            "++trainer.fast_dev_run=true",
            "callbacks=minimal",
            "seed=0",  # one seed of the recipes that sweep seeds
            f"hydra.run.dir={tmp_path}/run",
            f"hydra.sweep.dir={tmp_path}/multirun",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    assert len(rows) == len([r for r in recipe_sweep(recipe) if r.get("seed", "0") == "0"])
    assert all(r["steps"] == 1 for r in rows)


@pytest.mark.slow
def test_sweep_then_report(tmp_path: Path) -> None:
    proc = _train(
        [
            "-m",
            "norm=bn,gn",
            "seed=0,1",
            "data=digits",
            "callbacks=minimal",
            "logger=csv",
            "model.input_size=16",
            "trainer.max_epochs=2",
            "++trainer.limit_train_batches=6",
            "++trainer.limit_val_batches=3",
            "++trainer.limit_test_batches=3",
            "trainer.log_every_n_steps=2",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = subprocess.run(
        [sys.executable, "-m", "normswap.cli", "report", str(tmp_path / "sweep"), "--per-seed"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    printed = report.stdout.split("\n\n")
    assert "| n |" in printed[0]  # the aggregated table, then each run (--per-seed)
    assert sum("| resnet18 | gn | 32 |" in line for line in printed[1].splitlines()) == 2
    table = (tmp_path / "sweep" / "report.md").read_text()
    # Seeds grouped: one row per norm with n = 2 and mean ± std, computed from the runs.
    rows = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("metrics.json")]
    assert len(rows) == 4
    for norm in ("bn", "gn"):
        scores = [r["score"] for r in rows if r["norm"] == norm]
        mean, std = sum(scores) / 2, abs(scores[0] - scores[1]) / math.sqrt(2)
        row = next(line for line in table.splitlines() if f"| resnet18 | {norm} | 32 |" in line)
        assert "| 2 |" in row and f"{mean:.4f} ± {std:.4f}" in row, row
    assert "| rank | model | norm | batch | val_acc |" in table  # every run, too
    for name in (
        "accuracy_per_norm.png",
        "accuracy_vs_batch.png",
        "accuracy_vs_step_time.png",
        "training_curves.png",
    ):
        assert (tmp_path / "sweep" / name).stat().st_size > 1000
    for run in (tmp_path / "sweep").glob("*_norm=*"):
        assert (run / ".hydra" / "config.yaml").is_file()
        assert (run / "metrics.json").is_file()
    assert list((tmp_path / "sweep").rglob("normswap_report.json"))  # the gn run's swap report
    # callbacks=minimal: no checkpoint at all, not even Lightning's implicit one per epoch.
    assert not list((tmp_path / "sweep").rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.name=resnet", "unknown model 'resnet'; choose one of: alexnet"),
        ("norm=batchnorm", "Could not find 'norm/batchnorm'"),
        ("norm=gn norm.num_groups=0", "num_groups must be a positive integer, got 0"),
        ("data.root=/nonexistent", "make assets"),
        ("data=imagefolder data.root=/nonexistent", "is not a folder"),
        ("model.name=resnet50 model.weights=IMAGENET1K_V2", "cannot download them; put resnet50"),
        ("model.weights=missing.pth", "weights file 'missing.pth' does not exist"),
        ("data.batch_size=0", "data.batch_size must be a positive integer, got 0"),
        # The structured configs refuse these while composing, naming the key:
        ("data.batch_size=big", "Value 'big' of type 'str' could not be converted to Integer"),
        ("norm=gn norm.num_group=8", "Key 'num_group' not in 'NormGnSchema'"),
        ("task.lr=fast", "Value 'fast' of type 'str' could not be converted to Float"),
    ],
)
def test_bad_overrides_fail_before_training(override: str, message: str, tmp_path: Path) -> None:
    env = {**_env(), "TORCH_HOME": str(tmp_path / "empty_cache")}
    proc = subprocess.run(
        [
            *TRAIN,
            *override.split(),
            "data=digits" if "data" not in override else "seed=0",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.slow
def test_demo_runs_the_shootout_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from normswap import demo

    monkeypatch.setattr(demo, "OUT", tmp_path / "demo")
    assert demo.main(["++trainer.fast_dev_run=true", "norm=bn,gn"]) == 0
    out = capsys.readouterr().out
    assert "| rank | model | norm |" in out
    assert (tmp_path / "demo" / "report.md").is_file()
    assert (tmp_path / "demo" / "accuracy_per_norm.png").is_file()


def test_lr_schedule_ramps_up_linearly_then_decays_to_zero():
    from normswap.app.tasks import ClassificationTask, lr_factor

    steps, warmup = 100, 0.1
    factors = [lr_factor(s, steps, warmup) for s in range(steps + 1)]
    assert factors[:10] == pytest.approx([(s + 1) / 11 for s in range(10)])
    assert factors[10] == 1.0
    expected = [0.5 * (1 + math.cos(math.pi * (s - 10) / 90)) for s in range(10, steps + 1)]
    assert factors[10:] == pytest.approx(expected)
    assert factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(s, 10, 0.0) for s in (0, 10)] == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match=r"task.warmup must be a fraction .* got 1.0"):
        ClassificationTask(torch.nn.Linear(2, 2), warmup=1.0)


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in ("model", "norm", "data", "task") for o in options(g)],
)
def test_every_option_is_backed_by_its_typed_schema(group: str, option: str, tmp_path: Path):
    from omegaconf import OmegaConf

    cfg = _compose([f"{group}={option}"], tmp_path)
    schema = OmegaConf.get_type(cfg[group])
    assert schema.__name__ == f"{group.capitalize()}{option.title().replace('_', '')}Schema"
    assert dataclasses.is_dataclass(schema)


def test_schema_types_come_from_the_code(tmp_path: Path) -> None:
    cfg = _compose(["norm=gn", "norm.num_groups=16", "norm.calibrate=true"], tmp_path)
    assert cfg.norm.num_groups == 16 and cfg.norm.calibrate is True
    callback = build_norm_callback(cfg.norm)
    assert callback.spec.num_groups == 16
    assert callback.calibrate is normswap.calibrate  # calibrate=true: the closed-form re-fit
    for override, message in (
        ("data.batch_size=big", "could not be converted to Integer"),
        ("model.nope=1", "Key 'nope' not in 'ModelClassifierSchema'"),
    ):
        with pytest.raises(Exception, match=override.partition("=")[0]) as err:
            _compose([override], tmp_path)
        assert message in str(err.value.__cause__)


def test_finalize_hands_over_a_torch_only_program(tmp_path: Path) -> None:
    proc = _train(
        [
            "norm=gn",
            "data=digits",
            "callbacks=minimal",
            "logger=csv",
            "model.input_size=16",
            "++trainer.max_steps=2",
            "++trainer.limit_val_batches=1",
            "++trainer.limit_test_batches=1",
            "finalize=true",
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    saved = torch.load(run / "model_final.pt", weights_only=True)
    assert saved["normswap"]["finalized"] is True
    assert json.loads((run / "metrics.json").read_text())["finalized"] is True
    program = torch.export.load(run / "model_final.pt2")
    kinds = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("group_norm" in k for k in kinds), kinds  # the plain norm op in the graph
    (x,) = program.example_inputs[0]  # a training batch: the data's channels and size
    assert program.module()(torch.randn_like(x)).shape == (x.shape[0], 10)
    assert "model.net.bn1.weight" in saved["state_dict"]


def test_norm_calibrate_distill_and_progressive_options(tmp_path: Path) -> None:
    cfg = _compose(
        [
            "norm=gn",
            "norm.calibrate=true",
            "norm.distill_steps=50",
            "norm.progressive={end: 300, shape: cosine}",
        ],
        tmp_path,
    )
    callback = build_norm_callback(cfg.norm)
    assert callback.calibrate.keywords == {"steps": 50}
    assert callback.progressive == normswap.BlendSchedule(end=300, shape="cosine")
    bad = _compose(["norm=gn", "norm.distill_steps=50"], tmp_path)
    with pytest.raises(normswap.NormSwapError, match=r"set norm\.calibrate=true"):
        build_norm_callback(bad.norm)


def test_recipe_norm_options_compose_with_norm_bn(tmp_path: Path) -> None:
    # pretrained_gn sets norm.calibrate/distill_steps; comparing with norm=bn must still work.
    cfg = _compose(["+recipe=pretrained_gn", "norm=bn"], tmp_path)
    assert cfg.norm.calibrate is True and build_norm_callback(cfg.norm) is None
    gn = build_norm_callback(_compose(["+recipe=pretrained_gn"], tmp_path).norm)
    assert gn.calibrate.keywords == {"steps": 200} and gn.calibrate_batches == 64


def test_vit_norms_replaces_the_layernorms_of_a_tiny_vit(tmp_path: Path) -> None:
    norms = {run["norm"] for run in recipe_sweep("vit_norms")}
    assert norms == {"bn", "rms", "dyt", "derf", "frozen"}
    cfg = _compose(["+recipe=vit_norms", "norm=dyt"], tmp_path)
    model = instantiate(cfg.model)(num_classes=10, in_channels=1)
    assert type(model.net).__name__ == "VisionTransformer" and model.adapter.size == 28
    callback = build_norm_callback(cfg.norm)
    assert callback.replace == ("ln",) and callback.spec.name == "dyt"
    report = normswap.swap(model, callback.spec, replace=callback.replace)
    assert report.counts() == {"LayerNorm -> DyT": 9}  # two per block, one at the end
