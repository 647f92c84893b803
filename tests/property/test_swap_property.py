"""The swap property, on random tiny networks: either the swap converts faithfully, or it raises a
``ValueError`` and the model is bit-identical to what it was.

Faithful means: no norm of the replaced kinds (BatchNorm by default; ``replace=`` draws
LayerNorm, GroupNorm, InstanceNorm, RMSNorm, frozen look-alikes...) is left in the include/exclude
scope without a skip record and its reason; everything that is not a converted norm keeps its
object, type, training flag, hooks, ``requires_grad`` and bits (weight norm: the same effective
weight; a fold and an exact LayerNorm -> RMSNorm rewrite: the same outputs); a shared module stays
shared; the converted model runs forward and backward and every trainable parameter gets a finite
gradient. And the plan is the contract: a dry run that succeeds means the real swap succeeds with
the same records, a dry run that fails means the swap fails.

``make test`` runs a bounded, derandomized search. ``NORMSWAP_FUZZ_EXAMPLES=20000`` runs a long
random one (``make fuzz``), keeping found examples in ``.cache/hypothesis``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from helpers import LookalikeFrozenBatchNorm2d, assert_all_grads
from hypothesis import HealthCheck, event, given, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from strategies import (
    BatchNormReLU2d,
    Net,
    QuietBatchNorm2d,
    SwapArgs,
    swap_cases,
)
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torchvision.models.convnext import LayerNorm2d as TVLayerNorm2d
from torchvision.ops.misc import FrozenBatchNorm2d

import normswap

FUZZ_EXAMPLES = os.environ.get("NORMSWAP_FUZZ_EXAMPLES")
if FUZZ_EXAMPLES:
    SETTINGS = settings(
        max_examples=int(FUZZ_EXAMPLES),
        deadline=None,
        database=DirectoryBasedExampleDatabase(".cache/hypothesis"),
        suppress_health_check=[HealthCheck.too_slow],
    )
else:
    SETTINGS = settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        database=None,
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow],
    )

#: The BatchNorm family, judged independently of normswap's own registry.
BATCHNORM_CLASSES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    FrozenBatchNorm2d,
)
BATCHNORM_NAMES = frozenset(c.__name__ for c in BATCHNORM_CLASSES)
#: The classes of each source kind, judged independently of normswap's registry (exact classes:
#: the generated networks use these and nothing else).
KIND_CLASSES: dict[str, tuple[type, ...]] = {
    "bn": (
        *BATCHNORM_CLASSES,
        QuietBatchNorm2d,
        BatchNormReLU2d,
        LookalikeFrozenBatchNorm2d,
    ),
    "ln": (nn.LayerNorm,),
    "ln2d": (TVLayerNorm2d,),
    "gn": (nn.GroupNorm,),
    "in": (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
    "rms": (nn.RMSNorm,),
    "frozen": (normswap.FrozenAffine,),
}
NORM_ACTIONS = frozenset({"replace", "fold", "remove"})
#: Actions on other layers whose values may change (judged by the outputs).
REWRITES = frozenset({"center", "untie"})
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def kinds_of(args: SwapArgs) -> tuple[str, ...]:
    """The source kinds ``args`` replaces."""
    replace = args.replace
    if replace is None:
        return ("bn",)
    if replace == "any":
        return tuple(KIND_CLASSES)
    return (replace,) if isinstance(replace, str) else tuple(replace)


def is_replaced(module: nn.Module, args: SwapArgs) -> bool:
    """A norm of a kind ``args`` replaces, also inside TorchScript (which normswap may not
    see)."""
    kinds = kinds_of(args)
    if any(type(module) in KIND_CLASSES[k] for k in kinds):
        return True
    return (
        "bn" in kinds
        and isinstance(module, torch.jit.ScriptModule)
        and getattr(module, "original_name", None) in BATCHNORM_NAMES
    )


# --------------------------------------------------------------------------- snapshots


def _bits(t: torch.Tensor) -> Any:
    if is_lazy(t):
        return ("uninitialized", type(t).__name__)
    t = t.detach().cpu().contiguous()
    return (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).clone())


def _same_bits(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and a and a[0] == "uninitialized":
        return a == b
    return a[:2] == b[:2] and torch.equal(a[2], b[2])


def _hooks(module: nn.Module, names: Iterable[str] = HOOK_DICTS) -> tuple:
    return tuple((n, tuple(getattr(module, n, {}).items())) for n in names)


def _parametrizations(module: nn.Module) -> tuple:
    if not parametrize.is_parametrized(module):
        return ()
    return tuple(
        (
            name,
            tuple(id(p) for p in plist),
            tuple(id(t) for _, t in plist.named_parameters(recurse=False)),
        )
        for name, plist in module.parametrizations.items()
    )


@dataclass
class Snapshot:
    """Everything a failed swap must leave as it was, taken from ``model``."""

    state: dict[str, Any]
    modules: dict[str, nn.Module]
    types: dict[str, type]
    training: dict[str, bool]
    hooks: dict[str, tuple]
    parametrizations: dict[str, tuple]
    params: dict[str, tuple[int, bool]]
    buffers: dict[str, int]
    keepalive: list[Any]  # holds every object whose id is recorded

    @classmethod
    def take(cls, model: nn.Module) -> Snapshot:
        named = list(model.named_modules(remove_duplicate=False))
        params = list(model.named_parameters(remove_duplicate=False))
        buffers = list(model.named_buffers(remove_duplicate=False))
        return cls(
            state={k: _bits(v) for k, v in model.state_dict(keep_vars=True).items()},
            modules=dict(named),
            types={p: type(m) for p, m in named},
            training={p: m.training for p, m in named},
            hooks={p: _hooks(m) for p, m in named},
            parametrizations={p: _parametrizations(m) for p, m in named},
            params={n: (id(p), p.requires_grad) for n, p in params},
            buffers={n: id(b) for n, b in buffers},
            keepalive=[named, params, buffers],
        )

    def paths_of(self, module: nn.Module) -> list[str]:
        return [p for p, m in self.modules.items() if m is module]

    def differences(self, model: nn.Module) -> list[str]:
        """What differs between this snapshot and ``model`` now."""
        now = Snapshot.take(model)
        diffs = []
        if list(now.state) != list(self.state):
            diffs.append(f"state-dict keys: {sorted(set(now.state) ^ set(self.state))}")
        diffs += [
            f"state {k} changed"
            for k, v in self.state.items()
            if k in now.state and not _same_bits(v, now.state[k])
        ]
        if list(now.modules) != list(self.modules):
            diffs.append(f"module paths: {sorted(set(now.modules) ^ set(self.modules))}")
        for path, module in self.modules.items():
            if path in now.modules and now.modules[path] is not module:
                diffs.append(f"module at {path!r} replaced")
        for name in ("types", "training", "hooks", "parametrizations", "params", "buffers"):
            old, new = getattr(self, name), getattr(now, name)
            diffs += [f"{name} of {k!r} changed" for k in old if k in new and old[k] != new[k]]
            if set(old) != set(new):
                diffs.append(f"{name} keys: {sorted(set(old) ^ set(new))}")
        return diffs


# --------------------------------------------------------------------------- running models


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as err:  # the caller classifies it
        return None, err


def _cond_dim(model: nn.Module) -> int | None:
    dims = {m.cond_dim for m in model.modules() if isinstance(m, normswap.AdaLN)}
    assert len(dims) <= 1, f"AdaLN layers with different cond_dim: {dims}"
    return dims.pop() if dims else None


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One forward on a copy of ``x``, inside ``normswap.condition`` when the model has AdaLN."""
    cond_dim = _cond_dim(model)
    if cond_dim is None:
        return model(x.clone())
    g = torch.Generator().manual_seed(1)
    c = torch.randn(x.shape[0], cond_dim, generator=g, dtype=x.dtype)
    with normswap.condition(model, c):
        return model(x.clone())


def _loss(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return sum((o.float().square().mean() for o in outputs), torch.zeros(()))


def _patterns(value: str | tuple[str, ...] | None) -> tuple[str, ...] | None:
    return None if value is None else (value,) if isinstance(value, str) else tuple(value)


def in_scope(paths: Iterable[str], args: SwapArgs) -> bool:
    """Whether a module registered at ``paths`` is selected by the include/exclude globs."""
    paths = list(paths)
    include, exclude = _patterns(args.include), _patterns(args.exclude) or ()
    if any(fnmatchcase(p, pat) for p in paths for pat in exclude):
        return False
    return include is None or any(fnmatchcase(p, pat) for p in paths for pat in include)


def _describe(net: Net, args: SwapArgs) -> str:
    steps = "\n".join(f"    {i}: {s!r}" for i, s in enumerate(net.steps))
    return (
        f"net: seed={net.seed} batch={net.batch} input={net.input} dtype={net.dtype} "
        f"channels_last={net.channels_last}\n{steps}\nswap: {args}"
    )


# --------------------------------------------------------------------------- the property


def check_swap(net: Net, args: SwapArgs) -> str:
    """Assert the swap property for one generated network and one set of swap arguments.

    Returns what happened, for Hypothesis' statistics (``--hypothesis-show-statistics``).
    """
    probe, x = net.build()
    try:  # the model as generated must train: a failure here is a bug of the generator
        loss = _loss(run(probe, x))
        if loss.requires_grad:
            loss.backward()
    except Exception as err:
        raise AssertionError(f"[generator] the generated model does not run: {err!r}") from err

    model, x = net.build()
    before = Snapshot.take(model)
    fresh, fresh_x = net.build()
    planned, plan_error = _attempt(
        lambda: normswap.swap(fresh, args.name, **args.kwargs(fresh_x, dry_run=True))
    )

    report, error = _attempt(lambda: normswap.swap(model, args.name, **args.kwargs(x)))
    if error is not None:
        if not isinstance(error, ValueError):
            raise AssertionError(
                f"[error-type] swap raised {type(error).__name__}, not a ValueError: {error}"
            ) from error
        diffs = before.differences(model)
        assert not diffs, f"[untouched-after-error] swap raised {error!r} and changed: {diffs}"
        assert plan_error is not None, (
            f"[plan-then-apply] the dry run accepted the plan, the swap raised: {error!r}"
        )
        return f"{args.name}: {type(error).__name__}"
    assert plan_error is None, (
        f"[plan-then-apply] the dry run raised {plan_error!r}, the swap succeeded"
    )
    planned_records = [r.to_dict() for r in planned]
    assert [r.to_dict() for r in report] == planned_records, (
        "[plan-then-apply] the swap's records differ from the dry run's"
    )
    if args.dry_run:
        assert report.dry_run
        diffs = before.differences(model)
        assert not diffs, f"[dry-run-modified] a dry run changed: {diffs}"
        return f"{args.name}: dry run"
    check_converted(net, args, before, model, x, report)
    return f"{args.name}: {', '.join(sorted({r.action for r in report})) or 'nothing to do'}"


@dataclass
class _Records:
    """The report, sorted by what each record says happened to which path."""

    norms: dict[str, normswap.SwapRecord]  # every path of every replaced-kind norm's record
    converted: dict[str, normswap.SwapRecord]  # those paths replaced, folded or removed
    reparam: dict[str, normswap.SwapRecord]  # layer paths weight-normed or standardized
    folded_into: set[str]  # producer paths that received a folded BN
    rewritten: dict[str, normswap.SwapRecord]  # layer paths centred or untied (exact rewrite)


def _sort_records(report: normswap.SwapReport, before: Snapshot, args: SwapArgs) -> _Records:
    norms, converted, reparam, folded_into, rewritten = {}, {}, {}, set(), {}
    for r in report:
        paths = (r.path, *r.aliases)
        assert r.path in before.modules, f"[report] record for unknown path {r.path!r}"
        owner = before.modules[r.path]
        assert sorted(paths) == sorted(before.paths_of(owner)), (
            f"[report] record {r.path!r} lists paths {paths}, the module is at "
            f"{before.paths_of(owner)}"
        )
        if r.action in REWRITES:
            rewritten.update(dict.fromkeys(paths, r))
        elif is_replaced(owner, args):
            norms.update(dict.fromkeys(paths, r))
            if r.action in NORM_ACTIONS:
                converted.update(dict.fromkeys(paths, r))
            else:
                assert r.action == "skip" and r.reason, f"[report] {r} has no action or reason"
            if r.action == "fold":
                assert r.into in before.modules, f"[report] fold into unknown path {r.into!r}"
                folded_into.update(before.paths_of(before.modules[r.into]))
        elif r.action in ("weight_norm", "standardize"):
            reparam.update(dict.fromkeys(paths, r))
        else:
            assert r.action == "skip", f"[report] {r.action!r} on a layer that is no norm: {r}"
    return _Records(norms, converted, reparam, folded_into, rewritten)


def _inside(path: str, prefixes: Iterable[str]) -> bool:
    return any(path.startswith(p + ".") for p in prefixes)


def check_converted(
    net: Net,
    args: SwapArgs,
    before: Snapshot,
    model: nn.Module,
    x: torch.Tensor,
    report: normswap.SwapReport,
) -> None:
    """The invariants of a successful swap."""
    recs = _sort_records(report, before, args)
    after = dict(model.named_modules(remove_duplicate=False))
    after_paths: dict[int, list[str]] = {}
    for p, m in after.items():
        after_paths.setdefault(id(m), []).append(p)

    # No norm of a replaced kind left in scope without a skip record; none with strict=True.
    # (Only the model's own norms: a new layer may be of a replaced kind, e.g. gn -> gn.)
    originals = {id(m) for m in before.modules.values()}
    for path, module in after.items():
        if id(module) not in originals or not is_replaced(module, args):
            continue
        paths = after_paths[id(module)]
        assert not args.strict, f"[batchnorm-left] strict=True, yet {path!r} remains"
        if in_scope(paths, args):
            record = recs.norms.get(path)
            assert record is not None and record.action == "skip" and record.reason, (
                f"[batchnorm-left] {type(module).__name__} at {path!r} is in scope, still a "
                f"norm of a replaced kind, and has no skip record"
            )

    # Modules: converted norms replaced (a shared one by one shared module), the rest the same
    # objects of the same types with the same flags and hooks.
    for path, old in before.modules.items():
        record = recs.converted.get(path)
        if record is not None:
            _check_new_norm(path, record, old, after, report.spec)
            continue
        assert path in after, f"[module-lost] {path!r} disappeared"
        new = after[path]
        assert new is old, f"[module-replaced] {path!r} was not converted but was replaced"
        base = parametrize.type_before_parametrizations(new) if path in recs.reparam else type(new)
        assert base is before.types[path], f"[module-type] {path!r} changed type"
        assert new.training == before.training[path], f"[training] {path!r}'s flag changed"
        names = HOOK_DICTS[:6] if path in recs.reparam else HOOK_DICTS
        assert _hooks(new, names) == tuple(h for h in before.hooks[path] if h[0] in names), (
            f"[hooks] hooks of {path!r} changed"
        )
    for path in after:
        if path in before.modules:
            continue
        known = set(recs.converted) | {p + ".parametrizations" for p in recs.reparam}
        assert path in known or _inside(path, known), f"[module-new] unexpected module {path!r}"
        assert path not in recs.rewritten, f"[module-new] {path!r} was rewritten and replaced"

    _check_state(before, model, recs)
    _check_requires_grad(before, model, recs)

    # Weight norm with every BN folded or kept computes what the model computed; so does an
    # exact LayerNorm -> RMSNorm rewrite (centred writers, γ/β folded into their readers).
    exact_rms = args.name == "rms" and args.options.get("center") == "fold"
    wn_exact = args.name == "wn" and not any(r.action == "remove" for r in recs.norms.values())
    if wn_exact or exact_rms:
        reference, ref_x = net.build()
        with torch.no_grad():
            expected, got = run(reference, ref_x), run(model, x)
        for e, g in zip(expected, got, strict=True):
            scale = max(1.0, float(e.abs().max()))
            torch.testing.assert_close(
                g,
                e,
                rtol=1e-4,
                atol=1e-5 * scale,
                msg=lambda m: f"[outputs] an exact rewrite ({args.name}) changed the outputs: {m}",
            )

    # Forward and backward run; every trainable parameter gets a finite gradient.
    outputs, error = _attempt(lambda: run(model, x))
    if isinstance(error, normswap.NormSwapError) and args.inputs is None:
        # Without example inputs the plan cannot see input shapes; a refusal at run time is the
        # documented outcome, when the same swap with example inputs refuses at plan time.
        fresh, fresh_x = net.build()
        _, traced_error = _attempt(
            lambda: normswap.swap(
                fresh, args.name, **args.kwargs(fresh_x, inputs="tensor", dry_run=True)
            )
        )
        assert traced_error is not None, (
            f"[forward] the converted model raised {error!r}; with example_inputs the plan "
            f"accepts the same swap"
        )
        return
    if error is not None:
        raise AssertionError(f"[forward] the converted model raised {error!r}") from error
    loss = _loss(outputs)
    if not loss.requires_grad:  # nothing trainable reaches the outputs (a frozen model)
        assert not any(p.requires_grad for p in model.parameters()), "[gradients] none flow"
        return
    _, error = _attempt(lambda: loss.backward())
    if error is not None:
        raise AssertionError(f"[backward] the converted model raised {error!r}") from error
    try:
        assert_all_grads(model)
    except AssertionError as err:
        raise AssertionError(f"[gradients] {err}") from err


def _expected_requires_grad(old: nn.Module, spec: dict[str, Any]) -> bool:
    trainable = spec.get("trainable")
    if trainable is not None:
        return trainable
    if isinstance(old, FrozenBatchNorm2d | LookalikeFrozenBatchNorm2d):
        return False
    weight = getattr(old, "weight", None)
    return weight.requires_grad if isinstance(weight, nn.Parameter) else True


def _check_new_norm(
    path: str,
    record: normswap.SwapRecord,
    old: nn.Module,
    after: dict[str, nn.Module],
    spec: dict[str, Any],
) -> None:
    """A replaced norm: one new module at all its paths, of the recorded type, with the training
    flag and ``requires_grad`` carried; a layer that normalizes itself (it has an ``eps``) also
    carries eps and γ (the same Parameter). ``spec`` is the report's resolved spec."""
    new = after.get(path)
    assert new is not None, f"[module-lost] converted {path!r} disappeared"
    assert new is not old, f"[batchnorm-left] {path!r} has a replace record but is unchanged"
    for alias in (record.path, *record.aliases):
        assert after.get(alias) is new, f"[sharing] {path!r} and {alias!r} are no longer shared"
    assert type(new).__name__ == record.target, (
        f"[report] {path!r} became {type(new).__name__}, the record says {record.target}"
    )
    if record.action != "replace":
        return
    assert new.training == old.training, f"[training] {path!r}: the BN's training flag was lost"
    expected = _expected_requires_grad(old, spec)
    grads = {n: p.requires_grad for n, p in new.named_parameters()}
    assert all(g == expected for g in grads.values()), (
        f"[requires-grad] {path!r}: expected requires_grad={expected}, got {grads}"
    )
    if not hasattr(new, "eps"):  # e.g. statistics folded into a fixed affine, or DyT
        return
    eps = spec.get("eps")
    assert new.eps == (eps if eps is not None else _eps(old)), f"[carry] {path!r}: eps not carried"
    if "folded into" in (record.note or ""):  # an exact rewrite moved γ/β into the next layers
        return
    old_weight = getattr(old, "weight", None)
    new_weight = getattr(new, "weight", None)
    if old_weight is not None and not is_lazy(old_weight):
        assert new_weight is not None, f"[carry] {path!r}: γ was dropped"
        if isinstance(old_weight, nn.Parameter):
            assert new_weight is old_weight, f"[carry] {path!r}: γ is not the same Parameter"
        assert torch.equal(new_weight, old_weight), f"[carry] {path!r}: γ changed"
        assert new_weight.dtype == old_weight.dtype, f"[carry] {path!r}: γ changed dtype"


def _eps(module: nn.Module) -> float:
    """A source norm's epsilon as its forward uses it."""
    if isinstance(module, LookalikeFrozenBatchNorm2d):
        return module.EPS
    if isinstance(module, nn.RMSNorm) and module.eps is None:
        dtype = next(module.parameters(), torch.zeros(())).dtype
        return torch.finfo(dtype).eps
    return module.eps


def _check_state(before: Snapshot, model: nn.Module, recs: _Records) -> None:
    """Every state entry outside converted norms is bit-identical, with the documented
    exceptions: weight-normed weights keep their effective value, standardized weights keep the
    stored original, producers that received a fold and layers an exact rewrite changed (centred,
    untied) are judged by the outputs."""
    state = model.state_dict(keep_vars=True)
    for key, old in before.state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in recs.converted or owner in recs.rewritten:
            continue
        if owner in recs.folded_into and leaf in ("weight", "bias"):
            continue
        if owner in recs.reparam and leaf == "weight":
            record = recs.reparam[owner]
            if record.action == "standardize":
                stored = state.get(f"{owner}.parametrizations.weight.original")
                assert stored is not None and _same_bits(old, _bits(stored)), (
                    f"[state] {key}: the standardized layer's stored weight changed"
                )
            else:
                weight = model.get_submodule(owner).weight
                assert old[:2] == (weight.dtype, tuple(weight.shape)), f"[state] {key} reshaped"
                original = old[2].view(old[0]).reshape(old[1])
                torch.testing.assert_close(
                    weight.detach(),
                    original,
                    rtol=1e-5,
                    atol=1e-6,
                    msg=lambda m, key=key: f"[state] {key}: weight norm changed the weight: {m}",
                )
            continue
        assert key in state, f"[state] {key} disappeared"
        assert _same_bits(old, _bits(state[key])), f"[state] {key} changed"
    for key in state:
        if key in before.state:
            continue
        owner, _, leaf = key.rpartition(".")
        allowed = (
            _inside(key, recs.converted)
            or any(key.startswith(f"{p}.parametrizations.weight.") for p in recs.reparam)
            or (owner in recs.folded_into and leaf == "bias")
        )
        assert allowed, f"[state] unexpected new entry {key}"


def _check_requires_grad(before: Snapshot, model: nn.Module, recs: _Records) -> None:
    """Parameters outside converted norms: the same objects with the same ``requires_grad``;
    a reparameterized weight's originals keep the weight's ``requires_grad``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, (pid, grad) in before.params.items():
        owner, _, leaf = name.rpartition(".")
        if owner in recs.converted:
            continue
        if owner in recs.rewritten and recs.rewritten[owner].action == "untie":
            assert params[name].requires_grad == grad, f"[requires-grad] {name} changed"
            continue  # given its own copy of the tied values
        if owner in recs.reparam and leaf == "weight":
            originals = {
                n: p.requires_grad
                for n, p in params.items()
                if n.startswith(f"{owner}.parametrizations.weight.original")
            }
            assert originals and all(g == grad for g in originals.values()), (
                f"[requires-grad] {name} had requires_grad={grad}; its reparameterization has "
                f"{originals}"
            )
            continue
        assert name in params, f"[state] parameter {name} disappeared"
        assert id(params[name]) == pid, f"[state] parameter {name} was replaced"
        assert params[name].requires_grad == grad, f"[requires-grad] {name} changed"


@SETTINGS
@given(case=swap_cases())
def test_swap_converts_faithfully_or_refuses_untouched(case: tuple[Net, SwapArgs]) -> None:
    net, args = case
    try:
        event(check_swap(net, args))
    except AssertionError as err:
        err.add_note(_describe(net, args))
        raise
