"""A converted model goes where the original went: TorchScript (script and trace), ONNX through
both exporters run in onnxruntime, torch.export, and torch.save of the module — for every
registered family, on a small CNN and on a torchvision model. Weight norm and weight
standardization are torch parametrizations, which torch itself neither scripts nor pickles:
those families get there through normswap.finalize (tested here too)."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from families_matrix import FAMILIES, cond_dim, options
from helpers import pretrained_cnn
from torch import nn

import normswap

#: Families whose converted model holds torch parametrizations until finalized.
PARAMETRIZED = {"wn", "ws_gn"}
ATOL = 1e-4


def _cnn() -> nn.Module:
    return pretrained_cnn()


def _model(kind: str, name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The converted model in eval mode and its inputs (AdaLN: wrapped to take ``c``)."""
    torch.manual_seed(0)
    if kind == "cnn":
        model, x = _cnn(), torch.randn(2, 3, 16, 16)
    else:
        model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 64, 64)
    normswap.swap(model, name, example_inputs=x[:1], **options(name))
    model.eval()
    dim = cond_dim(name)
    if dim is None:
        return model, (x,)
    return normswap.Conditioned(model), (x, torch.randn(2, dim))


def _ready(model: nn.Module, name: str) -> nn.Module:
    if name in PARAMETRIZED:
        assert normswap.finalize(model).plain
    return model


@pytest.mark.parametrize("kind", ["cnn", "resnet18"])
@pytest.mark.parametrize("name", FAMILIES)
def test_trace_export_and_onnx_torchscript_exporter(kind: str, name: str) -> None:
    import onnxruntime as ort

    model, args = _model(kind, name)
    with torch.no_grad():
        expected = model(*args)
        traced = torch.jit.trace(model, args)
        torch.testing.assert_close(traced(*args), expected, atol=ATOL, rtol=ATOL)
        program = torch.export.export(model, args)
        torch.testing.assert_close(program.module()(*args), expected, atol=ATOL, rtol=ATOL)
    # The exported graph holds the plain norm ops, not the eager kernel dispatch.
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    norm_ops = {"group_norm", "layer_norm", "batch_norm", "native_group_norm", "instance_norm"}
    norm_ops |= {"rms_norm", "tanh", "erf"}  # RMSNorm; DyT and Derf have no statistics
    if name not in ("wn",):
        assert any(any(op in o for op in norm_ops) for o in ops) or name == "frozen", ops
    buf = io.BytesIO()
    if name == "rms":
        # As for torch.nn.RMSNorm: the TorchScript exporter has no ONNX op for aten::rms_norm
        # (the README's export table says so); the dynamo exporter is tested below.
        with pytest.raises(torch.onnx.errors.UnsupportedOperatorError, match="rms_norm"):
            torch.onnx.export(model, args, buf, dynamo=False)
        return
    torch.onnx.export(model, args, buf, dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    (out,) = session.run(None, feeds)
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kind", ["cnn", "resnet18"])
@pytest.mark.parametrize("name", FAMILIES)
def test_script_and_save(kind: str, name: str, tmp_path) -> None:
    model, args = _model(kind, name)
    model = _ready(model, name)
    with torch.no_grad():
        expected = model(*args)
    if cond_dim(name) is None:
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(*args), expected, atol=ATOL, rtol=ATOL)
        path = tmp_path / "scripted.pt"
        torch.jit.save(scripted, path)
        torch.testing.assert_close(torch.jit.load(path)(*args), expected, atol=ATOL, rtol=ATOL)
    else:  # the condition is a Python-side context: trace the wrapper instead (above)
        with pytest.raises(RuntimeError):
            torch.jit.script(model)
    path = tmp_path / "module.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_dynamo_exporter(name: str, tmp_path) -> None:
    import onnxruntime as ort

    model, args = _model("cnn", name)
    with torch.no_grad():
        expected = model(*args)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, args, str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    (out,) = session.run(None, feeds)
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name", sorted(PARAMETRIZED))
def test_parametrized_families_need_finalize_for_script_and_pickle(name: str) -> None:
    """What torch refuses for parametrized modules, and that finalize is the way through."""
    model, _ = _model("cnn", name)
    with pytest.raises(RuntimeError, match="state_dict"):
        torch.save(model, io.BytesIO())
    normswap.finalize(model)
    torch.save(model, io.BytesIO())
    torch.jit.script(model)


def test_adaln_without_its_condition_says_how_to_export() -> None:
    model, (x, c) = _model("cnn", "adaln")
    bare = model.model
    with pytest.raises(normswap.ConditionError, match=r"normswap\.condition"):
        torch.export.export(bare, (x,))
    with pytest.raises(normswap.ConditionError, match="no AdaLN"):
        normswap.Conditioned(pretrained_cnn())
    # The wrapper's result is the context manager's.
    with torch.no_grad(), normswap.condition(bare, c):
        expected = bare(x)
    torch.testing.assert_close(model(x, c), expected)


@pytest.mark.parametrize("name", ["gn", "ln", "in", "ln2d", "adalin", "frozen"])
def test_timm_norm_act_layers_script(name: str) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10).eval()
    normswap.swap(model, name)
    assert type(model.bn1).__name__.endswith("Act")  # the norm + activation layout
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x), atol=ATOL, rtol=ATOL)


def test_unscriptable_after_modules_name_the_fix() -> None:
    layer = normswap.norms.with_after(
        normswap.GroupNorm(4, 2), [("act", nn.ReLU()), ("extra", nn.Tanh())]
    )
    with pytest.raises(normswap.NormSwapError, match="trace it, or export it"):
        torch.jit.script(layer)
    torch.jit.trace(layer, torch.randn(2, 4, 3))  # tracing follows the Python loop
