"""Replacing modules inside a model: where they sit, and what a replacement takes over."""

from __future__ import annotations

from torch import nn

__all__ = ["module_paths", "set_module", "take_hooks"]


def module_paths(model: nn.Module) -> dict[int, tuple[nn.Module, list[str]]]:
    """Map ``id(module)`` to ``(module, every path at which it occurs)``, in module order.

    Example:
        >>> bn = nn.BatchNorm2d(4)
        >>> [p for _, p in module_paths(nn.Sequential(bn, bn)).values()][1]
        ['0', '1']
    """
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        found.setdefault(id(module), (module, []))[1].append(path)
    return found


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (dotted) inside ``model``; works for every container.

    Example:
        >>> m = nn.Sequential(nn.Sequential(nn.BatchNorm2d(2)))
        >>> set_module(m, "0.0", nn.Identity()); type(m[0][0]).__name__
        'Identity'
    """
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if name not in parent._modules:
        raise KeyError(f"{path!r} is not a child module of {type(parent).__name__}")
    parent._modules[name] = new


#: The hook tables a replacement takes over from the module it replaces.
_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def take_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward/backward hooks registered on ``old``: the same tables, so the
    handles the user holds still remove them. ``old`` itself is not changed.

    Example:
        >>> old, new = nn.BatchNorm1d(2), nn.GroupNorm(1, 2)
        >>> handle = old.register_forward_hook(lambda *_: None)
        >>> take_hooks(old, new); len(new._forward_hooks)
        1
    """
    if not any(getattr(old, name, None) for name in _HOOKS):
        return
    for name in _HOOKS:
        if name in vars(old) and not getattr(new, name, None):
            vars(new)[name] = vars(old)[name]
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook
