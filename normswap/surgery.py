"""Surgery: execute a validated plan; ``swap`` = plan + apply."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from normswap.fold import fold_conv_bn
from normswap.plan import Plan, plan
from normswap.report import FOLD, SKIP, SwapReport
from normswap.specs import NormSpec

__all__ = ["apply", "set_module", "swap"]


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (dotted) inside ``model``; works for every container.

    Example:
        >>> m = nn.Sequential(nn.Sequential(nn.BatchNorm2d(2)))
        >>> set_module(m, "0.0", nn.Identity()); type(m[0][0]).__name__
        'Identity'
    """
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if name not in parent._modules:
        raise KeyError(f"{path!r} is not a child module of {type(parent).__name__}")
    parent._modules[name] = new


def apply(model: nn.Module, the_plan: Plan) -> SwapReport:
    """Execute ``the_plan`` on ``model`` (the model it was planned for) and report.

    All new modules are built before the first change; then producers are folded, norms
    replaced at every path (a shared instance becomes one shared new instance), and other
    layers reparameterized.

    Example:
        >>> import torchvision
        >>> from normswap.plan import plan
        >>> m = torchvision.models.resnet18()
        >>> print(apply(m, plan(m, "gn")).counts())
        {'BatchNorm2d -> GroupNorm': 20}
    """
    spec, target = the_plan.spec, the_plan.target
    built: list[tuple[tuple[str, ...], nn.Module]] = []
    for step in the_plan.norm_steps:
        if step.decision.action == SKIP:
            continue
        assert step.source is not None
        new = target.build(step.source, spec, step.decision)
        if hasattr(type(new), "normswap_path"):
            new.normswap_path = step.paths[0]
        built.append((step.paths, new))

    for step in the_plan.norm_steps:
        if step.decision.action == FOLD:
            assert step.decision.into is not None
            producer = model.get_submodule(step.decision.into)
            fold_conv_bn(producer, step.module, path=step.paths[0])
    for paths, new in built:
        for path in paths:
            set_module(model, path, new)
    for layer_step in the_plan.layer_steps:
        if layer_step.action != SKIP:
            target.apply_layer(layer_step, spec)
    return the_plan.report(dry_run=False)


def swap(
    model: nn.Module,
    spec: NormSpec | str,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    dry_run: bool = False,
    strict: bool = False,
    example_inputs: Any = None,
    **overrides: Any,
) -> SwapReport:
    """Replace the BatchNorm-family modules of ``model`` in place and report what was done.

    Finds every BN flavour by class hierarchy (BatchNorm1d/2d/3d, SyncBatchNorm, lazy BN,
    torchvision's FrozenBatchNorm2d and subclasses), plans the whole conversion, and only
    then changes the model: if any step is invalid, one :class:`~normswap.errors.SwapError`
    lists every offending module and nothing is modified.

    Args:
        model: the model to convert (modified in place).
        spec: a spec object or a registered name: ``"gn"``, ``"ln"``, ``"ln2d"``, ``"in"``,
            ``"adalin"``, ``"adaln"``, ``"wn"``, ``"ws_gn"``.
        include: glob pattern(s) on module paths to convert (``"layer4.*"``).
        exclude: glob pattern(s) on module paths to leave alone (``"*.downsample.*"``).
        dry_run: plan only; return the plan as a report without modifying anything.
        strict: fail if any BatchNorm-family module would remain.
        example_inputs: inputs for one traced forward (a tensor, a tuple of positional
            args, or a dict of keyword args): checks input ranks (BatchNorm1d on (N, C) vs
            (N, C, L)) and finds the conv feeding each BN for ``wn`` with ``bn="fold"``.
        **overrides: spec field overrides, e.g. ``num_groups=16``.

    Returns:
        The :class:`~normswap.report.SwapReport`.

    Example:
        >>> import torchvision, normswap
        >>> model = torchvision.models.resnet18()
        >>> report = normswap.swap(model, "gn", num_groups=16, exclude="*.downsample.*")
        >>> report.counts()
        {'BatchNorm2d -> GroupNorm': 17, 'BatchNorm2d (kept)': 3}
    """
    the_plan = plan(
        model,
        spec,
        include=include,
        exclude=exclude,
        example_inputs=example_inputs,
        strict=strict,
        **overrides,
    )
    if dry_run:
        return the_plan.report(dry_run=True)
    return apply(model, the_plan)
