"""Register and remove parametrizations so that they change one module only.

:mod:`torch.nn.utils.parametrize` makes a module parametrized by giving it a new class
(``ParametrizedConv2d``) that holds one property per parametrized tensor. A deep copy of the
module shares that class with the original (``copy.deepcopy`` keeps ``type(module)``), so
:func:`torch.nn.utils.parametrize.remove_parametrizations` on the copy deletes the property from
the original's class too, and the original loses its ``weight``; registering a parametrization on
a copy that is already parametrized adds a property to the original's class. Users copy models all
the time (an export copy at the end of training, EMA and ``AveragedModel`` copies, the reference
copy of :func:`normswap.convert_pretrained`).

:func:`own_class` gives a module a parametrized class of its own (same name, same bases, same
properties) before it is changed, and :func:`register_parametrization` and
:func:`remove_parametrizations` do that first: every normswap operation that adds or removes a
parametrization goes through them. This uses only what torch documents — a parametrized module's
class derives from the class it had, and registering or removing changes ``type(module)`` — and
does not depend on whether a copy shares the class (``tests/norms/test_reparam.py`` pins both).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["own_class", "register_parametrization", "remove_parametrizations"]

#: Class attributes that ``type()`` creates itself and that cannot be passed in a namespace.
_CREATED_BY_TYPE = frozenset({"__dict__", "__weakref__"})


def own_class(module: nn.Module) -> None:
    """Give a parametrized ``module`` a class of its own, so changing it changes nothing else.

    The new class has the same name, qualified name, bases and attributes (the parametrized
    properties included): the module computes, prints and checks (``isinstance``,
    :func:`~torch.nn.utils.parametrize.type_before_parametrizations`) as before. A module that
    is not parametrized has its own class anyway (torch makes one when it first registers) and
    is left alone.

    Args:
        module: any module.

    Example:
        >>> import copy
        >>> conv = normswap.weight_norm(nn.Conv2d(2, 4, 3))
        >>> twin = copy.deepcopy(conv)
        >>> type(twin) is type(conv)  # torch's deep copy shares the parametrized class
        True
        >>> own_class(twin)
        >>> type(twin) is type(conv), type(twin).__name__
        (False, 'ParametrizedConv2d')
    """
    if not parametrize.is_parametrized(module):
        return
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in _CREATED_BY_TYPE}
    namespace["__qualname__"] = cls.__qualname__
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def register_parametrization(
    module: nn.Module, tensor_name: str, parametrization: nn.Module, *, unsafe: bool = False
) -> nn.Module:
    """:func:`torch.nn.utils.parametrize.register_parametrization` on ``module`` alone.

    A module that is already parametrized (a copy may share its class with the original) first
    gets a class of its own (:func:`own_class`), so the new property is added to it only.

    Args:
        module: the module whose tensor is parametrized.
        tensor_name: the parameter or buffer to parametrize (``"weight"``).
        parametrization: the parametrization module.
        unsafe: passed to torch (skips torch's consistency checks).

    Returns:
        ``module``.

    Example:
        >>> from normswap.norms.weight import WeightStandardization
        >>> conv = register_parametrization(nn.Conv2d(2, 4, 3), "weight", WeightStandardization())
        >>> type(conv).__name__
        'ParametrizedConv2d'
    """
    own_class(module)
    return parametrize.register_parametrization(module, tensor_name, parametrization, unsafe=unsafe)


def remove_parametrizations(
    module: nn.Module, tensor_name: str, *, leave_parametrized: bool = True
) -> nn.Module:
    """:func:`torch.nn.utils.parametrize.remove_parametrizations` on ``module`` alone.

    ``module`` first gets a class of its own (:func:`own_class`), so removing the property does
    not remove it from a copy's or the original's class.

    Args:
        module: a module whose ``tensor_name`` is parametrized.
        tensor_name: the parametrized tensor.
        leave_parametrized: keep the current (parametrized) value as the plain tensor.

    Returns:
        ``module``.

    Example:
        >>> import copy
        >>> conv = normswap.weight_norm(nn.Conv2d(2, 4, 3))
        >>> twin = copy.deepcopy(conv)
        >>> _ = remove_parametrizations(twin, "weight")
        >>> type(twin).__name__, conv(torch.randn(1, 2, 5, 5)).shape  # conv still works
        ('Conv2d', torch.Size([1, 4, 3, 3]))
    """
    own_class(module)
    return parametrize.remove_parametrizations(
        module, tensor_name, leave_parametrized=leave_parametrized
    )
