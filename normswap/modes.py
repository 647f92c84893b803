"""Train/eval flags: switch a model to eval for a while, and give a converted model its
module-by-module flags back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode", "restore_training_flags", "training_flags"]


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put every module in eval mode, restoring each module's own flag afterwards.

    Example:
        >>> net = nn.Sequential(nn.Dropout(), nn.BatchNorm1d(2).eval())
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def training_flags(model: nn.Module) -> dict[str, bool]:
    """Each path's training flag (every path of a shared module).

    Example:
        >>> training_flags(nn.Sequential(nn.ReLU()).eval())
        {'': False, '0': False}
    """
    return {path: m.training for path, m in model.named_modules(remove_duplicate=False)}


def restore_training_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    """Give each path its flag from ``flags``, also where the module at that path is new.

    A module at a recorded path takes that path's flag (a converted norm takes its
    BatchNorm's); a module at a new path takes its parent's (an AdaLN's modulation MLP).

    Example:
        >>> net = nn.Sequential(nn.BatchNorm1d(2))
        >>> flags = training_flags(net)
        >>> _ = net.eval()
        >>> net[0] = nn.GroupNorm(1, 2).eval()
        >>> restore_training_flags(net, flags); net[0].training
        True
    """
    restored: dict[str, bool] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        parent = path.rpartition(".")[0]
        flag = flags.get(path, restored.get(parent, flags.get("", module.training)))
        module.training = flag
        restored[path] = flag
