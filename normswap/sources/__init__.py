"""BatchNorm sources: the registry of what normswap converts, and the built-in adapters."""

from __future__ import annotations

from normswap.sources.base import (
    SOURCES,
    Adapter,
    SourceNorm,
    add_lazy_registration,
    describe_source,
    device_dtype,
    find_source_adapter,
    is_source_norm,
    register_source,
    source_classes,
)
from normswap.sources.normact import norm_act_adapter, register_norm_act  # registers timm's
from normswap.sources.torch_bn import (  # registers the built-in sources
    describe_batchnorm,
    describe_frozen_batchnorm,
)

__all__ = [
    "SOURCES",
    "Adapter",
    "SourceNorm",
    "add_lazy_registration",
    "describe_batchnorm",
    "describe_frozen_batchnorm",
    "describe_source",
    "device_dtype",
    "find_source_adapter",
    "is_source_norm",
    "norm_act_adapter",
    "register_norm_act",
    "register_source",
    "source_classes",
]
