"""normswap: turn the normalizations of any PyTorch model into the ones you need.

The flow is spec → plan → surgery → report: :func:`swap` plans every replacement (what each
source norm becomes, or why it stays), refuses the whole swap with one error if any step is
invalid, then executes the plan. Sources are BatchNorm by default; ``replace=`` selects other
kinds (LayerNorm, GroupNorm, InstanceNorm, RMSNorm, ...; :data:`SOURCE_KINDS`). Each target norm
is a *family* (:mod:`normswap.families`): its spec, target, calibration fitter and monitor
family in one module.

Example:
    >>> import torchvision
    >>> model = torchvision.models.resnet50()
    >>> normswap.swap(model, "gn").counts()
    {'BatchNorm2d -> GroupNorm': 53}
"""

from __future__ import annotations

from normswap.errors import (
    ApplyError,
    CalibrationError,
    ConditionError,
    FoldError,
    NormSwapError,
    SpecError,
    SwapError,
    TraceError,
    UnsupportedModuleError,
)
from normswap.families import (
    Decision,
    Family,
    LayerStep,
    NormContext,
    PlanContext,
    Target,
    get_family,
    register_family,
    unregister_family,
)
from normswap.families.adalin import AdaLINSpec
from normswap.families.adaln import AdaLNSpec
from normswap.families.derf import DerfSpec
from normswap.families.dyt import DyTSpec
from normswap.families.frozen import FrozenSpec
from normswap.families.gn import GroupNormSpec
from normswap.families.instance import InstanceNormSpec
from normswap.families.ln import LayerNormSpec
from normswap.families.ln2d import LayerNorm2dSpec
from normswap.families.rms import RMSNormSpec
from normswap.families.wn import WeightNormSpec
from normswap.families.ws_gn import WSGroupNormSpec
from normswap.finalize import FinalizeReport, finalize, register_finalizer
from normswap.graph import GraphFacts, trace
from normswap.graph.fold import fold_conv_bn
from normswap.monitor.families import (
    family_of,
    list_families,
    register_monitor_family,
    register_monitor_rule,
)
from normswap.norms import (
    AdaLIN,
    AdaLN,
    BlendNorm,
    Conditioned,
    Derf,
    DyT,
    FrozenAffine,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    WeightStandardization,
    condition,
    resolve_groups,
    set_kernel_dispatch,
    standardize_weight,
    weight_norm,
)
from normswap.norms.blend import register_blend_statistics
from normswap.plan import Plan, plan
from normswap.pretrained.adapt import adapt_statistics
from normswap.pretrained.calibrate import CalibrationReport, calibrate
from normswap.pretrained.convert import ConversionResult, convert_pretrained
from normswap.pretrained.distill import DistillReport, distill
from normswap.pretrained.fidelity import Fidelity, fidelity
from normswap.pretrained.fitters import Fitter, register_fitter
from normswap.pretrained.hybrid import LayerCost, conversion_costs, hybrid_swap
from normswap.pretrained.reconstruct import BlockFit, ReconstructionReport, reconstruct
from normswap.pretrained.synthesize import statistics_gap, synthesize
from normswap.pretrained.transfer import DiverseAugment, procedural_images
from normswap.progressive import (
    BlendSchedule,
    anchor_blend,
    blend_layers,
    calibrate_blend,
    finish_blend,
    set_blend,
    swap_progressive,
)
from normswap.record import restore, surgery_record
from normswap.report import SwapRecord, SwapReport
from normswap.small import tiny_gpt, tiny_vit
from normswap.sources import (
    SOURCE_KINDS,
    SourceNorm,
    describe_source,
    is_source_norm,
    register_source,
    register_source_kind,
    source_kind,
)
from normswap.specs import NormSpec, get_spec, list_norms, spec_from_dict
from normswap.surgery import apply, fold_bn, swap

__version__ = "0.2.0"

__all__ = [
    "SOURCE_KINDS",
    "AdaLIN",
    "AdaLINSpec",
    "AdaLN",
    "AdaLNSpec",
    "ApplyError",
    "BlendNorm",
    "BlendSchedule",
    "BlockFit",
    "CalibrationError",
    "CalibrationReport",
    "ConditionError",
    "Conditioned",
    "ConversionResult",
    "Decision",
    "Derf",
    "DerfSpec",
    "DistillReport",
    "DiverseAugment",
    "DyT",
    "DyTSpec",
    "Family",
    "Fidelity",
    "FinalizeReport",
    "Fitter",
    "FoldError",
    "FrozenAffine",
    "FrozenSpec",
    "GraphFacts",
    "GroupNorm",
    "GroupNormSpec",
    "InstanceNorm",
    "InstanceNormSpec",
    "LayerCost",
    "LayerNorm",
    "LayerNorm2d",
    "LayerNorm2dSpec",
    "LayerNormSpec",
    "LayerStep",
    "NormContext",
    "NormSpec",
    "NormSwapError",
    "Plan",
    "PlanContext",
    "RMSNorm",
    "RMSNormSpec",
    "ReconstructionReport",
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
    "adapt_statistics",
    "anchor_blend",
    "apply",
    "blend_layers",
    "calibrate",
    "calibrate_blend",
    "condition",
    "conversion_costs",
    "convert_pretrained",
    "describe_source",
    "distill",
    "family_of",
    "fidelity",
    "finalize",
    "finish_blend",
    "fold_bn",
    "fold_conv_bn",
    "get_family",
    "get_spec",
    "hybrid_swap",
    "is_source_norm",
    "list_families",
    "list_norms",
    "plan",
    "procedural_images",
    "reconstruct",
    "register_blend_statistics",
    "register_family",
    "register_finalizer",
    "register_fitter",
    "register_monitor_family",
    "register_monitor_rule",
    "register_source",
    "register_source_kind",
    "resolve_groups",
    "restore",
    "set_blend",
    "set_kernel_dispatch",
    "source_kind",
    "spec_from_dict",
    "standardize_weight",
    "statistics_gap",
    "surgery_record",
    "swap",
    "swap_progressive",
    "synthesize",
    "tiny_gpt",
    "tiny_vit",
    "trace",
    "unregister_family",
    "weight_norm",
]
