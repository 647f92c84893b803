"""Build torchvision models by name, with weights by name or from a file, offline-aware."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from normswap.errors import ModelError
from normswap.meta import init_on_meta

__all__ = ["ModelError", "build_model", "replace_head"]


def build_model(
    name: str,
    weights: str | None = None,
    *,
    meta: bool = False,
    names: list[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a torchvision model by name, with optional weights (a weights name or a file).

    Args:
        name: any name from ``torchvision.models.list_models()``.
        weights: a torchvision weights name (``"IMAGENET1K_V1"``, ``"DEFAULT"``) loaded
            through torchvision's cache, or the path of a state-dict checkpoint (loaded with
            ``weights_only=True``).
        meta: build on the meta device (no memory; for inspection only).
        names: the allowed names (default: every torchvision model).
        **kwargs: passed to the builder (e.g. ``num_classes`` when ``weights`` is None).

    Raises:
        ModelError: unknown model (the valid names are listed), weights that cannot be found.

    Example:
        >>> type(build_model("resnet18", meta=True)).__name__
        'ResNet'
    """
    names = torchvision.models.list_models() if names is None else names
    if name not in names:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(names)}")
    builder_params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    # Never fetch a pretrained backbone behind the user's back (segmentation/detection
    # builders default to one): weights=None means random weights everywhere.
    no_backbone = {"weights_backbone": None} if "weights_backbone" in builder_params else {}
    if weights is None:
        if meta:
            with init_on_meta():
                return torchvision.models.get_model(name, weights=None, **no_backbone, **kwargs)
        return torchvision.models.get_model(name, weights=None, **no_backbone, **kwargs)
    path = Path(weights)
    if path.suffix in {".pt", ".pth", ".ckpt", ".bin"} or path.exists():
        if not path.is_file():
            raise ModelError(f"weights file {str(path)!r} does not exist")
        model = torchvision.models.get_model(name, weights=None, **no_backbone, **kwargs)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
        return model
    enum = torchvision.models.get_model_weights(name)
    valid = [w.name for w in enum]
    if weights not in (*valid, "DEFAULT"):
        raise ModelError(
            f"model {name!r} has no weights {weights!r}; choose one of: {', '.join(valid)}, "
            "DEFAULT, or a path to a state-dict file"
        )
    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except (OSError, RuntimeError) as err:  # a download was attempted and failed
        url = (enum.DEFAULT if weights == "DEFAULT" else enum[weights]).url
        raise ModelError(
            f"could not load {name} weights {weights!r} ({type(err).__name__}): this machine "
            f"cannot download them; put {url.rsplit('/', 1)[-1]} into "
            f"{torch.hub.get_dir()}/checkpoints/ (or set TORCH_HOME), "
            "or pass --weights PATH to a state-dict file"
        ) from err


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give a pretrained classifier a new last layer with ``num_classes`` outputs.

    The last ``nn.Linear`` in module order (torchvision's ``fc``/``classifier``/``head``) is
    replaced by a fresh one with the same input size, device and dtype.

    Raises:
        ModelError: the model has no ``nn.Linear``.

    Example:
        >>> model = replace_head(torchvision.models.resnet18(), 10)
        >>> model.fc.out_features
        10
    """
    last = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (path, module)
    if last is None:
        raise ModelError(f"{type(model).__name__} has no nn.Linear head to resize")
    path, old = last
    if old.out_features == num_classes:
        return model
    new = nn.Linear(
        old.in_features,
        num_classes,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[attr] = new
    return model
