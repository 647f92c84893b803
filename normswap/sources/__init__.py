"""Source norms: the registry of what normswap converts, and the built-in adapters.

BatchNorm flavours (:mod:`~normswap.sources.torch_bn`, norm + activation layers in
:mod:`~normswap.sources.normact`, frozen-BatchNorm look-alikes in
:mod:`~normswap.sources.lookalike`), the per-sample norms (:mod:`~normswap.sources.norms`) and
timm's (:mod:`~normswap.sources.timm`, registered once timm is imported).
"""

from __future__ import annotations

from normswap.sources import lookalike, timm  # register the look-alike rule and timm's norms
from normswap.sources.base import (
    OVER,
    SOURCE_KINDS,
    SOURCES,
    Adapter,
    Source,
    SourceKind,
    SourceNorm,
    add_lazy_registration,
    describe_source,
    device_dtype,
    find_source_adapter,
    is_source_norm,
    register_source,
    register_source_kind,
    register_source_rule,
    resolve_replace,
    source_classes,
    source_kind,
)
from normswap.sources.normact import norm_act_adapter, register_norm_act  # registers timm's
from normswap.sources.norms import per_sample_record  # registers the per-sample norms
from normswap.sources.torch_bn import (  # registers the built-in sources
    describe_batchnorm,
    describe_frozen_batchnorm,
)

__all__ = [
    "OVER",
    "SOURCES",
    "SOURCE_KINDS",
    "Adapter",
    "Source",
    "SourceKind",
    "SourceNorm",
    "add_lazy_registration",
    "describe_batchnorm",
    "describe_frozen_batchnorm",
    "describe_source",
    "device_dtype",
    "find_source_adapter",
    "is_source_norm",
    "lookalike",
    "norm_act_adapter",
    "per_sample_record",
    "register_norm_act",
    "register_source",
    "register_source_kind",
    "register_source_rule",
    "resolve_replace",
    "source_classes",
    "source_kind",
    "timm",
]
