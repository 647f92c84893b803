"""torchvision models for the coverage tests: how to build each and feed it a small input.

Like torchvision's own ``test/test_models.py``, inputs are chosen per model (the smallest
size each architecture accepts, kept small so the whole coverage run fits CI's budget).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torchvision
from torch import nn

from normswap.meta import init_on_meta
from normswap.sources import is_source_norm, source_kind

ALL_MODELS = torchvision.models.list_models()

DETECTION = set(torchvision.models.list_models(module=torchvision.models.detection))
SEGMENTATION = set(torchvision.models.list_models(module=torchvision.models.segmentation))
VIDEO = set(torchvision.models.list_models(module=torchvision.models.video))
FLOW = set(torchvision.models.list_models(module=torchvision.models.optical_flow))

# Inputs larger than the default 64 px, where the architecture needs them.
IMAGE_SIZE = {
    "inception_v3": 299,  # the auxiliary classifier (trained in train mode) needs 17x17 maps
    "quantized_inception_v3": 299,
    "maxvit_t": 224,  # fixed input size
}
# GoogLeNet and Inception warn (FutureWarning) unless init_weights is explicit.
EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    name: {"init_weights": True}
    for name in ("googlenet", "inception_v3", "quantized_googlenet", "quantized_inception_v3")
}
VIDEO_SHAPE = {"s3d": (1, 3, 16, 224, 224)}  # its final AvgPool3d is (2, 7, 7)


def build(name: str, *, meta: bool = False) -> nn.Module:
    """Build ``name`` with random weights (never downloading a backbone)."""
    kwargs: dict[str, Any] = {"weights": None}
    params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    if "weights_backbone" in params:
        kwargs["weights_backbone"] = None
    kwargs.update(EXTRA_KWARGS.get(name, {}))
    if name in DETECTION and not name.startswith("ssd"):
        kwargs.update(min_size=128, max_size=128)
    if meta:
        with init_on_meta():
            return torchvision.models.get_model(name, **kwargs)
    torch.manual_seed(0)
    return torchvision.models.get_model(name, **kwargs)


def has_bn(model: nn.Module) -> bool:
    return any(is_source_norm(m) for m in model.modules())


@functools.cache
def norm_kinds(name: str) -> frozenset[str]:
    """The source kinds of the norms ``name`` holds (built once on the meta device)."""
    return frozenset(k for m in build(name, meta=True).modules() if (k := source_kind(m)))


def _targets(n: int, size: int, name: str) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(n):
        t = {
            "boxes": torch.tensor([[10.0, 12.0, 70.0, 90.0], [30.0, 20.0, 100.0, 60.0]]),
            "labels": torch.tensor([1, 1]),  # keypointrcnn has 2 classes (0 = background)
        }
        if "mask" in name:
            masks = torch.zeros(2, size, size, dtype=torch.uint8)
            masks[0, 12:90, 10:70] = 1
            masks[1, 20:60, 30:100] = 1
            t["masks"] = masks
        if "keypoint" in name:
            kp = torch.rand(2, 17, 3) * 60 + 20
            kp[..., 2] = 1
            t["keypoints"] = kp
        out.append(t)
    return out


def example(name: str, *, train: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for one small forward pass of ``name``."""
    torch.manual_seed(1)
    if name in DETECTION:
        size = 128
        images = [torch.rand(3, size, size) for _ in range(2)]
        return ((images, _targets(2, size, name)) if train else (images,)), {}
    if name in FLOW:
        a, b = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128)  # RAFT needs >= 128 px
        return (a, b), {"num_flow_updates": 2}
    if name in VIDEO:
        return (torch.rand(*VIDEO_SHAPE.get(name, (2, 3, 4, 32, 32))),), {}
    size = IMAGE_SIZE.get(name, 64)
    batch = 1 if name == "maxvit_t" else 2
    return (torch.rand(batch, 3, size, size),), {}


def trace_inputs(name: str, *, train: bool = False) -> Any:
    """``example_inputs`` for ``normswap.swap`` (for a model in train or eval mode)."""
    args, kwargs = example(name, train=train)
    if kwargs:
        params = list(inspect.signature(build(name, meta=True).forward).parameters)
        return {**dict(zip(params, args, strict=False)), **kwargs}
    return args[0] if len(args) == 1 else args


#: Input sizes where a model needs more than :func:`example`'s (fixed-size ViTs, MViT's clips).
META_IMAGE_SIZE = {name: 224 for name in ALL_MODELS if name.startswith(("vit_", "mvit_"))}


def _to_meta(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return torch.empty(obj.shape, dtype=obj.dtype, device="meta")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_meta(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_meta(v) for k, v in obj.items()}
    return obj


def meta_inputs(name: str) -> Any:
    """``example_inputs`` on the meta device (a forward on meta tensors gives every norm's input
    rank at no memory cost), or ``None`` for the detection models, whose forward needs data
    (``torch.nonzero`` has no meta kernel)."""
    if name in DETECTION:
        return None
    if name.startswith("mvit_"):
        return torch.empty(1, 3, 16, 224, 224, device="meta")
    if name in META_IMAGE_SIZE:
        return torch.empty(1, 3, META_IMAGE_SIZE[name], META_IMAGE_SIZE[name], device="meta")
    return _to_meta(trace_inputs(name))


def batch_size(name: str) -> int:
    args, _ = example(name, train=False)
    first = args[0]
    return len(first) if isinstance(first, list) else first.shape[0]
