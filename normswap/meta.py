"""Build models on the meta device, also those whose constructors compute with tensors.

``with torch.device("meta")`` fails for models whose ``__init__`` reads tensor values
(torchvision's RegNet computes its widths with ``torch.pow(...).tolist()``).
:func:`init_on_meta` instead moves every parameter and buffer to the meta device as it is
registered, so construction reads real values where it needs them and keeps nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["init_on_meta"]


@contextmanager
def init_on_meta() -> Iterator[None]:
    """Construct modules with their parameters and buffers on the meta device.

    Each tensor is allocated (uninitialized) only while its own layer is being built and
    is moved to meta when registered, so peak memory is one layer, not the model.

    Example:
        >>> import torchvision
        >>> with init_on_meta():
        ...     model = torchvision.models.regnet_y_400mf()
        >>> next(model.parameters()).device.type
        'meta'
    """
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

    def _parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(self, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(param)
            self._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    def _buffer(
        self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        if tensor is not None:
            tensor = tensor.to("meta")
        register_buffer(self, name, tensor, persistent=persistent)

    nn.Module.register_parameter = _parameter
    nn.Module.register_buffer = _buffer
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter
        nn.Module.register_buffer = register_buffer
