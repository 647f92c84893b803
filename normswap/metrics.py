"""Per-norm-layer statistics: the norm-family registry and tensor → statistics functions.

Nothing here imports Lightning; :class:`normswap.callbacks.NormMonitor` is the thin Lightning
glue around it, and a plain PyTorch loop can use :class:`NormStatsCollector` directly.

**Families.** Every norm layer belongs to one family, found by :func:`family_of` in this order:

1. the classes registered with :func:`register_family`, looked up along the module's class
   hierarchy (MRO), so a subclass is found through its base and the most specific registration
   wins;
2. ``"bn"`` for every BatchNorm-family module (:func:`normswap.sources.is_source_norm`:
   ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy BNs, torchvision's ``FrozenBatchNorm2d``, and
   their subclasses);
3. ``"wn"`` for a conv/linear whose ``weight`` carries torch's weight-norm parametrization.

Built in: ``nn.GroupNorm`` (hence :class:`~normswap.GroupNorm`) → ``"gn"``;
:class:`~normswap.LayerNorm` (statistics over ``(C, *S)``) and ``nn.LayerNorm`` → ``"ln"``;
:class:`~normswap.LayerNorm2d` and torchvision's ConvNeXt ``LayerNorm2d`` (channels-only) →
``"ln2d"``; :class:`~normswap.InstanceNorm` and ``nn.InstanceNorm1d/2d/3d`` → ``"in"``;
:class:`~normswap.AdaLIN` → ``"adalin"``; :class:`~normswap.AdaLN` → ``"adaln"``;
``nn.RMSNorm`` → ``"rms"``. ``nn.LayerNorm`` is ``"ln"`` (not ``"ln2d"``) because that is what
users call it in transformers, where it normalizes each token over its features; torchvision's
``LayerNorm2d`` subclasses it and is found as ``"ln2d"`` because the more specific class wins.

**Statistics** (columns of :data:`STATS`; every value is a float32 tensor computed on the
layer's device, never read back to the host here):

=============== ====================================================================================
``in_mean``     mean of the layer's input over all its elements
``in_std``      standard deviation (biased) of the input over all its elements
``bn_mean_gap`` BN with running stats: mean over channels of ``|μ_c − running_mean_c| /
                sqrt(running_var_c + ε)``, ``μ_c`` the batch mean; running stats read *before*
                the forward updates them (the train/eval discrepancy that hurts small batches)
``bn_var_gap``  same layers: mean over channels of ``|log((σ²_c + ε) / (running_var_c + ε))|``,
                ``σ²_c`` the biased batch variance (the one training normalizes with)
``out_mean``    mean of the layer's output
``out_std``     standard deviation (biased) of the output
``mod_shift``   AdaLN: mean ``|shift(c)|`` of the modulation output for the current condition
``mod_scale``   AdaLN: mean ``|scale(c)|``
``mod_gate``    AdaLN with ``gate=True``: mean ``|gate(c)|``
``gamma_mean``  mean of γ (the layer's ``weight``; FrozenBatchNorm2d's buffer too)
``gamma_std``   standard deviation (biased) of γ
``beta_mean``   mean of β (the layer's ``bias``)
``beta_std``    standard deviation (biased) of β
``rho``         AdaLIN: mean of ``clamp(ρ, 0, 1)`` (what the forward uses)
``g_mean``      weight norm: mean of ``g`` (``parametrizations.weight.original0``)
``v_norm``      weight norm: mean over output channels of ``‖v‖`` (``original1``)
``grad_norm``   L2 norm of the gradients of all the layer's parameters (γ, β, ρ, AdaLN's
                modulation MLP, WN's ``g`` and ``v`` and the conv bias)
=============== ====================================================================================

Activation statistics (``in_*``, ``bn_*``, ``out_*``, ``mod_*``) are computed per forward call
on the local batch and averaged over the calls of the step and over processes (the mean of
per-rank values: for a plain BN that is what each rank normalizes with); parameter statistics
are the same on every rank. A weight-normalized conv has no γ/β statistics (its ``weight`` is
a conv kernel); every other layer has those its ``weight``/``bias`` tensors allow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm
from torch.utils.hooks import RemovableHandle

from normswap.errors import SpecError
from normswap.norms import AdaLIN, AdaLN, InstanceNorm, LayerNorm, LayerNorm2d
from normswap.sources import is_source_norm

__all__ = [
    "HISTORY_COLUMNS",
    "STATS",
    "LayerTable",
    "NormHistory",
    "NormLayer",
    "NormStatsCollector",
    "batchnorm_input_stats",
    "family_of",
    "family_summary",
    "find_norm_layers",
    "grouped_grad_norms",
    "list_families",
    "modulation_magnitude",
    "moments",
    "register_family",
    "segment_mean_std",
    "unpack",
]

#: The statistics of one layer, in column order (see the module docs for definitions).
STATS: tuple[str, ...] = (
    "in_mean",
    "in_std",
    "bn_mean_gap",
    "bn_var_gap",
    "out_mean",
    "out_std",
    "mod_shift",
    "mod_scale",
    "mod_gate",
    "gamma_mean",
    "gamma_std",
    "beta_mean",
    "beta_std",
    "rho",
    "g_mean",
    "v_norm",
    "grad_norm",
)

#: Columns of one :class:`NormHistory` entry: :data:`STATS` and ``calls`` (forward calls).
HISTORY_COLUMNS: tuple[str, ...] = (*STATS, "calls")

_COL = {name: i for i, name in enumerate(STATS)}
_IN = _COL["in_mean"]  # in_mean, in_std[, bn_mean_gap, bn_var_gap]
_OUT = _COL["out_mean"]  # out_mean, out_std
_MOD = _COL["mod_shift"]  # mod_shift, mod_scale[, mod_gate]
_PARAM = _COL["gamma_mean"]  # gamma_mean ... grad_norm, the parameter block
_PARAM_STATS = STATS[_PARAM:]

# ---------------------------------------------------------------------------------------------
# The family registry.
# ---------------------------------------------------------------------------------------------

_FAMILIES: dict[type, str] = {}
_BUILTIN_NAMES = ("bn", "wn")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def register_family(cls: type[nn.Module], name: str) -> None:
    """Report modules of class ``cls`` (and its subclasses) under the family ``name``.

    The lookup walks a module's class hierarchy, so the most specific registered class wins:
    registering a BatchNorm2d subclass as ``"mybn"`` takes it out of ``"bn"``. Several classes
    may share a family name (``nn.GroupNorm`` and :class:`normswap.GroupNorm` are both ``"gn"``).

    Args:
        cls: an ``nn.Module`` subclass.
        name: the family name used in metric keys: letters, digits, ``_``, ``.`` or ``-``.

    Raises:
        SpecError: ``cls`` is not an ``nn.Module`` subclass or is already registered, or the
            name is not a valid key component.

    Example:
        >>> class ScaleNorm(nn.Module): ...
        >>> register_family(ScaleNorm, "scale")
        >>> family_of(ScaleNorm())
        'scale'
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SpecError(f"register_family: cls must be an nn.Module subclass, got {cls!r}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError(
            f"register_family: the family name must be letters, digits, '_', '.' or '-' "
            f"(it becomes part of metric keys such as 'NormMonitor/<family>/out_std'), "
            f"got {name!r}"
        )
    if cls in _FAMILIES:
        raise SpecError(
            f"{cls.__qualname__} is already registered as norm family {_FAMILIES[cls]!r}; "
            "register a subclass instead"
        )
    _FAMILIES[cls] = name


def list_families() -> list[str]:
    """The family names modules can be reported under, sorted.

    Example:
        >>> list_families()[:3]
        ['adalin', 'adaln', 'bn']
    """
    return sorted({*_FAMILIES.values(), *_BUILTIN_NAMES})


def family_of(module: nn.Module) -> str | None:
    """The norm family of ``module``, or ``None`` when it is not a norm layer.

    Args:
        module: any module.

    Returns:
        The registered family name of the most specific class in ``type(module).__mro__``,
        else ``"bn"`` for the BatchNorm family, ``"wn"`` for a weight-normalized
        conv/linear, else ``None``.

    Example:
        >>> family_of(nn.BatchNorm2d(4)), family_of(nn.GroupNorm(2, 4)), family_of(nn.ReLU())
        ('bn', 'gn', None)
    """
    for cls in type(module).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    if is_source_norm(module):
        return "bn"
    if _weight_norm_of(module) is not None:
        return "wn"
    return None


def _weight_norm_of(module: nn.Module) -> _WeightNorm | None:
    """The ``_WeightNorm`` parametrization on ``module.weight``, if any."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, _WeightNorm):
            return p
    return None


def _register_builtins() -> None:
    for cls, name in (
        (nn.GroupNorm, "gn"),
        (LayerNorm, "ln"),
        (nn.LayerNorm, "ln"),
        (LayerNorm2d, "ln2d"),
        (InstanceNorm, "in"),
        (nn.modules.instancenorm._InstanceNorm, "in"),
        (AdaLIN, "adalin"),
        (AdaLN, "adaln"),
    ):
        register_family(cls, name)
    rms = getattr(nn, "RMSNorm", None)  # torch >= 2.4
    if rms is not None:
        register_family(rms, "rms")
    try:
        from torchvision.models.convnext import LayerNorm2d as TVLayerNorm2d
    except ImportError:  # torchvision is a dependency, but this module works without it
        return
    register_family(TVLayerNorm2d, "ln2d")


_register_builtins()


@dataclass(frozen=True)
class NormLayer:
    """One norm layer of a model, as the statistics see it.

    Attributes:
        path: module path in the model (its first path, for a shared instance).
        family: its family name (:func:`family_of`).
        module: the module itself.

    Example:
        >>> find_norm_layers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))[0].path
        '1'
    """

    path: str
    family: str
    module: nn.Module = field(repr=False, compare=False)


def find_norm_layers(model: nn.Module, families: Sequence[str] | None = None) -> list[NormLayer]:
    """Every norm layer of ``model`` in ``named_modules()`` order, one per module instance.

    Args:
        model: the model to inspect.
        families: keep only layers of these families; ``None`` keeps every family.

    Returns:
        One :class:`NormLayer` per distinct norm module (a shared instance appears once, under
        its first path).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8))
        >>> [(n.path, n.family) for n in find_norm_layers(model)]
        [('1', 'bn'), ('2', 'gn')]
    """
    wanted = None if families is None else set(families)
    layers = []
    for path, module in model.named_modules():
        family = family_of(module)
        if family is not None and (wanted is None or family in wanted):
            layers.append(NormLayer(path or "<root>", family, module))
    return layers


# ---------------------------------------------------------------------------------------------
# Pure tensor → statistics functions.
# ---------------------------------------------------------------------------------------------


def _floating(x: Tensor) -> Tensor:
    """``x`` detached, in float32 unless it is already float32/float64 (fp16/bf16 upcast)."""
    x = x.detach()
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def moments(x: Tensor) -> Tensor:
    """Mean and biased standard deviation of all elements of ``x``.

    On the CPU this is the two-pass formula (``mean = Σx / n``, then ``‖x − mean‖ / sqrt(n)``),
    9-14x faster there than ``torch.var_mean``, whose Welford kernel is not vectorized
    (torch 2.14, 1 thread, 0.1-4 M elements), and as exact; elsewhere it is one fused
    ``torch.var_mean``.

    Args:
        x: a floating tensor of any shape with at least one element.

    Returns:
        A float32 tensor ``[mean, std]`` on ``x``'s device.

    Example:
        >>> moments(torch.tensor([1.0, 3.0]))
        tensor([2., 1.])
    """
    x = _floating(x)
    if x.device.type == "cpu":
        mean = x.sum() / x.numel()
        std = torch.linalg.vector_norm(x - mean) / math.sqrt(x.numel())
    else:
        var, mean = torch.var_mean(x, correction=0)
        std = var.sqrt()
    return torch.stack((mean, std)).float()


def _channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` of shape ``(N, C, *S)`` over ``(N, *S)``.

    ``torch.batch_norm_update_stats`` (BatchNorm's own statistics kernel) is 3-10x faster on the
    CPU than ``torch.var_mean`` over those dims; ``var_mean`` is the fallback.
    """
    try:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    except (RuntimeError, NotImplementedError):  # a backend without the kernel
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
    return mean, var


def batchnorm_input_stats(
    x: Tensor, running_mean: Tensor, running_var: Tensor, eps: float
) -> Tensor:
    """Input moments and the batch-vs-running-statistics gap of a BatchNorm input.

    One per-channel pass gives the batch statistics (BatchNorm's own statistics kernel); the
    overall mean and variance follow exactly from them (every channel has the same element
    count: ``var = mean_c(σ²_c) + var_c(μ_c)``).

    Args:
        x: BN input of shape ``(N, C, *S)``.
        running_mean: ``(C,)`` running mean, read before the forward updates it.
        running_var: ``(C,)`` running variance, read before the forward updates it.
        eps: the layer's epsilon.

    Returns:
        A float32 tensor ``[in_mean, in_std, bn_mean_gap, bn_var_gap]`` (see the module docs).

    Example:
        >>> x = torch.tensor([[1.0], [3.0]])  # N=2, C=1: batch mean 2, batch variance 1
        >>> batchnorm_input_stats(x, torch.zeros(1), torch.ones(1), eps=0.0)
        tensor([2., 1., 2., 0.])
    """
    mean_c, var_c = _channel_moments(_floating(x))
    mean = mean_c.mean()
    var = var_c.mean() + (mean_c - mean).square().mean()
    ref_var = running_var.detach().to(var_c.dtype) + eps
    mean_gap = ((mean_c - running_mean.detach().to(mean_c.dtype)).abs() * ref_var.rsqrt()).mean()
    var_gap = ((var_c + eps) / ref_var).log().abs().mean()
    return torch.stack((mean, var.sqrt(), mean_gap, var_gap)).float()


def modulation_magnitude(params: Tensor, chunks: int) -> Tensor:
    """Mean absolute value of each chunk of an AdaLN modulation output.

    Args:
        params: the modulation MLP's output of shape ``(N, chunks * C)``.
        chunks: 2 (shift, scale) or 3 (shift, scale, gate).

    Returns:
        A float32 tensor ``[mean |shift|, mean |scale|(, mean |gate|)]``.

    Example:
        >>> modulation_magnitude(torch.tensor([[1.0, -1.0, 2.0, -4.0]]), chunks=2)
        tensor([1., 3.])
    """
    p = _floating(params)
    return p.reshape(p.shape[0], chunks, -1).abs().mean(dim=(0, 2)).float()


def segment_mean_std(
    tensors: Sequence[Tensor], segments: Tensor, num_segments: int
) -> tuple[Tensor, Tensor]:
    """Mean and biased std of groups of tensors, all groups in a few fused ops.

    Args:
        tensors: the tensors; they are flattened and concatenated.
        segments: for every element of the concatenation, the index of its group (int64, on
            the tensors' device), e.g. from ``torch.repeat_interleave(rows, numels)``.
        num_segments: the number of groups; groups without elements get 0.

    Returns:
        ``(mean, std)``, float32 tensors of shape ``(num_segments,)``.

    Example:
        >>> mean, std = segment_mean_std(
        ...     [torch.tensor([1.0, 3.0]), torch.tensor([5.0])], torch.tensor([0, 0, 2]), 3
        ... )
        >>> mean, std
        (tensor([2., 0., 5.]), tensor([1., 0., 0.]))
    """
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    zeros = flat.new_zeros(num_segments)
    total = zeros.index_add(0, segments, flat)
    total_sq = zeros.index_add(0, segments, flat * flat)
    count = zeros.index_add(0, segments, torch.ones_like(flat)).clamp_min(1)
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0)
    return mean, var.sqrt()


def grouped_grad_norms(grads: Sequence[Tensor], rows: Tensor, num_rows: int) -> Tensor:
    """L2 norm of groups of gradients: one ``torch._foreach_norm`` and one ``index_add``.

    Args:
        grads: gradient tensors.
        rows: ``(len(grads),)`` int64: the group of each gradient.
        num_rows: the number of groups; groups without gradients get 0.

    Returns:
        A float32 tensor of shape ``(num_rows,)``: ``sqrt(sum of ‖g‖² over the group)``.

    Example:
        >>> grouped_grad_norms([torch.tensor([3.0]), torch.tensor([4.0])], torch.tensor([1, 1]), 2)
        tensor([0., 5.])
    """
    device = rows.device
    norms = torch._foreach_norm(list(grads))
    squares = torch.stack([n.to(device, torch.float32) for n in norms]).square()
    return squares.new_zeros(num_rows).index_add_(0, rows, squares).sqrt()


# ---------------------------------------------------------------------------------------------
# Collecting the statistics of one step.
# ---------------------------------------------------------------------------------------------


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
            >>> unpack(torch.zeros(2 * len(STATS) + 1), num_layers=1).history_row().shape
            torch.Size([1, 18])
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
                and is_source_norm(module)
                and x.dim() >= 2
            ):
                stats = batchnorm_input_stats(x, running_mean, running_var, float(module.eps))
            else:
                stats = moments(x)
            self._add(row, _IN, stats)

        return hook

    def _output_hook(self, row: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if _usable(output):
                self._add(row, _OUT, moments(output))

        return hook

    def _modulation_hook(
        self, row: int, chunks: int
    ) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if _usable(output) and output.dim() == 2:
                self._add(row, _MOD, modulation_magnitude(output, chunks))

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
            >>> c = NormStatsCollector(find_norm_layers(nn.BatchNorm1d(3)))
            >>> c.reset(torch.device("cpu")); c.record_parameters()
            >>> unpack(c.pack(), 1).values[0, STATS.index("gamma_mean")]
            tensor(1.)
        """
        if self._sums is None:
            raise RuntimeError("NormStatsCollector.record_parameters() before reset(device)")
        device = self._sums.device
        gammas, betas, rhos, gs, vnorms = [], [], [], [], []
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
            for p in module.parameters():
                if p.grad is not None and p.grad.layout == torch.strided:
                    grads.append(p.grad)
                    grad_rows.append(row)
                    has[row].add("grad_norm")

        zeros = torch.zeros(self.num_layers, device=device)
        block = dict.fromkeys(_PARAM_STATS, zeros)
        for names, items, key in (
            (("gamma_mean", "gamma_std"), gammas, "gamma"),
            (("beta_mean", "beta_std"), betas, "beta"),
            (("rho", None), rhos, "rho"),
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
        self._sums[:, _PARAM:].copy_(torch.stack([block[s] for s in _PARAM_STATS], dim=1))
        for row, names in enumerate(has):
            counts = self._counts[row]
            for col, stat in enumerate(_PARAM_STATS, start=_PARAM):
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


# ---------------------------------------------------------------------------------------------
# History: one small CPU tensor per collected step.
# ---------------------------------------------------------------------------------------------


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
        >>> h.stacked().shape
        torch.Size([1, 1, 18])
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
            >>> h.append(0, torch.arange(18.0)[None]); h.stacked("calls")
            tensor([[17.]])
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
