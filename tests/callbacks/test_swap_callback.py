"""NormSwap in real Trainer runs: what trains, resume, restore, DDP, bad arguments."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from families_matrix import FAMILIES, options
from helpers import run_ddp
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from swap_lit import LitClassifier, loader, trainer
from torch import nn

import normswap
from normswap import NormSwapError, SpecError
from normswap.callbacks import NormSwap

HERE = Path(__file__).parent
TARGETS = FAMILIES
KW = {name: options(name) for name in FAMILIES}


class Inspect(Callback):
    """Records what the optimizer holds and the parameters' values at the start of training."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.module_params = {id(p) for p in pl_module.parameters()}
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.bn_left = [n for n, m in pl_module.named_modules() if normswap.is_source_norm(m)]


@pytest.mark.parametrize("target", TARGETS)
def test_fit_trains_the_swapped_model(target: str, tmp_path: Path) -> None:
    module = LitClassifier()
    swap_cb, inspect = NormSwap(target, **KW.get(target, {})), Inspect()
    trainer(tmp_path, callbacks=[swap_cb, inspect]).fit(module, loader())
    # The swapped model is what the optimizer holds and what trained.
    assert inspect.bn_left == []
    assert inspect.optimized == inspect.module_params
    end = module.state_dict()
    converted = [r.path for r in swap_cb.report if r.action == "replace" and not r.frozen]
    for path in converted:
        key = f"{path}.weight"
        assert not torch.equal(end[key], inspect.start[key]), f"{key} did not train"
    if target == "wn":
        key = "model.conv1.parametrizations.weight.original0"
        assert not torch.equal(end[key], inspect.start[key])
    # The report is logged: counts as hyperparameters, the whole report as JSON.
    log_dir = Path(swap_cb_log_dir(tmp_path))
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["normswap/spec"] == target
    for key, count in swap_cb.report.counts().items():
        assert hparams[f"normswap/{key}"] == count
    saved = json.loads((log_dir / "normswap_report.json").read_text())
    assert saved == json.loads(json.dumps(swap_cb.report.to_dict()))


def swap_cb_log_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "version_0"


def test_fit_validate_test_swaps_once(tmp_path: Path) -> None:
    module = LitClassifier()
    swap_cb = NormSwap("gn", num_groups=16)
    t = trainer(tmp_path, callbacks=[swap_cb])
    t.fit(module, loader(), loader())
    first = swap_cb.report
    gn = module.model.bn1
    t.validate(module, loader())
    t.test(module, loader())
    assert swap_cb.report is first and module.model.bn1 is gn
    # A second callback with another spec refuses an already converted module.
    with pytest.raises(NormSwapError, match="already converted"):
        trainer(tmp_path, callbacks=[NormSwap("ln")]).validate(module, loader())


def test_resume_and_restore(tmp_path: Path) -> None:
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = LitClassifier()
    trainer(tmp_path, callbacks=[NormSwap("gn"), ckpt_cb], enable_checkpointing=True).fit(
        module, loader()
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    state_key = NormSwap("gn").state_key
    assert saved["callbacks"][state_key]["spec"]["name"] == "gn"

    # Resume: a fresh module is converted once, restored to the saved weights, trains on.
    resumed = LitClassifier()
    inspect, swap_cb = Inspect(), NormSwap("gn")
    t = trainer(tmp_path, callbacks=[swap_cb, inspect], max_steps=4)
    t.fit(resumed, loader(), ckpt_path=last)
    for key, value in saved["state_dict"].items():
        assert torch.equal(inspect.start[key], value), key
    assert swap_cb.state_dict() == saved["callbacks"][state_key]
    assert t.global_step == 4
    assert len(swap_cb.report.converted) == 20

    # restore() outside a Trainer rebuilds the same model.
    fresh = LitClassifier()
    report = normswap.restore(fresh, last)
    assert len(report) == 20
    module.eval()
    fresh.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)

    # Resuming with a differently configured callback is refused with the fix.
    with pytest.raises(NormSwapError, match="configure the callback as it was"):
        trainer(tmp_path, callbacks=[NormSwap("gn", num_groups=8)], max_steps=5).fit(
            LitClassifier(), loader(), ckpt_path=last
        )


def test_wn_fold_in_a_training_module_keeps_outputs(tmp_path: Path) -> None:
    module = LitClassifier()
    module.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = module(x)
    module.train()
    swap_cb = NormSwap("wn", bn="fold")
    trainer(tmp_path, callbacks=[swap_cb], max_steps=0).fit(module, loader())
    assert module.training  # the fold's eval mode was only for the swap
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)


def test_calibrate_hook(tmp_path: Path) -> None:
    calls = []

    def calibrate(model: nn.Module, reference: nn.Module, batches: list, *, batch_to_input) -> None:
        assert any(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
        assert not any(normswap.is_source_norm(m) for m in model.modules())
        calls.append([batch_to_input(b).shape for b in batches])
        with torch.no_grad():
            model.model.bn1.bias.fill_(0.25)

    t = trainer(tmp_path, callbacks=[NormSwap("gn", calibrate=calibrate, calibrate_batches=3)])
    module = LitClassifier(lr=0.0)
    t.fit(module, loader())
    assert calls == [[torch.Size([4, 3, 64, 64])] * 3]
    assert torch.all(module.model.bn1.bias == 0.25)


def test_calibrate_true_runs_normswap_calibrate_on_training_batches(tmp_path: Path) -> None:
    # A "pretrained" module: BN running statistics far from (0, 1).
    module = LitClassifier(arch="tiny", lr=0.0)
    bn = module.model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    copied = bn.weight.detach().clone()
    reference = copy.deepcopy(module)
    expected = copy.deepcopy(module)
    normswap.swap(expected, "gn", num_groups=4)
    batches = [x for x, _ in loader()][:2]
    normswap.calibrate(expected, reference, batches)  # the same fit, by hand

    t = trainer(
        tmp_path,
        callbacks=[NormSwap("gn", num_groups=4, calibrate=True, calibrate_batches=2)],
        max_steps=1,
    )
    t.fit(module, loader())
    fitted = module.model[1]
    assert isinstance(fitted, normswap.GroupNorm)
    torch.testing.assert_close(fitted.weight, expected.model[1].weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fitted.bias, expected.model[1].bias, rtol=1e-6, atol=1e-6)
    assert fitted.weight is bn.weight  # the same Parameter, updated in place
    assert not torch.allclose(fitted.weight, copied)  # re-fitted, not copied


def test_torch_compile_module(tmp_path: Path) -> None:
    module = LitClassifier(arch="tiny", compile=True)
    inspect = Inspect()
    trainer(tmp_path, callbacks=[NormSwap("gn", num_groups=4), inspect], max_steps=1).fit(
        module, loader(8)
    )
    assert inspect.bn_left == []
    assert inspect.optimized == inspect.module_params
    assert isinstance(module.model._orig_mod[1], normswap.GroupNorm)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"spec": "batchnorm"}, SpecError, "unknown norm 'batchnorm'; choose one of: adalin"),
        ({"spec": "gn", "num_groups": 0}, SpecError, "num_groups must be a positive integer"),
        ({"spec": "gn", "groups": 4}, SpecError, "valid fields"),
        ({"spec": "gn", "include": ""}, NormSwapError, "glob string"),
        (
            {"spec": "gn", "calibrate": 3},
            NormSwapError,
            "calibrate(model, reference, batches, *, batch_to_input)",
        ),
        ({"spec": "gn", "calibrate_batches": 0}, NormSwapError, "must be a positive int, got 0"),
        ({"spec": "gn", "strict": "yes"}, NormSwapError, "True or False"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error) as err:
        NormSwap(**kwargs)
    assert message in str(err.value)


def test_bad_plan_fails_in_setup_before_training(tmp_path: Path) -> None:
    module = LitClassifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(normswap.SwapError, match="matches no module"):
        trainer(tmp_path, callbacks=[NormSwap("gn", include="layer4.*")]).fit(module, loader())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_bn_left_alone_becomes_syncbn_as_usual(tmp_path: Path) -> None:
    """With sync_batchnorm=True Lightning converts BN after setup(), where NormSwap ran: what the
    spec leaves alone becomes SyncBatchNorm, converted layers stay. (DDP with SyncBatchNorm
    needs GPUs in PyTorch, so the conversion step Lightning applies is checked directly.)"""
    module = LitClassifier()
    t = trainer(tmp_path, callbacks=[NormSwap("gn", exclude="model.layer4.1.bn2")], max_steps=0)
    t.fit(module, loader())
    pl.plugins.TorchSyncBatchNorm().apply(module)
    assert isinstance(module.model.layer4[1].bn2, nn.SyncBatchNorm)
    assert isinstance(module.model.bn1, normswap.GroupNorm)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in module.modules()) == 1


@pytest.mark.ddp
def test_ddp_two_processes(tmp_path: Path) -> None:
    """2 CPU processes (gloo): identical converted models; calibrated parameters broadcast
    from rank zero."""
    ranks = run_ddp(HERE / "swap_ddp_script.py", tmp_path, timeout=300, cwd=HERE)
    assert ranks[0]["kinds"] == ranks[1]["kinds"]
    assert ranks[0]["kinds"]["model.layer4.1.bn2"] == "BatchNorm2d"  # excluded
    assert "GroupNorm" in ranks[0]["kinds"].values()
    # Everything is identical across ranks but the excluded BN's running statistics, which
    # plain (non-sync) BatchNorm keeps per rank by design.
    local = ("model.layer4.1.bn2.running_mean", "model.layer4.1.bn2.running_var")
    assert [k for k in ranks[0]["state"] if k.endswith("running_mean")] == [local[0]]
    for key, value in ranks[0]["state"].items():
        if key not in local:
            assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[0]["calibrated_bias"] == ranks[1]["calibrated_bias"] == 0.0
