"""BatchNorm sources: the registry of what normswap converts, and the built-in adapters."""

from __future__ import annotations

from normswap.sources.base import (
    SOURCES,
    Adapter,
    SourceNorm,
    describe_source,
    device_dtype,
    find_source_adapter,
    is_source_norm,
    register_source,
    source_classes,
)
from normswap.sources.torch_bn import describe_batchnorm  # registers the built-in sources

__all__ = [
    "SOURCES",
    "Adapter",
    "SourceNorm",
    "describe_batchnorm",
    "describe_source",
    "device_dtype",
    "find_source_adapter",
    "is_source_norm",
    "register_source",
    "source_classes",
]
