"""Out-of-domain agreement of pretrained conversions: does the converted model carry the
original's function to inputs from sources no step of the conversion saw — and if not, where
is it lost?

The real MobileNetV2 IMAGENET1K_V1 is converted to ``gn`` by each *method* on at most
``--images`` unlabeled images: Fashion-MNIST TRAIN images plus random crops of scikit-learn's
``china.jpg`` (``--photo-share`` of them). Early stopping (``val_data``) sees more of the same
two sources. Then top-1 agreement and KL with the original are measured on

* **in-domain**: more Fashion-MNIST TRAIN images and ``china.jpg`` crops, never trained on;
* **out-of-domain**: Fashion-MNIST TEST images (a new split of the conversion's dataset) and
  crops of **photos no step saw**: scikit-learn's ``flower.jpg``, scikit-image's ``chelsea``,
  ``coffee``, ``rocket``, ``astronaut`` and ``motorcycle_left``, matplotlib's
  ``grace_hopper.jpg`` (each a different scene; the mean over them is the headline).

**Diagnostics**, per method, on the unseen photos: the histogram of the converted model's
top-1 classes against the original's (distinct classes, the most frequent ones, and the share
of predictions that fall in the classes the original predicts on the *conversion* data: a
converted model that collapses onto its conversion domain's classes shows it); and the relative
error ``‖f_converted − f_original‖ / ‖f_original‖`` after each block of ``model.features`` and
at the logits, in- and out-of-domain. ``--parts stages`` converts one stage at a time (blocks of
one width), calibrates it, and measures agreement on the unseen photos: how much of the
original's function each stage's conversion alone loses.

Methods (``METHODS``): ``copy`` (γ/β copied), ``calibrate`` (closed form), ``distill``
(``convert_pretrained`` as it ships: calibrate + distill), ``reconstruct``
(``convert_pretrained(reconstruct=1)``: calibrate + block-wise reconstruction), ``progressive``,
``features`` (distillation with the per-layer feature loss), ``adapt`` (AdaBN teacher),
``diverse`` (distillation on a diverse transfer set:
:class:`normswap.pretrained.transfer.DiverseAugment`), and two references that convert on
*other crops of the judged photos* (``in-scene distill``, ``in-scene reconstruct``): what a
transfer set covering the judged scenes reaches. Each conversion gets ``--budget`` CPU-seconds
(``time.process_time``, one thread).

Runs go to ``<out>/ood_runs.jsonl`` (one line per method and budget; present ones are skipped, so
two processes can share the methods: ``--methods a,b`` and ``--methods c,d``); every run rewrites
``ood.json`` and ``ood.md`` from all lines. ``--small`` runs every method in seconds on a randomly
initialized model (CI: it checks the pipeline, not the figures). Run:
``TORCH_HOME=.cache/torch .venv/bin/python benchmarks/ood.py`` (about 50 CPU-minutes).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from normswap.data import load_fashion_mnist, photo_crops, to_imagenet
from normswap.pretrained.calibrate import calibrate
from normswap.pretrained.convert import convert_pretrained
from normswap.pretrained.transfer import DiverseAugment
from normswap.surgery import swap

RESULTS = Path(__file__).resolve().parent / "results"
IN_FM = "in-domain: Fashion-MNIST TRAIN (unseen images)"
IN_PHOTO = "in-domain: china.jpg (unseen crops)"
OUT_FM = "out-of-domain: Fashion-MNIST TEST"
UNSEEN = "out-of-domain: unseen photos (mean)"

Method = Callable[[nn.Module, Tensor, Tensor, argparse.Namespace], None]


def _convert(**kwargs: Any) -> Method:
    def run(model: nn.Module, data: Tensor, val: Tensor, args: argparse.Namespace) -> None:
        convert_pretrained(
            model,
            "gn",
            data,
            budget=args.budget,
            val_data=val,
            clock=time.process_time,
            progress=False,
            distill_steps=args.steps,
            **kwargs,
        )

    return run


def _copy_only(model: nn.Module, data: Tensor, val: Tensor, args: argparse.Namespace) -> None:
    swap(model, "gn")


def _calibrate_only(model: nn.Module, data: Tensor, val: Tensor, args: argparse.Namespace) -> None:
    reference = copy.deepcopy(model)
    swap(model, "gn")
    calibrate(model, reference, list(data[:256].split(32)))


def _in_scene(method: Method) -> Method:
    """``method`` converting on *other* crops of the judged photos themselves (and stopping
    early on more of them): the reference for a transfer set that covers the judged scenes."""

    def run(model: nn.Module, data: Tensor, val: Tensor, args: argparse.Namespace) -> None:
        photos = unseen_photos()
        per_photo = -(-args.images // len(photos))
        scene = torch.cat([photo_crops(p, per_photo, args.size, seed=7) for p in photos.values()])
        scene = scene[torch.randperm(scene.shape[0], generator=torch.Generator().manual_seed(0))]
        scene_val = torch.cat(
            [photo_crops(p, max(1, args.judge // 8), args.size, seed=8) for p in photos.values()]
        )
        method(model, scene[: args.images], scene_val, args)

    return run


METHODS: dict[str, Method] = {
    "copy": _copy_only,
    "calibrate": _calibrate_only,
    "distill": _convert(),
    "reconstruct": _convert(reconstruct=1.0),
    "progressive": _convert(progressive=0.5),
    "features": _convert(feature_weight=1.0),
    "adapt": _convert(adapt_teacher=True),
    "diverse": _convert(augment=DiverseAugment()),
    "in-scene distill": _in_scene(_convert()),
    "in-scene reconstruct": _in_scene(_convert(reconstruct=1.0)),
}


def unseen_photos() -> dict[str, str]:
    """``{label: photo}`` for the photos no conversion step sees (scikit-learn's flower, five
    of scikit-image's photos, matplotlib's Grace Hopper)."""
    missing = [p for p in ("skimage", "matplotlib") if importlib.util.find_spec(p) is None]
    if missing:
        raise SystemExit(
            f"the unseen photos come with {' and '.join(missing)}: pip install -e '.[dev]'"
        )
    import matplotlib

    spec = importlib.util.find_spec("skimage")
    assert spec is not None and spec.origin is not None
    skimage_data = Path(spec.origin).parent / "data"
    photos = {"flower.jpg": "flower.jpg"}
    for name in ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "motorcycle_left.png"):
        photos[name] = str(skimage_data / name)
    photos["grace_hopper.jpg"] = str(
        Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    )
    return photos


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return torch.cat([model(b) for b in x.split(100)])


def _agreement(out: Tensor, ref: Tensor) -> dict[str, float]:
    t = ref.log_softmax(-1)
    kl = (t.exp() * (t - out.log_softmax(-1))).sum(-1).mean()
    same = (out.argmax(-1) == ref.argmax(-1)).float().mean()
    return {"agreement": round(float(same), 4), "kl": round(float(kl), 4)}


def _sets(args: argparse.Namespace) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Conversion data, early-stopping data, the judged sets and the unseen photos' crops."""
    photos = round(args.images * args.photo_share)
    fm, _ = load_fashion_mnist("train", limit=args.images - photos + 2 * args.judge)
    n_fm = args.images - photos
    china = photo_crops("china.jpg", photos + args.judge // 4 + args.judge, args.size, seed=1)
    data = torch.cat([to_imagenet(fm[:n_fm], args.size), china[:photos]])
    data = data[torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(0))]
    val = torch.cat(
        [
            to_imagenet(fm[n_fm : n_fm + args.judge], args.size),
            china[photos : photos + args.judge // 4],
        ]
    )
    test_fm, _ = load_fashion_mnist("test", limit=args.judge)
    judged = {
        IN_FM: to_imagenet(fm[n_fm + args.judge :], args.size),
        IN_PHOTO: china[photos + args.judge // 4 :],
        OUT_FM: to_imagenet(test_fm, args.size),
    }
    unseen = {
        label: photo_crops(source, args.per_photo, args.size, seed=2)
        for label, source in unseen_photos().items()
    }
    return data, val, judged, unseen


def _blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks whose outputs the diagnostics compare: ``features.i`` and the logits."""
    blocks = {f"features.{i}": m for i, m in enumerate(model.features)}
    blocks["logits"] = model.classifier
    return blocks


@torch.no_grad()
def block_errors(model: nn.Module, original: nn.Module, x: Tensor) -> dict[str, float]:
    """Mean over ``x`` of ``‖f_model − f_original‖ / ‖f_original‖`` after each block."""
    outputs: list[dict[str, list[Tensor]]] = []
    for m in (model, original):
        store: dict[str, list[Tensor]] = {}
        hooks = [
            block.register_forward_hook(
                lambda _m, _a, out, name=name, store=store: store.setdefault(name, []).append(
                    out.flatten(1)
                )
            )
            for name, block in _blocks(m).items()
        ]
        _logits(m, x)
        for h in hooks:
            h.remove()
        outputs.append(store)
    errors = {}
    for name in outputs[1]:
        a, b = torch.cat(outputs[0][name]), torch.cat(outputs[1][name])
        errors[name] = round(
            float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).mean()), 4
        )
    return errors


def class_histogram(
    out: Tensor, ref: Tensor, conversion_classes: set[int], names: list[str]
) -> dict[str, Any]:
    """How the converted model's top-1 classes spread, against the original's."""

    def describe(logits: Tensor) -> dict[str, Any]:
        top = logits.argmax(-1)
        counts = torch.bincount(top, minlength=logits.shape[-1])
        share, index = (counts.float() / top.numel()).sort(descending=True)
        in_conversion = sum(int(counts[c]) for c in conversion_classes) / top.numel()
        return {
            "distinct": int((counts > 0).sum()),
            "top": [
                (names[int(i)], round(float(s), 3))
                for s, i in zip(share[:3], index[:3], strict=True)
            ],
            "conversion_classes_share": round(in_conversion, 3),
        }

    return {"converted": describe(out), "original": describe(ref)}


def stages(model: nn.Module, x: Tensor) -> dict[str, list[int]]:
    """Consecutive ``features`` blocks of one output width: ``{"32ch": [4, 5, 6], ...}``."""
    widths: list[int] = []
    hooks = [
        block.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[1]))
        for block in model.features
    ]
    _logits(model, x[:1])
    for h in hooks:
        h.remove()
    groups: dict[str, list[int]] = {}
    for i, width in enumerate(widths):
        key = f"{width}ch" if i else "stem"
        if key in groups and groups[key][-1] != i - 1:
            key = f"{key}@{i}"
        groups.setdefault(key, []).append(i)
    return groups


def _stage_rows(
    original: nn.Module, data: Tensor, unseen: dict[str, Tensor], refs: dict[str, Tensor]
) -> list[dict[str, Any]]:
    rows = []
    for stage, blocks in stages(original, data).items():
        model = copy.deepcopy(original)
        include = [f"features.{i}" for i in blocks] + [f"features.{i}.*" for i in blocks]
        swap(model, "gn", include=include)
        calibrate(model, original, list(data[:256].split(32)))
        agreement = {
            label: _agreement(_logits(model, x), refs[label])["agreement"]
            for label, x in unseen.items()
        }
        mean = sum(agreement.values()) / len(agreement)
        rows.append({"stage": stage, "blocks": blocks, "unseen": round(mean, 4), **agreement})
        print(f"stage {stage:<8} unseen photos {mean:.1%}", flush=True)
    return rows


def _run_method(
    method: str,
    original: nn.Module,
    data: Tensor,
    val: Tensor,
    sets: dict[str, Tensor],
    unseen: dict[str, Tensor],
    refs: dict[str, Tensor],
    conversion_classes: set[int],
    names: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    model = copy.deepcopy(original)
    torch.manual_seed(0)
    cpu = time.process_time()
    METHODS[method](model, data, val, args)
    seconds = time.process_time() - cpu
    outs = {label: _logits(model, x) for label, x in {**sets, **unseen}.items()}
    judged = {label: _agreement(outs[label], refs[label]) for label in sets}
    photos = {label: _agreement(outs[label], refs[label]) for label in unseen}
    judged[UNSEEN] = {
        key: round(sum(p[key] for p in photos.values()) / len(photos), 4)
        for key in ("agreement", "kl")
    }
    all_unseen = torch.cat(list(unseen.values()))
    in_domain = torch.cat([sets[IN_FM][: args.per_photo], sets[IN_PHOTO][: args.per_photo]])
    return {
        "method": method,
        "budget": args.budget,
        "cpu_s": round(seconds, 1),
        "judged": judged,
        "photos": photos,
        "classes": class_histogram(
            torch.cat([outs[label] for label in unseen]),
            torch.cat([refs[label] for label in unseen]),
            conversion_classes,
            names,
        ),
        "blocks": {
            "in-domain": block_errors(model, original, in_domain),
            "unseen photos": block_errors(model, original, all_unseen),
        },
    }


def _markdown(rows: list[dict], stage_rows: list[dict], args: argparse.Namespace) -> str:
    sets = list(rows[0]["judged"]) if rows else []
    lines = [
        "# Out-of-domain agreement of `gn` conversions "
        f"(MobileNetV2 IMAGENET1K_V1, {args.size} px)",
        "",
        f"Conversion data: {args.images} unlabeled images ({args.photo_share:.0%} china.jpg "
        "crops, the rest Fashion-MNIST TRAIN); each conversion's CPU-seconds are in the last "
        "column (budget per method in `ood.json`). Top-1 agreement with the original (KL in "
        f"brackets). Unseen photos: {args.per_photo} crops of each of "
        f"{', '.join(unseen_photos())}.",
        "",
    ]
    if rows:
        lines += [
            "| method | " + " | ".join(sets) + " | CPU-s |",
            "|" + "---|" * (len(sets) + 2),
        ]
        for r in rows:
            cells = [
                f"{r['judged'][s]['agreement']:.1%} ({r['judged'][s]['kl']:.2f})" for s in sets
            ]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['cpu_s']:.0f} |")
        photos = list(rows[0]["photos"])
        lines += [
            "",
            "## Agreement per unseen photo",
            "",
            "| method | " + " | ".join(photos) + " |",
            "|" + "---|" * (len(photos) + 1),
        ]
        for r in rows:
            cells = [f"{r['photos'][p]['agreement']:.0%}" for p in photos]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "## Which classes the models predict on the unseen photos",
            "",
            "Distinct top-1 classes, the three most frequent, and the share of top-1 predictions "
            "that are classes the original predicts on the conversion data.",
            "",
            "| model | distinct | most frequent | in conversion classes |",
            "|---|---|---|---|",
        ]
        original = rows[0]["classes"]["original"]
        for label, c in [("original", original)] + [
            (r["method"], r["classes"]["converted"]) for r in rows
        ]:
            top = ", ".join(f"{name} {share:.0%}" for name, share in c["top"])
            lines.append(
                f"| {label} | {c['distinct']} | {top} | {c['conversion_classes_share']:.0%} |"
            )
        blocks = list(rows[0]["blocks"]["in-domain"])
        lines += [
            "",
            "## Relative error after each block, in-domain / unseen photos",
            "",
            "`‖f_converted − f_original‖ / ‖f_original‖`, mean over images, after each block of "
            "`model.features` and at the logits.",
            "",
            "| method | " + " | ".join(b.replace("features.", "") for b in blocks) + " |",
            "|" + "---|" * (len(blocks) + 1),
        ]
        for r in rows:
            cells = [
                f"{r['blocks']['in-domain'][b]:.2f} / {r['blocks']['unseen photos'][b]:.2f}"
                for b in blocks
            ]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    if stage_rows:
        photos = [k for k in stage_rows[0] if k not in ("stage", "blocks", "unseen")]
        lines += [
            "",
            "## One stage converted (and calibrated), the rest left as it was",
            "",
            "| stage | blocks | unseen photos (mean) | " + " | ".join(photos) + " |",
            "|" + "---|" * (len(photos) + 3),
        ]
        for s in stage_rows:
            cells = [f"{s[p]:.0%}" for p in photos]
            blocks = (
                f"{s['blocks'][0]}-{s['blocks'][-1]}" if len(s["blocks"]) > 1 else s["blocks"][0]
            )
            lines.append(
                f"| {s['stage']} | {blocks} | {s['unseen']:.1%} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


def _read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--parts", default="methods,stages", help="methods and/or stages")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--photo-share", type=float, default=0.25)
    parser.add_argument("--judge", type=int, default=400, help="images per judged set")
    parser.add_argument("--per-photo", type=int, default=100, help="crops of each unseen photo")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--budget", type=float, default=300.0, help="CPU-seconds per conversion")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default: fit)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rewrite ood.md/ood.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    parts = set(args.parts.split(","))
    if not parts <= {"methods", "stages"}:
        parser.error(f"unknown parts {sorted(parts - {'methods', 'stages'})}; use methods,stages")
    if args.small:
        args.images, args.judge, args.per_photo, args.size = 64, 16, 4, 32
        args.budget, args.steps = 5.0, 4
    os.environ.setdefault("TORCH_HOME", str(Path(__file__).resolve().parents[1] / ".cache/torch"))
    torch.set_num_threads(args.threads)
    stem = "ood_small" if args.small else "ood"
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / f"{stem}_runs.jsonl"
    if not args.report:
        weights = None if args.small else "IMAGENET1K_V1"
        original = torchvision.models.mobilenet_v2(weights=weights).eval()
        names = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
        data, val, sets, unseen = _sets(args)
        refs = {label: _logits(original, x) for label, x in {**sets, **unseen}.items()}
        conversion_classes = set(_logits(original, data).argmax(-1).tolist())
        done = {(r.get("method"), r.get("budget")) for r in _read_runs(runs_path)}
        if "stages" in parts and ("stages", None) not in done:
            row = {
                "method": "stages",
                "budget": None,
                "stages": _stage_rows(original, data, unseen, refs),
            }
            with runs_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        for method in methods if "methods" in parts else []:
            if (method, args.budget) in done:
                print(f"{method}: already in {runs_path.name}, skipped", flush=True)
                continue
            row = _run_method(
                method, original, data, val, sets, unseen, refs, conversion_classes, names, args
            )
            cells = "  ".join(f"{v['agreement']:.1%}" for v in row["judged"].values())
            print(f"{method:<12} {cells}  ({row['cpu_s']:.0f} CPU-s)", flush=True)
            with runs_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
    runs = _read_runs(runs_path)
    order = {m: i for i, m in enumerate(METHODS)}
    rows = sorted(
        (r for r in runs if r["method"] in METHODS),
        key=lambda r: (order[r["method"]], r["budget"]),
    )
    stage_rows = next((r["stages"] for r in runs if r["method"] == "stages"), [])
    (args.out / f"{stem}.json").write_text(
        json.dumps({"rows": rows, "stages": stage_rows, "args": vars(args)}, indent=1, default=str)
    )
    (args.out / f"{stem}.md").write_text(_markdown(rows, stage_rows, args))
    print(_markdown(rows, stage_rows, args))


if __name__ == "__main__":
    main()
