"""Exact folding of an eval-mode BatchNorm into the conv/linear layer that produces its input.

An eval-mode BatchNorm is the per-channel affine map ``y = s * x + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``. When ``x`` is the
output of a conv or linear layer and nothing else uses it, the map folds into that layer:
``W' = s * W`` (per output channel) and ``b' = s * b + t``, after which the BatchNorm is the
identity. The arithmetic is done in float64 and cast back to the weight's dtype.

:func:`fold_conv_bn` folds one pair; :func:`fold_bn` finds every pair with
:func:`normswap.trace.trace`, checks them all, and folds them all or none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torchvision.ops.misc import FrozenBatchNorm2d

from normswap.errors import FoldError
from normswap.trace import BATCHNORM_TYPES, producer_problem, trace

__all__ = ["fold_bn", "fold_conv_bn", "fold_problems"]


def _channels(module: nn.Module) -> int | None:
    """Output channels of a producer, or channels of a BatchNorm."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, FrozenBatchNorm2d):
        return module.weight.shape[0]
    if isinstance(module, _BatchNorm):
        return module.num_features
    return None


def _bn_problems(bn: nn.Module) -> list[str]:
    """Why ``bn`` itself cannot be folded (mode, statistics), whatever produces its input."""
    kind = type(bn).__name__
    if not isinstance(bn, BATCHNORM_TYPES):
        return [f"{kind} is not a BatchNorm (_BatchNorm subclass or FrozenBatchNorm2d)"]
    if isinstance(bn, FrozenBatchNorm2d):
        return []
    problems = []
    if bn.running_mean is None or bn.running_var is None:
        problems.append(
            f"{kind} has no running statistics (track_running_stats=False): it normalizes with "
            f"batch statistics even in eval mode, so it is not a fixed affine map and cannot fold"
        )
    elif is_lazy(bn.running_mean):
        problems.append(f"{kind} is lazy and not initialized yet: run one forward pass first")
    if bn.training:
        problems.append(
            f"{kind} is in training mode: call model.eval() first: folding uses running statistics"
        )
    return problems


def _producer_problems(producer: nn.Module) -> list[str]:
    """Why ``producer`` cannot receive a folded BatchNorm."""
    bad = producer_problem(producer)
    if bad is not None:
        return [bad]
    kind = type(producer).__name__
    problems = []
    for name in ("weight", "bias"):
        if parametrize.is_parametrized(producer, name):
            problems.append(
                f"{kind}'s {name} is parametrized, so folding into it would not be exact: remove "
                f"the parametrization first (torch.nn.utils.parametrize.remove_parametrizations("
                f"module, {name!r}))"
            )
    if not problems and is_lazy(producer.weight):
        problems.append(f"{kind} is lazy and not initialized yet: run one forward pass first")
    return problems


def fold_problems(producer: nn.Module, bn: nn.Module) -> list[str]:
    """List every reason why ``bn`` cannot be folded into ``producer`` (empty when it can).

    Checks the modules only (types, mode, statistics, channels, parametrizations); whether
    ``producer``'s output really is ``bn``'s only input is a graph fact: see
    :func:`normswap.trace.trace`.

    Args:
        producer: the conv/linear layer whose output ``bn`` normalizes.
        bn: a ``_BatchNorm`` subclass with running statistics, or a ``FrozenBatchNorm2d``.

    Returns:
        Human-readable problems, each naming its fix where there is one.

    Example:
        >>> fold_problems(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))  # doctest: +ELLIPSIS
        ['BatchNorm2d is in training mode: call model.eval() first: ...']
        >>> fold_problems(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8).eval())
        []
    """
    problems = _producer_problems(producer) + _bn_problems(bn)
    if problems:
        return problems
    pkind, kind = type(producer).__name__, type(bn).__name__
    out, channels = _channels(producer), _channels(bn)
    if out != channels:
        problems.append(
            f"channel mismatch: {pkind} has {out} output channels, {kind} has {channels}"
        )
    if isinstance(producer, nn.Linear) and isinstance(bn, FrozenBatchNorm2d):
        problems.append("FrozenBatchNorm2d normalizes rank-4 inputs, so it cannot follow a Linear")
    return problems


def _affine(bn: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The BatchNorm's per-channel ``(scale, shift)``: ``bn(x) = scale * x + shift``."""
    mean = bn.running_mean.to(device, dtype)
    var = bn.running_var.to(device, dtype)
    gamma = torch.ones_like(mean) if bn.weight is None else bn.weight.detach().to(device, dtype)
    beta = torch.zeros_like(mean) if bn.bias is None else bn.bias.detach().to(device, dtype)
    scale = gamma * torch.rsqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold_conv_bn(producer: nn.Module, bn: nn.Module, *, path: str | None = None) -> None:
    """Fold an eval-mode BatchNorm into the conv/linear layer that produces its input, in place.

    Afterwards ``producer(x)`` equals the old ``bn(producer(x))`` (up to float rounding; the
    arithmetic is float64) and ``bn`` can be replaced by ``nn.Identity()``, which the caller does.
    ``bn`` itself is not modified.

    Supported producers: ``Conv1d/2d/3d`` (any groups, dilation, with or without bias),
    ``ConvTranspose1d/2d/3d`` (any groups; the output channel is weight dim 1) and ``Linear``
    followed by a BatchNorm1d over its ``(N, C)`` output. Supported norms: ``_BatchNorm``
    subclasses with running statistics (``affine=False`` means gamma = 1, beta = 0) and
    torchvision's ``FrozenBatchNorm2d``.

    The producer's Parameter objects are kept (updated in place), so optimizers and anything
    else holding them stay valid; their dtype, device, memory format (a channels_last weight stays
    channels_last) and ``requires_grad`` are unchanged. A producer without bias gets a new bias
    Parameter with the weight's dtype, device and ``requires_grad`` (an optimizer built earlier
    does not know it). A producer whose weight or bias is parametrized is refused rather than
    folded into the unconstrained original, because that is exact only for some
    parametrizations (e.g. not for weight norm, which re-normalizes the scaled weight).

    Args:
        producer: the conv/linear layer; modified in place.
        bn: the BatchNorm; must be in eval mode (a ``FrozenBatchNorm2d`` always is).
        path: the BatchNorm's module path, named in error messages.

    Raises:
        FoldError: every problem :func:`fold_problems` finds, with its fix; nothing is modified.

    Example:
        >>> conv, bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8).eval()
        >>> x = torch.randn(2, 3, 16, 16)
        >>> expected = bn(conv(x))
        >>> fold_conv_bn(conv, bn)
        >>> torch.allclose(conv(x), expected, atol=1e-6)
        True
    """
    problems = fold_problems(producer, bn)
    if problems:
        where = f"{type(bn).__name__} {path!r}" if path is not None else type(bn).__name__
        raise FoldError(
            f"cannot fold {where} into {type(producer).__name__}: {'; '.join(problems)}"
        )
    weight = producer.weight
    # float64 everywhere but on devices without it (MPS).
    calc = torch.float32 if weight.device.type == "mps" else torch.float64
    with torch.no_grad():
        scale, shift = _affine(bn, calc, weight.device)
        w = weight.detach().to(calc)
        if isinstance(producer, nn.modules.conv._ConvTransposeNd):
            # weight: (in, out / groups, *k); output channel g * (out / groups) + j.
            g, per_group = producer.groups, w.shape[1]
            spatial = (1,) * (w.ndim - 2)
            grouped = w.reshape(g, w.shape[0] // g, per_group, *w.shape[2:])
            w = (grouped * scale.reshape(g, 1, per_group, *spatial)).reshape(w.shape)
        else:
            w = w * scale.reshape(-1, *(1,) * (w.ndim - 1))
        bias = shift if producer.bias is None else producer.bias.detach().to(calc) * scale + shift
        weight.copy_(w)  # copy_ keeps the destination's dtype and strides (memory format)
        if producer.bias is None:
            producer.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
        else:
            producer.bias.copy_(bias)


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def fold_bn(
    model: nn.Module, example_inputs: Any, *, include: Iterable[str] | None = None
) -> list[tuple[str, str]]:
    """Fold every (or every included) BatchNorm into its producing conv/linear, all or nothing.

    Traces ``model`` once with ``example_inputs`` (see :func:`normswap.trace.trace` for the
    convention and cost), checks every selected BatchNorm, and if any cannot be folded raises one
    :class:`FoldError` listing each offending path with its reason before anything is modified.
    Otherwise folds each BatchNorm into its producer (:func:`fold_conv_bn`) and replaces it with
    ``nn.Identity()`` at every path where it is registered.

    To fold only what can be folded, select it from the trace:
    ``fold_bn(model, x, include=[p for p, f in trace(model, x).items() if f.foldable])``.

    Args:
        model: the model, in eval mode; modified in place.
        example_inputs: inputs for one forward pass (a tensor, a tuple of positional arguments,
            a dict of keyword arguments, or any other single argument such as a detection
            model's list of images).
        include: BatchNorm paths to fold (any path of a shared module); the others are left alone
            and not checked. ``None`` selects every BatchNorm in the model.

    Returns:
        ``(bn_path, producer_path)`` for every folded pair, in module order.

    Raises:
        FoldError: some selected BatchNorm cannot be folded (training mode, input not a
            conv/linear output, output shared, ...) or an included path is not a BatchNorm;
            the model is unchanged.
        TraceError: the forward pass failed with ``example_inputs``.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18().eval()
        >>> pairs = fold_bn(model, torch.randn(1, 3, 64, 64))
        >>> pairs[0], type(model.bn1).__name__
        (('bn1', 'conv1'), 'Identity')
    """
    facts = trace(model, example_inputs)
    problems: list[tuple[str, str]] = []
    if include is None:
        selected = list(facts)
    else:
        wanted = [include] if isinstance(include, str) else list(include)
        selected = []
        for path in wanted:
            if path in facts.aliases:
                selected.append(facts.aliases[path])
            else:
                problems.append((path, "is not a BatchNorm-family module of the model"))
        selected = list(dict.fromkeys(selected))

    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rpartition(".")[0])

    pairs: list[tuple[str, str]] = []
    seen_producers: set[str] = set()
    for path in selected:
        f = facts[path]
        bn = model.get_submodule(path)
        if not f.foldable or f.producer is None:
            issues = [f.reason or "no producing conv/linear"]
            if isinstance(bn, _BatchNorm) and bn.training:
                issues.append("in training mode: call model.eval() first")
            problems.append((path, "; ".join(issues)))
            continue
        producer = model.get_submodule(f.producer)
        issues = fold_problems(producer, bn)
        for pname in ("weight", "bias"):
            param = getattr(producer, pname, None)
            others = sorted(set(owners.get(id(param), [])) - {f.producer})
            if isinstance(param, nn.Parameter) and others:
                issues.append(
                    f"{f.producer}.{pname} is shared with {', '.join(others)}, which folding "
                    f"would change too"
                )
        if f.producer in seen_producers:
            issues.append(f"{f.producer} also feeds another selected BatchNorm")
        seen_producers.add(f.producer)
        if issues:
            problems.append((path, f"into {f.producer}: " + "; ".join(issues)))
            continue
        pairs.append((path, f.producer))

    if problems:
        lines = "\n".join(f"  - {path}: {msg}" for path, msg in problems)
        raise FoldError(
            f"cannot fold BatchNorm in {type(model).__name__}: {len(problems)} problem(s); nothing "
            f"was modified:\n{lines}\nfix: call model.eval() for training-mode BatchNorms, or "
            f"pass include= with the foldable paths only"
        )

    for bn_path, producer_path in pairs:
        fold_conv_bn(model.get_submodule(producer_path), model.get_submodule(bn_path), path=bn_path)
        identity = nn.Identity()
        for alias in facts[bn_path].paths:
            _set_module(model, alias, identity)
    return pairs
