"""The ``normswap`` command line: ``list``, ``inspect`` and ``convert``.

Examples::

    normswap list
    normswap inspect resnet50 --to gn --set num_groups=16
    normswap inspect efficientnet_b0 --source timm --to gn --set num_groups=8
    normswap convert mobilenet_v2 --to gn --weights IMAGENET1K_V1 --out mbv2_gn.pt
    normswap inspect resnet50 norm=gn norm.num_groups=16    # normswap-train's norm group
    normswap convert mobilenet_v2 --to gn --weights IMAGENET1K_V1 --out mbv2_gn.pt \
        --calibrate path/to/unlabeled/images --budget 600

With ``--calibrate DATA`` the conversion keeps what the pretrained model learned:
:func:`normswap.convert_pretrained` (swap, closed-form calibration, block-wise reconstruction
or self-distillation for what is left of ``--budget`` seconds) on unlabeled images from
``DATA`` (a folder of images, a ``.pt`` tensor file, or ``fashion-mnist``), and the checkpoint
records what it reached.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normswap.errors import CLIError, NormSwapError
from normswap.families import get_family
from normswap.monitor.families import family_of
from normswap.record import surgery_record
from normswap.report import SwapReport
from normswap.specs import get_spec, list_norms
from normswap.surgery import swap
from normswap.zoo import ZOOS, build_model

__all__ = ["CHECKPOINT_FORMAT", "main", "parse_overrides"]

CHECKPOINT_FORMAT = "normswap.convert/1"


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are Python literals where they parse, else text.

    Example:
        >>> parse_overrides(["num_groups=16", "bn=fold", "layers=('conv',)"])
        {'num_groups': 16, 'bn': 'fold', 'layers': ('conv',)}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--set expects key=value, got {item!r}")
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[key.strip()] = value
    return out


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise CLIError(f"--input-shape expects integers like 1,3,224,224, got {text!r}") from None
    return shape


def _cmd_list(_: argparse.Namespace) -> int:
    for name in list_norms():
        print(f"{name:8s} {get_family(name).summary}")
    return 0


def _norm_from_overrides(args: argparse.Namespace) -> None:
    """Resolve Hydra-style ``norm=NAME norm.KEY=VALUE`` overrides through the app's ``norm``
    config group (the same options, defaults and typed schemas as ``normswap-train``) into
    ``args.to`` and the spec overrides."""
    args.norm_fields = {}
    if not args.overrides:
        if args.to is None and args.need_to:
            raise CLIError("give the target norm: --to NAME or norm=NAME (see `normswap list`)")
        return
    bad = [o for o in args.overrides if not o.lstrip("+").startswith("norm")]
    if bad:
        raise CLIError(f"only norm=... and norm.KEY=VALUE overrides apply here, got {bad}")
    if args.to is not None:
        raise CLIError("give the norm either as --to NAME or as norm=NAME, not both")
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from normswap.app.schema import NORM_CALLBACK_OPTIONS
    from normswap.app.train import register_configs

    register_configs()
    try:
        with initialize_config_module("normswap.conf", version_base="1.3"):
            cfg = compose("train", overrides=list(args.overrides))
    except Exception as err:  # Hydra's own message names the override and the key
        cause = f": {err.__cause__}" if err.__cause__ else ""
        raise CLIError(f"{err}{cause}".replace("\n", " ")) from None
    fields = OmegaConf.to_container(cfg.norm, resolve=True)
    assert isinstance(fields, dict)
    spec = fields.pop("spec")
    if spec == "bn":
        raise CLIError("norm=bn keeps BatchNorm, nothing to convert; pick one of `normswap list`")
    for key in set(NORM_CALLBACK_OPTIONS) - {"include", "exclude", "replace"}:  # training only
        fields.pop(key, None)
    for key in ("include", "exclude", "replace"):
        value = fields.pop(key, None)
        if value and not getattr(args, key):
            setattr(args, key, [value] if isinstance(value, str) else list(value))
    args.to, args.norm_fields = spec, fields


def _swap_from_args(model: nn.Module, args: argparse.Namespace, *, dry_run: bool) -> SwapReport:
    shape = _parse_shape(args.input_shape)
    example = None
    if shape is not None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        example = torch.randn(shape, device=device)
    return swap(
        model,
        args.to,
        include=args.include or None,
        exclude=args.exclude or None,
        replace=args.replace or None,
        dry_run=dry_run,
        strict=args.strict,
        example_inputs=example,
        **{**args.norm_fields, **parse_overrides(args.set)},
    )


def _cmd_inspect(args: argparse.Namespace) -> int:
    _norm_from_overrides(args)
    meta = args.input_shape is None
    model = build_model(args.model, source=args.source, meta=meta)
    norms = [
        (path, m)
        for path, m in model.named_modules()
        if family_of(m) is not None or isinstance(m, nn.LocalResponseNorm)
    ]
    print(f"{args.model}: {len(norms)} norm layer(s)")
    for path, m in norms:
        print(f"  {path:50s} {m}")
    if args.to:
        print()
        print(_swap_from_args(model, args, dry_run=True))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a directory; give a file path such as model.pt")
    if not out.parent.exists():
        raise CLIError(f"the folder {str(out.parent)!r} does not exist; create it first")
    _norm_from_overrides(args)
    overrides = {**args.norm_fields, **parse_overrides(args.set)}
    get_spec(args.to, **overrides)  # a bad spec fails before anything is loaded
    data = None
    if args.progressive and args.calibrate is None:
        raise CLIError("--progressive distills: give the images with --calibrate DATA")
    if args.calibrate is not None:
        if args.input_shape:
            raise CLIError("--calibrate traces with its own images; drop --input-shape")
        from normswap.data import load_images

        data = load_images(args.calibrate, args.size, limit=args.samples)
    model = build_model(args.model, args.weights, source=args.source)
    model.eval()  # pretrained conversion (and folding) use running statistics
    conversion = None
    if data is None:
        report = _swap_from_args(model, args, dry_run=False)
        print(report)
    else:
        from normswap.pretrained.convert import convert_pretrained

        result = convert_pretrained(
            model,
            args.to,
            data,
            budget=args.budget,
            distill_steps=args.distill_steps,
            reconstruct=args.reconstruct,
            progressive=args.progressive,
            include=args.include or None,
            exclude=args.exclude or None,
            replace=args.replace or None,
            **overrides,
        )
        report, conversion = result.report, result.to_dict()
        del conversion["report"]  # the record below holds the plan
        print(result)
    record = surgery_record(report, args.include or None, args.exclude or None)
    finalized = None
    if args.finalize:
        from normswap.finalize import finalize

        finalized = finalize(model)
        record["finalized"] = True
        print(finalized)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": args.model,
            "source": args.source,
            "weights": args.weights,
            "normswap": record,
            "conversion": conversion,
            "state_dict": model.state_dict(),
        },
        out,
    )
    print(f"saved {out}")
    if finalized is not None and finalized.plain:
        program = out.with_suffix(".pt2")
        shape = _parse_shape(args.input_shape) or (1, 3, args.size, args.size)
        exported = torch.export.export(model, (torch.zeros(shape),))
        torch.export.save(exported, program)
        print(f"saved {program} (torch.export program for input {tuple(shape)}: torch only)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from normswap.app.report import collect_runs, markdown_table, write_report

    table, files = write_report(args.runs, args.out)
    print(table)
    print()
    if args.per_seed:
        print(markdown_table(collect_runs(args.runs)))
        print()
    for path in files:
        print(f"wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normswap", description="Replace BatchNorm in torchvision models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered norms").set_defaults(func=_cmd_list)

    def common(p: argparse.ArgumentParser, *, need_to: bool) -> None:
        p.add_argument("model", help="a model name of --source (torchvision by default)")
        p.add_argument(
            "--source",
            default="torchvision",
            choices=list(ZOOS),
            help="the model zoo: torchvision, timm (pretrained=False), normswap (tiny_vit, ...)",
        )
        p.add_argument("--to", choices=list_norms(), help="target norm")
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="norm=NAME|norm.KEY=VALUE",
            help="Hydra-style overrides of normswap-train's norm group, e.g. norm=gn "
            "norm.num_groups=16 (instead of --to/--set)",
        )
        p.set_defaults(need_to=need_to)
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="spec field override, e.g. num_groups=16 (repeatable)",
        )
        p.add_argument("--include", action="append", default=[], metavar="GLOB")
        p.add_argument("--exclude", action="append", default=[], metavar="GLOB")
        p.add_argument("--strict", action="store_true", help="fail if a replaced norm remains")
        p.add_argument(
            "--replace",
            action="append",
            default=[],
            metavar="KIND",
            help="source kinds to replace: bn (default), ln, ln2d, gn, in, rms, frozen, any "
            "(repeatable)",
        )
        p.add_argument(
            "--input-shape",
            metavar="N,C,H,W",
            help="trace with a random input of this shape (checks ranks; folds BN)",
        )

    inspect = sub.add_parser("inspect", help="show a model's norm layers and a dry-run plan")
    common(inspect, need_to=False)
    inspect.set_defaults(func=_cmd_inspect)
    convert = sub.add_parser("convert", help="convert a model and save its state dict")
    common(convert, need_to=True)
    convert.add_argument("--weights", help="torchvision weights name or state-dict file")
    convert.add_argument("--out", required=True, help="output file (.pt)")
    convert.add_argument(
        "--calibrate",
        metavar="DATA",
        help="keep the pretrained behaviour: calibrate + reconstruct (or distill) on unlabeled "
        "images from DATA "
        "(a folder of images, a .pt tensor file, or 'fashion-mnist')",
    )
    convert.add_argument("--size", type=int, default=224, help="image side for --calibrate")
    convert.add_argument("--samples", type=int, default=2000, help="images read for --calibrate")
    convert.add_argument(
        "--budget",
        type=float,
        default=600.0,
        help="seconds for calibration + reconstruction + distillation",
    )
    convert.add_argument(
        "--reconstruct",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="with --calibrate: the share of the budget left after calibration spent on "
        "block-wise reconstruction (the rest distills; 0, the default: none)",
    )
    convert.add_argument(
        "--finalize",
        action="store_true",
        help="save the inference form: plain torch modules where they compute the same "
        "(normswap.finalize); when every layer is plain, also OUT.pt2, a torch.export program",
    )
    convert.add_argument(
        "--progressive",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="with --calibrate: distill progressively (the student starts as the original and "
        "is the converted model after this fraction of the steps; 0: swap at once)",
    )
    convert.add_argument(
        "--distill-steps",
        type=int,
        default=None,
        help="distillation steps (default: what fits in what --reconstruct leaves of --budget; "
        "0: none, and calibrate only unless --reconstruct is set)",
    )
    convert.set_defaults(func=_cmd_convert)
    report = sub.add_parser("report", help="table and plots of normswap-train runs")
    report.add_argument("runs", help="a run or multirun output directory")
    report.add_argument("--out", help="where to write report.md and plots (default: RUNS)")
    report.add_argument(
        "--per-seed",
        action="store_true",
        help="also print every run (each seed) below the aggregated table (report.md has both)",
    )
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``normswap`` command line; returns the exit code.

    Example:
        >>> main(["list"])
        adalin ...
        0
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting positionals at the first option: overrides given after an
    # option (``--input-shape 1,3,64,64 norm=gn``) come back here.
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args))
    except NormSwapError as err:
        print(f"normswap: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
