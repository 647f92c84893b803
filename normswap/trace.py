"""Graph facts about a model's norm layers, recorded from one real forward pass.

For every norm layer (by default every BatchNorm, including torchvision's ``FrozenBatchNorm2d``)
:func:`trace` answers: how often does it run, what is the rank of its input, and which
conv/linear module produced that input tensor directly (same autograd node, no op in between)?
From those facts it decides whether the norm can be folded exactly into that producer.

The approach is Torch-Pruning's: forward hooks record the tensors that enter each norm and leave
each conv/linear during one real forward pass with autograd enabled, then autograd's graph is
walked from the model outputs to count who else consumes each producer's output. A dispatch mode
also records reads that leave no edge in that graph (``detach``, comparisons, ``.item()``, a
branch that does not reach the outputs), since folding would change what they see too. Unlike
``torch.fx``, this works for every model that runs, including data-dependent ones such as
torchvision's detection models and RAFT.

The pass is a real forward with autograd recording (one forward's time and activation memory):
keep the example inputs small. It leaves the model as it found it: hooks are removed, the
training/eval mode and ``requires_grad`` flags are unchanged, buffers that the forward updated
(BatchNorm running statistics in training mode) are restored, and the RNG state is restored.
Only lazy modules (``nn.LazyConv2d``, ...) keep what they infer on their first forward.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields, is_dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops.misc import FrozenBatchNorm2d

from normswap.errors import TraceError

__all__ = [
    "BATCHNORM_TYPES",
    "PRODUCER_TYPES",
    "GraphFacts",
    "NormFacts",
    "graph_facts",
    "producer_problem",
    "trace",
    "trace_fx",
]

#: The BatchNorm family: every ``_BatchNorm`` subclass (BatchNorm1d/2d/3d, SyncBatchNorm, the lazy
#: ones) and torchvision's ``FrozenBatchNorm2d``, which is a plain module with buffers only.
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, FrozenBatchNorm2d)

#: Modules whose output a BatchNorm can be folded into (subclasses included).
PRODUCER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


@dataclass(frozen=True)
class NormFacts:
    """What one forward pass showed about one norm module.

    Attributes:
        path: canonical path of the module (the first of ``paths``).
        paths: every path at which this module object is registered (shared modules have several).
        kind: the module's class name, e.g. ``"BatchNorm2d"``.
        calls: how many times the module ran during the forward.
        input_shapes: the shape of its input, one per call.
        input_rank: the number of dimensions of its input when every call agrees, else ``None``.
        producer: canonical path of the conv/linear module whose output tensor is exactly this
            norm's input (the same producer in every call), or ``None``.
        producer_kind: the producer's class name, or ``None``.
        foldable: whether the norm can be folded exactly into ``producer``.
        reason: why it is not foldable (``None`` when it is).

    Example:
        >>> facts = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval(),
        ...               torch.randn(1, 3, 8, 8))
        >>> facts["1"].producer, facts["1"].input_rank, facts["1"].foldable
        ('0', 4, True)
    """

    path: str
    paths: tuple[str, ...]
    kind: str
    calls: int
    input_shapes: tuple[tuple[int, ...], ...]
    input_rank: int | None
    producer: str | None
    producer_kind: str | None
    foldable: bool
    reason: str | None


@dataclass(frozen=True, eq=False)
class GraphFacts(Mapping[str, NormFacts]):
    """Per-norm facts of one traced forward pass, keyed by canonical module path.

    A read-only mapping ``path -> NormFacts`` in ``model.named_modules()`` order. Looking up any
    path of a shared module (``facts["alias.path"]``) returns the facts of its canonical path;
    iteration yields canonical paths only.

    Attributes:
        model: the traced model's class name.
        norms: the facts, keyed by canonical path.
        aliases: every path of every traced norm, mapped to its canonical path.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> facts = trace(model, torch.randn(1, 3, 8, 8))
        >>> facts.producers(), facts.ranks()
        ({'1': '0'}, {'1': 4})
    """

    model: str
    norms: Mapping[str, NormFacts]
    aliases: Mapping[str, str]

    def __getitem__(self, path: str) -> NormFacts:
        """Return the facts of the norm registered at ``path`` (any of its paths)."""
        return self.norms[self.aliases.get(path, path)]

    def __iter__(self) -> Iterator[str]:
        """Iterate over canonical norm paths."""
        return iter(self.norms)

    def __len__(self) -> int:
        """Return the number of distinct norm modules."""
        return len(self.norms)

    def ranks(self) -> dict[str, int]:
        """Return ``{path: input rank}`` for every norm whose calls agree on one rank.

        Norms that did not run, or ran with inputs of different ranks, are left out.

        Example:
            >>> trace(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).eval(),
            ...       torch.randn(2, 4)).ranks()
            {'1': 2}
        """
        return {p: f.input_rank for p, f in self.norms.items() if f.input_rank is not None}

    def producers(self) -> dict[str, str | None]:
        """Return ``{path: producer path or None}`` for every norm.

        Example:
            >>> trace(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).eval(),
            ...       torch.randn(2, 4)).producers()
            {'1': '0'}
        """
        return {p: f.producer for p, f in self.norms.items()}

    def foldable_pairs(self) -> list[tuple[str, str]]:
        """Return ``(norm path, producer path)`` for every foldable norm.

        Example:
            >>> trace(nn.Sequential(nn.Conv1d(2, 4, 1), nn.BatchNorm1d(4)).eval(),
            ...       torch.randn(2, 2, 5)).foldable_pairs()
            [('1', '0')]
        """
        return [(p, f.producer) for p, f in self.norms.items() if f.foldable and f.producer]

    def __str__(self) -> str:
        """Render the facts as a table, one row per norm."""
        header = ("path", "type", "calls", "rank", "producer", "foldable", "reason")
        rows = [
            (
                f.path + (f" (also {', '.join(f.paths[1:])})" if len(f.paths) > 1 else ""),
                f.kind,
                str(f.calls),
                "-" if f.input_rank is None else str(f.input_rank),
                f.producer if f.producer is not None else "-",
                "yes" if f.foldable else "no",
                f.reason or "",
            )
            for f in self.norms.values()
        ]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
        n_fold = sum(f.foldable for f in self.norms.values())
        lines = [f"GraphFacts of {self.model}: {len(self.norms)} norms, {n_fold} foldable"]
        for row in (header, *rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return "\n".join(lines)


def producer_problem(module: nn.Module) -> str | None:
    """Say why ``module`` cannot act as the layer a BatchNorm is folded into, or return ``None``.

    Supported: ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, ``Linear`` and subclasses of them that
    keep the stock ``forward`` (a subclass that, say, standardizes its weight in ``forward`` does
    not compute ``conv(x, weight)`` and would not fold exactly).

    Args:
        module: the candidate producer.

    Returns:
        A human-readable reason, or ``None`` when the module is supported.

    Example:
        >>> producer_problem(nn.Conv2d(3, 8, 3)) is None
        True
        >>> producer_problem(nn.ReLU())
        'ReLU is not a conv/linear layer (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear)'
    """
    base = next((t for t in PRODUCER_TYPES if isinstance(module, t)), None)
    name = type(module).__name__
    if base is None:
        return f"{name} is not a conv/linear layer (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear)"
    for method in ("forward", "_conv_forward"):
        if getattr(type(module), method, None) is not getattr(base, method, None):
            return (
                f"{name} overrides {base.__name__}.{method}, so its output need not be a plain "
                f"{base.__name__.lower()} of its weight; folding into it would not be exact"
            )
    return None


# ----------------------------------------------------------------------------------------------
# recording


@dataclass
class _Call:
    """One call of a norm module: what went in and the autograd node(s) of what came out."""

    shape: tuple[int, ...] | None
    node: Node | None
    output_nr: int
    requires_grad: bool
    out_nodes: tuple[Node, ...] = ()


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Apply the example-inputs convention: tuple -> ``*args``, mapping -> ``**kwargs``."""
    if isinstance(example_inputs, tuple) and not hasattr(example_inputs, "_fields"):
        return example_inputs, {}
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise TraceError(
                f"example_inputs is a mapping, so it is passed as keyword arguments, but it has "
                f"non-string keys {bad!r}; wrap it in a tuple to pass it as one positional "
                f"argument: trace(model, (inputs,))"
            )
        return (), dict(example_inputs)
    return (example_inputs,), {}


def _with_grad(obj: Any) -> Any:
    """Copy ``obj``, replacing floating-point tensors by clones that require grad."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            return obj.detach().clone().requires_grad_(True)
        return obj
    if isinstance(obj, tuple):
        items = [_with_grad(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [_with_grad(v) for v in obj]
    if isinstance(obj, dict):
        try:
            return type(obj)((k, _with_grad(v)) for k, v in obj.items())
        except TypeError:  # a dict subclass with another constructor
            return {k: _with_grad(v) for k, v in obj.items()}
    return obj


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Yield every tensor in a nested structure of sequences, mappings and dataclasses."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _tensors(v)
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from _tensors(getattr(obj, f.name))


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def _devices(model: nn.Module, inputs: Any) -> list[int]:
    """CUDA device indices used by the model or the inputs (for forking their RNG state)."""
    tensors = [*model.parameters(), *model.buffers(), *_tensors(inputs)]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@contextlib.contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (object and value) afterwards, e.g. BN running stats in training."""
    saved = [
        (m, name, b, b.detach().clone())
        for m in model.modules()
        for name, b in m.named_buffers(recurse=False)
        if not is_lazy(b)  # uninitialized until this very forward: nothing to restore
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, buf, value in saved:
                if buf.shape == value.shape:
                    buf.copy_(value)
                if getattr(m, name, None) is not buf:
                    setattr(m, name, buf)


@contextlib.contextmanager
def _grad_enabled(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Make the parameters of ``modules`` require grad for a while, so outputs get a grad_fn."""
    params = {
        id(p): p
        for m in modules
        for p in m.parameters()
        if not is_lazy(p) and (p.is_floating_point() or p.is_complex()) and not p.is_inference()
    }
    flags = [(p, p.requires_grad) for p in params.values()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# Ops that take a tensor argument without reading its values.
_VALUE_FREE = frozenset(
    {
        "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
        "randint_like", "new_empty", "new_empty_strided", "new_zeros", "new_ones", "new_full",
        "size", "stride", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim",
        "numel", "is_contiguous",
    }
)  # fmt: skip


class _ReadWatcher(TorchDispatchMode):
    """Record every op that reads a watched tensor outside the norm call it is the input of.

    Autograd's graph misses reads that create no edge (``detach``, comparisons, ``argmax``,
    ``.item()``, anything under ``no_grad``) and reads in branches that do not reach the outputs
    (a detached proposal branch still decides what a detector returns). Folding would change
    what those reads see, so they count as consumers too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[weakref.ref[torch.Tensor], tuple[Node, int]]] = {}
        self.reads: dict[tuple[Node, int], list[str]] = {}
        self.inside: list[int] = []  # ids of the inputs of the norm calls now running

    def watch(self, tensor: torch.Tensor, key: tuple[Node, int]) -> None:
        self.watched[id(tensor)] = (weakref.ref(tensor), key)
        self.reads.setdefault(key, [])

    def _note(self, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            entry = self.watched.get(id(value))
            if entry is not None and entry[0]() is value and id(value) not in self.inside:
                self.reads[entry[1]].append(name)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self._note(name, v)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if self.watched and name not in _VALUE_FREE:
            self._note(name, args)
            self._note(name, tuple(kwargs.values()))
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# graph walk


def _op_name(node: Node) -> str:
    """``CatBackward0`` -> ``cat``, ``MaxPool2DWithIndicesBackward0`` -> ``max_pool2d_with...``."""
    name = re.sub(r"Backward\d*$", "", node.name().split("::")[-1])
    return re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[0-9A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _consumers(
    roots: Iterable[Node], targets: set[tuple[Node, int]]
) -> dict[tuple[Node, int], list[Node]]:
    """Map each target ``(node, output_nr)`` to the nodes that use it, over the reachable graph."""
    found: dict[tuple[Node, int], list[Node]] = {t: [] for t in targets}
    visited = set(roots)
    stack = list(visited)
    while stack:
        node = stack.pop()
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            users = found.get((nxt, nr))
            if users is not None:
                users.append(node)
            if nxt not in visited:
                visited.add(nxt)
                stack.append(nxt)
    return found


def _inside(out_nodes: Iterable[Node], stop: Node) -> set[Node]:
    """Nodes reachable from a module's output nodes without passing through ``stop``."""
    seen = {n for n in out_nodes if n is not stop}
    stack = list(seen)
    while stack:
        for nxt, _ in stack.pop().next_functions:
            if nxt is not None and nxt is not stop and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


# ----------------------------------------------------------------------------------------------
# trace


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    norm_types: tuple[type, ...] | None = None,
) -> GraphFacts:
    """Run one forward pass of ``model`` and report, per norm module, its producer and input rank.

    Works for any model that runs on ``example_inputs``, including those ``torch.fx`` cannot
    trace (detection models, RAFT), and for frozen models (``requires_grad=False`` everywhere):
    the pass runs under ``torch.enable_grad()`` on clones of the floating-point inputs that
    require grad, and with the conv/linear parameters temporarily requiring grad. The model's
    mode is not changed: trace a model in ``eval()`` mode to see its inference graph.

    ``example_inputs`` convention:
        * a ``tuple`` (not a namedtuple) is the positional arguments: ``model(*example_inputs)``;
        * a mapping (``dict``, ``OrderedDict``, ...) is the keyword arguments:
          ``model(**example_inputs)``;
        * anything else (a tensor, a list, a namedtuple, ...) is the single positional argument:
          ``model(example_inputs)``. A detection model's list of images is therefore passed as
          is: ``trace(detector, [torch.rand(3, 128, 128)])``. To pass a tuple or a dict as the
          single argument, wrap it: ``(my_dict,)``.

    The user's tensors are never modified (floating-point ones are cloned). The pass costs one
    forward with autograd recording, so small inputs are best (e.g. batch 1 and the smallest
    resolution the model accepts). Buffers the forward updates (BN running statistics of a model
    in training mode) and the RNG state are restored afterwards.

    Foldable means all of: the norm is a BatchNorm with running statistics, it ran exactly once,
    its input is the output of a conv/linear module (:data:`PRODUCER_TYPES`, stock ``forward``)
    that ran exactly once, is registered at one path only, and whose output nothing else uses
    (no other edge in autograd's graph from the outputs, and no other op reads it during the
    forward, e.g. through ``detach`` or a comparison); the output is batched with channels in dim 1
    (a ``Linear`` must produce ``(N, C)``, since BatchNorm1d normalizes dim 1). Whether the BN is
    in eval mode is not part of it (see :func:`normswap.fold.fold_bn`).

    Args:
        model: the model to trace.
        example_inputs: inputs the model accepts, by the convention above.
        norm_types: the norm classes to report (subclasses included). Defaults to
            :data:`BATCHNORM_TYPES`.

    Returns:
        The facts of every norm module, keyed by canonical path (the first path at which
        ``named_modules(remove_duplicate=False)`` yields it).

    Raises:
        TraceError: the forward pass failed with these inputs, or ``norm_types`` is invalid.

    Example:
        >>> import torchvision
        >>> facts = trace(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
        >>> facts["layer1.0.bn1"].producer, facts["layer1.0.bn1"].foldable
        ('layer1.0.conv1', True)
    """
    if norm_types is None:
        norm_types = BATCHNORM_TYPES
    norm_types = tuple(norm_types)
    if not norm_types or not all(isinstance(t, type) for t in norm_types):
        raise TraceError(f"norm_types must be a non-empty tuple of classes, got {norm_types!r}")

    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
        modules.setdefault(id(m), m)
    norm_ids = [i for i, m in modules.items() if isinstance(m, norm_types)]
    producer_ids = [i for i, m in modules.items() if isinstance(m, PRODUCER_TYPES)]

    norm_calls: dict[int, list[_Call]] = {i: [] for i in norm_ids}
    producer_calls: dict[int, int] = dict.fromkeys(producer_ids, 0)
    owner: dict[tuple[Node, int], int] = {}  # producer output (node, output_nr) -> producer id
    watcher = _ReadWatcher()

    def norm_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = _first_tensor(args, kwargs)
        watcher.inside.append(id(x))
        norm_calls[id(module)].append(
            _Call(
                shape=None if x is None else tuple(x.shape),
                node=None if x is None else x.grad_fn,
                output_nr=0 if x is None else x.output_nr,
                requires_grad=x is not None and x.requires_grad,
            )
        )

    def norm_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        nodes = tuple(t.grad_fn for t in _tensors(output) if t.grad_fn is not None)
        norm_calls[id(module)][-1].out_nodes = nodes
        watcher.inside.pop()

    def producer_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        producer_calls[id(module)] += 1
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            # setdefault: when a producer wraps another, the inner (first to finish) owns it.
            key = (output.grad_fn, output.output_nr)
            if key not in owner:
                owner[key] = id(module)
                watcher.watch(output, key)

    args, kwargs = _split_inputs(example_inputs)
    with contextlib.ExitStack() as stack:
        for i in norm_ids:
            stack.callback(
                modules[i].register_forward_pre_hook(norm_pre_hook, with_kwargs=True).remove
            )
            stack.callback(modules[i].register_forward_hook(norm_hook).remove)
        for i in producer_ids:
            stack.callback(modules[i].register_forward_hook(producer_hook).remove)
        stack.enter_context(_buffers_restored(model))
        stack.enter_context(torch.random.fork_rng(devices=_devices(model, (args, kwargs))))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(_grad_enabled(modules[i] for i in producer_ids))
        args, kwargs = _with_grad(args), _with_grad(kwargs)  # clones outside inference mode
        stack.enter_context(watcher)
        try:
            outputs = model(*args, **kwargs)
        except Exception as err:
            raise TraceError(
                f"tracing {type(model).__name__} failed with the given example_inputs: {err}; "
                f"pass inputs the model accepts (e.g. torch.randn(1, 3, 224, 224) for a "
                f"classifier)"
            ) from err

    roots = {t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None}
    recording = _Recording(
        modules=modules,
        paths=paths,
        producer_calls=producer_calls,
        owner=owner,
        consumers=_consumers(roots, set(owner)),
        reads=watcher.reads,
    )

    norms: dict[str, NormFacts] = {}
    aliases: dict[str, str] = {}
    for i in norm_ids:
        norm = modules[i]
        calls = norm_calls[i]
        shapes = tuple(c.shape for c in calls if c.shape is not None)
        ranks = {len(s) for s in shapes}
        rank = ranks.pop() if len(ranks) == 1 else None
        producer_id = _common_producer(calls, owner)
        reason = _reason(norm, calls, rank, producer_id, recording)
        canonical = paths[i][0]
        norms[canonical] = NormFacts(
            path=canonical,
            paths=tuple(paths[i]),
            kind=type(norm).__name__,
            calls=len(calls),
            input_shapes=shapes,
            input_rank=rank,
            producer=None if producer_id is None else paths[producer_id][0],
            producer_kind=None if producer_id is None else type(modules[producer_id]).__name__,
            foldable=reason is None,
            reason=reason,
        )
        aliases.update(dict.fromkeys(paths[i], canonical))
    return GraphFacts(
        model=type(model).__name__,
        norms=MappingProxyType(norms),
        aliases=MappingProxyType(aliases),
    )


@dataclass(frozen=True)
class _Recording:
    """Everything the forward pass recorded, for :func:`_reason`."""

    modules: Mapping[int, nn.Module]
    paths: Mapping[int, list[str]]
    producer_calls: Mapping[int, int]  # producer id -> calls
    owner: Mapping[tuple[Node, int], int]  # producer output -> producer id
    consumers: Mapping[tuple[Node, int], list[Node]]  # producer output -> autograd users
    reads: Mapping[tuple[Node, int], list[str]]  # producer output -> ops reading it outside norms


def _common_producer(calls: list[_Call], owner: Mapping[tuple[Node, int], int]) -> int | None:
    """The producer id shared by every call, or ``None``."""
    found = {owner.get((c.node, c.output_nr)) if c.node is not None else None for c in calls}
    return found.pop() if len(found) == 1 else None


def _other_uses(call: _Call, rec: _Recording) -> str | None:
    """Describe the uses of the norm's input (a producer output) other than the norm itself."""
    assert call.node is not None  # a producer was found, so the input has a node
    key = (call.node, call.output_nr)
    users = rec.consumers.get(key, [])
    own = set(call.out_nodes)
    if any(u not in own for u in users):  # users inside the norm's own forward are fine
        own = _inside(call.out_nodes, call.node)
    others = [u for u in users if u not in own]
    if others:
        names = ", ".join(dict.fromkeys(_op_name(u) for u in others))
        s = "" if len(others) == 1 else "s"
        return f"used by {len(others)} other operation{s} ({names})"
    reads = rec.reads.get(key, [])
    if reads:
        names = ", ".join(dict.fromkeys(reads))
        s = "" if len(reads) == 1 else "s"
        return (
            f"read by {len(reads)} operation{s} outside autograd's graph from the outputs "
            f"({names}); folding would change what they see"
        )
    return None


def _input_origin(call: _Call) -> str:
    """Describe where a norm's input came from when no conv/linear module produced it."""
    if call.shape is None:
        return "input is not a tensor"
    if call.node is None:
        if call.requires_grad:
            return "input is a leaf tensor (a model input or a parameter), not a conv/linear output"
        return (
            "input has no autograd history (computed under torch.no_grad() or from constants), "
            "so its producer is unknown"
        )
    return f"input is produced by {_op_name(call.node)}, not a conv/linear"


def _reason(
    norm: nn.Module,
    calls: list[_Call],
    rank: int | None,
    producer_id: int | None,
    rec: _Recording,
) -> str | None:
    """Why ``norm`` cannot be folded into its producer (``None`` when it can)."""
    kind = type(norm).__name__
    problems: list[str] = []
    if not isinstance(norm, BATCHNORM_TYPES):
        problems.append(f"{kind} is not a BatchNorm; only BatchNorm folds into a conv/linear")
    elif isinstance(norm, _BatchNorm) and (
        not norm.track_running_stats or norm.running_var is None
    ):
        problems.append("norm has no running statistics (track_running_stats=False)")
    if not calls:
        return "; ".join([*problems, "norm did not run in the forward with these example inputs"])
    if len(calls) > 1:
        problems.append(f"norm runs {len(calls)} times per forward")
    if producer_id is None:
        unowned = [c for c in calls if c.node is None or (c.node, c.output_nr) not in rec.owner]
        origins = list(dict.fromkeys(_input_origin(c) for c in unowned))
        if not origins:
            origins = ["its input comes from different conv/linear layers in different calls"]
        return "; ".join([*problems, *origins])

    producer = rec.modules[producer_id]
    pkind = type(producer).__name__
    ppaths = rec.paths[producer_id]
    bad = producer_problem(producer)
    if bad is not None:
        problems.append(bad)
    n_calls = rec.producer_calls[producer_id]
    if n_calls > 1:
        problems.append(f"{pkind} {ppaths[0]} runs {n_calls} times per forward")
    if len(ppaths) > 1:
        problems.append(
            f"{pkind} {ppaths[0]} is shared: the same module is also at {', '.join(ppaths[1:])}"
        )
    if len(calls) == 1:
        used = _other_uses(calls[0], rec)
        if used is not None:
            problems.append(f"{pkind} output is also {used}")
    if isinstance(producer, nn.Linear):
        if rank != 2:
            problems.append(
                f"Linear output has rank {rank}: {kind} normalizes dim 1, not the Linear's "
                f"out-features (last) dim; only (N, C) Linear outputs fold"
            )
    elif isinstance(producer, nn.modules.conv._ConvNd):
        expected = len(producer.kernel_size) + 2
        if rank != expected:
            problems.append(
                f"{pkind} output has rank {rank}, not {expected} (unbatched?): dim 1 is not its "
                f"channel dim"
            )
    if isinstance(norm, FrozenBatchNorm2d) and rank != 4:
        problems.append(f"FrozenBatchNorm2d needs a rank-4 input, got rank {rank}")
    return "; ".join(problems) if problems else None


# ----------------------------------------------------------------------------------------------
# without example inputs: torch.fx


class _LeafTracer(torch.fx.Tracer):
    """A tracer that keeps norms and conv/linear layers as single ``call_module`` nodes."""

    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)


def trace_fx(model: nn.Module, *, norm_types: tuple[type, ...] | None = None) -> GraphFacts:
    """Graph facts from ``torch.fx`` symbolic tracing, when no example inputs are at hand.

    Symbolic tracing needs no input but sees no shapes: ``input_rank`` is ``None`` and a
    Linear → BatchNorm pair is not foldable (its rank decides which dim BN normalizes).
    Models with data-dependent control flow (torchvision's detection models, RAFT) cannot
    be traced this way: use :func:`trace` with example inputs.

    Raises:
        TraceError: torch.fx cannot trace the model; the message says to pass example inputs.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> trace_fx(model)["1"].producer
        '0'
    """
    norm_types = tuple(norm_types or BATCHNORM_TYPES)
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

    norms: dict[str, NormFacts] = {}
    aliases: dict[str, str] = {}
    for path, module in model.named_modules():
        if not isinstance(module, norm_types):
            continue
        nodes = calls.get(path, [])
        producer = None
        reason = None
        if len(nodes) != 1:
            reason = f"norm runs {len(nodes)} times per forward"
        else:
            source = nodes[0].args[0] if nodes[0].args else None
            if not (isinstance(source, torch.fx.Node) and source.op == "call_module"):
                op = getattr(source, "target", source)
                reason = f"input is produced by {getattr(op, '__name__', op)}, not a conv/linear"
            else:
                producer = str(source.target)
                pmod = model.get_submodule(producer)
                reason = producer_problem(pmod)
                if reason is None and isinstance(pmod, nn.Linear):
                    reason = "Linear → BatchNorm: pass example_inputs to check the input rank"
                elif reason is None and len(calls.get(producer, [])) != 1:
                    reason = f"{producer} runs {len(calls[producer])} times per forward"
                elif reason is None and len(paths[id(pmod)]) > 1:
                    reason = f"{producer} is shared at {len(paths[id(pmod)])} paths"
                elif reason is None and len(source.users) > 1:
                    reason = (
                        f"{producer}'s output is also used by {len(source.users) - 1} other op(s)"
                    )
                if not isinstance(pmod, PRODUCER_TYPES):
                    producer = None
        if reason is None and not isinstance(module, _BatchNorm | FrozenBatchNorm2d):
            reason = f"{type(module).__name__} is not a BatchNorm"
        norms[path] = NormFacts(
            path=path,
            paths=tuple(paths[id(module)]),
            kind=type(module).__name__,
            calls=len(nodes),
            input_shapes=(),
            input_rank=None,
            producer=producer,
            producer_kind=None
            if producer is None
            else type(model.get_submodule(producer)).__name__,
            foldable=reason is None,
            reason=reason,
        )
        aliases.update(dict.fromkeys(paths[id(module)], path))
    return GraphFacts(
        model=type(model).__name__,
        norms=MappingProxyType(norms),
        aliases=MappingProxyType(aliases),
    )


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
