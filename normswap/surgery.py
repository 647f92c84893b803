"""Surgery: execute a validated plan; ``swap`` = plan + apply, ``fold_bn`` = plan + apply too.

:func:`apply` builds every new module first, then changes the model; a plan accepted by
:func:`normswap.plan` is executed without a :class:`~normswap.errors.NormSwapError`, and if
anything still fails part-way (a bug, a ``KeyboardInterrupt``) the model is put back exactly as
it was (:class:`~normswap.journal.Journal`) before the error propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from normswap.errors import ApplyError, FoldError, SwapError
from normswap.graph.fold import fold_conv_bn
from normswap.journal import Journal
from normswap.modules import set_module, take_hooks
from normswap.norms import with_after
from normswap.plan import NormStep, Plan, check_model, plan
from normswap.report import FOLD, REPLACE, SKIP, SwapReport
from normswap.sources import is_source_norm
from normswap.specs import NormSpec, get_spec

__all__ = ["apply", "fold_bn", "swap"]


def _check_plan_fits(model: nn.Module, the_plan: Plan) -> None:
    """Refuse a plan made for another model, or for this one before it changed."""
    stale = []
    steps = [(s.paths, s.module) for s in the_plan.norm_steps]
    steps += [(s.paths, s.module) for s in the_plan.layer_steps]
    for paths, module in steps:
        for path in paths:
            try:
                found = model.get_submodule(path)
            except AttributeError:
                found = None
            if found is not module:
                stale.append(path)
    if stale:
        raise SwapError(
            f"the plan does not fit this model: {', '.join(stale[:5])} "
            f"{'is' if len(stale) == 1 else 'are'} no longer the planned module(s); the model "
            "changed since it was planned, or the plan is for another model: plan it again "
            "(normswap.plan(model, ...)); nothing was modified"
        )


#: Wraps one new norm module as it is built (``wrap(step, new) -> module``).
Wrap = Callable[[NormStep, nn.Module], nn.Module]


def apply(model: nn.Module, the_plan: Plan, *, wrap: Wrap | None = None) -> SwapReport:
    """Execute ``the_plan`` on ``model`` (the model it was planned for) and report.

    All new modules are built before the first change; then producers are folded, norms
    replaced at every path (a shared instance becomes one shared new instance), and other
    layers reparameterized. If a step fails, the model is restored exactly as it was and an
    :class:`~normswap.errors.ApplyError` says so (a ``KeyboardInterrupt`` propagates as is,
    after the restore).

    ``wrap`` is called on every norm the plan replaces, with its step and the new module, and
    returns what goes into the model instead (:func:`normswap.progressive.swap_progressive`
    wraps each in a blend with the pretrained BatchNorm).

    Raises:
        SwapError: the plan was made for another model, or the model changed since.
        ApplyError: a step failed; the model is as it was before.

    Example:
        >>> import torchvision
        >>> from normswap.plan import plan
        >>> m = torchvision.models.resnet18()
        >>> print(apply(m, plan(m, "gn")).counts())
        {'BatchNorm2d -> GroupNorm': 20}
    """
    check_model(model)
    _check_plan_fits(model, the_plan)
    spec, target = the_plan.spec, the_plan.target
    folds = [s for s in the_plan.norm_steps if s.decision.action == FOLD]
    producers = [model.get_submodule(s.decision.into) for s in folds if s.decision.into]
    writes = [t for p in producers for t in (p.weight, p.bias) if isinstance(t, torch.Tensor)]
    for layer_step in the_plan.layer_steps:
        if layer_step.action != SKIP:
            writes += target.layer_writes(layer_step, spec)
    journal = Journal(model, writes)
    step = "building the new modules"
    try:
        built: list[tuple[tuple[str, ...], nn.Module]] = []
        for norm_step in the_plan.norm_steps:
            if norm_step.decision.action == SKIP:
                continue
            assert norm_step.source is not None
            new = target.build(norm_step.source, spec, norm_step.decision)
            if wrap is not None and norm_step.decision.action == REPLACE:
                new = wrap(norm_step, new)
            new = with_after(new, norm_step.source.after)
            if hasattr(type(new), "normswap_path"):
                new.normswap_path = norm_step.paths[0]
            take_hooks(norm_step.module, new)
            built.append((norm_step.paths, new))
        for norm_step, producer in zip(folds, producers, strict=True):
            step = f"folding {norm_step.paths[0]} into {norm_step.decision.into}"
            fold_conv_bn(producer, norm_step.module, path=norm_step.paths[0])
        for paths, new in built:
            step = f"replacing {paths[0]}"
            for path in paths:
                set_module(model, path, new)
        for layer_step in the_plan.layer_steps:
            if layer_step.action != SKIP:
                step = f"{layer_step.action} on {layer_step.paths[0]}"
                target.apply_layer(layer_step, spec)
        step = "checking the result"
        target.check_applied(model, the_plan)
    except Exception as err:
        journal.rollback()
        raise ApplyError(
            f"applying the {spec.name!r} plan to {type(model).__name__} failed while {step} "
            f"({type(err).__name__}: {err}); the model was restored exactly as it was before "
            "the swap. This is a bug in normswap or in a registered target: please report it"
        ) from err
    except BaseException as err:  # KeyboardInterrupt, SystemExit: restore, then let it go on
        journal.rollback()
        if hasattr(err, "add_note"):
            err.add_note("normswap: the swap was interrupted; the model was restored as it was")
        raise
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
    replace: str | Iterable[str] | None = None,
    **overrides: Any,
) -> SwapReport:
    """Replace the norms of ``model`` in place and report what was done.

    By default replaces every BatchNorm flavour, found by class hierarchy (BatchNorm1d/2d/3d,
    SyncBatchNorm, lazy BN, torchvision's FrozenBatchNorm2d, frozen-BN look-alikes, subclasses
    and anything added with :func:`~normswap.register_source`); ``replace=`` chooses other
    source kinds (LayerNorm, GroupNorm, InstanceNorm, RMSNorm, ...). It plans the whole
    conversion, and only then changes the model: if any step is invalid, one
    :class:`~normswap.errors.SwapError` lists every offending module and nothing is modified.

    Args:
        model: the model to convert (modified in place).
        spec: a spec object or a registered name (``normswap.list_norms()``): ``"gn"``,
            ``"ln"``, ``"ln2d"``, ``"in"``, ``"adalin"``, ``"adaln"``, ``"wn"``, ``"ws_gn"``,
            ``"frozen"``.
        include: glob pattern(s) on module paths to convert (``"layer4.*"``).
        exclude: glob pattern(s) on module paths to leave alone (``"*.downsample.*"``).
        dry_run: plan only; return the plan as a report without modifying anything.
        strict: fail if any norm of the replaced kinds would remain.
        example_inputs: inputs for one traced forward (a tensor, a tuple of positional
            args, or a dict of keyword args; see :mod:`normswap.inputs`): checks input ranks
            (BatchNorm1d on (N, C) vs (N, C, L); a channels-last map vs tokens), finds the conv
            feeding each BN for ``wn`` with ``bn="fold"``, and the layers an exact LayerNorm →
            RMSNorm rewrite changes (``"rms"`` with ``center="fold"``).
        replace: the source kinds to replace: ``"bn"`` (the default), ``"ln"``, ``"ln2d"``,
            ``"gn"``, ``"in"``, ``"rms"``, ``"frozen"``, a tuple of them, or ``"any"``.
        **overrides: spec field overrides, e.g. ``num_groups=16``.

    Returns:
        The :class:`~normswap.report.SwapReport`.

    Raises:
        SpecError: a bad spec name, field or value.
        SwapError: one error listing every offending module path and its fix.
        UnsupportedModuleError: ``model`` is not an ``nn.Module``, or is TorchScript.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18()
        >>> report = normswap.swap(model, "gn", num_groups=16, exclude="*.downsample.*")
        >>> report.counts()
        {'BatchNorm2d -> GroupNorm': 17, 'BatchNorm2d (kept)': 3}
        >>> vit = torchvision.models.vit_b_16()
        >>> normswap.swap(vit, "dyt", replace="ln").counts()
        {'LayerNorm -> DyT': 25}
    """
    the_plan = plan(
        model,
        spec,
        include=include,
        exclude=exclude,
        example_inputs=example_inputs,
        strict=strict,
        replace=replace,
        **overrides,
    )
    if dry_run:
        return the_plan.report(dry_run=True)
    return apply(model, the_plan)


def fold_bn(
    model: nn.Module, example_inputs: Any, *, include: Iterable[str] | str | None = None
) -> list[tuple[str, str]]:
    """Fold every (or every included) BatchNorm into its producing conv/linear, all or nothing.

    The plan of ``swap(model, "wn", bn="fold", layers=())``: the BatchNorms are folded and
    replaced by ``nn.Identity()``, and no layer is weight-normalized. Traces ``model`` once with
    ``example_inputs`` and checks every selected BatchNorm with the folding rule
    (:func:`normswap.graph.rules.fold_problems`); if any cannot be folded, one
    :class:`~normswap.errors.FoldError` lists each offending path with its reason and nothing is
    modified.

    To fold only what can be folded:
    ``fold_bn(model, x, include=[p for p, f in trace(model, x).items() if f.foldable])``.

    Args:
        model: the model, in eval mode; modified in place.
        example_inputs: inputs for one forward pass (see :mod:`normswap.inputs`).
        include: BatchNorm paths to fold (any path of a shared module); the others are left
            alone. ``None`` selects every BatchNorm in the model.

    Returns:
        ``(bn_path, producer_path)`` for every folded pair, in module order.

    Raises:
        FoldError: some selected BatchNorm cannot be folded (training mode, input not a
            conv/linear output, output shared, ...) or an included path is not a BatchNorm;
            the model is unchanged.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18().eval()
        >>> pairs = fold_bn(model, torch.randn(1, 3, 64, 64))
        >>> pairs[0], type(model.bn1).__name__
        (('bn1', 'conv1'), 'Identity')
    """
    check_model(model)
    spec = get_spec("wn", bn="fold", unfoldable="keep", layers=())
    problems: list[tuple[str, str]] = []
    paths = None
    if include is not None:
        wanted = [include] if isinstance(include, str) else list(include)
        modules = dict(model.named_modules(remove_duplicate=False))
        problems += [
            (p, "is not a BatchNorm-family module of the model")
            for p in wanted
            if p not in modules or not is_source_norm(modules[p])
        ]
        paths = [_literal(p) for p in wanted]
    the_plan = None
    if not problems:
        try:
            the_plan = plan(model, spec, include=paths, example_inputs=example_inputs)
        except SwapError as err:
            problems += err.problems
        else:
            problems += [
                (s.paths[0], (s.decision.reason or "").removeprefix("not foldable: "))
                for s in the_plan.norm_steps
                if s.source is not None and s.decision.action == SKIP
            ]
    if problems:
        lines = "\n".join(f"  - {path}: {message}" for path, message in problems)
        raise FoldError(
            f"cannot fold BatchNorm in {type(model).__name__}: {len(problems)} problem(s); "
            f"nothing was modified:\n{lines}\nfix: call model.eval() for training-mode "
            "BatchNorms, or pass include= with the foldable paths only",
            problems,
        )
    assert the_plan is not None
    apply(model, the_plan)
    return [(s.paths[0], s.decision.into) for s in the_plan.norm_steps if s.decision.into]


def _literal(path: str) -> str:
    """A glob pattern that matches exactly ``path`` (module paths may hold ``[``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)
