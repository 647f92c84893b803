"""Graph facts about a model's norm layers, recorded from one real forward pass.

For every norm layer (by default every registered BatchNorm source, see
:mod:`normswap.sources`) :func:`trace` answers: how often does it run, what is the rank of its
input, and which conv/linear module produced that input tensor directly (same autograd node, no
op in between)? Whether the norm can then be folded into that producer is decided by the
rulebook, :func:`normswap.graph.rules.fold_problems`.

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
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import Node
from torch.nn.parameter import is_lazy
from torch.utils._python_dispatch import TorchDispatchMode

from normswap.errors import NormSwapError, TraceError
from normswap.graph.facts import GraphFacts, NormFacts
from normswap.graph.rules import PRODUCER_TYPES, fold_problems, parameter_owners
from normswap.inputs import split_inputs, tensors
from normswap.sources import SourceNorm, describe_source, source_classes

__all__ = ["trace"]


# ----------------------------------------------------------------------------------------------
# recording


@dataclass
class _Call:
    """One call of a norm module: what went in and the autograd node(s) of what came out."""

    shape: tuple[int, ...] | None
    node: Node | None
    output_nr: int
    requires_grad: bool
    dtype: torch.dtype | None = None
    out_nodes: tuple[Node, ...] = ()


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


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def _devices(model: nn.Module, inputs: Any) -> list[int]:
    """CUDA device indices used by the model or the inputs (for forking their RNG state)."""
    found = [*model.parameters(), *model.buffers(), *tensors(inputs)]
    return sorted({t.device.index or 0 for t in found if t.device.type == "cuda"})


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


#: Ops that take a tensor argument without reading its values.
VALUE_FREE = frozenset(
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
        if self.watched and name not in VALUE_FREE:
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

    ``foldable`` and ``reason`` come from :func:`normswap.graph.rules.fold_problems` on what the
    pass showed: the norm is a BatchNorm source with running statistics that ran exactly once, on
    the output of a conv/linear module (stock ``forward``, not parametrized) that ran exactly
    once, sits at one path, holds no parameter tied to another module, and whose output nothing
    else uses (no other edge in autograd's graph from the outputs, and no other op reads it during
    the forward, e.g. through ``detach`` or a comparison); the output is batched with channels in
    dim 1 (a ``Linear`` must produce ``(N, C)``). Whether the BN is in eval mode is not part of it.

    Args:
        model: the model to trace.
        example_inputs: inputs the model accepts, by the convention above.
        norm_types: the norm classes to report (subclasses included). Defaults to every
            registered BatchNorm source (:func:`normswap.sources.source_classes`).

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
    norm_types = source_classes() if norm_types is None else tuple(norm_types)
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
                dtype=None if x is None else x.dtype,
            )
        )

    def norm_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        nodes = tuple(t.grad_fn for t in tensors(output) if t.grad_fn is not None)
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

    try:
        args, kwargs = split_inputs(example_inputs)
    except NormSwapError as err:
        raise TraceError(f"example_inputs: {err}") from None
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

    roots = {t.grad_fn for t in tensors(outputs) if t.grad_fn is not None}
    recording = _Recording(
        modules=modules,
        paths=paths,
        producer_calls=producer_calls,
        owner=owner,
        consumers=_consumers(roots, set(owner)),
        reads=watcher.reads,
        outputs=frozenset((t.grad_fn, t.output_nr) for t in tensors(outputs) if t.grad_fn),
    )

    owners = parameter_owners(model)
    norms: dict[str, NormFacts] = {}
    aliases: dict[str, str] = {}
    for i in norm_ids:
        norm = modules[i]
        calls = norm_calls[i]
        shapes = tuple(c.shape for c in calls if c.shape is not None)
        ranks = {len(s) for s in shapes}
        rank = ranks.pop() if len(ranks) == 1 else None
        producer_id = _common_producer(calls, owner)
        producer = None if producer_id is None else modules[producer_id]
        canonical = paths[i][0]
        raw = NormFacts(
            path=canonical,
            paths=tuple(paths[i]),
            kind=type(norm).__name__,
            calls=len(calls),
            input_shapes=shapes,
            input_rank=rank,
            producer=None if producer_id is None else paths[producer_id][0],
            producer_kind=None if producer is None else type(producer).__name__,
            foldable=False,
            reason=None,
            producer_calls=0 if producer_id is None else recording.producer_calls[producer_id],
            producer_paths=() if producer_id is None else tuple(paths[producer_id]),
            other_uses=_other_uses(calls[0], recording)
            if producer is not None and len(calls) == 1
            else None,
            origin=None if producer is not None else _origin(calls, recording),
            input_dtype=next((c.dtype for c in calls if c.dtype is not None), None),
        )
        problems = fold_problems(
            _source(norm),
            producer,
            facts=raw,
            owners=owners,
            producer_path=raw.producer,
            check_mode=False,
            kind=raw.kind,
        )
        norms[canonical] = replace(raw, foldable=not problems, reason="; ".join(problems) or None)
        aliases.update(dict.fromkeys(paths[i], canonical))
    return GraphFacts(
        model=type(model).__name__,
        norms=MappingProxyType(norms),
        aliases=MappingProxyType(aliases),
    )


@dataclass(frozen=True)
class _Recording:
    """Everything the forward pass recorded, for the facts of each norm."""

    modules: Mapping[int, nn.Module]
    paths: Mapping[int, list[str]]
    producer_calls: Mapping[int, int]  # producer id -> calls
    owner: Mapping[tuple[Node, int], int]  # producer output -> producer id
    consumers: Mapping[tuple[Node, int], list[Node]]  # producer output -> autograd users
    reads: Mapping[tuple[Node, int], list[str]]  # producer output -> ops reading it outside norms
    outputs: frozenset[tuple[Node, int]]  # the model outputs' (node, output_nr)


def _common_producer(calls: list[_Call], owner: Mapping[tuple[Node, int], int]) -> int | None:
    """The producer id shared by every call, or ``None``."""
    found = {owner.get((c.node, c.output_nr)) if c.node is not None else None for c in calls}
    return found.pop() if len(found) == 1 else None


def _other_uses(call: _Call, rec: _Recording) -> str | None:
    """Describe the uses of the norm's input (a producer output) other than the norm itself."""
    assert call.node is not None  # a producer was found, so the input has a node
    key = (call.node, call.output_nr)
    if key in rec.outputs:
        return "returned as a model output, which folding would change"
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


def _origin(calls: list[_Call], rec: _Recording) -> str:
    """Why no single conv/linear produced the norm's input, over all its calls."""
    unowned = [c for c in calls if c.node is None or (c.node, c.output_nr) not in rec.owner]
    origins = list(dict.fromkeys(_input_origin(c) for c in unowned))
    if not origins:
        origins = ["its input comes from different conv/linear layers in different calls"]
    return "; ".join(origins)


def _source(module: nn.Module) -> SourceNorm | None:
    """The module as a BatchNorm source, or ``None`` (not a source, or one it cannot convert)."""
    try:
        return describe_source(module)
    except NormSwapError:
        return None
