"""Build models by name from a model zoo (torchvision, timm), offline-aware.

Each zoo is a :class:`ModelZoo` in the :data:`ZOOS` registry: how to list its model names and
build one with random weights; weights come by torchvision name (from the torch hub cache) or
from a state-dict file (loaded with ``weights_only=True``). Nothing here downloads: a weights
name that is not in the local cache gives an error naming the file to put where.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from normswap.errors import ModelError
from normswap.meta import init_on_meta
from normswap.registry import Registry
from normswap.small import SMALL_CLASSIFIERS, SMALL_MODELS

__all__ = ["ZOOS", "ModelError", "ModelZoo", "build_model", "list_zoo_models", "replace_head"]


@dataclass(frozen=True)
class ModelZoo:
    """A source of models by name.

    Attributes:
        name: the zoo's name (``model.source=`` in the Hydra app, ``--source`` in the CLI).
        names: lists the model names it builds.
        create: builds a model with random weights: ``create(name, **kwargs)``.
        named_weights: loads a model with weights by name (``None``: the zoo has none offline).
        requires: the package the zoo needs, named in the error when it is missing.
        classifiers: lists the image-classification models among ``names`` (default: all).
        takes_image_size: its classifiers are built for one input size, passed as
            ``image_size=`` (the app's ``model.input_size``).

    Example:
        >>> ZOOS.get("torchvision").create("resnet18", num_classes=3).fc.out_features
        3
    """

    name: str
    names: Callable[[], list[str]]
    create: Callable[..., nn.Module]
    named_weights: Callable[..., nn.Module] | None = None
    requires: str = ""
    classifiers: Callable[[], list[str]] | None = None
    takes_image_size: bool = False

    def classifier_names(self) -> list[str]:
        """The image-classification model names of the zoo.

        Example:
            >>> "fcn_resnet50" in ZOOS.get("torchvision").classifier_names()
            False
        """
        self.available()
        return (self.classifiers or self.names)()

    def available(self) -> None:
        """Refuse a zoo whose package is not installed, naming the install command.

        Example:
            >>> ZOOS.get("torchvision").available()
        """
        if self.requires and importlib.util.find_spec(self.requires) is None:
            raise ModelError(
                f"model source {self.name!r} needs the package {self.requires!r}: "
                f"pip install {self.requires}"
            )


#: The model zoos, by name.
ZOOS: Registry[str, ModelZoo] = Registry("model source")


def _torchvision_create(name: str, **kwargs: Any) -> nn.Module:
    builder_params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    # Never fetch a pretrained backbone behind the user's back (segmentation/detection
    # builders default to one): weights=None means random weights everywhere.
    no_backbone = {"weights_backbone": None} if "weights_backbone" in builder_params else {}
    return torchvision.models.get_model(name, weights=None, **no_backbone, **kwargs)


def _torchvision_weights(name: str, weights: str, **kwargs: Any) -> nn.Module:
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


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _timm_create(name: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


ZOOS.register(
    "torchvision",
    ModelZoo(
        "torchvision",
        torchvision.models.list_models,
        _torchvision_create,
        _torchvision_weights,
        classifiers=lambda: torchvision.models.list_models(module=torchvision.models),
    ),
)
ZOOS.register("timm", ModelZoo("timm", _timm_names, _timm_create, None, requires="timm"))


ZOOS.register(
    "normswap",
    ModelZoo(
        "normswap",
        lambda: sorted(SMALL_MODELS),
        lambda name, **kwargs: SMALL_MODELS.get(name)(**kwargs),
        None,
        classifiers=lambda: list(SMALL_CLASSIFIERS),
        takes_image_size=True,
    ),
)


def list_zoo_models(source: str = "torchvision") -> list[str]:
    """The model names ``source`` builds.

    Example:
        >>> "resnet18" in list_zoo_models("torchvision")
        True
    """
    zoo = ZOOS.get(source)
    zoo.available()
    return zoo.names()


def build_model(
    name: str,
    weights: str | None = None,
    *,
    source: str = "torchvision",
    meta: bool = False,
    names: list[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name from a zoo, with optional weights (a weights name or a file).

    Args:
        name: a model name of the zoo (``torchvision.models.list_models()``,
            ``timm.list_models()``).
        weights: a torchvision weights name (``"IMAGENET1K_V1"``, ``"DEFAULT"``) loaded
            through torchvision's cache, or the path of a state-dict checkpoint (loaded with
            ``weights_only=True``). timm's named weights live on the Hugging Face hub, which
            this library never downloads from: pass a state-dict file.
        source: the zoo: ``"torchvision"`` (default) or ``"timm"``.
        meta: build on the meta device (no memory; for inspection only).
        names: the allowed names (default: every model of the zoo).
        **kwargs: passed to the builder (e.g. ``num_classes`` when ``weights`` is None).

    Raises:
        ModelError: unknown zoo or model (the valid names are listed), weights that cannot be
            found, or a zoo whose package is not installed.

    Example:
        >>> type(build_model("resnet18", meta=True)).__name__
        'ResNet'
    """
    zoo = ZOOS.get(source)
    zoo.available()
    names = zoo.names() if names is None else names
    if name not in names:
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise ModelError(f"unknown model {name!r}; choose one of: {shown} (from {source})")
    if weights is None:
        if meta:
            with init_on_meta():
                return zoo.create(name, **kwargs)
        return zoo.create(name, **kwargs)
    path = Path(weights)
    if path.suffix in {".pt", ".pth", ".ckpt", ".bin"} or path.exists():
        if not path.is_file():
            raise ModelError(f"weights file {str(path)!r} does not exist")
        model = zoo.create(name, **kwargs)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
        return model
    if zoo.named_weights is None:
        raise ModelError(
            f"{source} loads named weights ({weights!r}) from the internet, which normswap never "
            "does: pass the path of a state-dict file as the weights"
        )
    return zoo.named_weights(name, weights, **kwargs)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give a pretrained classifier a new last layer with ``num_classes`` outputs.

    A model with timm's ``reset_classifier`` gets it called; otherwise the last ``nn.Linear`` in
    module order (torchvision's ``fc``/``classifier``/``head``) is replaced by a fresh one with
    the same input size, device and dtype.

    Raises:
        ModelError: the model has no ``nn.Linear``.

    Example:
        >>> model = replace_head(torchvision.models.resnet18(), 10)
        >>> model.fc.out_features
        10
    """
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        reset(num_classes)
        return model
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
