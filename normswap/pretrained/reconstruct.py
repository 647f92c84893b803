"""Block-wise reconstruction: train each block of the converted model to reproduce the original
block's output from the converted model's own input (BRECQ, Li et al. 2021).

Distillation trains the whole network from one signal, the logits. Reconstruction gives every
block its own dense target: the original block's output map at every position of every image.
Blocks are reconstructed in execution order, each fed what the already-reconstructed blocks
before it produce (so each one compensates what the conversions upstream changed), with Adam on
``‖block(x) − y‖² / Var(y)``. On the real MobileNetV2 converted to GroupNorm it reached a higher
agreement in the conversion's own domain than distillation at the same CPU budget
(``benchmarks/results/ood.md``).

**Blocks** are found from the module tree, with no knowledge of the architecture: walking down
from the model, a module that holds converted norm layers becomes one block when it holds at most
``max_layers`` of them and one forward pass called it exactly once, with one tensor as its only
argument, returning a tensor (a residual block, a ``Conv-Norm-Act`` unit, a lone norm);
otherwise its children are tried. Converted layers in no such module (a norm called twice, a
block with several inputs) keep their calibrated parameters and are listed in the report.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normswap.distributed import (
    all_ranks_true,
    any_rank_true,
    average_gradients,
    broadcast_module,
    max_over_ranks,
)
from normswap.errors import CalibrationError
from normswap.inputs import (
    BatchToInput,
    call_model,
    check_samples,
    count_samples,
    default_batch_to_input,
    iter_inputs,
    model_device,
)
from normswap.modes import eval_mode
from normswap.pretrained.structure import converted_layers, unwrap

__all__ = ["BlockFit", "ReconstructionReport", "find_blocks", "reconstruct"]


@dataclass(frozen=True)
class BlockFit:
    """What reconstruction did to one block.

    Attributes:
        path: the block's module path (``""`` for the whole model).
        layers: how many converted norm layers it holds.
        steps: optimizer steps it was trained for.
        error_before: relative error ``‖f − f_ref‖ / ‖f_ref‖`` of its output over all the
            reconstruction samples, fed its own inputs, before training.
        error_after: the same after training (the parameters are kept only when it is lower).

    Example:
        >>> BlockFit("features.1", 2, 100, 0.5, 0.4).error_after
        0.4
    """

    path: str
    layers: int
    steps: int
    error_before: float
    error_after: float


@dataclass(frozen=True)
class ReconstructionReport:
    """What :func:`reconstruct` did.

    Attributes:
        blocks: one :class:`BlockFit` per block, in execution order.
        samples: samples the blocks were reconstructed on.
        seconds: time taken, by the clock it was given.
        left_out: converted layers in no block (they keep their calibrated parameters).
        unreached: blocks the time budget ran out before (they keep their parameters).

    Example:
        >>> r = ReconstructionReport((BlockFit("0", 1, 10, 0.5, 0.25),), 64, 1.0)
        >>> print(r)
        reconstruction: 1 block(s) on 64 sample(s) in 1.0 s; mean relative error 0.500 -> 0.250
    """

    blocks: tuple[BlockFit, ...]
    samples: int
    seconds: float
    left_out: tuple[str, ...] = field(default=())
    unreached: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable dictionary.

        Example:
            >>> ReconstructionReport((), 0, 0.5).to_dict()["seconds"]
            0.5
        """
        return {
            "blocks": [vars(b) for b in self.blocks],
            "samples": self.samples,
            "seconds": self.seconds,
            "left_out": list(self.left_out),
            "unreached": list(self.unreached),
        }

    def __str__(self) -> str:
        n = max(len(self.blocks), 1)
        before = sum(b.error_before for b in self.blocks) / n
        after = sum(b.error_after for b in self.blocks) / n
        text = (
            f"reconstruction: {len(self.blocks)} block(s) on {self.samples} sample(s) in "
            f"{self.seconds:.1f} s; mean relative error {before:.3f} -> {after:.3f}"
        )
        if self.left_out:
            text += f"; left calibrated (in no block): {', '.join(self.left_out)}"
        if self.unreached:
            text += f"; out of time before: {', '.join(self.unreached)}"
        return text


#: Samples per forward pass when block inputs and outputs are recorded.
CAPTURE_CHUNK = 64


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is skipped."""


def _calls(model: nn.Module, inputs: Any, paths: list[str]) -> dict[str, tuple[int, bool, int]]:
    """``{path: (calls, one tensor in and out every time, order of its first call)}`` from one
    forward pass (paths that did not run are missing)."""
    seen: dict[str, list[bool]] = {}

    def hook(path: str) -> Callable[..., None]:
        def record(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            ok = len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
            seen.setdefault(path, []).append(ok and isinstance(out, Tensor))

        return record

    def first_call(path: str) -> Callable[..., None]:
        def record(_m: nn.Module, _args: tuple) -> None:
            order.setdefault(path, len(order))

        return record

    order: dict[str, int] = {}
    handles = []
    for p in paths:
        module = model.get_submodule(p)
        handles.append(module.register_forward_pre_hook(first_call(p)))
        handles.append(module.register_forward_hook(hook(p), with_kwargs=True))
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return {p: (len(v), all(v), order[p]) for p, v in seen.items()}


def find_blocks(
    model: nn.Module, layers: list[str], inputs: Any, max_layers: int = 4
) -> tuple[list[str], list[str]]:
    """Partition the converted layers into blocks (see the module docs).

    Args:
        model: the converted model.
        layers: the paths of its converted norm layers.
        inputs: one batch of model inputs (one forward pass tells how modules are called).
        max_layers: the most converted layers one block may hold.

    Returns:
        ``(blocks, left_out)``: block paths in execution order, and the converted layers in no
        block.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(),
        ...                     nn.Sequential(nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4)))
        >>> find_blocks(net, ["1", "3.1"], torch.randn(1, 3, 8, 8), max_layers=1)
        (['1', '3'], [])
    """
    candidates = [""] + [p for p, _ in model.named_modules() if p]
    holding = {p: _inside(p, layers) for p in candidates}
    holding = {p: v for p, v in holding.items() if v}
    calls = _calls(model, inputs, list(holding))  # "" is the model itself
    blocks: list[str] = []
    left_out: list[str] = []

    def eligible(path: str) -> bool:
        count, one_tensor, _ = calls.get(path, (0, False, 0))
        return count == 1 and one_tensor and len(holding[path]) <= max_layers

    def walk(path: str, module: nn.Module) -> None:
        if path not in holding:
            return
        if eligible(path):
            blocks.append(path)
            return
        children = list(module.named_children())
        if not children:
            left_out.extend(holding[path])
            return
        covered = set()
        for name, child in children:
            child_path = f"{path}.{name}" if path else name
            walk(child_path, child)
            covered.update(holding.get(child_path, []))
        left_out.extend(x for x in holding[path] if x not in covered and x not in left_out)

    walk("", model)
    blocks.sort(key=lambda b: calls[b][2])
    return blocks, sorted(set(left_out))


def _inside(path: str, layers: list[str]) -> list[str]:
    """The layers at or under ``path`` (every layer for the model itself, ``""``)."""
    return [x for x in layers if path == "" or x == path or x.startswith(path + ".")]


def _capture(model: nn.Module, path: str, batches: list[Any], what: str) -> Tensor:
    """The block's input (``what="input"``) or output over ``batches``; the forward pass
    stops right after the block."""
    module = model.get_submodule(path)  # "" is the model itself
    got: list[Tensor] = []

    def pre(_m: nn.Module, args: tuple) -> None:
        got.append(args[0].detach())
        raise _Stop

    def post(_m: nn.Module, _a: tuple, out: Tensor) -> None:
        got.append(out.detach())
        raise _Stop

    handle = (
        module.register_forward_pre_hook(pre)
        if what == "input"
        else module.register_forward_hook(post)
    )
    try:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_Stop):
                    call_model(model, batch)
    finally:
        handle.remove()
    return torch.cat(got)


def _relative_error(block: nn.Module, x: Tensor, y: Tensor, chunk: int) -> float:
    """``‖block(x) − y‖ / ‖y‖`` over all samples: what the squared loss minimizes."""
    with torch.no_grad():
        num = den = 0.0
        for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
            # a copy: a block that starts with an in-place op must not change the record
            num += float((block(xs.clone()) - ys).double().square().sum())
            den += float(ys.double().square().sum())
    return (num / max(den, 1e-300)) ** 0.5


def reconstruct(
    model: nn.Module,
    reference: nn.Module,
    data: Any,
    *,
    max_seconds: float | None = None,
    steps: int = 2000,
    lr: float = 1e-3,
    batch_size: int = 16,
    samples: int = 256,
    max_layers: int = 4,
    clock: Callable[[], float] = time.perf_counter,
    batch_to_input: BatchToInput = default_batch_to_input,
    seed: int = 0,
) -> ReconstructionReport:
    """Train each block of ``model`` to reproduce ``reference``'s block on its own inputs.

    Blocks (see the module docs) are reconstructed one after the other in execution order: the
    block's input in the converted model and the original block's output are recorded on the
    first ``samples`` samples of ``data``, then the block's parameters are trained with Adam
    (cosine schedule from ``lr``) on ``‖block(x) − y‖² / Var(y)`` over random batches of them.
    A block keeps its new parameters only when its relative error on those samples went down.
    Both models run in eval mode. Under ``torch.distributed`` every rank must call it: rank
    zero's parameters are broadcast first, gradients are averaged, every rank runs as many
    steps as the slowest estimate and keeps or restores a block alike, so the ranks end with
    identical parameters.

    Args:
        model: the converted model (after :func:`normswap.swap`, usually calibrated); trained
            in place. A DDP wrapper is unwrapped.
        reference: the model before the swap.
        data: unlabeled inputs: one tensor or an iterable of batches (:mod:`normswap.inputs`).
            Blocks need one tensor input: a model called with several inputs is reconstructed
            from its inner blocks.
        max_seconds: time for the whole reconstruction (by ``clock``), shared out among the
            blocks as they come (each gets an equal part of what is left, in steps of its own
            measured cost); ``None``: ``steps`` steps per block.
        steps: optimizer steps per block: exactly these without ``max_seconds``, at most
            these with it (a small model does not spend a large budget for nothing).
        lr: Adam's learning rate at the start of each block's cosine schedule.
        batch_size: samples per step.
        samples: samples of ``data`` recorded per block (memory: one block's input and output
            for each).
        max_layers: the most converted layers one block may hold.
        clock: ``time.perf_counter`` or ``time.process_time`` for ``max_seconds``.
        batch_to_input: maps a batch of an iterable to model inputs.
        seed: seeds the order of the samples.

    Returns:
        A :class:`ReconstructionReport`.

    Raises:
        CalibrationError: bad arguments, no data, or models that do not run on it (nothing is
            modified).

    Example:
        >>> import copy
        >>> ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> model = copy.deepcopy(ref)
        >>> _ = normswap.swap(model, "gn", num_groups=2)
        >>> report = reconstruct(model, ref, torch.randn(32, 3, 12, 12), steps=20)
        >>> fit = report.blocks[0]
        >>> fit.path, fit.layers, fit.error_after <= fit.error_before
        ('', 2, True)
    """
    start = clock()
    for name, value in (("steps", steps), ("batch_size", batch_size), ("samples", samples),
                        ("max_layers", max_layers)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"{name} must be a positive int, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise CalibrationError(f"lr must be a positive number, got {lr!r}")
    if max_seconds is not None and (
        isinstance(max_seconds, bool)
        or not isinstance(max_seconds, (int, float))
        or max_seconds <= 0
    ):
        raise CalibrationError(
            f"max_seconds must be a positive number or None, got {max_seconds!r}"
        )
    model, reference = unwrap(model), unwrap(reference)
    device = model_device(model)
    # The first ``samples`` samples, in chunks of CAPTURE_CHUNK for the recording passes (one
    # tensor or a big batch is never run through the model at once).
    batches: list[Any] = []
    count = 0
    source = data[:samples] if isinstance(data, Tensor) else data
    for batch in iter_inputs(source, batch_size=CAPTURE_CHUNK, batch_to_input=batch_to_input,
                             device=device, what="reconstruction data"):  # fmt: skip
        if isinstance(batch, Tensor):
            batch = batch[: samples - count]
            batches.extend(batch.split(CAPTURE_CHUNK))
        else:
            batches.append(batch)
        count += count_samples(batch)
        if count >= samples:
            break
    check_samples(batches[0] if batches else None, "reconstruction data")
    layers = list(converted_layers(model, reference))
    with eval_mode(model, reference):
        blocks, left_out = find_blocks(model, layers, batches[0], max_layers)
        broadcast_module(model)
        fits: list[BlockFit] = []
        unreached: tuple[str, ...] = ()
        generator = torch.Generator().manual_seed(seed)
        for index, path in enumerate(blocks):
            if max_seconds is not None and any_rank_true(clock() - start >= max_seconds):
                unreached = tuple(blocks[index:])
                break
            x = _capture(model, path, batches, "input")[:samples]
            y = _capture(reference, path, batches, "output")[:samples]
            block = model.get_submodule(path) if path else model
            before = _relative_error(block, x, y, 64)
            params = [p for p in block.parameters() if p.requires_grad]
            saved = [p.detach().clone() for p in params]
            n_steps = steps
            if max_seconds is not None:
                left = max_seconds - (clock() - start)
                share = left / (len(blocks) - index)
                n_steps = min(steps, _steps_that_fit(block, x, y, batch_size, share, clock))
            n_steps = int(max_over_ranks(float(n_steps)))  # every rank runs the same steps
            if params and n_steps > 0:
                _train(block, params, x, y, n_steps, lr, batch_size, generator)
            after = _relative_error(block, x, y, 64)
            # Under DDP every rank keeps or restores alike (parameters stay identical).
            if not all_ranks_true(after < before):
                with torch.no_grad():
                    for p, v in zip(params, saved, strict=True):
                        p.copy_(v)
                after = before
            fits.append(BlockFit(path, len(_inside(path, layers)), n_steps, before, after))
    return ReconstructionReport(
        tuple(fits), min(count, samples), clock() - start, tuple(left_out), unreached
    )


def _steps_that_fit(
    block: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    seconds: float,
    clock: Callable[[], float],
) -> int:
    if seconds <= 0:
        return 0
    xs, ys = x[:batch_size].clone(), y[:batch_size]
    tick = clock()
    loss = (block(xs) - ys).square().mean()
    loss.backward()
    elapsed = max(clock() - tick, 1e-6)
    block.zero_grad(set_to_none=True)
    return max(0, int(0.9 * seconds / elapsed))


def _train(
    block: nn.Module,
    params: list[nn.Parameter],
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    scale = 1.0 / max(float(y.var()), 1e-12)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    n = x.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        loss = (block(x[idx]) - y[idx]).square().mean() * scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        optimizer.step()
        schedule.step()
