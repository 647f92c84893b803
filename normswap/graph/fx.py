"""Graph facts without example inputs: ``torch.fx`` symbolic tracing.

Symbolic tracing needs no input but sees no shapes (``input_rank`` is ``None``), and it fails on
models with data-dependent control flow (torchvision's detection models, RAFT): there the
recorded forward pass of :func:`normswap.graph.record.trace` is the way. The facts it finds are
judged by the same rule, :func:`normswap.graph.rules.fold_problems`.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import torch
from torch import nn

from normswap.errors import NormSwapError, TraceError
from normswap.graph.facts import GraphFacts, NormFacts
from normswap.graph.rules import PRODUCER_TYPES, fold_problems, parameter_owners
from normswap.sources import describe_source, source_classes

__all__ = ["trace_fx"]


class _LeafTracer(torch.fx.Tracer):
    """A tracer that keeps norms and conv/linear layers as single ``call_module`` nodes."""

    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)


def _op_name(node: object) -> str:
    op = getattr(node, "target", node)
    return str(getattr(op, "__name__", op))


def trace_fx(model: nn.Module, *, norm_types: tuple[type, ...] | None = None) -> GraphFacts:
    """Graph facts from ``torch.fx`` symbolic tracing, when no example inputs are at hand.

    A Linear → BatchNorm pair is never foldable here: its input rank decides which dim the
    BatchNorm normalizes, and symbolic tracing does not know it.

    Raises:
        TraceError: torch.fx cannot trace the model; the message says to pass example inputs.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> trace_fx(model)["1"].producer
        '0'
    """
    norm_types = source_classes() if norm_types is None else tuple(norm_types)
    try:
        graph = _LeafTracer(norm_types + PRODUCER_TYPES).trace(model)
    except Exception as err:
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err}); "
            "pass example_inputs (e.g. example_inputs=torch.randn(1, 3, 224, 224)) so a real "
            "forward pass can be recorded instead"
        ) from err
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    owners = parameter_owners(model)

    norms: dict[str, NormFacts] = {}
    aliases: dict[str, str] = {}
    for path, module in model.named_modules():
        if not isinstance(module, norm_types):
            continue
        nodes = calls.get(path, [])
        producer_path = origin = other_uses = None
        producer = None
        producer_calls = 0
        if len(nodes) == 1:
            source = nodes[0].args[0] if nodes[0].args else None
            if isinstance(source, torch.fx.Node) and source.op == "call_module":
                candidate = model.get_submodule(str(source.target))
                if isinstance(candidate, PRODUCER_TYPES):
                    producer, producer_path = candidate, paths[id(candidate)][0]
                    producer_calls = len(calls.get(str(source.target), []))
                    if len(source.users) > 1:
                        other_uses = f"used by {len(source.users) - 1} other op(s)"
                else:
                    origin = f"input is produced by {type(candidate).__name__}, not a conv/linear"
            else:
                origin = f"input is produced by {_op_name(source)}, not a conv/linear"
        raw = NormFacts(
            path=path,
            paths=tuple(paths[id(module)]),
            kind=type(module).__name__,
            calls=len(nodes),
            input_shapes=(),
            input_rank=None,
            producer=producer_path,
            producer_kind=None if producer is None else type(producer).__name__,
            foldable=False,
            reason=None,
            producer_calls=producer_calls,
            producer_paths=() if producer is None else tuple(paths[id(producer)]),
            other_uses=other_uses,
            origin=origin,
        )
        try:
            src = describe_source(module)
        except NormSwapError:
            src = None
        problems = fold_problems(
            src,
            producer,
            facts=raw,
            owners=owners,
            producer_path=producer_path,
            check_mode=False,
            kind=raw.kind,
        )
        norms[path] = replace(raw, foldable=not problems, reason="; ".join(problems) or None)
        aliases.update(dict.fromkeys(paths[id(module)], path))
    return GraphFacts(
        model=type(model).__name__,
        norms=MappingProxyType(norms),
        aliases=MappingProxyType(aliases),
    )
