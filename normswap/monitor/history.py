"""The per-layer statistics of every collected step, kept on the CPU (and in checkpoints)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from normswap.monitor.stats import HISTORY_COLUMNS

__all__ = ["NormHistory"]


@dataclass
class NormHistory:
    """Per-layer statistics over the collected steps, on the CPU.

    Attributes:
        paths: layer paths, one per row.
        families: the family of each row.
        steps: the global step of each entry.
        values: one ``(L, len(HISTORY_COLUMNS))`` float32 tensor per step (NaN: not produced).
        order: rows in forward order (first call seen), for plots.

    Example:
        >>> h = NormHistory(paths=["bn"], families=["bn"])
        >>> h.append(0, torch.zeros(1, len(HISTORY_COLUMNS)))
        >>> h.stacked().shape == (1, 1, len(HISTORY_COLUMNS))
        True
    """

    paths: list[str]
    families: list[str]
    steps: list[int] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    order: list[int] = field(default_factory=list)

    def append(self, step: int, row: Tensor) -> None:
        """Add the ``(L, len(HISTORY_COLUMNS))`` statistics of ``step`` (moved to the CPU).

        Example:
            >>> h = NormHistory(paths=["bn"], families=["bn"])
            >>> h.append(5, torch.ones(1, len(HISTORY_COLUMNS))); h.steps
            [5]
        """
        self.steps.append(int(step))
        self.values.append(row.detach().to("cpu", torch.float32))

    def stacked(self, column: str | None = None) -> Tensor:
        """``(T, L, len(HISTORY_COLUMNS))``, or ``(T, L)`` for one ``column``.

        Example:
            >>> h = NormHistory(paths=["bn"], families=["bn"])
            >>> h.append(0, torch.arange(float(len(HISTORY_COLUMNS)))[None])
            >>> h.stacked("calls") == len(HISTORY_COLUMNS) - 1
            tensor([[True]])
        """
        width = len(HISTORY_COLUMNS)
        full = torch.stack(self.values) if self.values else torch.empty(0, len(self.paths), width)
        return full if column is None else full[..., HISTORY_COLUMNS.index(column)]

    def reindexed(self, paths: Sequence[str], families: Sequence[str]) -> NormHistory:
        """This history laid out for another list of layers (matched by path; NaN if new).

        Example:
            >>> h = NormHistory(paths=["a"], families=["gn"])
            >>> h.append(0, torch.ones(1, len(HISTORY_COLUMNS)))
            >>> h.reindexed(["b", "a"], ["gn", "gn"]).stacked("calls")
            tensor([[nan, 1.]])
        """
        if list(paths) == self.paths:
            return NormHistory(list(paths), list(families), self.steps, self.values, self.order)
        where = {p: i for i, p in enumerate(self.paths)}
        old = [where.get(p, -1) for p in paths]
        index = torch.tensor([max(i, 0) for i in old], dtype=torch.long)
        known = torch.tensor([i >= 0 for i in old])[:, None]
        values = [torch.where(known, v[index], math.nan) for v in self.values]
        back = {i: new for new, i in enumerate(old) if i >= 0}
        order = [back[i] for i in self.order if i in back]
        return NormHistory(list(paths), list(families), list(self.steps), values, order)

    def state_dict(self) -> dict[str, Any]:
        """Plain data (lists, one tensor) for checkpoints.

        Example:
            >>> sorted(NormHistory(paths=[], families=[]).state_dict())
            ['columns', 'families', 'order', 'paths', 'steps', 'values']
        """
        return {
            "paths": list(self.paths),
            "families": list(self.families),
            "columns": list(HISTORY_COLUMNS),
            "steps": list(self.steps),
            "values": self.stacked().clone(),
            "order": list(self.order),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> NormHistory:
        """Rebuild a history saved by :meth:`state_dict` (columns matched by name).

        Example:
            >>> h = NormHistory(paths=["a"], families=["gn"])
            >>> NormHistory.from_state_dict(h.state_dict()).paths
            ['a']
        """
        values = state["values"]
        columns = list(state.get("columns", HISTORY_COLUMNS))
        if columns != list(HISTORY_COLUMNS):
            full = torch.full((*values.shape[:2], len(HISTORY_COLUMNS)), math.nan)
            for j, name in enumerate(columns):
                if name in HISTORY_COLUMNS:
                    full[..., HISTORY_COLUMNS.index(name)] = values[..., j]
            values = full
        return cls(
            paths=list(state["paths"]),
            families=list(state["families"]),
            steps=[int(s) for s in state["steps"]],
            values=list(values.unbind(0)),
            order=[int(i) for i in state.get("order", [])],
        )
