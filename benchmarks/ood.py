"""Out-of-domain agreement of pretrained conversions: does the converted model carry the
original's function to inputs from sources no step of the conversion saw?

The real MobileNetV2 IMAGENET1K_V1 is converted to ``gn`` by each *method* on at most
``--images`` unlabeled images: Fashion-MNIST TRAIN images plus random crops of scikit-learn's
``china.jpg`` (``--photo-share`` of them). Early stopping (``val_data``) sees more of the same
two sources. Then top-1 agreement and KL with the original are measured on

* **in-domain**: more Fashion-MNIST TRAIN images and ``china.jpg`` crops, never trained on;
* **out-of-domain**: crops of ``flower.jpg`` and Fashion-MNIST TEST images — sources that no
  step calibrated, distilled or stopped early on (Fashion-MNIST TEST shares the conversion's
  *dataset*, so it is reported separately from the new photo).

Methods: ``copy`` (γ/β copied), ``calibrate`` (closed form), ``distill`` (``convert_pretrained``:
calibrate + distill), ``progressive`` (``convert_pretrained(progressive=0.5)``),
``features`` (distillation with the per-layer feature loss) and ``adapt`` (teacher
re-estimated on the conversion data first, AdaBN; agreement is still measured against the
*original* model). Each conversion gets ``--budget`` CPU-seconds (``time.process_time``).

Writes ``<out>/ood.json`` and ``ood.md``. ``--small`` runs every method in seconds on a
randomly initialized model (CI: it checks the pipeline, not the figures). Run:
``TORCH_HOME=.cache/torch .venv/bin/python benchmarks/ood.py`` (about 70 CPU-minutes).
"""

from __future__ import annotations

import argparse
import copy
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
from normswap.surgery import swap

RESULTS = Path(__file__).resolve().parent / "results"


def _convert(**kwargs: Any) -> Callable[[nn.Module, Tensor, Tensor, argparse.Namespace], None]:
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


METHODS: dict[str, Callable[[nn.Module, Tensor, Tensor, argparse.Namespace], None]] = {
    "copy": _copy_only,
    "calibrate": _calibrate_only,
    "distill": _convert(),
    "progressive": _convert(progressive=0.5),
    "features": _convert(feature_weight=1.0),
    "adapt": _convert(adapt_teacher=True),
}


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return torch.cat([model(b) for b in x.split(100)])


def _agreement(out: Tensor, ref: Tensor) -> dict[str, float]:
    t = ref.log_softmax(-1)
    kl = (t.exp() * (t - out.log_softmax(-1))).sum(-1).mean()
    same = (out.argmax(-1) == ref.argmax(-1)).float().mean()
    return {"agreement": round(float(same), 4), "kl": round(float(kl), 4)}


def _sets(args: argparse.Namespace) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Conversion data, early-stopping data, and the judged sets (each labeled by domain)."""
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
        "in-domain: Fashion-MNIST TRAIN (unseen images)": to_imagenet(
            fm[n_fm + args.judge :], args.size
        ),
        "in-domain: china.jpg (unseen crops)": china[photos + args.judge // 4 :],
        "out-of-domain: flower.jpg crops": photo_crops("flower.jpg", args.judge, args.size, seed=2),
        "out-of-domain: Fashion-MNIST TEST": to_imagenet(test_fm, args.size),
    }
    return data, val, judged


def _markdown(rows: list[dict], args: argparse.Namespace) -> str:
    sets = list(rows[0]["judged"])
    head = "| method | " + " | ".join(sets) + " | CPU-s |"
    lines = [
        "# Out-of-domain agreement of `gn` conversions "
        f"(MobileNetV2 IMAGENET1K_V1, {args.size} px)",
        "",
        f"Conversion data: {args.images} unlabeled images ({args.photo_share:.0%} china.jpg "
        f"crops, the rest Fashion-MNIST TRAIN); budget {args.budget:g} CPU-s per conversion. "
        "Top-1 agreement with the original (KL in brackets).",
        "",
        head,
        "|" + "---|" * (len(sets) + 2),
    ]
    for r in rows:
        cells = [f"{r['judged'][s]['agreement']:.1%} ({r['judged'][s]['kl']:.2f})" for s in sets]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--photo-share", type=float, default=0.25)
    parser.add_argument("--judge", type=int, default=400, help="images per judged set")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--budget", type=float, default=600.0, help="CPU-seconds per conversion")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default: fit)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.small:
        args.images, args.judge, args.size, args.budget, args.steps = 64, 16, 32, 30.0, 4
    os.environ.setdefault("TORCH_HOME", str(Path(__file__).resolve().parents[1] / ".cache/torch"))
    torch.set_num_threads(args.threads)
    weights = None if args.small else "IMAGENET1K_V1"
    original = torchvision.models.mobilenet_v2(weights=weights).eval()
    data, val, judged = _sets(args)
    reference = {name: _logits(original, x) for name, x in judged.items()}
    rows = []
    for method in methods:
        model = copy.deepcopy(original)
        torch.manual_seed(0)
        cpu = time.process_time()
        METHODS[method](model, data, val, args)
        seconds = time.process_time() - cpu
        scores = {
            name: _agreement(_logits(model, x), reference[name]) for name, x in judged.items()
        }
        rows.append({"method": method, "cpu_s": round(seconds, 1), "judged": scores})
        cells = "  ".join(f"{v['agreement']:.1%}" for v in scores.values())
        print(f"{method:<12} {cells}  ({seconds:.0f} CPU-s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "ood_small" if args.small else "ood"
    (args.out / f"{stem}.json").write_text(
        json.dumps({"rows": rows, "args": vars(args)}, indent=1, default=str)
    )
    (args.out / f"{stem}.md").write_text(_markdown(rows, args))
    print(_markdown(rows, args))


if __name__ == "__main__":
    main()
