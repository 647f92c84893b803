"""Changing one copy of a model changes no other: the machinery of the copy property.

A *world* is a model built from a recipe (a generated :class:`~strategies.Net` or a fixed model),
optionally converted (``prep``: a swap or a progressive swap). The property deep-copies a world,
applies a sequence of :class:`Change` s, each to the original or to the copy, and compares each of
the two with a *twin*: a model built and prepared the same way on its own, never copied, that
received exactly the changes its counterpart received. Every model must equal its twin — same
state-dict bits, same classes (names, the class before parametrizations, the parametrized
tensors), same training flags, and bit-identical outputs, gradients and parameters after one
SGD step — so no change to one copy reached the other, whatever the order. A model that no change
touched must also keep its very class objects.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

import normswap
from normswap.record import surgery_record

#: Every operation normswap offers that changes a model.
OPS: tuple[str, ...] = (
    "swap",
    "fold",
    "finalize",
    "restore",
    "restore_finalized",
    "calibrate",
    "distill",
    "progressive",
    "finish",
)


@dataclass(frozen=True)
class Change:
    """One operation applied to one model of a world.

    Attributes:
        op: one of :data:`OPS`.
        who: ``"original"`` or ``"copy"``.
        name: the norm family the operation converts to (where it converts).
        options: spec options for that family.
    """

    op: str
    who: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)


class Logits(nn.Module):
    """A generated network's outputs flattened into one ``(N, K)`` tensor, so that
    :func:`normswap.distill` (which imitates logits) runs on it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.net(x)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return torch.cat([o.reshape(o.shape[0], -1) for o in outputs], dim=1)


#: Builds a fresh, unconverted model and its input, identical bits every call.
Build = Callable[[], "tuple[nn.Module, torch.Tensor]"]


def _cond_dim(model: nn.Module) -> int | None:
    dims = {m.cond_dim for m in model.modules() if isinstance(m, normswap.AdaLN)}
    return min(dims) if dims else None


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One forward (inside ``normswap.condition`` where the model has AdaLN layers)."""
    cond_dim = _cond_dim(model)
    if cond_dim is None:
        return model(x.clone())
    c = torch.randn(x.shape[0], cond_dim, generator=torch.Generator().manual_seed(1))
    with normswap.condition(model, c.to(x.dtype)):
        return model(x.clone())


def _attempt(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as err:  # classified by the caller
        return err
    return None


def prepare(build: Build, prep: str, name: str, options: dict[str, Any]) -> nn.Module:
    """A fresh model, converted by ``prep`` (``"none"``, ``"swap"`` or ``"progressive"``).

    A conversion that refuses leaves the model as built (the swap property proves that). New
    layers that draw random numbers (AdaLN's modulation) draw the same ones every call.
    """
    model, x = build()
    if prep != "none":
        convert = normswap.swap if prep == "swap" else normswap.swap_progressive
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4321)
            _attempt(lambda: convert(model, name, example_inputs=x, **options))
    return model


def _checkpoint(build: Build, change: Change, finalized: bool) -> dict[str, Any]:
    """What ``normswap convert`` saves for a fresh model converted as ``change`` says."""
    model, x = build()
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        report = normswap.swap(model, change.name, example_inputs=x, **change.options)
    record = surgery_record(report)
    if finalized:
        normswap.finalize(model)
        record["finalized"] = True
    return {"normswap": record, "state_dict": model.state_dict()}


def apply_change(model: nn.Module, change: Change, build: Build) -> BaseException | None:
    """Apply ``change`` to ``model``; returns the error it raised, if any.

    Randomness (distillation's batch order and initial state) is seeded the same way for every
    call, so a model and its twin receive identical changes.
    """
    fresh, x = build()  # an untouched model of the same recipe: the reference / teacher
    checkpoint = None
    if change.op.startswith("restore"):
        try:  # a conversion that refuses leaves nothing to restore
            checkpoint = _checkpoint(build, change, change.op == "restore_finalized")
        except Exception as err:  # classified by the caller
            return err

    def act() -> None:
        if change.op == "swap":
            normswap.swap(model, change.name, example_inputs=x, **change.options)
        elif change.op == "fold":
            model.eval()
            normswap.fold_bn(model, x)
        elif change.op == "finalize":
            normswap.finalize(model)
        elif change.op.startswith("restore"):
            normswap.restore(model, checkpoint, example_inputs=x)
        elif change.op == "calibrate":
            normswap.calibrate(model, fresh.eval(), x)
        elif change.op == "distill":
            normswap.distill(
                model,
                fresh.eval(),
                x,
                val_data=x,
                steps=2,
                eval_every=1,
                batch_size=x.shape[0],
                augment=None,
                progress=False,
            )
        elif change.op == "progressive":
            normswap.swap_progressive(model, change.name, example_inputs=x, **change.options)
        elif change.op == "finish":
            normswap.set_blend(model, 1.0)
            normswap.finish_blend(model)
        else:
            raise AssertionError(f"unknown op {change.op!r}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return _attempt(act)


# --------------------------------------------------------------------------- comparing worlds


def _classes(model: nn.Module) -> dict[str, tuple]:
    """Per path: class name, class before parametrizations, parametrized tensors, flag."""
    out = {}
    for path, m in model.named_modules(remove_duplicate=False):
        props = sorted(k for k, v in vars(type(m)).items() if isinstance(v, property))
        base = parametrize.type_before_parametrizations(m)
        out[path] = (type(m).__name__, base, tuple(props), m.training)
    return out


def _bits(t: torch.Tensor) -> tuple:
    t = t.detach().cpu().contiguous()
    return (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    x, y = _bits(a), _bits(b)
    return x[:2] == y[:2] and torch.equal(x[2], y[2])


def differences(model: nn.Module, twin: nn.Module, x: torch.Tensor) -> list[str]:
    """How ``model`` differs from ``twin``: state, classes, outputs, gradients, one SGD step.

    Runs both (a forward in their current modes, a backward, an SGD step): call it last.
    """
    diffs = []
    state, twin_state = model.state_dict(), twin.state_dict()
    if list(state) != list(twin_state):
        diffs.append(f"state-dict keys: {sorted(set(state) ^ set(twin_state))}")
    diffs += [f"state {k}" for k in state if k in twin_state and not _same(state[k], twin_state[k])]
    classes, twin_classes = _classes(model), _classes(twin)
    diffs += [
        f"class of {p!r}: {classes[p]} != {twin_classes.get(p)}"
        for p in classes
        if classes[p] != twin_classes.get(p)
    ]
    if diffs:
        return diffs
    results = []
    for m in (model, twin):
        out, error = None, None
        try:
            out = run(m, x)
        except Exception as err:  # compared below
            error = err
        results.append((out, error))
    (out, error), (twin_out, twin_error) = results
    if (error is None) != (twin_error is None):
        return [f"forward: {error!r} vs the twin's {twin_error!r}"]
    if error is not None:
        return [] if type(error) is type(twin_error) else [f"forward: {error!r} vs {twin_error!r}"]
    if not _same(out, twin_out):
        return ["outputs differ"]
    for o in (out, twin_out):
        loss = o.float().square().mean()
        if loss.requires_grad:
            loss.backward()
    params = dict(model.named_parameters())
    twin_params = dict(twin.named_parameters())
    for name, p in params.items():
        q = twin_params.get(name)
        if q is None or (p.grad is None) != (q.grad is None):
            diffs.append(f"gradient of {name}: present {p.grad is not None} vs twin")
        elif p.grad is not None and not _same(p.grad, q.grad):
            diffs.append(f"gradient of {name} differs")
    for m in (model, twin):
        trainable = [p for p in m.parameters() if p.requires_grad and p.grad is not None]
        if trainable:
            torch.optim.SGD(trainable, lr=0.1).step()
    diffs += [
        f"{name} after an SGD step"
        for name, p in model.named_parameters()
        if not _same(p, twin_params[name])
    ]
    return diffs


def class_objects(model: nn.Module) -> dict[str, tuple[type, tuple[str, ...]]]:
    """Per path: the class object itself and the names in its namespace."""
    return {p: (type(m), tuple(sorted(vars(type(m))))) for p, m in model.named_modules()}


def check_copies(
    build: Build, prep: str, name: str, options: dict[str, Any], changes: list[Change]
) -> list[str]:
    """The copy property for one world and one sequence of changes; returns what happened.

    Raises:
        AssertionError: tagged ``[copy-independence]`` with what differs.
    """
    original = prepare(build, prep, name, options)
    _, x = build()
    duplicate = copy.deepcopy(original)
    models = {"original": original, "copy": duplicate}
    twins = {who: prepare(build, prep, name, options) for who in models}
    untouched = {who: class_objects(m) for who, m in models.items()}
    outcomes = []
    for change in changes:
        error = apply_change(models[change.who], change, build)
        twin_error = apply_change(twins[change.who], change, build)
        if (error is None) != (twin_error is None) or type(error) is not type(twin_error):
            raise AssertionError(
                f"[copy-independence] {change}: {error!r} on the {change.who}, but "
                f"{twin_error!r} on a model that was never copied"
            )
        if error is not None and not isinstance(error, ValueError):
            raise AssertionError(f"[op-error] {change} raised {error!r}") from error
        outcomes.append(f"{change.op}: {'refused' if error else 'done'}")
    for who, model in models.items():
        if all(c.who != who for c in changes):
            after = class_objects(model)
            assert after == untouched[who], (
                f"[copy-independence] the {who} was not changed, but its classes were: "
                f"{[p for p in after if after[p] != untouched[who].get(p)][:5]}"
            )
        diffs = differences(model, twins[who], x)
        assert not diffs, (
            f"[copy-independence] the {who} differs from a model that was never copied and "
            f"received the same changes: {diffs[:8]}"
        )
    return outcomes
