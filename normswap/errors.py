"""Typed errors raised by normswap.

Every error a user can cause with bad input is a :class:`ValueError` subclass, so
``except ValueError`` keeps working for callers that do not care about the detail.
"""

from __future__ import annotations

__all__ = [
    "ConditionError",
    "FoldError",
    "NormSwapError",
    "SpecError",
    "SwapError",
    "TraceError",
    "UnsupportedModuleError",
]


class NormSwapError(ValueError):
    """Base class of every error normswap raises for bad input."""


class SpecError(NormSwapError):
    """A spec name, field or value is invalid (unknown norm, ``num_groups=0``, ...)."""


class SwapError(NormSwapError):
    """A swap plan has invalid steps; the model was left untouched.

    Attributes:
        problems: one ``(module_path, message)`` pair per offending module.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = list(problems or [])


class UnsupportedModuleError(NormSwapError):
    """A module cannot be converted as it is (custom ``forward``, uninitialized lazy BN, ...)."""


class TraceError(NormSwapError):
    """The model could not be traced with the example inputs given."""


class FoldError(NormSwapError):
    """A BatchNorm cannot be folded exactly into the layer that produces its input."""


class ConditionError(NormSwapError):
    """An adaptive (conditional) norm ran without a condition, or with one of the wrong shape."""
