"""Graph knowledge: which conv/linear feeds each norm, at what rank, and whether it folds.

* :mod:`normswap.graph.facts`: the records (:class:`NormFacts`, :class:`GraphFacts`);
* :mod:`normswap.graph.record`: the recorded-forward tracer (works on every model that runs);
* :mod:`normswap.graph.fx`: the ``torch.fx`` fallback when there are no example inputs;
* :mod:`normswap.graph.rules`: the rulebook (fold, rank) both tracers and the planner use;
* :mod:`normswap.graph.fold`: the folding arithmetic.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from normswap.graph.facts import GraphFacts, NormFacts
from normswap.graph.fx import trace_fx
from normswap.graph.record import trace

__all__ = ["GraphFacts", "NormFacts", "graph_facts", "trace", "trace_fx"]


def graph_facts(
    model: nn.Module, example_inputs: Any = None, *, norm_types: tuple[type, ...] | None = None
) -> GraphFacts:
    """Graph facts by the best means available: a recorded forward pass, else ``torch.fx``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> graph_facts(model, torch.randn(1, 3, 8, 8))["1"].input_rank
        4
    """
    if example_inputs is None:
        return trace_fx(model, norm_types=norm_types)
    return trace(model, example_inputs, norm_types=norm_types)
