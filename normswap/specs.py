"""Specs: small frozen dataclasses that say what a norm should become.

A spec carries no behaviour beyond validating its own fields. The planner reads it, the
target registry (:mod:`normswap.targets`) turns it into layers. Python users build specs
directly; the Hydra app builds the same dataclasses from YAML; ``swap(model, "gn",
num_groups=16)`` builds one by registered name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from normswap.errors import SpecError

__all__ = [
    "AdaLINSpec",
    "AdaLNSpec",
    "GroupNormSpec",
    "InstanceNormSpec",
    "LayerNorm2dSpec",
    "LayerNormSpec",
    "NormSpec",
    "WSGroupNormSpec",
    "WeightNormSpec",
    "get_spec",
    "list_norms",
    "register_norm",
    "spec_class",
    "spec_from_dict",
]

GroupPolicy = Literal["divisor", "error"]
BNPolicy = Literal["keep", "remove", "fold"]
UnfoldablePolicy = Literal["error", "keep", "remove"]

_SPECS: dict[str, type[NormSpec]] = {}


def register_norm(name: str):
    """Register a spec class under ``name`` so ``swap(model, name)`` can build it.

    Refuses a name that is already taken, naming the class that holds it.

    Example:
        >>> @register_norm("my_gn")  # doctest: +SKIP
        ... @dataclass(frozen=True)
        ... class MyGNSpec(GroupNormSpec): ...
    """

    def decorator(cls: type[NormSpec]) -> type[NormSpec]:
        if name in _SPECS:
            raise SpecError(
                f"norm name {name!r} is already registered by {_SPECS[name].__qualname__}; "
                "pick another name"
            )
        cls.name = name
        _SPECS[name] = cls
        return cls

    return decorator


def list_norms() -> list[str]:
    """Return the registered norm names, sorted.

    Example:
        >>> "gn" in list_norms()
        True
    """
    return sorted(_SPECS)


def spec_class(name: str) -> type[NormSpec]:
    """The spec class registered under ``name`` (to read its fields without building one).

    Raises:
        SpecError: an unknown name, listing the registered ones.

    Example:
        >>> spec_class("gn").__name__
        'GroupNormSpec'
    """
    if name not in _SPECS:
        raise SpecError(f"unknown norm {name!r}; choose one of: {', '.join(sorted(_SPECS))}")
    return _SPECS[name]


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
        key = spec.strip().lower()
        if key not in _SPECS:
            raise SpecError(f"unknown norm {spec!r}; choose one of: {', '.join(list_norms())}")
        cls = _SPECS[key]
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
        >>> spec_from_dict(GroupNormSpec(num_groups=8).to_dict()).num_groups
        8
    """
    data = dict(data)
    name = data.pop("name", None)
    if name is None:
        raise SpecError("spec dictionary has no 'name' key")
    return get_spec(name, **data)


def _check_eps(eps: float | None) -> None:
    if eps is not None and (not isinstance(eps, (int, float)) or not eps > 0):
        raise SpecError(f"eps must be a positive number or None (keep the source's), got {eps!r}")


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{field_name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive_int(field_name: str, value: Any, *, optional: bool = False) -> None:
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
    """

    name: ClassVar[str] = ""
    eps: float | None = None
    trainable: bool | None = None

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        if self.trainable not in (None, True, False):
            raise SpecError(f"trainable must be None, True or False, got {self.trainable!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a plain dictionary with its registered ``name``.

        Example:
            >>> GroupNormSpec().to_dict()["name"]
            'gn'
        """
        return {"name": self.name, **dataclasses.asdict(self)}


@register_norm("gn")
@dataclass(frozen=True)
class GroupNormSpec(NormSpec):
    """GroupNorm with ``num_groups`` groups or ``group_size`` channels per group.

    Attributes:
        num_groups: groups per layer (the GN paper's default is 32).
        group_size: channels per group; when set, it wins over ``num_groups``.
        policy: ``"divisor"`` uses the largest divisor of C not above the request (each
            decision is reported); ``"error"`` refuses layers whose C does not divide.

    Example:
        >>> GroupNormSpec(num_groups=16).num_groups
        16
    """

    num_groups: int | None = 32
    group_size: int | None = None
    policy: GroupPolicy = "divisor"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_groups is None and self.group_size is None:
            raise SpecError("give num_groups or group_size (both are None)")
        _check_positive_int("num_groups", self.num_groups, optional=True)
        _check_positive_int("group_size", self.group_size, optional=True)
        _check_choice("policy", self.policy, ("divisor", "error"))


@register_norm("ln")
@dataclass(frozen=True)
class LayerNormSpec(NormSpec):
    """LayerNorm over (C, *S) per sample with a per-channel affine (the GN paper's LN).

    Example:
        >>> LayerNormSpec(eps=1e-6).eps
        1e-06
    """


@register_norm("ln2d")
@dataclass(frozen=True)
class LayerNorm2dSpec(NormSpec):
    """Channels-only LayerNorm at every position (ConvNeXt style).

    Example:
        >>> LayerNorm2dSpec().name
        'ln2d'
    """


@register_norm("in")
@dataclass(frozen=True)
class InstanceNormSpec(NormSpec):
    """InstanceNorm with affine; optionally tracking running statistics.

    Attributes:
        track_running_stats: keep running mean/var for eval (initialised from the BN's).
        momentum: running-statistics momentum when tracking.

    Example:
        >>> InstanceNormSpec(track_running_stats=True).track_running_stats
        True
    """

    track_running_stats: bool = False
    momentum: float | None = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.momentum is not None and not 0.0 <= self.momentum <= 1.0:
            raise SpecError(f"momentum must be in [0, 1] or None, got {self.momentum!r}")


@register_norm("adalin")
@dataclass(frozen=True)
class AdaLINSpec(NormSpec):
    """U-GAT-IT's AdaLIN: a learnable per-channel mix ρ of IN and LN statistics.

    Attributes:
        rho_init: initial ρ in [0, 1] (1 = pure InstanceNorm, 0 = pure LayerNorm).

    Example:
        >>> AdaLINSpec(rho_init=0.5).rho_init
        0.5
    """

    rho_init: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rho_init, (int, float)) or not 0.0 <= self.rho_init <= 1.0:
            raise SpecError(f"rho_init must be in [0, 1], got {self.rho_init!r}")


@register_norm("adaln")
@dataclass(frozen=True)
class AdaLNSpec(NormSpec):
    """Conditional AdaLN (DiT adaLN-Zero style): LN modulated by a condition vector.

    The modulation MLP starts at zero, so the converted model computes exactly what a
    plain LayerNorm swap computes until it learns otherwise. Pass the condition with
    ``with normswap.condition(model, c): model(x)``.

    Attributes:
        cond_dim: size of the condition vector (required).
        hidden_dim: hidden width of the modulation MLP (``None``: a single linear layer).
        gate: also predict a multiplicative gate.

    Example:
        >>> AdaLNSpec(cond_dim=8).cond_dim
        8
    """

    cond_dim: int | None = None
    hidden_dim: int | None = None
    gate: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cond_dim is None:
            raise SpecError(
                "adaln needs the condition size: e.g. swap(model, 'adaln', cond_dim=16) "
                "or norm.cond_dim=16"
            )
        _check_positive_int("cond_dim", self.cond_dim)
        _check_positive_int("hidden_dim", self.hidden_dim, optional=True)


@register_norm("wn")
@dataclass(frozen=True)
class WeightNormSpec(NormSpec):
    """Weight normalization on conv/linear layers, with a policy for the BatchNorms.

    Attributes:
        bn: ``"fold"`` folds each eval-mode BN into the conv/linear producing its input
            (exact: outputs unchanged), ``"remove"`` replaces BNs with identity,
            ``"keep"`` leaves them.
        unfoldable: with ``bn="fold"``, what to do with a BN that cannot be folded exactly
            (its input comes from a concat, or feeds other layers too): ``"error"`` refuses
            the swap and lists them, ``"keep"`` leaves them, ``"remove"`` removes them.
        layers: which layer kinds get weight norm: any of ``"conv"``, ``"linear"``.

    Example:
        >>> WeightNormSpec(bn="remove").bn
        'remove'
    """

    bn: BNPolicy = "fold"
    unfoldable: UnfoldablePolicy = "error"
    layers: tuple[str, ...] = field(default=("conv", "linear"))

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("bn", self.bn, ("keep", "remove", "fold"))
        _check_choice("unfoldable", self.unfoldable, ("error", "keep", "remove"))
        layers = tuple(self.layers) if not isinstance(self.layers, str) else (self.layers,)
        object.__setattr__(self, "layers", layers)
        for kind in layers:
            _check_choice("layers", kind, ("conv", "linear"))


@register_norm("ws_gn")
@dataclass(frozen=True)
class WSGroupNormSpec(GroupNormSpec):
    """Weight-standardized convolutions plus GroupNorm (BiT style).

    Standardizing a pretrained conv changes what it computes; use this for training.

    Attributes:
        ws_eps: epsilon of the weight standardization (1e-6, as timm's StdConv2d: PyTorch's
            default conv init gives per-channel weight variances near 1e-4, which a larger
            eps would visibly shrink).

    Example:
        >>> WSGroupNormSpec(num_groups=32).ws_eps
        1e-06
    """

    ws_eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.ws_eps, (int, float)) or not self.ws_eps > 0:
            raise SpecError(f"ws_eps must be a positive number, got {self.ws_eps!r}")
