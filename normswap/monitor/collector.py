"""Collect the statistics of one step for a fixed list of norm layers (no Lightning here)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm
from torch.utils.hooks import RemovableHandle

from normswap.monitor.families import NormLayer
from normswap.monitor.stats import (
    IN_START,
    MOD_START,
    OUT_START,
    PARAM_START,
    PARAM_STATS,
    SATURATED,
    STATS,
    batchnorm_input_stats,
    grouped_grad_norms,
    modulation_magnitude,
    moments,
    saturation,
    segment_mean_std,
)
from normswap.norms import AdaLIN, AdaLN, PointwiseNorm
from normswap.sources import source_kind

__all__ = ["LayerTable", "NormStatsCollector", "family_summary", "unpack"]


def _weight_norm_of(module: nn.Module) -> _WeightNorm | None:
    """The ``_WeightNorm`` parametrization on ``module.weight``, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, _WeightNorm):
            return p
    return None


@dataclass(frozen=True)
class LayerTable:
    """The statistics of one step, per layer (the unpacked, reduced collector state).

    Attributes:
        values: ``(L, len(STATS))`` float32: sum / count, NaN where the count is 0.
        counts: ``(L, len(STATS))`` float32: how many contributions (forward calls, ranks)
            each value averages; 0 means the layer did not produce that statistic.
        calls: ``(L,)`` float32: forward calls of each layer, summed over ranks.

    Example:
        >>> table = unpack(torch.zeros(2 * len(STATS) + 1), num_layers=1)
        >>> table.calls
        tensor([0.])
    """

    values: Tensor
    counts: Tensor
    calls: Tensor

    def history_row(self) -> Tensor:
        """``(L, len(HISTORY_COLUMNS))``: the values with ``calls`` as the last column.

        Example:
            >>> row = unpack(torch.zeros(2 * len(STATS) + 1), num_layers=1).history_row()
            >>> row.shape == (1, len(STATS) + 1)
            True
        """
        return torch.cat([self.values, self.calls[:, None]], dim=1)


def unpack(packed: Tensor, num_layers: int) -> LayerTable:
    """Turn a (reduced) :meth:`NormStatsCollector.pack` vector into per-layer values.

    Args:
        packed: the 1-D vector ``[sums (L*S), counts (L*S), calls (L)]``.
        num_layers: ``L``.

    Returns:
        The :class:`LayerTable` (on ``packed``'s device).

    Example:
        >>> packed = torch.zeros(2 * len(STATS) + 1)
        >>> packed[0], packed[len(STATS)] = 6.0, 2.0  # in_mean: sum 6 over 2 calls
        >>> unpack(packed, 1).values[0, 0]
        tensor(3.)
    """
    size = num_layers * len(STATS)
    sums = packed[:size].view(num_layers, len(STATS))
    counts = packed[size : 2 * size].view(num_layers, len(STATS))
    calls = packed[2 * size :]
    values = torch.where(counts > 0, sums / counts.clamp_min(1), math.nan)
    return LayerTable(values=values, counts=counts, calls=calls)


def family_summary(table: LayerTable, families: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per family: the mean over its layers of each statistic, and which statistics exist.

    Each layer counts once (whatever its channel count or call count); a layer without a
    statistic is left out of that statistic's mean, and a NaN value of a layer that has the
    statistic stays NaN (a diverged layer is not hidden).

    Args:
        table: the per-layer statistics.
        families: the family of each row.

    Returns:
        ``{family: (values (S,), present (S,) bool)}`` in first-appearance order.

    Example:
        >>> packed = torch.zeros(4 * len(STATS) + 2)
        >>> packed[0], packed[len(STATS)] = 1.0, 3.0  # row 0 in_mean = 1, row 1 = 3
        >>> packed[2 * len(STATS)], packed[3 * len(STATS)] = 1.0, 1.0
        >>> family_summary(unpack(packed, 2), ["gn", "gn"])["gn"][0][0]
        tensor(2.)
    """
    out: dict[str, tuple[Tensor, Tensor]] = {}
    valid = table.counts > 0
    filled = torch.where(valid, table.values, 0.0)
    for family in dict.fromkeys(families):
        rows = torch.tensor([i for i, f in enumerate(families) if f == family])
        n = valid[rows].sum(dim=0)
        out[family] = (filled[rows].sum(dim=0) / n.clamp_min(1), n > 0)
    return out


class NormStatsCollector:
    """Collects the statistics of one step for a fixed list of norm layers.

    Forward hooks exist only between :meth:`attach` and :meth:`detach`; the statistics go into
    one preallocated ``(L, S)`` float32 tensor on ``device`` (no host sync), and how many
    contributions each cell holds is counted on the host. :meth:`pack` returns one vector whose
    size depends only on ``L`` (never on which layers ran), so summing it across processes and
    calling :func:`unpack` gives correct means even when a layer ran on some ranks only.

    The input statistics (and BN's batch-vs-running gap) are taken in a forward *pre*-hook,
    before BN updates its running statistics; the output statistics in a forward hook; AdaLN's
    modulation magnitude in a forward hook on its ``modulation`` MLP. No backward hooks:
    gradient statistics are read from ``.grad`` by :meth:`record_parameters`.

    Args:
        layers: the layers, in row order (e.g. from :func:`find_norm_layers`).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> from normswap.monitor.families import find_norm_layers
        >>> collector = NormStatsCollector(find_norm_layers(model))
        >>> collector.reset(torch.device("cpu"))
        >>> collector.attach()
        >>> model(torch.randn(2, 3, 8, 8)).sum().backward()
        >>> collector.detach()
        >>> collector.record_parameters()
        >>> table = unpack(collector.pack(), collector.num_layers)
        >>> table.calls
        tensor([1.])
    """

    def __init__(self, layers: Sequence[NormLayer]) -> None:
        self.layers = list(layers)
        self._handles: list[RemovableHandle] = []
        self._sums: Tensor | None = None
        self._counts: list[list[int]] = []
        self._calls: list[int] = []
        self._params_recorded = False
        self._cache: dict[Any, Tensor] = {}
        #: Rows in the order their first forward call was seen (over every collection).
        self.order: list[int] = []

    @property
    def num_layers(self) -> int:
        """``L``, the number of rows.

        Example:
            >>> NormStatsCollector([]).num_layers
            0
        """
        return len(self.layers)

    @property
    def attached(self) -> bool:
        """Whether hooks are currently registered.

        Example:
            >>> NormStatsCollector([]).attached
            False
        """
        return bool(self._handles)

    def reset(self, device: torch.device) -> None:
        """Start a new collection: zero the statistics on ``device``.

        Example:
            >>> NormStatsCollector([]).reset(torch.device("cpu"))
        """
        self._sums = torch.zeros(self.num_layers, len(STATS), device=device)
        self._counts = [[0] * len(STATS) for _ in self.layers]
        self._calls = [0] * self.num_layers
        self._params_recorded = False

    def attach(self) -> None:
        """Register the forward hooks (idempotent); :meth:`reset` must have run.

        Example:
            >>> from normswap.monitor.families import find_norm_layers
            >>> c = NormStatsCollector(find_norm_layers(nn.BatchNorm1d(3)))
            >>> c.reset(torch.device("cpu")); c.attach(); c.attached
            True
        """
        if self._sums is None:
            raise RuntimeError("NormStatsCollector.attach() before reset(device)")
        if self._handles:
            return
        for row, layer in enumerate(self.layers):
            module = layer.module
            self._handles.append(module.register_forward_pre_hook(self._input_hook(row)))
            self._handles.append(module.register_forward_hook(self._output_hook(row)))
            if isinstance(module, AdaLN):
                hook = self._modulation_hook(row, module.chunks)
                self._handles.append(module.modulation.register_forward_hook(hook))

    def detach(self) -> None:
        """Remove every hook this collector registered (idempotent).

        Example:
            >>> NormStatsCollector([]).detach()
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _add(self, row: int, start: int, values: Tensor) -> None:
        assert self._sums is not None
        n = values.shape[0]
        self._sums[row, start : start + n].add_(values.to(self._sums.device, non_blocking=True))
        counts = self._counts[row]
        for col in range(start, start + n):
            counts[col] += 1

    def _input_hook(self, row: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._calls[row] == 0 and row not in self.order:
                self.order.append(row)
            self._calls[row] += 1
            x = args[0] if args else None
            if not _usable(x):
                return
            running_mean = getattr(module, "running_mean", None)
            running_var = getattr(module, "running_var", None)
            if (
                isinstance(running_mean, Tensor)
                and isinstance(running_var, Tensor)
                and source_kind(module) == "bn"
                and x.dim() >= 2
            ):
                stats = batchnorm_input_stats(x, running_mean, running_var, float(module.eps))
            else:
                stats = moments(x)
            self._add(row, IN_START, stats)
            if isinstance(module, PointwiseNorm):
                shift = getattr(module, "shift", None)
                self._add(row, SATURATED, saturation(x, module.alpha, shift))

        return hook

    def _output_hook(self, row: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if _usable(output):
                self._add(row, OUT_START, moments(output))

        return hook

    def _modulation_hook(
        self, row: int, chunks: int
    ) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if _usable(output) and output.dim() == 2:
                self._add(row, MOD_START, modulation_magnitude(output, chunks))

        return hook

    def _segments(
        self, key: str, rows: list[int], numels: list[int], device: torch.device
    ) -> Tensor:
        cache_key = (key, tuple(rows), tuple(numels), device)
        ids = self._cache.get(cache_key)
        if ids is None:
            ids = torch.repeat_interleave(torch.tensor(rows), torch.tensor(numels)).to(device)
            self._cache[cache_key] = ids
        return ids

    def _segment_stat(
        self, key: str, items: list[tuple[int, Tensor]], device: torch.device
    ) -> tuple[Tensor, Tensor] | None:
        if not items:
            return None
        rows = [r for r, _ in items]
        tensors = [t.to(device) for _, t in items]
        ids = self._segments(key, rows, [t.numel() for t in tensors], device)
        return segment_mean_std(tensors, ids, self.num_layers)

    def record_parameters(self) -> None:
        """Record γ/β, ρ, WN's g/‖v‖ and the gradient norms (call after backward).

        Overwrites what an earlier call recorded in this collection (the last optimizer step
        of a step wins). Reads ``.grad`` only: no backward hooks.

        Example:
            >>> from normswap.monitor.families import find_norm_layers
            >>> c = NormStatsCollector(find_norm_layers(nn.BatchNorm1d(3)))
            >>> c.reset(torch.device("cpu")); c.record_parameters()
            >>> unpack(c.pack(), 1).values[0, STATS.index("gamma_mean")]
            tensor(1.)
        """
        if self._sums is None:
            raise RuntimeError("NormStatsCollector.record_parameters() before reset(device)")
        device = self._sums.device
        gammas, betas, rhos, alphas, gs, vnorms = [], [], [], [], [], []
        grads: list[Tensor] = []
        grad_rows: list[int] = []
        has: list[set[str]] = [set() for _ in self.layers]
        for row, layer in enumerate(self.layers):
            module = layer.module
            wn = _weight_norm_of(module)
            if wn is not None:
                g = module.parametrizations["weight"].original0
                v = module.parametrizations["weight"].original1
                # _WeightNorm.dim == -1 means one norm over the whole tensor (dim=None).
                dims = [d for d in range(v.dim()) if wn.dim == -1 or d != wn.dim]
                gs.append((row, g))
                vnorms.append((row, torch.linalg.vector_norm(v.detach(), dim=dims)))
                has[row] |= {"g_mean", "v_norm"}
            else:
                weight = getattr(module, "weight", None)
                bias = getattr(module, "bias", None)
                if isinstance(weight, Tensor) and weight.numel():
                    gammas.append((row, weight))
                    has[row] |= {"gamma_mean", "gamma_std"}
                if isinstance(bias, Tensor) and bias.numel():
                    betas.append((row, bias))
                    has[row] |= {"beta_mean", "beta_std"}
            if isinstance(module, AdaLIN):
                rhos.append((row, module.rho.detach().clamp(0, 1)))
                has[row].add("rho")
            if isinstance(module, PointwiseNorm):
                alphas.append((row, module.alpha.detach()))
                has[row].add("alpha")
            for p in module.parameters():
                if p.grad is not None and p.grad.layout == torch.strided:
                    grads.append(p.grad)
                    grad_rows.append(row)
                    has[row].add("grad_norm")

        zeros = torch.zeros(self.num_layers, device=device)
        block = dict.fromkeys(PARAM_STATS, zeros)
        for names, items, key in (
            (("gamma_mean", "gamma_std"), gammas, "gamma"),
            (("beta_mean", "beta_std"), betas, "beta"),
            (("rho", None), rhos, "rho"),
            (("alpha", None), alphas, "alpha"),
            (("g_mean", None), gs, "g"),
            (("v_norm", None), vnorms, "v"),
        ):
            stats = self._segment_stat(key, items, device)
            if stats is not None:
                block[names[0]] = stats[0]
                if names[1] is not None:
                    block[names[1]] = stats[1]
        if grads:
            rows = self._segments("grad", grad_rows, [1] * len(grad_rows), device)
            block["grad_norm"] = grouped_grad_norms(grads, rows, self.num_layers)
        self._sums[:, PARAM_START:].copy_(torch.stack([block[s] for s in PARAM_STATS], dim=1))
        for row, names in enumerate(has):
            counts = self._counts[row]
            for col, stat in enumerate(PARAM_STATS, start=PARAM_START):
                counts[col] = int(stat in names)
        self._params_recorded = True

    def pack(self) -> Tensor:
        """One 1-D vector ``[sums (L*S), counts (L*S), calls (L)]`` on the collector's device.

        Records the parameters first if :meth:`record_parameters` has not run in this
        collection. Its size depends on ``L`` only, so it can be summed across processes with
        one collective.

        Example:
            >>> c = NormStatsCollector([]); c.reset(torch.device("cpu")); c.pack().shape
            torch.Size([0])
        """
        if self._sums is None:
            raise RuntimeError("NormStatsCollector.pack() before reset(device)")
        if not self._params_recorded:
            self.record_parameters()
        host = torch.tensor(
            [c for row in self._counts for c in row] + self._calls, dtype=torch.float32
        )
        return torch.cat([self._sums.flatten(), host.to(self._sums.device, non_blocking=True)])


def _usable(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point() and x.numel() > 0
