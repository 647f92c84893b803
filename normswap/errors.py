"""Every error normswap raises, in one hierarchy.

Every error a user can cause with bad input is a :class:`ValueError` subclass, so
``except ValueError`` keeps working for callers that do not care about the detail, and each
message names the fix (the module path, the value, the valid choices).

Example:
    >>> issubclass(SwapError, ValueError) and issubclass(FoldError, SwapError)
    True
"""

from __future__ import annotations

__all__ = [
    "ApplyError",
    "CLIError",
    "CalibrationError",
    "ConditionError",
    "DataError",
    "FoldError",
    "ModelError",
    "NormSwapError",
    "SpecError",
    "SwapError",
    "TraceError",
    "UnsupportedModuleError",
]


class NormSwapError(ValueError):
    """Base class of every error normswap raises for bad input."""


class SpecError(NormSwapError):
    """A spec name, field or value is invalid (unknown norm, ``num_groups=0``, ...), or a
    registry refused a name (taken already, or unknown)."""


class SwapError(NormSwapError):
    """A swap plan has invalid steps; the model was left untouched.

    Attributes:
        problems: one ``(module_path, message)`` pair per offending module.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = list(problems or [])


class FoldError(SwapError):
    """A BatchNorm cannot be folded exactly into the layer that produces its input; nothing
    was modified."""


class ApplyError(NormSwapError):
    """Executing an accepted plan failed part-way (a bug, or a model changed since it was
    planned); the model was put back exactly as it was before the swap."""


class UnsupportedModuleError(NormSwapError):
    """A module cannot be converted as it is (custom ``forward``, uninitialized lazy BN,
    a TorchScript module, ...)."""


class TraceError(NormSwapError):
    """The model could not be traced with the example inputs given."""


class ConditionError(NormSwapError):
    """An adaptive (conditional) norm ran without a condition, or with one of the wrong shape."""


class CalibrationError(NormSwapError):
    """Calibration or distillation cannot run: bad data, a reference that is not the model
    before the swap, or a converted layer that no fitter knows. Nothing was modified."""


class ModelError(NormSwapError):
    """Unknown model, unknown weights, or weights that cannot be found offline."""


class DataError(NormSwapError):
    """Data that normswap was asked to read is missing or malformed."""


class CLIError(NormSwapError):
    """Bad command-line input."""
