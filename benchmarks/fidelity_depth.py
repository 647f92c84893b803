"""Which layers cost agreement when a pretrained MobileNetV2 is converted to a per-sample norm.

On the real MobileNetV2 ``IMAGENET1K_V1`` (Fashion-MNIST at 160 px: 256 TRAIN images for
calibration, the first 500 TEST images to measure top-1 agreement with the original):

* how often the original keeps its top-1 when its normalized input is scaled by ``a`` (a model
  with a per-sample norm after the bias-free stem conv cannot see that scaling at all);
* calibrate-only agreement with every BN converted, for ``gn`` (32 groups and 16 channels per
  group), ``ln``, ``in``, ``adalin``;
* calibrate-only agreement when only the first / only the last ``k`` BNs become ``gn``.

Prints one line per measurement (about 15 minutes on one core). Run:
``TORCH_HOME=.cache/torch .venv/bin/python benchmarks/fidelity_depth.py``.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch
import torchvision

import normswap
from normswap.data import load_fashion_mnist, to_imagenet
from normswap.pretrained.calibrate import calibrate


def main() -> None:
    os.environ.setdefault("TORCH_HOME", str(Path(__file__).resolve().parents[1] / ".cache/torch"))
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    ref = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    xt = to_imagenet(load_fashion_mnist("test", limit=500)[0], 160)
    xc = to_imagenet(load_fashion_mnist("train", limit=256)[0], 160)

    @torch.no_grad()
    def logits(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(b) for b in x.split(100)])

    top = logits(ref, xt).argmax(-1)

    def agree(m: torch.nn.Module) -> float:
        return (logits(m, xt).argmax(-1) == top).float().mean().item()

    print("teacher classes used:", top.unique().numel(), flush=True)
    for a in (0.5, 0.8, 1.25, 2.0):
        kept = (logits(ref, xt * a).argmax(-1) == top).float().mean()
        print(f"teacher top-1 kept under x_norm*{a}: {kept:.3f}", flush=True)
    bns = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    print(len(bns), "BNs", flush=True)

    def conv(paths: list[str], target: str = "gn", **kw: object) -> float:
        m = copy.deepcopy(ref)
        normswap.swap(m, target, include=paths, **kw)
        calibrate(m, ref, list(xc.split(32)))
        return agree(m)

    for target, kw in (
        ("gn", {}),
        ("gn", {"group_size": 16}),
        ("ln", {}),
        ("in", {}),
        ("adalin", {}),
    ):
        t = time.time()
        print(
            f"all {target} {kw}: calibrate-only agree {conv(bns, target, **kw):.3f} "
            f"({time.time() - t:.0f}s)",
            flush=True,
        )
    for k in (1, 3, 6, 12, 24, 40):
        print(
            f"first {k:>2} BNs -> gn: {conv(bns[:k]):.3f}   last {k:>2}: {conv(bns[-k:]):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
