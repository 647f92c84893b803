"""A value graph of one real forward pass, at the level of ATen operators.

Exact rewrites that reach across many layers (centring every writer into a transformer's
residual stream, folding a LayerNorm's γ/β into the linear layers that read it) need to follow
tensors through every op in between: residual adds, reshapes of tokens, the class-token concat,
attention's transposes. :func:`record_dataflow` runs the model once under a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` and records each ATen call as an
:class:`Op`: its name, its arguments with every tensor replaced by a *value* id, its output
values, and the module it ran in. Parameters and buffers are leaf values named by their owner
module and attribute. Like :mod:`normswap.graph.record`, this works for any model that runs,
including those ``torch.fx`` cannot trace.

The pass runs in eval mode (the graph used for inference), with autograd enabled and every
parameter requiring grad, so ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take
their composite path, not the fused inference kernels that hide their projections. The model is
left as it was found: training flags, ``requires_grad``, buffers and the RNG state are
restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from normswap.errors import NormSwapError, TraceError
from normswap.graph.record import _buffers_restored, _devices, _grad_enabled
from normswap.inputs import split_inputs, tensors
from normswap.modes import eval_mode

__all__ = ["Dataflow", "Leaf", "Op", "record_dataflow"]


@dataclass(frozen=True)
class Leaf:
    """A parameter or buffer: the module that holds it (its first path) and its attribute, and
    every ``(module, attribute)`` holding the same tensor (tied weights have several).

    Example:
        >>> Leaf("encoder.ln", "weight", (8,)).name
        'encoder.ln.weight'
    """

    module: str
    attr: str
    shape: tuple[int, ...]
    holders: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """``module.attr``."""
        return f"{self.module}.{self.attr}" if self.module else self.attr

    def holder(self, module: str) -> tuple[str, str]:
        """The ``(module, attribute)`` through which code running in ``module`` uses it: the
        deepest holder that is ``module`` or one of its parents (else the first holder).

        Example:
            >>> leaf = Leaf("wte", "weight", (5, 4), (("wte", "weight"), ("lm_head", "weight")))
            >>> leaf.holder("lm_head"), leaf.holder("transformer.h.0")
            (('lm_head', 'weight'), ('wte', 'weight'))
        """
        inside = [
            h
            for h in self.holders or ((self.module, self.attr),)
            if h[0] == "" or module == h[0] or module.startswith(h[0] + ".")
        ]
        return max(inside, key=lambda h: len(h[0])) if inside else (self.module, self.attr)


@dataclass
class Op:
    """One ATen call of the recorded forward.

    Attributes:
        index: its position in the forward.
        name: the operator's name without overload (``"addmm"``, ``"native_layer_norm"``).
        args: the positional arguments; a tensor is its value id (an ``int`` wrapped in a
            one-element ``list`` is a list of tensors), anything else as given.
        kwargs: the keyword arguments, the same way.
        inputs: every value id the call reads, in argument order.
        outputs: the value ids of its tensor outputs, in order.
        module: the path of the innermost module it ran in (``""``: the model itself).
    """

    index: int
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    module: str


class _Value(int):
    """A value id inside an op's arguments (an ``int`` that is not a plain number)."""


@dataclass
class Dataflow:
    """The value graph of one forward pass (see the module docs).

    Attributes:
        ops: every op, in order.
        shapes: each value's shape.
        producer: value -> the op that made it (leaves and inputs have none).
        consumers: value -> the ops that read it, in order.
        leaves: value -> the parameter or buffer it is.
        inputs: the values of the model's input tensors.
        outputs: the values of the model's output tensors.
        dtypes: each value's dtype.
    """

    ops: list[Op] = field(default_factory=list)
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    producer: dict[int, Op] = field(default_factory=dict)
    consumers: dict[int, list[Op]] = field(default_factory=dict)
    leaves: dict[int, Leaf] = field(default_factory=dict)
    inputs: set[int] = field(default_factory=set)
    outputs: set[int] = field(default_factory=set)
    dtypes: dict[int, torch.dtype] = field(default_factory=dict)

    @staticmethod
    def is_value(obj: Any) -> bool:
        """Whether an argument of an op is a tensor (a value id).

        Example:
            >>> Dataflow.is_value(_Value(3)), Dataflow.is_value(3)
            (True, False)
        """
        return isinstance(obj, _Value)

    def uses(self, value: int) -> list[Op]:
        """The ops reading ``value``."""
        return self.consumers.get(value, [])


class _Recorder(TorchDispatchMode):
    def __init__(self, flow: Dataflow, leaves: dict[int, Leaf], stack: list[str]) -> None:
        super().__init__()
        self.flow = flow
        self.ids: dict[int, int] = {}  # id(tensor) -> current value id
        self.keep: list[torch.Tensor] = []  # keeps every recorded tensor alive (ids stay unique)
        self.leaf_by_id = leaves
        self.stack = stack

    def value(self, t: torch.Tensor) -> int:
        found = self.ids.get(id(t))
        if found is not None:
            return found
        v = len(self.flow.shapes)
        self.ids[id(t)] = v
        self.keep.append(t)
        self.flow.shapes[v] = tuple(t.shape)
        self.flow.dtypes[v] = t.dtype
        leaf = self.leaf_by_id.get(id(t))
        if leaf is not None:
            self.flow.leaves[v] = leaf
        return v

    def new_version(self, t: torch.Tensor) -> int:
        """A fresh value for a tensor an op changed in place."""
        self.ids.pop(id(t), None)
        return self.value(t)

    def _encode(self, obj: Any, reads: list[int]) -> Any:
        if isinstance(obj, torch.Tensor):
            v = self.value(obj)
            reads.append(v)
            return _Value(v)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._encode(o, reads) for o in obj)
        return obj

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        reads: list[int] = []
        enc_args = self._encode(args, reads)
        enc_kwargs = {k: self._encode(v, reads) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        read_tensors = {
            id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        outputs = []
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                outputs.append(self.new_version(t) if id(t) in read_tensors else self.value(t))
        op = Op(
            index=len(self.flow.ops),
            name=func.overloadpacket.__name__,
            args=enc_args,
            kwargs=enc_kwargs,
            inputs=tuple(reads),
            outputs=tuple(outputs),
            module=self.stack[-1] if self.stack else "",
        )
        self.flow.ops.append(op)
        for v in outputs:
            self.flow.producer[v] = op
        for v in dict.fromkeys(reads):
            self.flow.consumers.setdefault(v, []).append(op)
        return out


@contextlib.contextmanager
def _module_stack(model: nn.Module, stack: list[str]) -> Iterator[None]:
    """Keep ``stack`` at the paths of the modules whose forward is running."""
    paths: dict[int, str] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), path)

    def pre(module: nn.Module, args: Any) -> None:
        stack.append(paths.get(id(module), stack[-1] if stack else ""))

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    handles = [
        nn.modules.module.register_module_forward_pre_hook(pre),
        nn.modules.module.register_module_forward_hook(post, always_call=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record_dataflow(model: nn.Module, example_inputs: Any) -> Dataflow:
    """Run ``model`` once on ``example_inputs`` in eval mode and record its value graph.

    Args:
        model: the model (left as it was: flags, ``requires_grad``, buffers, RNG).
        example_inputs: inputs by :mod:`normswap.inputs`' convention.

    Returns:
        The :class:`Dataflow`.

    Raises:
        TraceError: the forward pass failed on these inputs.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        >>> flow = record_dataflow(model, torch.randn(2, 4))
        >>> [op.name for op in flow.ops][-1], flow.ops[-1].module
        ('native_layer_norm', '1')
    """
    holders: dict[int, list[tuple[str, str]]] = {}
    found: dict[int, torch.Tensor] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, t in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            if (path, attr) not in holders.setdefault(id(t), []):
                holders[id(t)].append((path, attr))
            found[id(t)] = t
    leaves = {
        key: Leaf(pairs[0][0], pairs[0][1], tuple(found[key].shape), tuple(pairs))
        for key, pairs in holders.items()
    }
    try:
        args, kwargs = split_inputs(example_inputs)
    except NormSwapError as err:
        raise TraceError(f"example_inputs: {err}") from None
    flow = Dataflow()
    stack: list[str] = []
    recorder = _Recorder(flow, leaves, stack)
    with contextlib.ExitStack() as ctx:
        ctx.enter_context(eval_mode(model))
        ctx.enter_context(_buffers_restored(model))
        ctx.enter_context(torch.random.fork_rng(devices=_devices(model, (args, kwargs))))
        ctx.enter_context(torch.inference_mode(False))
        ctx.enter_context(torch.enable_grad())
        ctx.enter_context(_grad_enabled([model]))
        ctx.enter_context(_module_stack(model, stack))
        for t in tensors((args, kwargs)):
            flow.inputs.add(recorder.value(t))
        ctx.enter_context(recorder)
        try:
            outputs = model(*args, **kwargs)
        except Exception as err:
            raise TraceError(
                f"recording {type(model).__name__} failed with the given example_inputs: {err}; "
                "pass inputs the model accepts"
            ) from err
    flow.outputs = {recorder.ids[id(t)] for t in tensors(outputs) if id(t) in recorder.ids}
    return flow
