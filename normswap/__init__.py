"""normswap: replace BatchNorm in any PyTorch model with the normalization you need.

Example:
    >>> import torchvision, normswap
    >>> model = torchvision.models.resnet50()
    >>> report = normswap.swap(model, "gn")
    >>> print(report)  # doctest: +SKIP
"""

from __future__ import annotations

from normswap.calibrate import CalibrationError, CalibrationReport, calibrate, register_fitter
from normswap.distill import DistillReport, Fidelity, distill, fidelity
from normswap.errors import (
    ConditionError,
    FoldError,
    NormSwapError,
    SpecError,
    SwapError,
    TraceError,
    UnsupportedModuleError,
)
from normswap.fold import fold_bn, fold_conv_bn
from normswap.metrics import family_of, list_families, register_family
from normswap.norms import (
    AdaLIN,
    AdaLN,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    WeightStandardization,
    condition,
    resolve_groups,
    standardize_weight,
    weight_norm,
)
from normswap.plan import Plan, plan
from normswap.pretrained import ConversionResult, convert_pretrained
from normswap.report import SwapRecord, SwapReport
from normswap.restore import restore, surgery_record
from normswap.sources import SourceNorm, describe_source, is_source_norm, register_source
from normswap.specs import (
    AdaLINSpec,
    AdaLNSpec,
    GroupNormSpec,
    InstanceNormSpec,
    LayerNorm2dSpec,
    LayerNormSpec,
    NormSpec,
    WeightNormSpec,
    WSGroupNormSpec,
    get_spec,
    list_norms,
    register_norm,
    spec_from_dict,
)
from normswap.surgery import apply, swap
from normswap.targets import Target, register_target
from normswap.trace import GraphFacts, trace

__version__ = "0.1.0"

__all__ = [
    "AdaLIN",
    "AdaLINSpec",
    "AdaLN",
    "AdaLNSpec",
    "CalibrationError",
    "CalibrationReport",
    "ConditionError",
    "ConversionResult",
    "DistillReport",
    "Fidelity",
    "FoldError",
    "GraphFacts",
    "GroupNorm",
    "GroupNormSpec",
    "InstanceNorm",
    "InstanceNormSpec",
    "LayerNorm",
    "LayerNorm2d",
    "LayerNorm2dSpec",
    "LayerNormSpec",
    "NormSpec",
    "NormSwapError",
    "Plan",
    "SourceNorm",
    "SpecError",
    "SwapError",
    "SwapRecord",
    "SwapReport",
    "Target",
    "TraceError",
    "UnsupportedModuleError",
    "WSGroupNormSpec",
    "WeightNormSpec",
    "WeightStandardization",
    "__version__",
    "apply",
    "calibrate",
    "condition",
    "convert_pretrained",
    "describe_source",
    "distill",
    "family_of",
    "fidelity",
    "fold_bn",
    "fold_conv_bn",
    "get_spec",
    "is_source_norm",
    "list_families",
    "list_norms",
    "plan",
    "register_family",
    "register_fitter",
    "register_norm",
    "register_source",
    "register_target",
    "resolve_groups",
    "restore",
    "spec_from_dict",
    "standardize_weight",
    "surgery_record",
    "swap",
    "trace",
    "weight_norm",
]
