"""NormMonitor and normswap.monitor: real Trainer runs on the CPU with tiny models and data."""

from __future__ import annotations

import copy
import csv
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from helpers import run_ddp
from monitor_lit import AllNorms, LitModel, condition_of, dataset, loader, trainer_kwargs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import normswap
from normswap.callbacks import NormMonitor
from normswap.errors import NormSwapError, SpecError
from normswap.monitor import collector
from normswap.monitor.families import (
    MONITOR_FAMILIES,
    family_of,
    list_families,
    register_monitor_family,
)
from normswap.monitor.history import NormHistory
from normswap.monitor.stats import HISTORY_COLUMNS, STATS

HERE = Path(__file__).resolve().parent

COMMON = {"in_mean", "in_std", "out_mean", "out_std", "grad_norm"}
AFFINE = {"gamma_mean", "gamma_std", "beta_mean", "beta_std"}
FAMILY_STATS = {
    "bn": COMMON | AFFINE | {"bn_mean_gap", "bn_var_gap"},
    "gn": COMMON | AFFINE,
    "ln": COMMON | AFFINE,
    "ln2d": COMMON | AFFINE,
    "in": COMMON | AFFINE,
    "adalin": COMMON | AFFINE | {"rho"},
    "adaln": COMMON | AFFINE | {"mod_shift", "mod_scale", "mod_gate"},
    "wn": COMMON | {"g_mean", "v_norm"},
    "dyt": COMMON | AFFINE | {"alpha", "saturated"},
    "derf": COMMON | AFFINE | {"alpha", "saturated"},
    "rms": COMMON | {"gamma_mean", "gamma_std"},
}
ALL_NORMS_LAYERS = {  # AllNorms in forward order: path -> family
    "model.bn": "bn",
    "model.bn2": "bn",
    "model.gn": "gn",
    "model.ln": "ln",
    "model.ln2d": "ln2d",
    "model.inorm": "in",
    "model.adalin": "adalin",
    "model.adaln": "adaln",
    "model.wconv": "wn",
}


def expected_keys(layers: dict[str, str], per_layer: bool) -> set[str]:
    """The documented key set for layers ``{path: family}`` that all ran and all have every
    statistic of their family."""
    keys = {f"NormMonitor/{f}/{s}" for f in set(layers.values()) for s in FAMILY_STATS[f]}
    if per_layer:
        for path, family in layers.items():
            keys |= {f"NormMonitor/{family}/{path}/{s}" for s in FAMILY_STATS[family]}
            keys.add(f"NormMonitor/{family}/{path}/calls")
    return keys


class MemoryLogger(pl.loggers.Logger):
    """A Lightning logger keeping ``(step, metrics)`` in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def fit(
    tmp_path: Path, module: pl.LightningModule, callbacks: list[pl.Callback], **kwargs: Any
) -> tuple[pl.Trainer, MemoryLogger]:
    logger = kwargs.pop("logger", None) or MemoryLogger()
    data = kwargs.pop("data", None) or loader()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, logger=logger, callbacks=callbacks, **trainer_kwargs(), **kwargs
    )
    trainer.fit(module, data)
    return trainer, logger


# ---------------------------------------------------------------------------------------------
# The family registry (no Trainer).
# ---------------------------------------------------------------------------------------------


def test_families_by_class_hierarchy() -> None:
    """Families come from the MRO: subclasses are found, the most specific class wins."""
    tv_ln2d = torchvision.models.convnext.LayerNorm2d(8)
    cases = {
        "bn": [nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.SyncBatchNorm(4), FrozenBatchNorm2d(4)],
        "gn": [nn.GroupNorm(2, 4), normswap.GroupNorm(4, num_groups=2)],
        "ln": [nn.LayerNorm(4), normswap.LayerNorm(4)],
        "ln2d": [normswap.LayerNorm2d(4), tv_ln2d],
        "in": [nn.InstanceNorm2d(4), nn.InstanceNorm1d(4), normswap.InstanceNorm(4)],
        "adalin": [normswap.AdaLIN(4)],
        "adaln": [normswap.AdaLN(4, cond_dim=2)],
        "wn": [normswap.weight_norm(nn.Conv2d(3, 4, 3)), normswap.weight_norm(nn.Linear(3, 4))],
        None: [nn.Conv2d(3, 4, 3), normswap.standardize_weight(nn.Conv2d(3, 4, 3)), nn.ReLU()],
    }
    for family, modules in cases.items():
        for module in modules:
            assert family_of(module) == family, type(module).__name__

    class MyBN(nn.BatchNorm2d):
        pass

    class MyGN(normswap.GroupNorm):
        pass

    class OwnBN(nn.BatchNorm2d):
        pass

    assert family_of(MyBN(4)) == "bn"
    assert family_of(MyGN(4, num_groups=2)) == "gn"
    register_monitor_family(OwnBN, "ownbn")
    try:
        assert family_of(OwnBN(4)) == "ownbn"
        assert "ownbn" in list_families()
        with pytest.raises(SpecError, match=r"OwnBN is already registered \(by 'ownbn'\)"):
            register_monitor_family(OwnBN, "other")
        with pytest.raises(SpecError, match=r"family name must be letters.*got 'a/b'"):
            register_monitor_family(MyGN, "a/b")
        with pytest.raises(SpecError, match=r"cls must be an nn.Module subclass, got 3"):
            register_monitor_family(3, "three")  # type: ignore[arg-type]  # wrong type on purpose
    finally:
        MONITOR_FAMILIES.unregister(OwnBN)


def test_history_state_roundtrip_and_reindex() -> None:
    history = NormHistory(paths=["a", "b"], families=["gn", "bn"], order=[1, 0])
    width = len(HISTORY_COLUMNS)
    history.append(0, torch.arange(2.0 * width).view(2, width))
    restored = NormHistory.from_state_dict(history.state_dict())
    assert restored.steps == [0] and restored.order == [1, 0]
    torch.testing.assert_close(restored.stacked(), history.stacked())
    moved = restored.reindexed(["c", "b"], ["ln", "bn"])
    assert moved.order == [1]
    calls = moved.stacked("calls")
    assert math.isnan(calls[0, 0]) and calls[0, 1] == 2 * width - 1


# ---------------------------------------------------------------------------------------------
# Arguments.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "NormMonitor: every_n_steps must be a positive int, got 0"),
        ({"every_n_steps": 2.5}, "NormMonitor: every_n_steps must be a positive int, got 2.5"),
        ({"every_n_steps": True}, "NormMonitor: every_n_steps must be a positive int, got True"),
        ({"per_layer": "yes"}, "NormMonitor: per_layer must be a bool, got 'yes'"),
        (
            {"families": "bn"},
            "NormMonitor: families must be a list of names such as ['bn', 'gn'], got 'bn'",
        ),
        (
            {"families": ["bn", "batchnorm"]},
            "NormMonitor: unknown family 'batchnorm' in families; valid: adalin, adaln, bn",
        ),
        (
            {"families": []},
            "NormMonitor: families is empty, so nothing would be monitored; "
            "pass None to monitor every family",
        ),
        (
            {"plot_stats": ["std"]},
            "NormMonitor: unknown statistic 'std' in plot_stats; valid: in_mean, in_std",
        ),
        (
            {"plot_stats": "out_std"},
            "NormMonitor: plot_stats must be a list of names such as ['out_std', 'grad_norm'], "
            "got 'out_std'",
        ),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(NormSwapError, match="^" + re.escape(message)):
        NormMonitor(**kwargs)


def test_no_logger_fails_in_setup(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        default_root_dir=tmp_path, logger=False, callbacks=[NormMonitor()], **trainer_kwargs()
    )
    message = (
        "NormMonitor needs a logger to write its metrics to, but the Trainer has none "
        "(logger=False); pass one, e.g. Trainer(logger=pytorch_lightning.loggers.CSVLogger("
        "'logs'))"
    )
    with pytest.raises(NormSwapError, match="^" + re.escape(message) + "$"):
        trainer.fit(LitModel(), loader())


# ---------------------------------------------------------------------------------------------
# What is logged, and that it is right.
# ---------------------------------------------------------------------------------------------


def _direct_statistics(model: AllNorms, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """One training forward/backward of ``model`` with hand-written hooks; the reference."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            seen[name + ".in"] = args[0].detach().clone()
            seen[name + ".out"] = output.detach().clone()  # before the in-place ReLU

        return hook

    for name in ("bn", "bn2", "adaln", "wconv"):
        getattr(model, name).register_forward_hook(keep(name))
    model.adaln.modulation.register_forward_hook(keep("mod"))
    with normswap.condition(model, condition_of(x)):
        F.cross_entropy(model(x), y).backward()
    return seen


def test_every_family_keys_and_values_match_direct_computation(tmp_path: Path) -> None:
    """Exact key set for a model with every family; values equal a direct computation."""
    lit = LitModel()
    reference = copy.deepcopy(lit.model)
    monitor = NormMonitor(every_n_steps=5, per_layer=True)
    _, logger = fit(tmp_path, lit, [monitor], max_steps=1)

    assert [step for step, _ in logger.rows] == [0]
    # This logger has no directory: the picture is not written anywhere (not in the cwd).
    assert not list(tmp_path.rglob("*.png")) and not (Path.cwd() / "norm_monitor.png").exists()
    logged = logger.rows[0][1]
    assert set(logged) == expected_keys(ALL_NORMS_LAYERS, per_layer=True)
    assert all(math.isfinite(v) for v in logged.values())

    x, y = dataset()[:8]
    seen = _direct_statistics(reference, x, y)

    def close(key: str, value: torch.Tensor | float) -> None:
        assert logged[key] == pytest.approx(
            float(torch.as_tensor(value).detach()), rel=1e-4, abs=1e-5
        ), key

    per_bn: dict[str, dict[str, float]] = {}
    for name in ("bn", "bn2"):
        xin, out = seen[name + ".in"], seen[name + ".out"]
        var_c, mean_c = torch.var_mean(xin, dim=(0, 2, 3), correction=0)
        eps = getattr(reference, name).eps  # running stats before the first update: 0 and 1
        per_bn[name] = {
            "in_mean": xin.mean().item(),
            "in_std": xin.std(correction=0).item(),
            "out_std": out.std(correction=0).item(),
            "bn_mean_gap": (mean_c.abs() / math.sqrt(1 + eps)).mean().item(),
            "bn_var_gap": ((var_c + eps) / (1 + eps)).log().abs().mean().item(),
        }
        for stat, value in per_bn[name].items():
            close(f"NormMonitor/bn/model.{name}/{stat}", value)
        params = [p.grad for p in getattr(reference, name).parameters()]
        close(f"NormMonitor/bn/model.{name}/grad_norm", torch.linalg.vector_norm(torch.cat(params)))
    for stat in per_bn["bn"]:  # the family value is the mean over its layers
        close(f"NormMonitor/bn/{stat}", (per_bn["bn"][stat] + per_bn["bn2"][stat]) / 2)

    shift, scale, gate = seen["mod.out"].chunk(3, dim=1)
    close("NormMonitor/adaln/mod_shift", shift.abs().mean())
    close("NormMonitor/adaln/mod_scale", scale.abs().mean())
    close("NormMonitor/adaln/mod_gate", gate.abs().mean())
    close("NormMonitor/adaln/out_mean", seen["adaln.out"].mean())
    grads = [p.grad.flatten() for p in reference.adaln.parameters()]  # modulation MLP included
    close("NormMonitor/adaln/grad_norm", torch.linalg.vector_norm(torch.cat(grads)))

    g = reference.wconv.parametrizations.weight.original0
    v = reference.wconv.parametrizations.weight.original1
    close("NormMonitor/wn/g_mean", g.mean())
    close("NormMonitor/wn/v_norm", torch.linalg.vector_norm(v, dim=(1, 2, 3)).mean())
    close("NormMonitor/wn/in_std", seen["wconv.in"].std(correction=0))
    close("NormMonitor/wn/out_std", seen["wconv.out"].std(correction=0))
    wn_grads = [p.grad.flatten() for p in reference.wconv.parameters()]
    close("NormMonitor/wn/grad_norm", torch.linalg.vector_norm(torch.cat(wn_grads)))
    close("NormMonitor/adalin/rho", 0.7)
    close("NormMonitor/gn/gamma_mean", 1.0)
    assert logged["NormMonitor/gn/model.gn/calls"] == 1.0


def _hook_count(module: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


class HookProbe(pl.Callback):
    """Placed after NormMonitor: sees the hooks it registered for the batch, and after."""

    def __init__(self) -> None:
        self.at_start: list[tuple[int, int]] = []
        self.at_end: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.at_start.append((trainer.global_step, _hook_count(pl_module)))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        self.at_end.append(_hook_count(pl_module))


def test_nothing_runs_on_other_steps_resnet18(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision resnet18 (in-place ReLUs; layer4 swapped to GN): hooks exist only during
    logging steps, and the statistics functions run only there."""
    net = torchvision.models.resnet18(num_classes=10)
    normswap.swap(net, "gn", include="layer4.*")
    calls = {"moments": 0, "batchnorm_input_stats": 0}
    for name in calls:
        original = getattr(collector, name)

        def counting(*args: Any, _name: str = name, _f: Any = original) -> torch.Tensor:
            calls[_name] += 1
            return _f(*args)

        monkeypatch.setattr(collector, name, counting)
    lit = LitModel(net)
    assert _hook_count(lit) == 0
    probe = HookProbe()
    monitor = NormMonitor(every_n_steps=3)
    data = loader(n=28, batch_size=4, size=16)
    _, logger = fit(tmp_path, lit, [monitor, probe], max_steps=7, data=data)

    layers = monitor.layers
    num_bn = sum(layer.family == "bn" for layer in layers)
    assert {layer.family for layer in layers} == {"bn", "gn"} and num_bn == 15
    assert probe.at_start == [(s, 2 * len(layers) if s % 3 == 0 else 0) for s in range(7)]
    assert probe.at_end == [0] * 7
    assert _hook_count(lit) == 0
    # Per logging step: BN inputs use batchnorm_input_stats, other inputs and every output
    # use moments.
    assert calls == {"moments": 3 * (2 * len(layers) - num_bn), "batchnorm_input_stats": 3 * num_bn}
    assert [step for step, _ in logger.rows] == monitor.history.steps == [0, 3, 6]
    assert set(logger.rows[0][1]) == {
        f"NormMonitor/{f}/{s}" for f in ("bn", "gn") for s in FAMILY_STATS[f]
    }


def test_gradient_accumulation_and_family_filter(tmp_path: Path) -> None:
    """The accumulated batches of a step are averaged (2 calls per layer); ``families``
    restricts the layers."""
    monitor = NormMonitor(every_n_steps=1, per_layer=True, families=["bn", "wn"])
    _, logger = fit(tmp_path, LitModel(), [monitor], max_steps=2, accumulate_grad_batches=2)
    assert [step for step, _ in logger.rows] == [0, 1]
    layers = {p: f for p, f in ALL_NORMS_LAYERS.items() if f in ("bn", "wn")}
    assert set(logger.rows[1][1]) == expected_keys(layers, per_layer=True)
    assert all(v == 2.0 for k, v in logger.rows[1][1].items() if k.endswith("/calls"))


def test_no_norm_layers_warns_and_logs_nothing(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.warns(UserWarning, match=r"NormMonitor found no norm layers in LitModel"):
        _, logger = fit(tmp_path, LitModel(net), [NormMonitor(every_n_steps=1)], max_steps=2)
    assert not [row for row in logger.rows if any("NormMonitor" in k for k in row[1])]


# ---------------------------------------------------------------------------------------------
# Loggers, the picture and resuming.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["tensorboard", "csv"])
def test_tensorboard_and_csv_loggers_and_picture(tmp_path: Path, first: str) -> None:
    """Both loggers get the documented keys; the PNG lands in trainer.log_dir (the first
    logger's), and TensorBoard also gets it as an image."""
    tb = pl.loggers.TensorBoardLogger(tmp_path / "tb")
    csv_logger = pl.loggers.CSVLogger(tmp_path / "csv")
    loggers = [tb, csv_logger] if first == "tensorboard" else [csv_logger, tb]
    trainer, _ = fit(
        tmp_path, LitModel(), [NormMonitor(every_n_steps=2)], max_steps=4, logger=loggers
    )

    pictures = sorted(tmp_path.rglob("*.png"))
    assert pictures == [Path(trainer.log_dir) / "norm_monitor.png"]
    assert pictures[0].stat().st_size > 10_000

    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == expected_keys(ALL_NORMS_LAYERS, per_layer=False) | {"step"}
    assert [row["step"] for row in rows] == ["0", "2"]  # one row per logging step

    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert events.Tags()["images"] == ["NormMonitor/history"]
    assert set(events.Tags()["scalars"]) == expected_keys(ALL_NORMS_LAYERS, per_layer=False)
    assert [e.step for e in events.Scalars("NormMonitor/bn/out_std")] == [0, 2]


def test_missing_matplotlib_skips_the_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.colors", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` raises ImportError
    csv_logger = pl.loggers.CSVLogger(tmp_path)
    with pytest.warns(UserWarning, match=r"matplotlib is not installed, so the picture"):
        fit(tmp_path, LitModel(), [NormMonitor(every_n_steps=1)], max_steps=1, logger=csv_logger)
    assert not list(tmp_path.rglob("*.png"))
    assert (Path(csv_logger.log_dir) / "metrics.csv").is_file()


def test_resume_keeps_the_history(tmp_path: Path) -> None:
    first = NormMonitor(every_n_steps=2)
    trainer, _ = fit(tmp_path, LitModel(), [first], max_steps=4)
    assert first.history.steps == [0, 2]
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)

    second = NormMonitor(every_n_steps=2)
    logger = MemoryLogger()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        logger=logger,
        callbacks=[second],
        max_steps=8,
        **trainer_kwargs(),
    )
    trainer.fit(LitModel(), loader(), ckpt_path=checkpoint)
    assert second.history.steps == [0, 2, 4, 6]
    assert [step for step, _ in logger.rows] == [4, 6]
    torch.testing.assert_close(second.history.values[0], first.history.values[0], equal_nan=True)
    assert second.history.order == list(range(len(ALL_NORMS_LAYERS)))


# ---------------------------------------------------------------------------------------------
# DDP: 2 CPU processes with gloo, in a subprocess so a hang cannot outlive the timeout.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp_monitor")
    ranks = run_ddp(HERE / "monitor_ddp_script.py", out, timeout=240, cwd=HERE)
    return out, ranks


@pytest.mark.ddp
def test_ddp_ranks_agree_and_rank_zero_logs_once(
    ddp_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, ranks = ddp_run
    assert ranks[0]["logged"] == ranks[1]["logged"]
    assert [step for step, _ in ranks[0]["logged"]] == [0, 2]
    for key in ("values", "steps"):
        torch.testing.assert_close(
            ranks[0]["history"][key], ranks[1]["history"][key], equal_nan=True
        )
    log_dir = Path(ranks[0]["log_dir"])
    with open(log_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["step"] for row in rows] == ["0", "2"]
    assert set(rows[0]) == expected_keys(ALL_NORMS_LAYERS, per_layer=True) | {"step"}
    for key, value in ranks[0]["logged"][0][1].items():
        assert float(rows[0][key]) == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert sorted(out.rglob("*.png")) == [log_dir / "norm_monitor.png"]


@pytest.mark.ddp
def test_ddp_layer_skipped_on_one_rank(ddp_run: tuple[Path, list[dict[str, Any]]]) -> None:
    """Rank 1 never runs model.bn2: no hang, its count is 1, and every mean is the
    count-weighted mean of the two ranks' local sums."""
    _, ranks = ddp_run
    step0 = ranks[0]["logged"][0][1]
    assert step0["NormMonitor/bn/model.bn2/calls"] == 1.0
    assert step0["NormMonitor/bn/model.bn/calls"] == 2.0
    paths = ranks[0]["paths"]
    size = len(paths) * len(STATS)
    local0, local1 = (ranks[r]["local"][0] for r in (0, 1))
    assert local1[2 * size + paths.index("model.bn2")] == 0  # rank 1: no call
    assert local1[size : 2 * size].view(len(paths), -1)[paths.index("model.bn2"), 0] == 0
    total = local0 + local1
    table = collector.unpack(total, len(paths))
    for path, family in ALL_NORMS_LAYERS.items():
        row = paths.index(path)
        for stat in ("in_std", "out_mean", "grad_norm"):
            value = table.values[row, STATS.index(stat)].item()
            assert step0[f"NormMonitor/{family}/{path}/{stat}"] == pytest.approx(value, rel=1e-6)
    bn2_in_std = local0[:size].view(len(paths), -1)[paths.index("model.bn2"), 1].item()
    assert step0["NormMonitor/bn/model.bn2/in_std"] == pytest.approx(bn2_in_std, rel=1e-6)
