"""normswap.finalize: converted models in plain torch modules, outputs unchanged, and the plain
forms script, trace, export (torch.export, both ONNX exporters), pickle and load without
normswap."""

from __future__ import annotations

import copy
import functools
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from families_matrix import FAMILIES, cond_dim, options
from helpers import pretrained_cnn, snapshot
from torch import nn

import normswap
from normswap import NormSwapError
from normswap.finalize import FINALIZERS, FinalizeReport, finalize

#: Families whose every layer has a plain torch form.
PLAIN = {"gn", "ln", "in", "frozen", "wn", "ws_gn"}


def _cnn() -> nn.Module:
    return pretrained_cnn()


def _converted(name: str, model: nn.Module | None = None) -> nn.Module:
    model = _cnn() if model is None else model
    normswap.swap(model, name, example_inputs=torch.randn(1, 3, 16, 16), **options(name))
    return model.eval()


def _call(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    dim = cond_dim(name)
    if dim is None:
        return model(x)
    with normswap.condition(model, torch.ones(x.shape[0], dim)):
        return model(x)


def test_families_are_covered() -> None:
    assert set(FAMILIES) >= PLAIN


@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_unchanged_and_report(name: str) -> None:
    model = _converted(name)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = _call(model, x, name)
        report = finalize(model)
        after = _call(model, x, name)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert report.plain == (name in PLAIN), str(report)
    if name in PLAIN:
        modules = {type(m).__module__.split(".")[0] for m in model.modules()}
        assert modules == {"torch"}, modules  # nothing of normswap left
    else:
        assert report.kept() and all(report.kept().values())  # every kept layer says why


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_models_script_trace_export_and_pickle(name: str, tmp_path: Path) -> None:
    model = _converted(name)
    finalize(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.jit.trace(model, x)(x), expected, atol=1e-5, rtol=1e-5)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected, atol=1e-5, rtol=1e-5)
    # The pickled module loads in a Python where normswap cannot be imported.
    path = tmp_path / "model.pt"
    torch.save(model, path)
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "y.pt")
    script = (
        "import sys; sys.modules['normswap'] = None\n"
        "import torch\n"
        f"m = torch.load({str(path)!r}, weights_only=False)\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        f"y = torch.load({str(tmp_path / 'y.pt')!r}, weights_only=True)\n"
        "torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo"])
@pytest.mark.parametrize("name", ["gn", "frozen", "wn", "ws_gn"])
def test_plain_models_run_in_onnxruntime(name: str, dynamo: bool, tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _converted(name)
    finalize(model)
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=1e-4)


def test_state_dict_loads_into_a_model_built_without_normswap(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    normswap.swap(model, "gn")
    finalize(model)
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    plain = torchvision.models.resnet18(
        num_classes=10, norm_layer=lambda c: nn.GroupNorm(32, c)
    ).eval()
    plain.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))

    frozen = torchvision.models.resnet18(num_classes=10).eval()
    normswap.swap(frozen, "frozen")
    finalize(frozen)
    again = torchvision.models.resnet18(
        num_classes=10, norm_layer=functools.partial(nn.BatchNorm2d, eps=0.0)
    ).eval()
    again.load_state_dict(frozen.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), frozen(x))


def test_nothing_to_finalize_is_a_report_not_an_error() -> None:
    model = _cnn()
    before = snapshot(model)
    report = finalize(model)
    assert isinstance(report, FinalizeReport) and len(report) == 0 and report.plain
    assert "nothing to finalize" in str(report)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_training_mode_frozen_is_refused_untouched() -> None:
    model = _converted("frozen").train()
    before = copy.deepcopy(model)
    with pytest.raises(NormSwapError, match=r"model.eval\(\) first"):
        finalize(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    # Families whose plain form is the same in both modes finalize in training mode.
    gn = _converted("gn").train()
    assert finalize(gn).plain


def test_blends_are_refused() -> None:
    model = _cnn()
    normswap.swap_progressive(model, "gn", num_groups=4)
    with pytest.raises(NormSwapError, match="finish_blend"):
        finalize(model)


def test_adaln_is_kept_with_the_way_to_export_it() -> None:
    model = _converted("adaln")
    report = finalize(model)
    assert not report.plain
    assert all("condition" in why for why in report.kept().values())


def test_script_module_is_refused() -> None:
    model = torch.jit.script(_cnn())
    with pytest.raises(NormSwapError, match="finalize the eager model"):
        finalize(model)


def test_hooks_and_shared_modules_follow() -> None:
    model = _converted("gn")
    calls = []
    model[1].register_forward_hook(lambda *a: calls.append(1))
    shared = nn.Sequential(model, model[1])  # the same norm at two paths
    finalize(shared)
    assert shared[1] is shared[0][1] and type(shared[1]) is nn.GroupNorm
    model(torch.randn(1, 3, 16, 16))
    assert calls == [1]


def test_every_normswap_layer_has_a_rule() -> None:
    layers = {
        normswap.GroupNorm,
        normswap.LayerNorm,
        normswap.LayerNorm2d,
        normswap.InstanceNorm,
        normswap.AdaLIN,
        normswap.AdaLN,
        normswap.FrozenAffine,
    }
    assert all(FINALIZERS.lookup(cls.__new__(cls)) is not None for cls in layers)


def test_report_text(capsys: pytest.CaptureFixture[str]) -> None:
    model = _converted("ln2d")
    text = str(finalize(model))
    assert "LayerNorm2d -> kept" in text and "module(s) kept" in text
    buf = io.StringIO()
    print(finalize(_converted("gn")), file=buf)
    assert "plain torch only" in buf.getvalue()
