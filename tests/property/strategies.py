"""Hypothesis strategies for the swap property: tiny random networks and random swap arguments.

A network is generated as a recipe (:class:`Net`): plain data that builds the same model, bit for
bit, every time :meth:`Net.build` is called. The property needs several identical copies (the
model to swap, an untouched reference, a dry run), and a recipe is the one way to get them:
uninitialized lazy modules cannot be deep-copied.

The grammar: an input of rank 2-5, then a few steps, each reading earlier values of a small DAG
(:class:`DagNet`) — convolutions (1d/2d/3d, transposed, grouped, depthwise, tied weights, already
weight-normed), Linear layers, every BatchNorm flavour (lazy ones initialized or not, SyncBatchNorm,
FrozenBatchNorm2d, subclasses with and without their own ``forward``), in-place activations, add and
concat merges, a module called again or registered at a second path, and TorchScript blocks.
Shapes are tracked while drawing, so every generated model runs on its generated input.

The swap arguments are drawn from the registry (:func:`normswap.list_norms`) and from each spec
dataclass's fields and type hints, so a norm family added later is covered without editing this
file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from helpers import LookalikeFrozenBatchNorm2d
from hypothesis import strategies as st
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrizations
from torchvision.models.convnext import LayerNorm2d as TVLayerNorm2d
from torchvision.ops.misc import FrozenBatchNorm2d

import normswap


def spec_class(name: str) -> type:
    """The spec dataclass registered under ``name``: the only reach into normswap's internals."""
    from normswap.specs import spec_class as registered

    return registered(name)


# --------------------------------------------------------------------------- modules used by nets


class QuietBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass that keeps the stock ``forward``: converted like any BatchNorm."""


class BatchNormReLU2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own ``forward``: must be refused unless excluded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def noop_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook that changes nothing (only its presence is checked)."""


def noop_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """A forward hook that changes nothing (only its presence is checked)."""


class DagNet(nn.Module):
    """Evaluates a fixed program over a list of values; modules are looked up by path each call.

    Looking modules up by path (not holding references) is what real models do through their
    attributes: a swap that replaces a module in its container is seen by the next forward.
    ``program`` entries are ``(op, path, args)``; the forward returns the values no op consumed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        self.named = nn.ModuleDict()
        self.nested = nn.ModuleList()
        self.program: list[tuple[str, str, tuple[int, ...]]] = []
        self.outputs: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = [x]
        for op, path, args in self.program:
            if op == "call":
                values.append(self.get_submodule(path)(values[args[0]]))
            elif op == "add":
                values.append(values[args[0]] + values[args[1]])
            elif op == "cat":
                values.append(torch.cat([values[args[0]], values[args[1]]], dim=1))
            elif op == "pool":
                values.append(values[args[0]].mean(dim=tuple(range(2, values[args[0]].dim()))))
            elif op == "unsqueeze":
                values.append(values[args[0]].unsqueeze(-1))
            else:
                raise AssertionError(f"unknown op {op!r}")
        return tuple(values[i] for i in self.outputs)


# --------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class Shape:
    """A value's shape without the batch dim: rank (with batch), channels, spatial sizes."""

    rank: int
    channels: int
    spatial: tuple[int, ...]


def _short_repr(obj: Any) -> str:
    """``Name(field=value, ...)`` listing only the fields that differ from their defaults."""
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        parts.append(f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass(frozen=True, kw_only=True, repr=False)
class Step:
    """One step of a recipe; it reads earlier values and produces value ``index + 1``.

    Attributes:
        place: where a new module is registered: ``layers`` (ModuleList), ``named``
            (ModuleDict) or ``nested`` (a ModuleDict inside a ModuleList).
        frozen: ``requires_grad_(False)`` on the new module.
        hook: a no-op forward ``"pre"`` or ``"post"`` hook on the new module.
    """

    place: str = "layers"
    frozen: bool = False
    hook: str | None = None

    def __repr__(self) -> str:
        return _short_repr(self)


@dataclass(frozen=True, repr=False)
class Conv(Step):
    """``Conv{dims}d`` or ``ConvTranspose{dims}d``, stride 1, "same" padding."""

    src: int
    dims: int
    cin: int
    cout: int
    kernel: int = 1
    groups: int = 1
    bias: bool = True
    transposed: bool = False
    tie: int | None = None  # step index of an earlier Conv whose weight Parameter this one shares
    weight_norm: bool = False  # torch.nn.utils.parametrizations.weight_norm before the swap


@dataclass(frozen=True, repr=False)
class Linear(Step):
    """``Linear(fin, fout)`` on an (N, C) value, or on the last dim of an (N, C, *S) value."""

    src: int
    fin: int
    fout: int
    bias: bool = True
    last_dim: bool = False
    weight_norm: bool = False


@dataclass(frozen=True, repr=False)
class Norm(Step):
    """A norm module with random affine parameters (and running statistics where it has them).

    ``flavour``: ``bn1d``/``bn2d``/``bn3d`` (``lazy``: ``"init"`` = a LazyBatchNorm initialized by
    one forward before the swap, ``"uninit"`` = left uninitialized), ``sync`` (SyncBatchNorm),
    ``frozen`` (torchvision's FrozenBatchNorm2d), ``quiet`` (subclass keeping ``forward``),
    ``fused`` (subclass overriding ``forward``), ``lookalike`` (a frozen BatchNorm of its own);
    the other source kinds: ``ln`` (``nn.LayerNorm`` over the last dim), ``rms``
    (``nn.RMSNorm`` over the last dim), ``ln2d`` (ConvNeXt's channels-first LayerNorm2d),
    ``gn`` (``nn.GroupNorm`` with ``groups`` groups), ``in`` (``nn.InstanceNorm{1,2,3}d``).
    ``channels`` is the normalized dim's size: the last dim for ``ln``/``rms``.
    """

    src: int
    flavour: str
    channels: int
    affine: bool = True
    track: bool = True
    training: bool = False
    eps: float = 1e-5
    momentum: float | None = 0.1
    lazy: str = "no"
    groups: int = 1
    dims: int = 0  # InstanceNorm{dims}d


@dataclass(frozen=True, repr=False)
class Act(Step):
    """``relu``, ``relu_`` (``ReLU(inplace=True)``), ``gelu`` or ``identity``."""

    src: int
    kind: str = "relu"


@dataclass(frozen=True, repr=False)
class Merge(Step):
    """``add`` (same shapes) or ``cat`` (along channels) of two values."""

    a: int
    b: int
    op: str = "add"


@dataclass(frozen=True, repr=False)
class Reshape(Step):
    """``pool``: mean over the spatial dims, to (N, C); ``unsqueeze``: (N, C) to (N, C, 1)."""

    src: int
    op: str = "pool"


@dataclass(frozen=True, repr=False)
class Again(Step):
    """Call the module of step ``step`` once more, on value ``src``.

    With ``alias``, the same instance is first registered at a second path (``place``) and called
    through it; without, it is called through its first path again.
    """

    src: int
    step: int
    alias: bool = False


@dataclass(frozen=True, repr=False)
class Scripted(Step):
    """``torch.jit.script(nn.Sequential(Conv{d}d(cin, cout, kernel), BatchNorm{d}d(cout)))``."""

    src: int
    dims: int
    cin: int
    cout: int
    kernel: int = 1
    training: bool = False


@dataclass(frozen=True)
class Net:
    """A recipe for a tiny model and its input; :meth:`build` makes identical copies.

    Attributes:
        seed: seeds every random tensor of the build (weights, statistics, input).
        batch: the input's batch size.
        input: the input's shape.
        steps: what to build, in order; step ``i`` produces value ``i + 1``.
        dtype: ``"float32"`` or ``"float64"``.
        channels_last: model and input in channels_last (rank-4 input) or channels_last_3d
            (rank 5) memory format.
    """

    seed: int
    batch: int
    input: Shape
    steps: tuple[Step, ...]
    dtype: str = "float32"
    channels_last: bool = False

    def build(self) -> tuple[DagNet, torch.Tensor]:
        """Build the model and its input (identical bits at every call)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return _build(self)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_LAZY_BN = {1: nn.LazyBatchNorm1d, 2: nn.LazyBatchNorm2d, 3: nn.LazyBatchNorm3d}
_NORM_DIMS = {"bn1d": 1, "bn2d": 2, "bn3d": 3}
#: Input ranks each flavour accepts (``None``: any rank from 2 up).
NORM_RANKS: dict[str, tuple[int, ...]] = {
    "bn1d": (2, 3),
    "bn2d": (4,),
    "bn3d": (5,),
    "sync": (2, 3, 4, 5),
    "frozen": (4,),
    "quiet": (4,),
    "fused": (4,),
    "lookalike": (4,),
    "ln": (2, 3, 4, 5),
    "rms": (2, 3, 4, 5),
    "ln2d": (4,),
    "gn": (2, 3, 4, 5),
    "in": (3, 4, 5),
}
#: Flavours that normalize the last dim (``channels`` is its size).
LAST_DIM = frozenset({"ln", "rms"})
#: Flavours without batch statistics (per-sample norms and frozen ones).
PER_SAMPLE = frozenset({"ln", "rms", "ln2d", "gn", "in"})
_IN = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}


def _randomize_norm(module: nn.Module) -> None:
    """Random γ/β and running statistics, so a fold or a copy is not trivially right."""
    with torch.no_grad():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is not None:
            weight.uniform_(0.5, 1.5)
        if bias is not None:
            bias.normal_()
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 1.5)


def _make_norm(step: Norm, batch: int) -> nn.Module:
    c = step.channels
    kwargs: dict[str, Any] = {
        "eps": step.eps,
        "momentum": step.momentum,
        "affine": step.affine,
        "track_running_stats": step.track,
    }
    if step.flavour == "frozen":
        module: nn.Module = FrozenBatchNorm2d(c, eps=step.eps)
    elif step.flavour == "lookalike":
        module = LookalikeFrozenBatchNorm2d(c)
    elif step.flavour == "ln":
        module = nn.LayerNorm(c, eps=step.eps, elementwise_affine=step.affine)
    elif step.flavour == "rms":
        module = nn.RMSNorm(c, eps=step.eps, elementwise_affine=step.affine)
    elif step.flavour == "ln2d":
        module = TVLayerNorm2d(c, eps=step.eps, elementwise_affine=step.affine)
    elif step.flavour == "gn":
        module = nn.GroupNorm(step.groups, c, eps=step.eps, affine=step.affine)
    elif step.flavour == "in":
        module = _IN[step.dims + 2](c, **kwargs)
    elif step.flavour == "sync":
        module = nn.SyncBatchNorm(c, **kwargs)
    elif step.flavour in ("quiet", "fused"):
        module = (QuietBatchNorm2d if step.flavour == "quiet" else BatchNormReLU2d)(c, **kwargs)
    elif step.lazy == "no":
        module = _BN[_NORM_DIMS[step.flavour]](c, **kwargs)
    else:
        dims = _NORM_DIMS[step.flavour]
        module = _LAZY_BN[dims](**kwargs)
        if step.lazy == "init":  # one forward materializes it (it becomes a BatchNorm{d}d)
            with torch.no_grad():
                module(torch.randn(2, c, *([2] * dims)))
    if step.lazy != "uninit":
        _randomize_norm(module)
    return module


def _make_module(step: Step, modules: dict[int, nn.Module], batch: int) -> nn.Module:
    if isinstance(step, Conv):
        table = _CONV_T if step.transposed else _CONV
        conv = table[step.dims](
            step.cin,
            step.cout,
            step.kernel,
            padding=step.kernel // 2,
            groups=step.groups,
            bias=step.bias,
        )
        if step.tie is not None:
            conv.weight = modules[step.tie].weight
        if step.weight_norm:
            parametrizations.weight_norm(conv)
        return conv
    if isinstance(step, Linear):
        linear = nn.Linear(step.fin, step.fout, bias=step.bias)
        if step.weight_norm:
            parametrizations.weight_norm(linear)
        return linear
    if isinstance(step, Norm):
        return _make_norm(step, batch)
    if isinstance(step, Act):
        return {
            "relu": lambda: nn.ReLU(),
            "relu_": lambda: nn.ReLU(inplace=True),
            "gelu": lambda: nn.GELU(),
            "identity": lambda: nn.Identity(),
        }[step.kind]()
    if isinstance(step, Scripted):
        conv = _CONV[step.dims](step.cin, step.cout, step.kernel, padding=step.kernel // 2)
        bn = _BN[step.dims](step.cout)
        _randomize_norm(bn)
        block = nn.Sequential(conv, bn).train(step.training)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            return torch.jit.script(block)
    raise AssertionError(f"{step!r} builds no module")


def _register(model: DagNet, module: nn.Module, place: str) -> str:
    """Register ``module`` in one of the model's containers; return its path."""
    if place == "layers":
        model.layers.append(module)
        return f"layers.{len(model.layers) - 1}"
    if place == "named":
        key = f"m{len(model.named)}"
        model.named[key] = module
        return f"named.{key}"
    model.nested.append(nn.ModuleDict({"inner": module}))
    return f"nested.{len(model.nested) - 1}.inner"


def _build(net: Net) -> tuple[DagNet, torch.Tensor]:
    model = DagNet()
    modules: dict[int, nn.Module] = {}
    paths: dict[int, str] = {}
    consumed: set[int] = set()
    for i, step in enumerate(net.steps):
        if isinstance(step, Merge):
            model.program.append((step.op, "", (step.a, step.b)))
            consumed.update((step.a, step.b))
            continue
        if isinstance(step, Reshape):
            model.program.append((step.op, "", (step.src,)))
            consumed.add(step.src)
            continue
        consumed.add(step.src)
        if isinstance(step, Again):
            path = paths[step.step]
            if step.alias:
                path = _register(model, modules[step.step], step.place)
            model.program.append(("call", path, (step.src,)))
            continue
        module = _make_module(step, modules, net.batch)
        if step.frozen:
            module.requires_grad_(False)
        if step.hook == "pre":
            module.register_forward_pre_hook(noop_pre_hook)
        elif step.hook == "post":
            module.register_forward_hook(noop_hook)
        modules[i] = module
        paths[i] = _register(model, module, step.place)
        model.program.append(("call", paths[i], (step.src,)))
    model.outputs = tuple(v for v in range(len(net.steps) + 1) if v not in consumed)
    for i, step in enumerate(net.steps):  # per-norm modes last: they are part of the recipe
        if isinstance(step, Norm):
            modules[i].train(step.training)
    dtype = getattr(torch, net.dtype)
    model.to(dtype)
    x = torch.randn(net.batch, net.input.channels, *net.input.spatial, dtype=dtype)
    if net.channels_last:
        fmt = torch.channels_last if net.input.rank == 4 else torch.channels_last_3d
        for t in (*model.parameters(), *model.buffers()):  # model.to() trips on lazy ones
            if not is_lazy(t) and t.dim() == net.input.rank:
                t.data = t.data.contiguous(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
    return model, x


# --------------------------------------------------------------------------- drawing networks


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _rarely(draw: st.DrawFn) -> bool:
    """True one time in four; shrinks to False."""
    return draw(st.integers(0, 3)) == 3


@dataclass
class _Value:
    shape: Shape
    users: int = 0
    writable: bool = False  # a new tensor that no op saves for backward: may be changed in place
    locked: bool = False  # consumed by an in-place op: nothing else may read it


@dataclass
class _Drawing:
    """The state of a network being drawn: values, and the modules that can be called again."""

    batch: int
    values: list[_Value]
    steps: list[Step]
    #: Every norm in eval mode (a pretrained model, what folding needs), or each drawn freely.
    all_eval: bool = False

    def open_values(self) -> list[int]:
        return [i for i, v in enumerate(self.values) if not v.locked]

    def add(self, step: Step, shape: Shape, reads: tuple[int, ...], writable: bool = False) -> None:
        for r in reads:
            self.values[r].users += 1
        self.steps.append(step)
        self.values.append(_Value(shape, writable=writable))


def _writable(step: Step) -> bool:
    """Whether ``step``'s output may be changed in place: no op saved it for backward."""
    if isinstance(step, Norm):
        return step.flavour != "fused"  # its ReLU saves its output
    return isinstance(step, Conv | Linear | Scripted)


def _needs_batch_stats(flavour: str, training: bool, track: bool) -> bool:
    """Batch statistics over the batch and the positions (BatchNorm in training, or without
    running statistics)."""
    if flavour in PER_SAMPLE or flavour in ("frozen", "lookalike"):
        return False
    return training or not track


def _needs_instance_stats(flavour: str, training: bool, track: bool) -> bool:
    """InstanceNorm statistics over the positions of one sample (torch refuses one position)."""
    return flavour == "in" and (training or not track)


def _normalized(flavour: str, shape: Shape) -> int:
    """The size of the dim a norm of ``flavour`` normalizes on a value of ``shape``."""
    if flavour in LAST_DIM:
        return shape.spatial[-1] if shape.spatial else shape.channels
    return shape.channels


def _norm_fits(step: Norm, shape: Shape, batch: int) -> bool:
    """Whether the norm module of ``step`` runs on a value of ``shape``."""
    if (
        shape.rank not in NORM_RANKS[step.flavour]
        or _normalized(step.flavour, shape) != step.channels
    ):
        return False
    if step.flavour == "in" and shape.rank != step.dims + 2:
        return False
    if step.flavour == "gn" and step.channels // step.groups * math.prod(shape.spatial) < 2:
        return False
    if _needs_batch_stats(step.flavour, step.training, step.track):
        return _values_per_channel(batch, shape) >= 2
    if _needs_instance_stats(step.flavour, step.training, step.track):
        return math.prod(shape.spatial) >= 2
    return True


def _values_per_channel(batch: int, shape: Shape) -> int:
    return batch * math.prod(shape.spatial)


def _calls(step: Step, shape: Shape, batch: int) -> Shape | None:
    """The output shape when ``step``'s module is called on ``shape``, or None if it cannot be."""
    if isinstance(step, Conv | Scripted):
        ok = shape.rank == step.dims + 2 and shape.channels == step.cin
        return Shape(shape.rank, step.cout, shape.spatial) if ok else None
    if isinstance(step, Linear):
        if step.last_dim:
            if shape.rank < 3 or shape.spatial[-1] != step.fin:
                return None
            return Shape(shape.rank, shape.channels, (*shape.spatial[:-1], step.fout))
        return Shape(2, step.fout, ()) if shape.rank == 2 and shape.channels == step.fin else None
    if isinstance(step, Norm):
        return shape if _norm_fits(step, shape, batch) else None
    if isinstance(step, Act):
        return None if step.kind == "relu_" else shape  # an in-place call reads one value only
    return None


def _draw_common(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "place": draw(st.sampled_from(["layers", "named", "nested"])),
        "frozen": draw(st.integers(0, 7)) == 7,
        "hook": draw(st.sampled_from([None, None, None, "pre", "post"])),
    }


def _draw_conv(draw: st.DrawFn, d: _Drawing, src: int) -> None:
    shape = d.values[src].shape
    cin, dims = shape.channels, shape.rank - 2
    tieable = [
        i
        for i, s in enumerate(d.steps)
        if isinstance(s, Conv) and (s.dims, s.cin, s.weight_norm) == (dims, cin, False)
    ]
    tie = draw(st.sampled_from(tieable)) if tieable and draw(st.booleans()) else None
    if tie is not None:  # the same configuration, sharing the weight Parameter
        base = d.steps[tie]
        assert isinstance(base, Conv)
        cout, kernel, groups, transposed = base.cout, base.kernel, base.groups, base.transposed
    else:
        groups = draw(st.sampled_from(_divisors(cin)))
        cout = groups * draw(st.integers(1, 12 // groups))
        kernel = draw(st.sampled_from([1, 3]))
        transposed = _rarely(draw)
    step = Conv(
        src=src,
        dims=dims,
        cin=cin,
        cout=cout,
        kernel=kernel,
        groups=groups,
        bias=draw(st.booleans()),
        transposed=transposed,
        tie=tie,
        weight_norm=tie is None and _rarely(draw),
        **_draw_common(draw),
    )
    d.add(step, Shape(shape.rank, cout, shape.spatial), (src,), writable=True)


def _draw_linear(draw: st.DrawFn, d: _Drawing, src: int) -> None:
    shape = d.values[src].shape
    if shape.rank == 2:
        fin, fout = shape.channels, draw(st.integers(1, 12))
        out = Shape(2, fout, ())
    else:
        fin, fout = shape.spatial[-1], draw(st.integers(1, 6))
        out = Shape(shape.rank, shape.channels, (*shape.spatial[:-1], fout))
    step = Linear(
        src=src,
        fin=fin,
        fout=fout,
        bias=draw(st.booleans()),
        last_dim=shape.rank > 2,
        weight_norm=_rarely(draw),
        **_draw_common(draw),
    )
    d.add(step, out, (src,), writable=True)


def _draw_norm(draw: st.DrawFn, d: _Drawing, src: int) -> None:
    shape = d.values[src].shape
    positions = math.prod(shape.spatial)
    flavours = [f for f, ranks in NORM_RANKS.items() if shape.rank in ranks]
    if shape.channels * positions < 2:  # F.group_norm refuses one value per group
        flavours.remove("gn")
    flavour = draw(st.sampled_from(flavours))
    lazy = "no"
    if flavour in _NORM_DIMS:
        lazy = draw(st.sampled_from(["no", "no", "init", "uninit"]))
    track = draw(st.integers(0, 4)) != 4
    training = False if d.all_eval else draw(st.booleans())
    if _values_per_channel(d.batch, shape) < 2 and _needs_batch_stats(flavour, training, track):
        training, track = False, True  # batch statistics over one value per channel: invalid
    if math.prod(shape.spatial) < 2 and _needs_instance_stats(flavour, training, track):
        training, track = False, True  # instance statistics over one position: invalid
    channels = _normalized(flavour, shape)
    groups = 1
    if flavour == "gn":
        groups = draw(
            st.sampled_from([g for g in _divisors(channels) if channels // g * positions > 1])
        )
    step = Norm(
        src=src,
        flavour=flavour,
        channels=channels,
        affine=draw(st.integers(0, 4)) != 4,
        track=track if flavour not in PER_SAMPLE - {"in"} else False,
        training=training,
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        momentum=draw(st.sampled_from([0.1, None])),
        lazy=lazy,
        groups=groups,
        dims=shape.rank - 2 if flavour == "in" else 0,
        **_draw_common(draw),
    )
    if lazy == "uninit":  # requires_grad_ on an uninitialized parameter raises
        step = dataclasses.replace(step, frozen=False)
    d.add(step, shape, (src,), writable=_writable(step))


def _draw_act(draw: st.DrawFn, d: _Drawing, src: int) -> None:
    kind = draw(st.sampled_from(["relu", "relu_", "gelu", "identity"]))
    value = d.values[src]
    if kind == "relu_" and (value.users > 0 or not value.writable):
        kind = "relu"  # in place only on a new value that nothing else reads
    step = Act(src=src, kind=kind, **_draw_common(draw))
    d.add(step, value.shape, (src,))
    if kind == "relu_":
        value.locked = True


@st.composite
def nets(draw: st.DrawFn, max_steps: int = 8, scripted: bool = True) -> Net:
    """A tiny random network (see the module docstring) with its input shape and seed;
    ``scripted=False`` leaves TorchScript blocks out."""
    rank = draw(st.integers(2, 5))
    spatial = tuple(draw(st.integers(1, 6 if rank < 5 else 4)) for _ in range(rank - 2))
    shape = Shape(rank, draw(st.integers(1, 12)), spatial)
    d = _Drawing(
        batch=draw(st.integers(1, 3)),
        values=[_Value(shape)],
        steps=[],
        all_eval=draw(st.booleans()),
    )
    kinds = ["block", "norm", "conv", "linear", "act", "merge", "reshape", "again"]
    kinds += ["scripted"] if scripted else []
    for _ in range(draw(st.integers(1, max_steps))):
        kind = draw(st.sampled_from(kinds))
        open_values = d.open_values()
        # Half the time the newest value: chains (conv -> norm -> act) are what CNNs are made of.
        src = open_values[-1] if draw(st.booleans()) else draw(st.sampled_from(open_values))
        shape = d.values[src].shape
        if kind == "block":  # producer, norm, activation
            if shape.rank >= 3:
                _draw_conv(draw, d, src)
            else:
                _draw_linear(draw, d, src)
            _draw_norm(draw, d, len(d.values) - 1)
            _draw_act(draw, d, len(d.values) - 1)
        elif kind == "norm":
            _draw_norm(draw, d, src)
        elif kind == "conv" and shape.rank >= 3:
            _draw_conv(draw, d, src)
        elif kind == "linear":
            _draw_linear(draw, d, src)
        elif kind == "act":
            _draw_act(draw, d, src)
        elif kind == "merge":
            _draw_merge(draw, d, src)
        elif kind == "reshape":
            if shape.rank >= 3:
                d.add(Reshape(src=src, op="pool"), Shape(2, shape.channels, ()), (src,))
            else:
                out = Shape(3, shape.channels, (1,))
                d.add(Reshape(src=src, op="unsqueeze"), out, (src,))
        elif kind == "again":
            _draw_again(draw, d, src)
        elif kind == "scripted" and shape.rank >= 3:
            step = Scripted(
                src=src,
                dims=shape.rank - 2,
                cin=shape.channels,
                cout=draw(st.integers(1, 12)),
                kernel=draw(st.sampled_from([1, 3])),
                training=draw(st.booleans()) and _values_per_channel(d.batch, shape) > 1,
                place=draw(st.sampled_from(["layers", "named", "nested"])),
            )
            d.add(step, Shape(shape.rank, step.cout, shape.spatial), (src,), writable=True)
    if not any(isinstance(s, Norm) for s in d.steps):
        _draw_norm(draw, d, len(d.values) - 1)  # the last value is never locked
    return Net(
        seed=draw(st.integers(0, 2**16)),
        batch=d.batch,
        input=d.values[0].shape,
        steps=tuple(d.steps),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        channels_last=rank >= 4 and _rarely(draw),
    )


def _draw_merge(draw: st.DrawFn, d: _Drawing, a: int) -> None:
    shape = d.values[a].shape
    partners = [
        i
        for i in d.open_values()
        if d.values[i].shape.rank == shape.rank and d.values[i].shape.spatial == shape.spatial
    ]
    b = draw(st.sampled_from(partners))  # a itself is one: x + x, cat(x, x)
    other = d.values[b].shape
    if other.channels == shape.channels and draw(st.booleans()):
        d.add(Merge(a=a, b=b, op="add"), shape, (a, b), writable=True)
    elif shape.channels + other.channels <= 12:
        out = Shape(shape.rank, shape.channels + other.channels, shape.spatial)
        d.add(Merge(a=a, b=b, op="cat"), out, (a, b), writable=True)


def _draw_again(draw: st.DrawFn, d: _Drawing, src: int) -> None:
    shape = d.values[src].shape
    options = [
        (i, out)
        for i, s in enumerate(d.steps)
        if not isinstance(s, Merge | Reshape | Again)
        and (out := _calls(s, shape, d.batch)) is not None
    ]
    if not options:
        return
    i, out = draw(st.sampled_from(options))
    step = Again(
        src=src,
        step=i,
        alias=draw(st.booleans()),
        place=draw(st.sampled_from(["layers", "named", "nested"])),
    )
    d.add(step, out, (src,), writable=_writable(d.steps[i]))


# --------------------------------------------------------------------------- drawing swap arguments

#: Every registered norm name, read at collection time: families added later are covered.
NORMS: tuple[str, ...] = tuple(normswap.list_norms())

#: Spec fields whose type hint alone does not say what to draw.
FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "cond_dim": st.integers(1, 6),  # required by "adaln"
    "layers": st.lists(st.sampled_from(["conv", "linear"]), unique=True).map(tuple),
    "alpha_paths": st.dictionaries(
        st.sampled_from(["*", "layers.*", "named.*", "*.inner"]), st.floats(0.05, 2.0), max_size=2
    ),
}
#: Every source kind, read at collection time, and the selections ``replace=`` is drawn from.
KINDS: tuple[str, ...] = tuple(normswap.SOURCE_KINDS)
REPLACES: tuple[Any, ...] = (None, None, *KINDS, ("bn", "ln"), ("gn", "in", "rms"), "any")
#: Spec fields without a usable default.
REQUIRED_FIELDS = frozenset({"cond_dim"})


def field_strategy(name: str, hint: Any) -> st.SearchStrategy[Any]:
    """Values for a spec field, from the per-field table or else from its type hint."""
    if name in FIELD_STRATEGIES:
        return FIELD_STRATEGIES[name]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return st.none()
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(1, 12)
    if hint is float:
        return st.floats(1e-6, 1.0)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(field_strategy(name, a) for a in args))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(field_strategy(name, args[0]), unique=True, max_size=3).map(tuple)
    raise TypeError(f"no strategy for spec field {name}: {hint!r}; add it to FIELD_STRATEGIES")


@st.composite
def spec_options(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """Keyword overrides for the spec registered under ``name``: each field drawn or left out."""
    cls = spec_class(name)
    hints = typing.get_type_hints(cls)
    options = {}
    for f in dataclasses.fields(cls):
        if f.name in REQUIRED_FIELDS or draw(st.booleans()):
            options[f.name] = draw(field_strategy(f.name, hints[f.name]))
    return options


@st.composite
def patterns(draw: st.DrawFn, paths: list[str]) -> str:
    """A glob pattern built from a real module path (or one that matches nothing)."""
    path = draw(st.sampled_from(paths))
    head, _, last = path.rpartition(".")
    kind = draw(st.sampled_from(["exact", "prefix", "suffix", "all", "none", "wild"]))
    if kind == "exact":
        return path
    if kind == "prefix":
        return f"{head}.*" if head else f"{path}*"
    if kind == "suffix":
        return f"*.{last}" if head else f"*{last}"
    if kind == "all":
        return "*"
    if kind == "none":
        return "nothing.here.*"
    i = draw(st.integers(0, len(path) - 1))
    return path[:i] + "?" + path[i + 1 :]


def _pattern_arg(paths: list[str]) -> st.SearchStrategy[str | tuple[str, ...] | None]:
    return st.one_of(
        st.none(),
        patterns(paths),
        st.lists(patterns(paths), min_size=1, max_size=2).map(tuple),
    )


@dataclass(frozen=True)
class SwapArgs:
    """The arguments of one ``normswap.swap`` call (the model and its input apart).

    Attributes:
        name: a registered norm name.
        options: spec field overrides.
        include: glob pattern(s) or ``None``.
        exclude: glob pattern(s) or ``None``.
        inputs: how ``example_inputs`` is passed: ``None`` (not at all), ``"tensor"``,
            ``"tuple"`` (positional arguments) or ``"dict"`` (keyword arguments).
        strict: ``strict=``.
        dry_run: ``dry_run=``.
        replace: ``replace=`` (``None``: the default, BatchNorm).
    """

    name: str
    options: dict[str, Any]
    include: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None
    inputs: str | None = None
    strict: bool = False
    dry_run: bool = False
    replace: Any = None

    def kwargs(self, x: torch.Tensor, **changes: Any) -> dict[str, Any]:
        """Keyword arguments of ``swap(model, name, **kwargs)`` with input ``x``."""
        args = dataclasses.replace(self, **changes)
        example = {
            None: None,
            "tensor": x,
            "tuple": (x,),
            "dict": {"x": x},
        }[args.inputs]
        return {
            "include": args.include,
            "exclude": args.exclude,
            "example_inputs": example,
            "strict": args.strict,
            "dry_run": args.dry_run,
            "replace": args.replace,
            **args.options,
        }


@st.composite
def swap_args(draw: st.DrawFn, paths: list[str]) -> SwapArgs:
    """Arguments for ``swap`` on a model whose module paths are ``paths``."""
    name = draw(st.sampled_from(NORMS))
    return SwapArgs(
        name=name,
        options=draw(spec_options(name)),
        include=draw(_pattern_arg(paths)) if paths else None,
        exclude=draw(_pattern_arg(paths)) if paths else None,
        inputs=draw(st.sampled_from([None, "tensor", "tuple", "dict"])),
        strict=draw(st.integers(0, 4)) == 4,
        dry_run=draw(st.integers(0, 9)) == 9,
        replace=draw(st.sampled_from(REPLACES)),
    )


@st.composite
def swap_cases(draw: st.DrawFn) -> tuple[Net, SwapArgs]:
    """A network recipe and swap arguments built from its real module paths."""
    net = draw(nets())
    model, _ = net.build()
    paths = [p for p, _ in model.named_modules(remove_duplicate=False) if p]
    return net, draw(swap_args(paths))
