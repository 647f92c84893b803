"""Classification models for the app: any torchvision classifier, adapted to the data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from normswap.zoo import ZOOS, build_model, replace_head

__all__ = [
    "AdaptedModel",
    "InputAdapter",
    "build_classifier",
    "build_segmenter",
    "classification_models",
]


def classification_models(source: str = "torchvision") -> list[str]:
    """The classification model names of a zoo (``model.name`` choices): torchvision's
    classifiers, or every timm model.

    Example:
        >>> "resnet18" in classification_models()
        True
    """
    return ZOOS.get(source).classifier_names()


class InputAdapter(nn.Module):
    """Turn the data's images into what the network expects: channels and size.

    Grayscale inputs are repeated to 3 channels; inputs are resized (bilinear) to ``size``
    when it is given and differs.

    Example:
        >>> InputAdapter(1, 3, 32)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, in_channels: int, out_channels: int = 3, size: int | None = None) -> None:
        super().__init__()
        if out_channels % in_channels:
            raise ValueError(f"cannot adapt {in_channels} channels to {out_channels}")
        self.in_channels, self.out_channels, self.size = in_channels, out_channels, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_channels != self.in_channels:
            x = x.repeat_interleave(self.out_channels // self.in_channels, dim=1)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, size={self.size}"


class AdaptedModel(nn.Module):
    """``net(adapter(x))``; module paths of the network start with ``net.``.

    Example:
        >>> m = AdaptedModel(InputAdapter(1, 3, 32), torchvision.models.resnet18(num_classes=10))
        >>> m(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, adapter: InputAdapter, net: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(x))


def build_classifier(
    name: str,
    num_classes: int,
    in_channels: int,
    *,
    source: str = "torchvision",
    weights: str | None = None,
    input_size: int | None = None,
) -> AdaptedModel:
    """A classifier for ``num_classes`` classes fed ``in_channels``-channel images.

    Args:
        name: a classification model name of ``source``.
        num_classes: number of classes of the data.
        in_channels: channels of the data's images (1 for Fashion-MNIST).
        source: the model zoo: ``"torchvision"``, ``"timm"`` (``pretrained=False``: timm's
            weights come as a state-dict file) or ``"normswap"`` (:mod:`normswap.small`).
        weights: a torchvision weights name (loaded offline from the torch hub cache) or a
            state-dict file; the classification head is replaced to fit ``num_classes``.
        input_size: the side the network sees (images are resized to it); ``None`` keeps
            the data's size.

    Raises:
        ModelError: unknown model or weights, or weights not available offline.

    Example:
        >>> build_classifier("resnet18", 10, 1, input_size=32).adapter.size
        32
    """
    names = classification_models(source)
    sized = {"image_size": input_size} if input_size and ZOOS.get(source).takes_image_size else {}
    if weights is None:
        net = build_model(name, source=source, names=names, num_classes=num_classes, **sized)
    else:
        net = build_model(name, weights, source=source, names=names, **sized)
        net = replace_head(net, num_classes)
    return AdaptedModel(InputAdapter(in_channels, 3, input_size), net)


def build_segmenter(
    name: str,
    num_classes: int,
    in_channels: int,
    *,
    out_channels: int = 1,
    input_size: int | None = None,
) -> AdaptedModel:
    """A torchvision segmentation network with ``out_channels`` output maps (for denoising).

    ``num_classes`` (the data's) is ignored: a dense-prediction task decides its outputs.

    Example:
        >>> net = build_segmenter("lraspp_mobilenet_v3_large", 10, 1, input_size=64)
        >>> net(torch.zeros(2, 1, 28, 28))["out"].shape
        torch.Size([2, 1, 64, 64])
    """
    names = torchvision.models.list_models(module=torchvision.models.segmentation)
    net = build_model(name, names=names, num_classes=out_channels)
    return AdaptedModel(InputAdapter(in_channels, 3, input_size), net)
