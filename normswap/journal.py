"""Record a model's state before surgery and put it back exactly if the surgery fails.

:func:`normswap.apply` executes a plan in several steps (build, fold, replace, reparameterize).
A plan that was accepted does not fail, but a bug, a ``KeyboardInterrupt`` or a custom target
can still stop it part-way: the :class:`Journal` then restores every module object as it was —
its class (a parametrization swaps it), its children, its parameters and buffers (the same
objects), its hooks and parametrizations, every other attribute — plus every parameter's
``requires_grad`` and the values of the tensors the plan writes in place (folded producers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["Journal"]


def _copy(value: Any) -> Any:
    """A shallow copy of a container attribute (its contents go back into the same object)."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (set, list)):
        return type(value)(value)
    return None


def _restore_into(obj: Any, saved: Any) -> None:
    if isinstance(obj, (dict, set)):
        obj.clear()
        obj.update(saved)
    else:  # list
        obj[:] = saved


class Journal:
    """What :meth:`rollback` needs to put ``model`` back as it is now.

    Args:
        model: the model about to be changed.
        writes: tensors whose values the change overwrites in place (they are copied).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
        >>> journal = Journal(model)
        >>> bn = model[1]
        >>> model[1] = nn.Identity()
        >>> journal.rollback()
        >>> model[1] is bn
        True
    """

    def __init__(self, model: nn.Module, writes: Iterable[torch.Tensor] = ()) -> None:
        self._modules: list[tuple[nn.Module, type, dict[str, tuple[Any, Any]]]] = []
        for module in dict.fromkeys(model.modules()):
            entries = {k: (v, _copy(v)) for k, v in vars(module).items()}
            self._modules.append((module, type(module), entries))
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._values = [(t, t.detach().clone()) for t in dict.fromkeys(writes)]

    def rollback(self) -> None:
        """Put every recorded module, flag and value back."""
        for module, cls, entries in self._modules:
            if type(module) is not cls:
                module.__class__ = cls
            state = vars(module)
            for key in [k for k in state if k not in entries]:
                del state[key]
            for key, (obj, saved) in entries.items():
                if saved is not None:
                    _restore_into(obj, saved)
                state[key] = obj
        for param, flag in self._flags:
            param.requires_grad_(flag)
        with torch.no_grad():
            for tensor, value in self._values:
                tensor.copy_(value)
