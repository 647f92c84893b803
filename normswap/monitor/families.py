"""Which family a norm layer is reported under: ``NormMonitor/<family>/<stat>``.

Found by :func:`family_of`, in this order:

1. the classes registered in :data:`MONITOR_FAMILIES`, looked up along the module's class
   hierarchy (MRO), so a subclass is found through its base and the most specific registration
   wins; every norm family registers its layers here (:func:`normswap.register_family`), and
   :func:`register_monitor_family` adds other classes (``nn.RMSNorm`` is ``"rms"``);
2. the source kind of every other source norm (``"bn"`` for BatchNorm flavours;
   :func:`normswap.sources.source_kind`);
3. the rules added with :func:`register_monitor_rule` (the ``wn`` family reports a conv/linear
   whose weight carries weight norm as ``"wn"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from normswap.errors import SpecError
from normswap.norms import BlendNorm, NormThen
from normswap.registry import TypeRegistry
from normswap.sources import source_kind

__all__ = [
    "MONITOR_FAMILIES",
    "WRAPPERS",
    "NormLayer",
    "check_monitor_name",
    "family_of",
    "find_norm_layers",
    "list_families",
    "register_monitor_family",
    "register_monitor_rule",
]

#: Layer classes -> the family name their statistics are logged under.
MONITOR_FAMILIES: TypeRegistry[str] = TypeRegistry("monitored norm class")
#: Wrapper classes -> the attribute holding the norm they wrap (reported as that norm).
WRAPPERS: TypeRegistry[str] = TypeRegistry("norm wrapper")
_RULES: list[tuple[Callable[[nn.Module], bool], str]] = []
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_monitor_name(name: object) -> str:
    """Return ``name`` if it can be part of a metric key, else raise.

    Example:
        >>> check_monitor_name("gn")
        'gn'
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError(
            f"a monitor family name must be letters, digits, '_', '.' or '-' (it becomes part of "
            f"metric keys such as 'NormMonitor/<family>/out_std'), got {name!r}"
        )
    return name


def register_monitor_family(cls: type[nn.Module], name: str) -> None:
    """Report modules of class ``cls`` (and its subclasses) under the family ``name``.

    Several classes may share a family name (``nn.GroupNorm`` and :class:`normswap.GroupNorm`
    are both ``"gn"``); registering a BatchNorm2d subclass as ``"mybn"`` takes it out of
    ``"bn"``.

    Raises:
        SpecError: ``cls`` is not an ``nn.Module`` subclass or is registered already, or the name
            is not a valid metric-key component.

    Example:
        >>> class ScaleNorm(nn.Module): ...
        >>> register_monitor_family(ScaleNorm, "scale")
        >>> family_of(ScaleNorm())
        'scale'
        >>> _ = MONITOR_FAMILIES.unregister(ScaleNorm)
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SpecError(f"register_monitor_family: cls must be an nn.Module subclass, got {cls!r}")
    MONITOR_FAMILIES.register(cls, check_monitor_name(name))


def register_monitor_rule(rule: Callable[[nn.Module], bool], name: str) -> None:
    """Report every module for which ``rule(module)`` holds under ``name`` (after the classes).

    Example:
        >>> register_monitor_rule(lambda m: getattr(m, "is_special", False), "special")
        >>> _RULES.pop()[1]
        'special'
    """
    if not callable(rule):
        raise SpecError(f"register_monitor_rule: rule must be callable, got {rule!r}")
    _RULES.append((rule, check_monitor_name(name)))


def list_families() -> list[str]:
    """The family names modules can be reported under, sorted.

    Example:
        >>> list_families()[:3]
        ['adalin', 'adaln', 'bn']
    """
    return sorted({*(v for _, v in MONITOR_FAMILIES.items()), "bn", *(n for _, n in _RULES)})


def family_of(module: nn.Module) -> str | None:
    """The norm family of ``module``, or ``None`` when it is not a norm layer.

    Example:
        >>> family_of(nn.BatchNorm2d(4)), family_of(nn.GroupNorm(2, 4)), family_of(nn.ReLU())
        ('bn', 'gn', None)
    """
    inner = WRAPPERS.lookup(module)
    if inner is not None:  # a wrapper is reported as the norm it wraps
        return family_of(getattr(module, inner))
    name = MONITOR_FAMILIES.lookup(module)
    if name is not None:
        return name
    kind = source_kind(module)
    if kind is not None:
        return kind
    for rule, rule_name in _RULES:
        if rule(module):
            return rule_name
    return None


@dataclass(frozen=True)
class NormLayer:
    """One norm layer of a model, as the statistics see it.

    Attributes:
        path: module path in the model (its first path, for a shared instance).
        family: its family name (:func:`family_of`).
        module: the module itself.

    Example:
        >>> find_norm_layers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))[0].path
        '1'
    """

    path: str
    family: str
    module: nn.Module = field(repr=False, compare=False)


def find_norm_layers(model: nn.Module, families: Sequence[str] | None = None) -> list[NormLayer]:
    """Every norm layer of ``model`` in ``named_modules()`` order, one per module instance.

    Args:
        model: the model to inspect.
        families: keep only layers of these families; ``None`` keeps every family.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8))
        >>> [(n.path, n.family) for n in find_norm_layers(model)]
        [('1', 'bn'), ('2', 'gn')]
    """
    wanted = None if families is None else set(families)
    layers = []
    for path, module in model.named_modules():
        family = family_of(module)
        if family is not None and (wanted is None or family in wanted):
            layers.append(NormLayer(path or "<root>", family, module))
    return layers


register_monitor_family(nn.RMSNorm, "rms")
WRAPPERS.register(NormThen, "norm")
WRAPPERS.register(BlendNorm, "target")
