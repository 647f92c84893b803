"""The exact LayerNorm → RMSNorm rewrite: centre every writer of the stream, fold γ/β forward.

LayerNorm subtracts each vector's mean before dividing by its root mean square; RMSNorm does
not. Where every vector a LayerNorm reads already has zero mean along its normalized dim, the
two compute the same (with the same eps), so a LayerNorm can become an RMSNorm exactly once
each *writer* of what it reads produces zero-mean vectors. In a pre-norm transformer, what a
LayerNorm reads is the residual stream: the sum of the embeddings (token and position
embeddings, the class token, the patch-embedding conv) and every attention and MLP output
projection. Subtracting, from each writer's weight and bias, their mean over the output
channels makes its output zero-mean for every input (SliceGPT, QuaRot). The LayerNorm's γ/β
then fold into the linear layers that read its output (``W diag(γ)``, ``b + W β``), leaving a
weightless RMSNorm.

:func:`analyze` finds all of it on the value graph of one forward
(:mod:`normswap.graph.dataflow`), with no per-architecture code:

* from each converted LayerNorm's input it walks back through residual adds, reshapes,
  transposes, concatenations of tokens, slices and padding of positions, and scalings of whole
  vectors to the writers: a linear
  (``addmm``/``mm`` with a parameter weight, torch's ``nn.Linear`` or Hugging Face's
  transposed ``Conv1D``), an ungrouped convolution, an embedding lookup, or a parameter or
  buffer added in (class token, position embedding). Anything else that writes into the stream
  cannot be centred and refuses the rewrite, naming the op and the module: an activation, a
  grouped (depthwise) conv, an elementwise scale such as a LayerScale, another norm's output;
* every value of the stream must be read only by the stream itself and by LayerNorms over the
  same dim (which centring does not change); a value read by anything else refuses it;
* LayerNorms whose streams share a value or a writer are one component: all convert, or none;
* a writer's parameter used elsewhere by another module (an embedding tied to the LM head) is
  untied: the other module gets a copy of the original;
* from each LayerNorm's output it walks forward through view-like ops to the linear layers
  that read it; where every reader is one, γ folds into their weights, and β into their biases
  where they all have one; what cannot fold stays in the RMSNorm (``weight``/``bias``).

:func:`apply_edits` does the arithmetic in float64 and :func:`check_outputs` compares the
model's outputs with the ones recorded before, so a rewrite that is not exact is rolled back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normswap.errors import NormSwapError
from normswap.graph.dataflow import Dataflow, Op, record_dataflow
from normswap.graph.record import VALUE_FREE
from normswap.inputs import call_model, tensors
from normswap.modes import eval_mode

__all__ = [
    "Absorb",
    "CenterAnalysis",
    "Centre",
    "analyze",
    "apply_edits",
    "apply_module_edits",
    "check_outputs",
]

#: Ops that move or copy a tensor without mixing its channel axis into others.
_SAME = frozenset({"clone", "contiguous", "alias", "_to_copy", "detach", "lift_fresh"})
#: Averages over positions (a channel axis kept intact stays zero-mean).
_POOLS = frozenset(
    {"mean", "sum", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool2d",
     "_adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool3d"}
)  # fmt: skip
#: Norm ops whose output, written into a stream, no weight edit can centre.
_NORMS = frozenset(
    {"native_layer_norm", "native_group_norm", "native_batch_norm", "_native_batch_norm_legit",
     "_native_batch_norm_legit_no_training", "_fused_rms_norm", "rms_norm"}
)  # fmt: skip


@dataclass(frozen=True)
class Centre:
    """Subtract the mean along ``axis`` from the parameter ``module.attr`` (a writer).

    Example:
        >>> Centre("head", "weight", 0).axis
        0
    """

    module: str
    attr: str
    axis: int


@dataclass(frozen=True)
class Absorb:
    """Fold the γ/β of the norm at ``norm`` into the linear weight ``module.attr``, whose input
    channels are along ``axis``, and β into ``bias`` (``None``: β stays in the norm).

    Example:
        >>> Absorb("mlp.fc1", "weight", 1, "ln_2", "bias").norm
        'ln_2'
    """

    module: str
    attr: str
    axis: int
    norm: str
    bias: str | None


@dataclass
class CenterAnalysis:
    """What :func:`analyze` found (plain data and the reference outputs).

    Attributes:
        problems: converted norm path -> why its stream cannot be centred.
        centre: the writer edits of every centrable component.
        absorb: norm path -> the edits that fold its γ/β (empty: they stay in the norm).
        keeps_gamma: norm paths whose γ and β stay in the RMSNorm (some reader is not a linear
            layer with a bias).
        keeps_beta: the same paths (β never folds without γ).
        untie: ``(module, attr)`` of tied parameters to give their own copy first.
        notes: norm path -> a sentence for the report.
        outputs: the model's outputs on the example inputs, in eval mode, before the rewrite.
        example_inputs: those inputs.
    """

    problems: dict[str, str] = field(default_factory=dict)
    centre: list[Centre] = field(default_factory=list)
    absorb: dict[str, list[Absorb]] = field(default_factory=dict)
    keeps_gamma: set[str] = field(default_factory=set)
    keeps_beta: set[str] = field(default_factory=set)
    untie: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    outputs: list[Tensor] = field(default_factory=list)
    example_inputs: Any = None

    def writes(self, norms: Iterable[str]) -> list[tuple[str, str]]:
        """The ``(module, attr)`` parameters the rewrite of ``norms`` changes in place."""
        wanted = set(norms)
        out = [(c.module, c.attr) for c in self.centre]
        for path, edits in self.absorb.items():
            if path in wanted:
                out += [(a.module, a.attr) for a in edits]
                out += [(a.module, a.bias) for a in edits if a.bias is not None]
        return list(dict.fromkeys(out))


class _Blocked(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _where(op: Op) -> str:
    return f"{op.name} in {op.module!r}" if op.module else f"{op.name} in the model's forward"


def _arg(op: Op, i: int, name: str, default: Any = None) -> Any:
    if len(op.args) > i:
        return op.args[i]
    return op.kwargs.get(name, default)


def _norm_dims(rank: int, dims: Any) -> list[int]:
    if isinstance(dims, int):
        dims = [dims]
    return [d % rank for d in dims]


def _view_axis(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> int | None:
    """The axis of ``in_shape`` that a view to ``out_shape`` keeps intact as ``axis``."""
    size, after = out_shape[axis], math.prod(out_shape[axis + 1 :])
    for i in range(len(in_shape)):
        if in_shape[i] == size and math.prod(in_shape[i + 1 :]) == after:
            return i
    return None


class _Walk:
    """The backward walk of one norm call's stream."""

    def __init__(self, flow: Dataflow) -> None:
        self.flow = flow
        self.values: dict[int, int] = {}  # stream value -> its channel axis
        self.edges: set[tuple[int, int]] = set()  # (op index, value) walked through
        self.leaves: dict[int, int] = {}  # leaf value -> the axis to centre
        self.users: dict[int, set[int]] = {}  # leaf value -> the ops writing it into the stream

    def run(self, value: int, axis: int) -> None:
        stack = [(value, axis)]
        while stack:
            v, a = stack.pop()
            if v in self.values:
                if self.values[v] != a:
                    raise _Blocked("the stream reaches one tensor along two different axes")
                continue
            self.values[v] = a
            if v in self.flow.leaves:
                self._leaf(v, a)
                continue  # the op that reached it is its user (recorded with the edge)
            op = self.flow.producer.get(v)
            if op is None:
                what = "the model's input" if v in self.flow.inputs else "a constant tensor"
                raise _Blocked(
                    f"{what} is written into the stream as it is, which no weight edit centres"
                )
            for nxt in self._step(op, v, a):
                self.edges.add((op.index, nxt[0]))
                if nxt[0] in self.flow.leaves:
                    self.users.setdefault(nxt[0], set()).add(op.index)
                stack.append(nxt)

    def _leaf(self, v: int, a: int) -> None:
        if self.leaves.get(v, a) != a:
            raise _Blocked(f"{self.flow.leaves[v].name} is written into the stream along two axes")
        self.leaves[v] = a

    def _shape(self, v: int) -> tuple[int, ...]:
        return self.flow.shapes[v]

    def _step(self, op: Op, v: int, a: int) -> list[tuple[int, int]]:
        """Where the walk continues: (value, axis) pairs; raises _Blocked."""
        name, flow = op.name, self.flow
        out_rank = len(self._shape(v))
        if name in ("add", "sub"):
            nxt = []
            for x in op.args[:2]:
                if not flow.is_value(x):
                    if x != 0:
                        raise _Blocked(f"{_where(op)} adds the constant {x!r} to every channel")
                    continue
                rank = len(self._shape(x))
                ax = a - (out_rank - rank)
                if ax < 0 or self._shape(x)[ax] != self._shape(v)[a]:
                    raise _Blocked(
                        f"{_where(op)} adds a tensor that is the same on every channel (broadcast "
                        "along them), which shifts the mean"
                    )
                nxt.append((x, ax))
            return nxt  # any alpha: a scaled zero-mean vector is zero-mean
        if name in ("mul", "div"):
            x, y = op.args[0], op.args[1]
            scale_ok = []
            for t in (x, y):
                if not flow.is_value(t):
                    scale_ok.append(True)
                    continue
                rank = len(self._shape(t))
                ax = a - (out_rank - rank)
                scale_ok.append(ax < 0 or self._shape(t)[ax] == 1)
            if name == "div":
                if flow.is_value(x) and scale_ok[1]:
                    return [(x, a - (out_rank - len(self._shape(x))))]
            elif flow.is_value(x) and scale_ok[1]:
                return [(x, a - (out_rank - len(self._shape(x))))]
            elif flow.is_value(y) and scale_ok[0]:
                return [(y, a - (out_rank - len(self._shape(y))))]
            raise _Blocked(
                f"{_where(op)} scales each channel by its own factor (a LayerScale?), which no "
                "weight edit upstream keeps zero-mean"
            )
        if name in _SAME:
            return [(op.args[0], a)]
        if name == "native_dropout":
            return [(op.args[0], a)]
        if name in ("view", "_unsafe_view", "reshape", "_reshape_alias", "flatten"):
            x = op.args[0]
            ax = _view_axis(self._shape(x), self._shape(v), a)
            if ax is None:
                raise _Blocked(f"{_where(op)} reshapes the channel axis into others")
            return [(x, ax)]
        if name == "permute":
            dims = _norm_dims(len(self._shape(op.args[0])), op.args[1])
            return [(op.args[0], dims[a])]
        if name in ("transpose", "t"):
            rank = len(self._shape(op.args[0]))
            d0, d1 = (0, 1) if name == "t" else _norm_dims(rank, [op.args[1], op.args[2]])
            return [(op.args[0], d1 if a == d0 else d0 if a == d1 else a)]
        if name == "expand":
            x = op.args[0]
            ax = a - (out_rank - len(self._shape(x)))
            if ax < 0 or self._shape(x)[ax] != self._shape(v)[a]:
                raise _Blocked(f"{_where(op)} repeats one value across the channels")
            return [(x, ax)]
        if name == "unsqueeze":
            d = _arg(op, 1, "dim") % out_rank
            return [(op.args[0], a if a < d else a - 1)]
        if name == "squeeze":
            x = op.args[0]
            in_shape = self._shape(x)
            dims = _arg(op, 1, "dim", None)
            removed = [
                i
                for i in range(len(in_shape))
                if in_shape[i] == 1 and (dims is None or i in _norm_dims(len(in_shape), dims))
            ]
            kept = [i for i in range(len(in_shape)) if i not in removed]
            return [(x, kept[a])]
        if name == "cat":
            if _arg(op, 1, "dim", 0) % out_rank == a:
                raise _Blocked(
                    f"{_where(op)} joins channels of several vectors into one (a patch merging): "
                    "the norm reading it subtracts one mean from pieces that centring would shift "
                    "each by its own, so centring changes what it computes"
                )
            return [(x, a) for x in op.args[0]]
        if name in ("slice", "select", "index_select"):
            x = op.args[0]
            dim = _arg(op, 1, "dim", 0) % len(self._shape(x))
            if dim == a:
                raise _Blocked(f"{_where(op)} keeps part of the channels, which is not zero-mean")
            if name == "select":
                return [(x, a if a < dim else a + 1)]
            return [(x, a)]
        if name == "constant_pad_nd":
            if _pads_axis(list(op.args[1]), out_rank, a):
                raise _Blocked(f"{_where(op)} pads the channels, which centring would not shift")
            return [(op.args[0], a)]  # padded positions are zeros before and after
        if name == "roll":
            return [(op.args[0], a)]
        if name in _POOLS:
            x = op.args[0]
            if name in ("mean", "sum"):
                dims = _arg(op, 1, "dim", None)
                rank = len(self._shape(x))
                keep = bool(_arg(op, 2, "keepdim", False))
                reduced = list(range(rank)) if dims in (None, []) else _norm_dims(rank, dims)
                kept = [i for i in range(rank) if i not in reduced]
                in_axis = a if keep else kept[a]
                if in_axis in reduced:
                    raise _Blocked(f"{_where(op)} reduces over the channels")
                return [(x, in_axis)]
            if a != 1:
                raise _Blocked(f"{_where(op)} pools over the channel axis")
            return [(x, a)]
        if name in ("mm", "addmm"):
            return self._linear_writer(op, v, a)
        if name == "embedding":
            self._writer(op, op.args[0], 1, "the embedding table")
            return []
        if name == "convolution":
            return self._conv_writer(op, a)
        if name in _NORMS:
            raise _Blocked(
                f"the output of the norm in {op.module!r} is written into the stream; a norm's "
                "output is not zero-mean and no weight edit makes it so (a post-norm block, or "
                "a norm right after the embeddings)"
            )
        raise _Blocked(f"{_where(op)} writes into the stream and cannot be centred")

    def _writer(self, op: Op, value: Any, axis: int, what: str) -> None:
        leaf, ax = _to_leaf(self.flow, value, axis)
        if leaf is None:
            raise _Blocked(f"{_where(op)}: {what} is not a parameter, so it cannot be centred")
        self._leaf(leaf, ax)
        self.users.setdefault(leaf, set()).add(op.index)

    def _linear_writer(self, op: Op, v: int, a: int) -> list[tuple[int, int]]:
        if a != 1:
            raise _Blocked(f"{_where(op)} produces the channels along its rows")
        mat2 = op.args[2] if op.name == "addmm" else op.args[1]
        self._writer(op, mat2, 1, "the weight")
        if op.name == "addmm":
            bias = op.args[0]
            if self.flow.is_value(bias):
                self._writer(op, bias, len(self._shape(bias)) - 1, "its bias")
        return []

    def _conv_writer(self, op: Op, a: int) -> list[tuple[int, int]]:
        if a != 1:
            raise _Blocked(f"{_where(op)}: a convolution's channels are its dim 1")
        transposed, groups = op.args[6], op.args[8]
        if groups != 1:
            raise _Blocked(
                f"{_where(op)} is a grouped (depthwise) convolution: each output channel sees "
                "its own group only, so no weight edit makes the channels zero-mean"
            )
        self._writer(op, op.args[1], 1 if transposed else 0, "the weight")
        bias = op.args[2]
        if self.flow.is_value(bias):
            self._writer(op, bias, 0, "its bias")
        return []


def _to_leaf(flow: Dataflow, value: Any, axis: int) -> tuple[int | None, int]:
    """Follow a weight operand back through transposes and copies to a parameter."""
    v, a = value, axis
    while flow.is_value(v) and v not in flow.leaves:
        op = flow.producer.get(v)
        if op is None:
            return None, a
        if op.name in ("t", "transpose"):
            rank = len(flow.shapes[op.args[0]])
            d0, d1 = (0, 1) if op.name == "t" else _norm_dims(rank, [op.args[1], op.args[2]])
            a = d1 if a == d0 else d0 if a == d1 else a
            v = op.args[0]
        elif op.name in _SAME:
            v = op.args[0]
        else:
            return None, a
    return (v if flow.is_value(v) else None), a


def _layer_norm_calls(flow: Dataflow, norms: Mapping[str, Any]) -> dict[str, list[Op]]:
    """The ``native_layer_norm`` calls of each converted norm, by path."""
    calls: dict[str, list[Op]] = {}
    for op in flow.ops:
        if op.name == "native_layer_norm" and op.module in norms:
            calls.setdefault(op.module, []).append(op)
    return calls


class _Components:
    """Union-find over norm paths."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.parent = {p: p for p in paths}

    def find(self, p: str) -> str:
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def analyze(
    model: nn.Module, norms: Mapping[str, tuple[str, ...]], example_inputs: Any
) -> CenterAnalysis:
    """Find what makes the LayerNorms at ``norms`` (canonical path -> all paths) RMSNorms
    exactly; modifies nothing.

    Raises:
        TraceError: the model does not run on ``example_inputs``.

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.ln = nn.Embedding(10, 8), nn.LayerNorm(8)
        ...         self.fc = nn.Linear(8, 3)
        ...     def forward(self, ids):
        ...         return self.fc(self.ln(self.embed(ids)))
        >>> found = analyze(Block(), {"ln": ("ln",)}, torch.tensor([[1, 2, 3]]))
        >>> found.problems, [c.module for c in found.centre], [a.module for a in found.absorb["ln"]]
        ({}, ['embed'], ['fc'])
    """
    with torch.no_grad(), eval_mode(model):
        outputs = [t.detach().clone() for t in tensors(call_model(model, example_inputs))]
    flow = record_dataflow(model, example_inputs)
    calls = _layer_norm_calls(flow, norms)
    result = CenterAnalysis(outputs=outputs, example_inputs=example_inputs)
    walks: dict[str, list[_Walk]] = {}
    for path in norms:
        if path not in calls:
            result.problems[path] = "it did not run on the example inputs"
            continue
        for op in calls[path]:
            if len(op.args[1]) != 1:
                result.problems[path] = (
                    f"it normalizes {len(op.args[1])} trailing dims; the rewrite handles one"
                )
                break
            walk = _Walk(flow)
            x = op.args[0]
            try:
                walk.run(x, len(flow.shapes[x]) - 1)
            except _Blocked as err:
                result.problems.setdefault(path, err.reason)
            walks.setdefault(path, []).append(walk)
    # The stream is every walk together: a value one norm's walk reaches may be read by an op
    # another norm's walk goes through (the residual add after a block).
    edges = {e for ws in walks.values() for w in ws for e in w.edges}
    for path, ws in walks.items():
        for walk in ws:
            try:
                _check_readers(flow, walk, edges)
            except _Blocked as err:
                result.problems.setdefault(path, err.reason)
    _components(result, walks)
    good = [p for p in walks if p not in result.problems]
    _plan_writers(flow, result, [w for p in good for w in walks[p]], good)
    for path in good:
        if path not in result.problems:
            _plan_absorb(flow, result, path, calls[path])
    return result


def _check_readers(flow: Dataflow, walk: _Walk, walked: set[tuple[int, int]]) -> None:
    """Every stream value is read only by the stream (``walked``: every walk's edges) or by a
    LayerNorm over its channels."""
    for v, axis in walk.values.items():
        if v in flow.outputs:
            raise _Blocked("a value of the stream is also a model output, which centring changes")
        for op in flow.uses(v):
            if (op.index, v) in walked or op.name in VALUE_FREE:
                continue
            rank = len(flow.shapes[v])
            if (
                op.name == "native_layer_norm"
                and op.args[0] == v
                and len(op.args[1]) == 1
                and axis == rank - 1
            ):
                continue  # a LayerNorm does not see the mean it subtracts
            raise _Blocked(
                f"the stream is also read by {_where(op)}, which would see the centred values"
            )


def _components(result: CenterAnalysis, walks: dict[str, list[_Walk]]) -> None:
    """Norms whose streams share a value or a writer stand or fall together."""
    comps = _Components(walks)
    owner: dict[int, str] = {}
    for path, ws in walks.items():
        for w in ws:
            for v in (*w.values, *w.leaves):
                other = owner.setdefault(v, path)
                if other != path:
                    comps.union(path, other)
    blocked: dict[str, str] = {}
    for path in walks:
        if path in result.problems:
            blocked.setdefault(comps.find(path), f"{result.problems[path]} (at {path})")
    for path in walks:
        root = comps.find(path)
        if root in blocked and path not in result.problems:
            result.problems[path] = (
                f"its stream is shared with a norm that cannot convert: {blocked[root]}"
            )


def _weight_uses(flow: Dataflow, leaf: int) -> list[Op]:
    """The ops reading a leaf, through transposes and copies (not those themselves)."""
    found, stack, seen = [], [leaf], {leaf}
    while stack:
        for op in flow.uses(stack.pop()):
            if op.name in ("t", "transpose", *_SAME) and op.outputs:
                if op.outputs[0] not in seen:
                    seen.add(op.outputs[0])
                    stack.append(op.outputs[0])
            else:
                found.append(op)
    return found


def _plan_writers(
    flow: Dataflow, result: CenterAnalysis, walks: list[_Walk], good: list[str]
) -> None:
    """The centring edits of the good components, and the tied parameters to untie for them."""
    leaves: dict[int, int] = {}
    users: dict[int, set[int]] = {}
    for w in walks:
        leaves.update(w.leaves)
        for leaf, ops in w.users.items():
            users.setdefault(leaf, set()).update(ops)
    centre: list[Centre] = []
    untie: list[tuple[str, str]] = []
    for leaf, axis in leaves.items():
        info = flow.leaves[leaf]
        mine = users.get(leaf, set())
        owner = info.holder(flow.ops[min(mine)].module) if mine else (info.module, info.attr)
        for op in _weight_uses(flow, leaf):
            if op.index in mine:
                continue
            holder = info.holder(op.module)
            if holder == owner:  # the writer's own module uses it elsewhere too
                for path in good:
                    result.problems.setdefault(
                        path,
                        f"{info.name} is written into the stream and also used by {_where(op)}, "
                        "which centring would change",
                    )
                return
            if holder not in untie:
                untie.append(holder)  # the other module keeps the original values
        centre.append(Centre(owner[0], owner[1], axis))
    result.centre += centre
    result.untie += [h for h in untie if h not in result.untie]


def _plan_absorb(flow: Dataflow, result: CenterAnalysis, path: str, calls: list[Op]) -> None:
    """Where the norm's γ/β fold: into the linear layers reading its output, when every reader
    is one, has a bias, and nothing but views sits in between (γ alone cannot fold while β stays
    in the norm: the reader would scale β too). Otherwise both stay in the RMSNorm."""
    edits: dict[tuple[str, str], Absorb] = {}
    untie: list[tuple[str, str]] = []
    try:
        for op in calls:
            out = op.outputs[0]
            found, beta_safe = _readers(flow, out, len(flow.shapes[out]) - 1)
            if not beta_safe:
                raise _Blocked("zero padding sits between it and a reader")
            for r in found:
                if r.bias is None:
                    raise _Blocked(f"its reader {r.module} has no bias to take β")
                edits[(r.module, r.attr)] = Absorb(r.module, r.attr, r.axis, path, r.bias)
        for module, attr in edits:
            # A reader's weight shared with another module: that module keeps the original.
            leaf = next(v for v, info in flow.leaves.items() if (module, attr) in info.holders)
            info = flow.leaves[leaf]
            for op in _weight_uses(flow, leaf):
                if info.holder(op.module) != (module, attr):
                    untie.append((module, attr))
                elif op.name not in ("mm", "addmm"):
                    raise _Blocked(f"{module}.{attr} is also used by {_where(op)}")
    except _Blocked as err:
        result.keeps_gamma.add(path)
        result.keeps_beta.add(path)
        result.notes[path] = f"γ and β stay in the RMSNorm: {err.reason}"
        return
    result.untie += [h for h in dict.fromkeys(untie) if h not in result.untie]
    readers = ", ".join(dict.fromkeys(e.module for e in edits.values()))
    result.notes[path] = f"γ and β folded into {readers}"
    result.absorb[path] = list(edits.values())


@dataclass(frozen=True)
class _Reader:
    module: str
    attr: str
    axis: int
    bias: str | None


def _readers(flow: Dataflow, value: int, axis: int) -> tuple[list[_Reader], bool]:
    """The linear layers reading ``value`` (channel axis ``axis``) through view-like ops, and
    whether β reaches them unchanged (no zero padding in between). Raises _Blocked when some
    reader is not a linear layer."""
    found: list[_Reader] = []
    beta_safe = True
    stack = [(value, axis)]
    seen: set[tuple[int, int]] = set()
    while stack:
        v, a = stack.pop()
        if (v, a) in seen:
            continue
        seen.add((v, a))
        if v in flow.outputs:
            raise _Blocked("its output is also a model output")
        rank = len(flow.shapes[v])
        for op in flow.uses(v):
            name = op.name
            out = op.outputs[0] if op.outputs else None
            if name in VALUE_FREE:
                continue
            if name in _SAME or _restride(flow, op):
                stack.append((out, a))
            elif name in ("view", "_unsafe_view", "reshape", "_reshape_alias", "flatten"):
                ax = _forward_view_axis(flow.shapes[v], flow.shapes[out], a)
                if ax is None:
                    raise _Blocked(f"{_where(op)} reshapes its channels into other dims")
                stack.append((out, ax))
            elif name == "permute":
                dims = _norm_dims(rank, op.args[1])
                stack.append((out, dims.index(a)))
            elif name in ("transpose", "t"):
                d0, d1 = (0, 1) if name == "t" else _norm_dims(rank, [op.args[1], op.args[2]])
                stack.append((out, d1 if a == d0 else d0 if a == d1 else a))
            elif name in ("select", "slice"):
                dim = _arg(op, 1, "dim", 0) % rank
                if dim == a:
                    raise _Blocked(f"{_where(op)} takes part of its channels")
                stack.append((out, a - 1 if name == "select" and dim < a else a))
            elif name == "unsqueeze":
                d = _arg(op, 1, "dim") % (rank + 1)
                stack.append((out, a + 1 if d <= a else a))
            elif name == "constant_pad_nd":
                pads = list(op.args[1])
                if any(pads) and (
                    _arg(op, 2, "value", 0) not in (0, 0.0) or _pads_axis(pads, rank, a)
                ):
                    raise _Blocked(f"{_where(op)} pads its channels")
                beta_safe = beta_safe and not any(pads)
                stack.append((out, a))
            elif name == "roll":
                stack.append((out, a))
            elif name in ("mean", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d"):
                if name == "mean":
                    dims = _norm_dims(rank, _arg(op, 1, "dim", list(range(rank))))
                    if a in dims:
                        raise _Blocked(f"{_where(op)} averages its channels")
                    keep = bool(_arg(op, 2, "keepdim", False))
                    stack.append((out, a if keep else a - sum(d < a for d in dims)))
                else:
                    if a != 1:
                        raise _Blocked(f"{_where(op)} pools its channels")
                    stack.append((out, a))
            elif name in ("mm", "addmm"):
                mat1 = op.args[1] if name == "addmm" else op.args[0]
                mat2 = op.args[2] if name == "addmm" else op.args[1]
                if mat1 != v or a != 1:
                    raise _Blocked(
                        f"{_where(op)} does not read its channels as a linear layer's inputs"
                    )
                leaf, ax = _to_leaf(flow, mat2, 0)
                if leaf is None:
                    raise _Blocked(f"{_where(op)}: the weight is not a parameter")
                module, attr = flow.leaves[leaf].holder(op.module)
                bias = None
                if name == "addmm" and flow.is_value(op.args[0]):
                    b, _ = _to_leaf(flow, op.args[0], 0)
                    if b is not None and flow.leaves[b].holder(op.module)[0] == module:
                        bias = flow.leaves[b].holder(op.module)[1]
                elif name == "mm":
                    bias = _bias_after(flow, op, module)
                found.append(_Reader(module, attr, ax, bias))
            else:
                raise _Blocked(f"it is read by {_where(op)}, not a linear layer")
    return found, beta_safe


def _restride(flow: Dataflow, op: Op) -> bool:
    """An ``as_strided(_)`` that keeps the shape of a tensor with at most one dim above 1 (a
    pooled ``(N, C, 1, 1)``: its strides cannot reorder values)."""
    if op.name not in ("as_strided", "as_strided_"):
        return False
    shape = flow.shapes[op.args[0]]
    return list(op.args[1]) == list(shape) and sum(d > 1 for d in shape[1:]) <= 1


def _pads_axis(pads: list[int], rank: int, axis: int) -> bool:
    """Whether F.pad's ``pads`` (last dim first, pairs) pad dim ``axis``."""
    pairs = [pads[i : i + 2] for i in range(0, len(pads), 2)]
    return any(rank - 1 - k == axis and any(pair) for k, pair in enumerate(pairs))


def _forward_view_axis(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int
) -> int | None:
    size, after = in_shape[axis], math.prod(in_shape[axis + 1 :])
    for j in range(len(out_shape)):
        if out_shape[j] == size and math.prod(out_shape[j + 1 :]) == after:
            return j
    return None


def _bias_after(flow: Dataflow, op: Op, module: str) -> str | None:
    """The bias parameter an ``mm`` output gets added next (torch's linear on 3-d input)."""
    v = op.outputs[0]
    for _ in range(4):
        users = flow.uses(v)
        if len(users) != 1:
            return None
        nxt = users[0]
        if nxt.name in ("view", "_unsafe_view", "reshape"):
            v = nxt.outputs[0]
            continue
        if nxt.name == "add":
            other = nxt.args[1] if nxt.args[0] == v else nxt.args[0]
            if flow.is_value(other) and other in flow.leaves and len(flow.shapes[other]) == 1:
                holder, attr = flow.leaves[other].holder(nxt.module)
                return attr if holder == module else None
        return None
    return None


# --------------------------------------------------------------------------- apply and check


def _tensor(model: nn.Module, module: str, attr: str) -> Tensor:
    return getattr(model.get_submodule(module), attr)


def apply_edits(
    model: nn.Module,
    analysis: CenterAnalysis,
    norms: Mapping[str, tuple[Tensor | None, Tensor | None]],
) -> None:
    """Untie, centre the writers and fold γ/β of ``norms`` (path -> the source's (γ, β)) into
    their readers, in float64, in place.

    Example:
        >>> lin, ln = nn.Linear(4, 8), nn.LayerNorm(8)
        >>> found = CenterAnalysis(centre=[Centre("0", "weight", 0), Centre("0", "bias", 0)])
        >>> apply_edits(nn.Sequential(lin, ln), found, {})
        >>> float(lin.weight.sum(0).abs().max()) < 1e-6
        True
    """
    for module_path, attr in analysis.untie:
        module = model.get_submodule(module_path)
        original = getattr(module, attr)
        setattr(module, attr, nn.Parameter(original.detach().clone(), original.requires_grad))
    work: dict[tuple[str, str], Tensor] = {}

    def get(module: str, attr: str) -> Tensor:
        key = (module, attr)
        if key not in work:
            work[key] = _tensor(model, module, attr).detach().to(torch.float64)
        return work[key]

    for path, edits in analysis.absorb.items():
        if path not in norms:
            continue
        gamma, beta = norms[path]
        for e in edits:
            w = get(e.module, e.attr)
            shape = [1] * w.dim()
            shape[e.axis] = -1
            if e.bias is not None and beta is not None:
                b = get(e.module, e.bias)
                contracted = torch.tensordot(
                    w, beta.detach().to(torch.float64), dims=([e.axis], [0])
                )
                work[(e.module, e.bias)] = b + contracted.reshape(b.shape)
            if gamma is not None:
                work[(e.module, e.attr)] = w * gamma.detach().to(torch.float64).view(shape)
    for c in analysis.centre:
        t = get(c.module, c.attr)
        work[(c.module, c.attr)] = t - t.mean(dim=c.axis, keepdim=True)
    with torch.no_grad():
        for (module, attr), value in work.items():
            target = _tensor(model, module, attr)
            target.copy_(value.to(target.dtype))


def apply_module_edits(module: nn.Module, edits: list[tuple[str, Any]]) -> None:
    """One module's part of the rewrite, in float64: fold γ/β into its weight and bias
    (``("absorb", (Absorb, γ, β))``), then centre its parameters (``("centre", Centre)``).

    Example:
        >>> lin = nn.Linear(4, 8)
        >>> apply_module_edits(lin, [("centre", Centre("", "weight", 0))])
        >>> float(lin.weight.sum(0).abs().max()) < 1e-6
        True
    """
    work: dict[str, Tensor] = {}

    def get(attr: str) -> Tensor:
        if attr not in work:
            work[attr] = getattr(module, attr).detach().to(torch.float64)
        return work[attr]

    for kind, edit in edits:
        if kind != "absorb":
            continue
        absorb, gamma, beta = edit
        w = get(absorb.attr)
        if absorb.bias is not None and beta is not None:
            b = get(absorb.bias)
            beta64 = beta.detach().to(torch.float64)
            work[absorb.bias] = b + torch.tensordot(w, beta64, dims=([absorb.axis], [0]))
        if gamma is not None:
            shape = [1] * w.dim()
            shape[absorb.axis] = -1
            work[absorb.attr] = w * gamma.detach().to(torch.float64).view(shape)
    for kind, edit in edits:
        if kind == "centre":
            t = get(edit.attr)
            work[edit.attr] = t - t.mean(dim=edit.axis, keepdim=True)
    with torch.no_grad():
        for attr, value in work.items():
            target = getattr(module, attr)
            target.copy_(value.to(target.dtype))


def check_outputs(model: nn.Module, analysis: CenterAnalysis, *, tolerance: float = 1e-4) -> None:
    """Refuse a rewrite whose outputs differ from the recorded ones (relative max difference
    above ``tolerance``, in eval mode).

    Raises:
        NormSwapError: naming the difference.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> found = analyze(model, {}, torch.randn(3, 2))
        >>> check_outputs(model, found)
    """
    with torch.no_grad(), eval_mode(model):
        now = [t.detach() for t in tensors(call_model(model, analysis.example_inputs))]
    if len(now) != len(analysis.outputs):
        raise NormSwapError("the rewritten model returns other outputs")
    for new, old in zip(now, analysis.outputs, strict=True):
        if not new.is_floating_point():
            continue
        scale = float(old.abs().max().clamp_min(1e-30))
        diff = float((new.double() - old.double()).abs().max()) / scale
        if not diff <= tolerance:
            raise NormSwapError(
                f"the LayerNorm -> RMSNorm rewrite is not exact on the example inputs: relative "
                f"max difference {diff:.2e} > {tolerance:g}"
            )
