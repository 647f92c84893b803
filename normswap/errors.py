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
    """Base class of every error normswap raises for bad input.

    Example:
        >>> try:
        ...     normswap.swap(nn.Sequential(nn.BatchNorm2d(4)), "gn", num_groups=3, policy="error")
        ... except normswap.NormSwapError as err:
        ...     print(type(err).__name__)
        SwapError
    """


class SpecError(NormSwapError):
    """A spec name, field or value is invalid (unknown norm, ``num_groups=0``, ...), or a
    registry refused a name (taken already, or unknown).

    Example:
        >>> normswap.get_spec("gn", num_groups=0)
        Traceback (most recent call last):
        ...
        normswap.errors.SpecError: num_groups must be a positive integer, got 0
    """


class SwapError(NormSwapError):
    """A swap plan has invalid steps; the model was left untouched.

    Attributes:
        problems: one ``(module_path, message)`` pair per offending module.

    Example:
        >>> try:
        ...     normswap.swap(nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4)), "in",
        ...                   example_inputs=torch.zeros(2, 2))
        ... except SwapError as err:
        ...     err.problems[0][0]
        '1'
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = list(problems or [])


class FoldError(SwapError):
    """A BatchNorm cannot be folded exactly into the layer that produces its input; nothing
    was modified.

    Example:
        >>> normswap.fold_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))  # training mode
        Traceback (most recent call last):
        ...
        normswap.errors.FoldError: cannot fold BatchNorm2d into Conv2d: BatchNorm2d is in ...
    """


class ApplyError(NormSwapError):
    """Executing an accepted plan failed part-way (a bug, or a registered target that raised);
    the model was put back exactly as it was before the swap.

    Example:
        >>> issubclass(ApplyError, NormSwapError)
        True
    """


class UnsupportedModuleError(NormSwapError):
    """A module cannot be converted as it is (custom ``forward``, uninitialized lazy BN,
    a TorchScript module, ...).

    Example:
        >>> normswap.swap(None, "gn")
        Traceback (most recent call last):
        ...
        normswap.errors.UnsupportedModuleError: the model must be a torch.nn.Module, got NoneType
    """


class TraceError(NormSwapError):
    """The model could not be traced with the example inputs given.

    Example:
        >>> normswap.trace(nn.Linear(3, 2), torch.zeros(1, 4))
        Traceback (most recent call last):
        ...
        normswap.errors.TraceError: tracing Linear failed with the given example_inputs: ...
    """


class ConditionError(NormSwapError):
    """An adaptive (conditional) norm ran without a condition, or with one of the wrong shape.

    Example:
        >>> normswap.AdaLN(4, cond_dim=2)(torch.zeros(1, 4, 3))
        Traceback (most recent call last):
        ...
        normswap.errors.ConditionError: AdaLN at AdaLN has no condition: call the model inside ...
    """


class CalibrationError(NormSwapError):
    """Calibration or distillation cannot run: bad data, a reference that is not the model
    before the swap, or a converted layer that no fitter knows. Nothing was modified.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        >>> normswap.convert_pretrained(net, "gn", torch.zeros(0, 3, 8, 8))
        Traceback (most recent call last):
        ...
        normswap.errors.CalibrationError: the conversion data is a tensor of shape (0, 3, 8, 8), ...
    """


class ModelError(NormSwapError):
    """Unknown model, unknown weights, or weights that cannot be found offline.

    Example:
        >>> from normswap.zoo import build_model
        >>> build_model("resnet")
        Traceback (most recent call last):
        ...
        normswap.errors.ModelError: unknown model 'resnet'; choose one of: alexnet, ...
    """


class DataError(NormSwapError):
    """Data that normswap was asked to read is missing or malformed.

    Example:
        >>> from normswap.data import load_images
        >>> load_images("/nonexistent", 32)
        Traceback (most recent call last):
        ...
        normswap.errors.DataError: ...
    """


class CLIError(NormSwapError):
    """Bad command-line input.

    Example:
        >>> from normswap.cli import parse_overrides
        >>> parse_overrides(["num_groups"])
        Traceback (most recent call last):
        ...
        normswap.errors.CLIError: --set expects key=value, got 'num_groups'
    """
