"""Specs: small frozen dataclasses that say what a norm should become.

A spec carries no behaviour beyond validating its own fields. Each norm family
(:mod:`normswap.families`) defines its spec next to its target, and registering the family
puts the spec here under the family's name, so ``swap(model, "gn", num_groups=16)`` can build
one by name. Python users build specs directly; the Hydra app builds the same dataclasses from
YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from normswap.errors import SpecError
from normswap.registry import Registry

__all__ = [
    "SPECS",
    "NormSpec",
    "check_choice",
    "check_eps",
    "check_positive_int",
    "get_spec",
    "list_norms",
    "spec_class",
    "spec_from_dict",
]

#: Registered norm names -> spec classes (filled by :func:`normswap.register_family`).
SPECS: Registry[str, type[NormSpec]] = Registry("norm")


def list_norms() -> list[str]:
    """Return the registered norm names, sorted.

    Example:
        >>> "gn" in list_norms()
        True
    """
    return sorted(SPECS)


def spec_class(name: str) -> type[NormSpec]:
    """The spec class registered under ``name`` (to read its fields without building one).

    Raises:
        SpecError: an unknown name, listing the registered ones.

    Example:
        >>> spec_class("gn").__name__
        'GroupNormSpec'
    """
    return SPECS.get(name)


def get_spec(spec: NormSpec | str, **overrides: Any) -> NormSpec:
    """Build a spec from a registered name (with field overrides), or update a spec object.

    Args:
        spec: a spec instance or a registered name such as ``"gn"``.
        **overrides: field values, e.g. ``num_groups=16``.

    Returns:
        A validated, frozen spec.

    Raises:
        SpecError: unknown name (the valid names are listed), unknown field (the valid
            fields are listed) or an invalid value.

    Example:
        >>> get_spec("gn", num_groups=16).num_groups
        16
    """
    if isinstance(spec, NormSpec):
        cls = type(spec)
        base = dataclasses.asdict(spec)
    elif isinstance(spec, str):
        cls = SPECS.get(spec)
        base = {}
    else:
        raise SpecError(
            f"spec must be a NormSpec or a norm name, not {type(spec).__name__}; "
            f"choose one of: {', '.join(list_norms())}"
        )
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise SpecError(
            f"{cls.name!r} has no field(s) {', '.join(unknown)}; valid fields: {', '.join(names)}"
        )
    return cls(**{**base, **overrides})


def spec_from_dict(data: dict[str, Any]) -> NormSpec:
    """Rebuild a spec from :meth:`NormSpec.to_dict` output (e.g. read from a checkpoint).

    Example:
        >>> spec_from_dict(get_spec("gn", num_groups=8).to_dict()).num_groups
        8
    """
    data = dict(data)
    name = data.pop("name", None)
    if name is None:
        raise SpecError("spec dictionary has no 'name' key")
    return get_spec(name, **data)


def check_eps(eps: float | None) -> None:
    """Refuse an ``eps`` that is not ``None`` or a positive number (for spec authors).

    Example:
        >>> check_eps(0.0)
        Traceback (most recent call last):
        ...
        normswap.errors.SpecError: eps must be a positive number or None (keep the source's), ...
    """
    if eps is not None and (not isinstance(eps, (int, float)) or not eps > 0):
        raise SpecError(f"eps must be a positive number or None (keep the source's), got {eps!r}")


def check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Refuse a ``value`` of field ``field_name`` that is not one of ``choices``.

    Example:
        >>> check_choice("policy", "round", ("divisor", "error"))
        Traceback (most recent call last):
        ...
        normswap.errors.SpecError: policy must be one of divisor, error; got 'round'
    """
    if value not in choices:
        raise SpecError(f"{field_name} must be one of {', '.join(choices)}; got {value!r}")


def check_positive_int(field_name: str, value: Any, *, optional: bool = False) -> None:
    """Refuse a ``value`` of field ``field_name`` that is not a positive ``int`` (``None`` is
    allowed when ``optional``).

    Example:
        >>> check_positive_int("num_groups", None, optional=True)
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{field_name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class NormSpec:
    """Base of every spec.

    Attributes:
        eps: epsilon of the new norm; ``None`` keeps the source BatchNorm's eps (1e-3 in
            EfficientNet, MobileNetV3, ...), which a pretrained model needs.
        trainable: ``None`` carries each source's ``requires_grad`` over (a frozen BN
            becomes a frozen norm); ``True``/``False`` forces it for the new parameters.

    Example:
        >>> spec = get_spec("ln", eps=1e-6)
        >>> isinstance(spec, NormSpec), spec.to_dict()
        (True, {'name': 'ln', 'eps': 1e-06, 'trainable': None})
    """

    name: ClassVar[str] = ""
    eps: float | None = None
    trainable: bool | None = None

    def __post_init__(self) -> None:
        check_eps(self.eps)
        if self.trainable not in (None, True, False):
            raise SpecError(f"trainable must be None, True or False, got {self.trainable!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a plain dictionary with its registered ``name``.

        Example:
            >>> get_spec("gn").to_dict()["name"]
            'gn'
        """
        return {"name": self.name, **dataclasses.asdict(self)}
