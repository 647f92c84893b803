"""The ``normswap`` command line and the demo."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import normswap
import normswap.data
from normswap import cli, demo_pretrained


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == normswap.list_norms()


def test_inspect_plans_without_modifying(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "regnet_x_400mf", "--to", "gn", "--set", "num_groups=16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("regnet_x_400mf: 71 norm layer(s)")
    assert "plan (dry run)" in out and "num_groups=16" in out
    assert "BatchNorm2d -> GroupNorm: 71" in out


def test_inspect_and_convert_a_timm_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["test_efficientnet", "--source", "timm", "--to", "gn", "--set", "num_groups=8"]
    assert cli.main(["inspect", *argv]) == 0
    out = capsys.readouterr().out
    assert "BatchNormAct2d -> GroupNorm: 13" in out and "act (SiLU), the same modules" in out
    assert cli.main(["convert", *argv, "--out", str(tmp_path / "m.pt")]) == 0
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    assert saved["source"] == "timm" and saved["model"] == "test_efficientnet"
    assert cli.main(["inspect", "test_efficientnet", "--to", "gn"]) == 2  # not a torchvision name
    assert "unknown model 'test_efficientnet'" in capsys.readouterr().err


def test_inspect_with_input_shape_checks_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "resnet18", "--to", "in", "--input-shape", "1,3,64,64"]) == 0
    assert "InstanceNorm" in capsys.readouterr().out


def test_convert_from_a_state_dict_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=1000).eval()
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_()
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    out = tmp_path / "converted.pt"
    argv = ["convert", "resnet18", "--to", "wn", "--weights", str(weights), "--out", str(out)]
    assert cli.main(argv) == 0
    saved = torch.load(out, weights_only=True)  # plain data only: safe to load
    assert saved["format"] == cli.CHECKPOINT_FORMAT
    assert saved["normswap"]["report"]["counts"]["BatchNorm2d -> folded"] == 20
    # Replaying the recorded surgery on a fresh model and loading the weights reproduces it.
    rebuilt = torchvision.models.resnet18().eval()
    report = normswap.restore(rebuilt, out)
    assert report.counts() == saved["normswap"]["report"]["counts"]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), source(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "resnet"], "unknown model 'resnet'; choose one of: alexnet"),
        (["inspect", "resnet18", "--to", "gn", "--set", "groups=4"], "valid fields"),
        (["inspect", "resnet18", "--to", "gn", "--set", "num_groups"], "key=value"),
        (["inspect", "resnet18", "--to", "gn", "--include", "layer9.*"], "matches no module"),
        (["convert", "resnet18", "--to", "gn", "--weights", "NOPE", "--out", "x.pt"], "NOPE"),
        (["convert", "resnet18", "--to", "gn", "--out", "/nonexistent/dir/x.pt"], "does not exist"),
        (
            ["convert", "resnet18", "--to", "gn", "--weights", "missing.pth", "--out", "x.pt"],
            "does not exist",
        ),
    ],
)
def test_bad_input_exits_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = [str(tmp_path / a) if a == "x.pt" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("normswap: error:") and message in err
    assert not (tmp_path / "x.pt").exists()


def test_missing_offline_weights_name_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: loading must fail

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    argv = ["convert", "resnet18", "--to", "gn", "--weights", "IMAGENET1K_V1"]
    assert cli.main([*argv, "--out", str(tmp_path / "r.pt")]) == 2
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth" in err and "checkpoints" in err


def test_demo_on_the_real_pretrained_mobilenet(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_pretrained.main() == 0
    out = capsys.readouterr().out
    assert "china.jpg" in out and "flower.jpg" in out
    assert "BatchNorm2d -> GroupNorm: 52" in out
    # Folding BN into the convs keeps the pretrained predictions.
    assert "weight norm, BN folded   top-1 agreement 100%" in out


def _pretrained_like_resnet18(tmp_path: Path, images: torch.Tensor) -> tuple[torch.nn.Module, Path]:
    """resnet18 whose BN running statistics are those of ``images`` (as after training on
    them) and whose γ/β are random."""
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=1000)
    for m in source.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    with torch.no_grad():
        for batch in images.split(4):
            source(batch)
    source.eval()
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    return source, weights


def test_convert_with_calibration_on_a_folder_of_images(tmp_path: Path) -> None:
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    for i in range(12):  # different sizes: each is resized and center-cropped
        image = torch.randint(0, 256, (3, 70 + 3 * i, 90), generator=g, dtype=torch.uint8)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    x = normswap.data.load_images(tmp_path / "images", 64)
    assert x.shape == (12, 3, 64, 64)
    source, weights = _pretrained_like_resnet18(tmp_path, x)
    out = tmp_path / "calibrated.pt"
    argv = ["convert", "resnet18", "--to", "gn", "--weights", str(weights), "--out", str(out)]
    argv += ["--calibrate", str(tmp_path / "images"), "--size", "64", "--distill-steps", "0"]
    argv += ["--reconstruct", "0"]
    assert cli.main(argv) == 0
    saved = torch.load(out, weights_only=True)
    assert len(saved["conversion"]["calibration"]["layers"]) == 20
    assert saved["conversion"]["distillation"] is None

    # The saved model is what the library call makes from the same images.
    rebuilt = torchvision.models.resnet18().eval()
    normswap.restore(rebuilt, out)
    direct = copy.deepcopy(source)
    result = normswap.convert_pretrained(
        direct, "gn", x, distill_steps=0, reconstruct=0, progress=False
    )
    assert len(result.calibration) == 20
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), direct(x))


def test_convert_calibration_data_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    torch.save({"x": torch.zeros(2)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(2, 5), tmp_path / "flat.pt")
    base = ["convert", "resnet18", "--to", "gn", "--out", str(tmp_path / "x.pt"), "--calibrate"]
    for data, message in (
        ("missing", "no such file or folder"),
        ("empty", "no images (.jpg"),
        ("dict.pt", "holds a dict; save one tensor"),
        ("flat.pt", "expected uint8 images or float32 inputs of shape (N, 3, H, W)"),
    ):
        assert cli.main([*base, str(tmp_path / data)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("normswap: error:") and message in err, err
    assert not (tmp_path / "x.pt").exists()
    assert (
        cli.main(
            [
                "convert",
                "resnet18",
                "--to",
                "gn",
                "--out",
                str(tmp_path / "x.pt"),
                "--progressive",
                "0.5",
            ]
        )
        == 2
    )
    assert "--progressive distills" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_convert_progressive_saves_a_plain_converted_model(tmp_path: Path) -> None:
    x = torch.randn(24, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    _, weights = _pretrained_like_resnet18(tmp_path, x)
    out = tmp_path / "progressive.pt"
    argv = ["convert", "resnet18", "--to", "gn", "--weights", str(weights), "--out", str(out)]
    argv += ["--calibrate", str(tmp_path / "x.pt"), "--size", "64", "--distill-steps", "4"]
    assert cli.main([*argv, "--progressive", "0.5"]) == 0
    saved = torch.load(out, weights_only=True)
    checks = saved["conversion"]["distillation"]["checks"]
    assert checks[0]["alpha"] == 0.0 and checks[-1]["alpha"] == 1.0
    assert not any(k.endswith(".alpha") for k in saved["state_dict"])  # no blends left
    rebuilt = torchvision.models.resnet18().eval()
    normswap.restore(rebuilt, out)
    assert type(rebuilt.bn1).__name__ == "GroupNorm"


def test_norm_group_overrides_like_normswap_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same conf/norm options, defaults and typed schemas as the Hydra app.
    assert cli.main(["inspect", "resnet18", "norm=gn", "norm.num_groups=16"]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm2d -> GroupNorm: 20" in out and "num_groups=16" in out
    out_file = tmp_path / "wn.pt"
    argv = ["convert", "resnet18", "norm=wn", "norm.bn=remove", "--out", str(out_file)]
    assert cli.main(argv) == 0
    saved = torch.load(out_file, weights_only=True)
    assert saved["normswap"]["report"]["counts"]["BatchNorm2d -> Identity"] == 20
    capsys.readouterr()
    for argv, message in (
        (["inspect", "resnet18", "norm=gn", "norm.num_group=8"], "Key 'num_group' not in"),
        (["inspect", "resnet18", "norm=gn", "norm.num_groups=many"], "converted to Integer"),
        (["inspect", "resnet18", "norm=bn"], "norm=bn keeps BatchNorm"),
        (["inspect", "resnet18", "model.name=x"], "only norm=... and norm.KEY=VALUE"),
        (["inspect", "resnet18", "--to", "gn", "norm=ln"], "not both"),
        (["convert", "resnet18", "--out", str(tmp_path / "x.pt")], "--to NAME or norm=NAME"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("normswap: error:") and message in err, err


def test_convert_finalize_writes_a_torch_only_program(tmp_path: Path) -> None:
    out = tmp_path / "resnet18_gn.pt"
    argv = ["convert", "resnet18", "--to", "gn", "--out", str(out), "--finalize"]
    assert cli.main([*argv, "--input-shape", "1,3,64,64"]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["normswap"]["finalized"] is True
    assert "bn1.weight" in saved["state_dict"]
    rebuilt = torchvision.models.resnet18()
    normswap.restore(rebuilt, out)
    rebuilt.eval()
    assert type(rebuilt.bn1) is torch.nn.GroupNorm
    x = torch.randn(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(rebuilt(x), tmp_path / "y.pt")
    # The program runs where normswap cannot be imported.
    script = (
        "import sys; sys.modules['normswap'] = None\n"
        "import torch\n"
        f"program = torch.export.load({str(out.with_suffix('.pt2'))!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        f"y = torch.load({str(tmp_path / 'y.pt')!r}, weights_only=True)\n"
        "torch.testing.assert_close(program.module()(x), y, atol=1e-5, rtol=1e-5)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_inspect_replaces_other_kinds_of_norms(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["inspect", "swin_t", "--to", "dyt", "--replace", "ln"]
    assert cli.main(argv) == 0
    assert "LayerNorm -> DyT: 29" in capsys.readouterr().out
    assert cli.main(["inspect", "swin_t", "--to", "dyt", "--replace", "layernorm"]) == 2
    assert "unknown source kind replace='layernorm'" in capsys.readouterr().err
