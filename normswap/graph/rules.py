"""The rulebook of folding: can this BatchNorm fold exactly into that producer?

One function, :func:`fold_problems`, answers it, and every place that needs the answer calls it:
both tracers (to fill :attr:`NormFacts.foldable`), the planner of the ``wn`` family, and the
executor :func:`normswap.graph.fold.fold_conv_bn`. It weighs four kinds of facts, whichever the
caller has:

* the norm (a :class:`~normswap.sources.SourceNorm`): running statistics, train/eval mode;
* the producer module: a conv/linear with the stock ``forward``, not parametrized, initialized,
  with as many output channels as the norm;
* the graph (a :class:`~normswap.graph.facts.NormFacts` from tracing): the norm runs once, on
  the output of that producer, which runs once, sits at one path and feeds nothing else;
* the model (the owners of every parameter): the producer's weight and bias are not tied to
  another module, which folding would change too.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from normswap.graph.facts import NormFacts
from normswap.sources import SourceNorm

__all__ = [
    "PRODUCER_TYPES",
    "fold_problems",
    "norm_fold_problems",
    "parameter_owners",
    "producer_problem",
    "producer_rank",
    "statistics_problem",
]

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


def producer_problem(module: nn.Module) -> str | None:
    """Say why ``module`` cannot act as the layer a BatchNorm is folded into, or return ``None``.

    Supported: ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, ``Linear`` and subclasses of them that
    keep the stock ``forward`` (a subclass that, say, standardizes its weight in ``forward`` does
    not compute ``conv(x, weight)`` and would not fold exactly).

    Example:
        >>> producer_problem(nn.Conv2d(3, 8, 3)) is None
        True
        >>> producer_problem(nn.ReLU())
        'ReLU is not a conv/linear layer (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear)'
    """
    base = next((t for t in PRODUCER_TYPES if isinstance(module, t)), None)
    name = parametrize.type_before_parametrizations(module).__name__
    if base is None:
        return f"{name} is not a conv/linear layer (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear)"
    cls = parametrize.type_before_parametrizations(module)
    for method in ("forward", "_conv_forward"):
        if getattr(cls, method, None) is not getattr(base, method, None):
            return (
                f"{name} overrides {base.__name__}.{method}, so its output need not be a plain "
                f"{base.__name__.lower()} of its weight; folding into it would not be exact"
            )
    return None


def producer_rank(producer: nn.Module) -> int | None:
    """The rank of a producer's output a BatchNorm may fold from: ``(N, C, *S)`` of a conv,
    ``(N, C)`` of a Linear (BatchNorm normalizes dim 1, the Linear's features only then).

    Example:
        >>> producer_rank(nn.Conv3d(1, 1, 1)), producer_rank(nn.Linear(2, 2))
        (5, 2)
    """
    if isinstance(producer, nn.modules.conv._ConvNd):
        return len(producer.kernel_size) + 2
    if isinstance(producer, nn.Linear):
        return 2
    return None


def _channels(producer: nn.Module) -> int | None:
    if isinstance(producer, nn.modules.conv._ConvNd):
        return producer.out_channels
    if isinstance(producer, nn.Linear):
        return producer.out_features
    return None


def parameter_owners(model: nn.Module) -> dict[int, dict[int, str]]:
    """``id(parameter) -> {id(module): path}`` for every module that holds the parameter.

    A module registered at several paths counts once (it is one module); two modules holding
    one Parameter (tied weights) both appear.

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> b.weight = a.weight
        >>> sorted(parameter_owners(nn.Sequential(a, b))[id(a.weight)].values())
        ['0', '1']
    """
    owners: dict[int, dict[int, str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), {}).setdefault(id(module), path)
    return owners


def norm_fold_problems(
    src: SourceNorm | None, kind: str = "module", check_mode: bool = True
) -> list[str]:
    """Why the norm itself cannot fold, whatever produces its input (part of
    :func:`fold_problems`): not a BatchNorm source, no running statistics, training mode.

    Example:
        >>> from normswap.sources import describe_source
        >>> bn = nn.BatchNorm2d(2, track_running_stats=False)
        >>> norm_fold_problems(describe_source(bn))[0][:45]
        'BatchNorm2d has no running statistics (track_'
    """
    if src is None:
        return [f"{kind} is not a BatchNorm; only BatchNorm folds into a conv/linear"]
    if src.over != "batch":
        return [
            f"{src.kind} normalizes each sample with its own statistics: only a BatchNorm (a "
            "fixed affine map in eval mode) folds into a conv/linear"
        ]
    problems = []
    if not src.has_statistics:
        problems.append(
            f"{src.kind} has no running statistics (track_running_stats=False): it normalizes "
            "with batch statistics even in eval mode, so it is not a fixed affine map and cannot "
            "fold"
        )
    if check_mode and src.training:
        problems.append(
            f"{src.kind} is in training mode: call model.eval() first: folding uses running "
            "statistics"
        )
    return problems


def _producer_problems(producer: nn.Module, src: SourceNorm | None) -> list[str]:
    bad = producer_problem(producer)
    if bad is not None:
        return [bad]
    kind = parametrize.type_before_parametrizations(producer).__name__
    problems = []
    for name in ("weight", "bias"):
        if parametrize.is_parametrized(producer, name):
            problems.append(
                f"{kind}'s {name} is parametrized, so folding into it would not be exact: remove "
                f"the parametrization first (torch.nn.utils.parametrize.remove_parametrizations("
                f"module, {name!r}))"
            )
    if problems:
        return problems
    if is_lazy(producer.weight):
        return [f"{kind} is lazy and not initialized yet: run one forward pass first"]
    if src is not None:
        out = _channels(producer)
        if out != src.num_channels:
            problems.append(
                f"channel mismatch: {kind} has {out} output channels, {src.kind} has "
                f"{src.num_channels}"
            )
        rank = producer_rank(producer)
        if src.ranks is not None and rank not in src.ranks:
            problems.append(
                f"{src.kind} normalizes rank-{'/'.join(map(str, src.ranks))} inputs, so it cannot "
                f"follow a {kind} (rank-{rank} output)"
            )
    return problems


def _graph_problems(facts: NormFacts, producer: nn.Module | None) -> list[str]:
    if facts.calls == 0:
        return ["norm did not run in the forward with these example inputs"]
    problems = []
    if facts.calls > 1:
        problems.append(f"norm runs {facts.calls} times per forward")
    if producer is None:
        return [*problems, facts.origin or "its input is not the output of one conv/linear layer"]
    pkind = parametrize.type_before_parametrizations(producer).__name__
    ppath = facts.producer_paths[0] if facts.producer_paths else facts.producer
    if facts.producer_calls > 1:
        problems.append(f"{pkind} {ppath} runs {facts.producer_calls} times per forward")
    if len(facts.producer_paths) > 1:
        problems.append(
            f"{pkind} {ppath} is shared: the same module is also at "
            f"{', '.join(facts.producer_paths[1:])}"
        )
    if facts.other_uses is not None:
        problems.append(f"{pkind} output is also {facts.other_uses}")
    expected = producer_rank(producer)
    if facts.input_rank is None and isinstance(producer, nn.Linear):
        problems.append("Linear → BatchNorm: pass example_inputs to check the input rank")
    elif facts.input_rank is not None and expected is not None and facts.input_rank != expected:
        if isinstance(producer, nn.Linear):
            problems.append(
                f"Linear output has rank {facts.input_rank}: {facts.kind} normalizes dim 1, not "
                f"the Linear's out-features (last) dim; only (N, C) Linear outputs fold"
            )
        else:
            problems.append(
                f"{pkind} output has rank {facts.input_rank}, not {expected} (unbatched?): dim 1 "
                "is not its channel dim"
            )
    return problems


def _tied_problems(
    producer: nn.Module, producer_path: str, owners: Mapping[int, Mapping[int, str]]
) -> list[str]:
    problems = []
    for name in ("weight", "bias"):
        param = producer._parameters.get(name)
        if param is None:
            continue
        others = sorted(p for i, p in owners.get(id(param), {}).items() if i != id(producer))
        if others:
            problems.append(
                f"{producer_path}.{name} is shared with {', '.join(others)}, which folding "
                "would change too"
            )
    return problems


def fold_problems(
    src: SourceNorm | None,
    producer: nn.Module | None,
    *,
    facts: NormFacts | None = None,
    owners: Mapping[int, Mapping[int, str]] | None = None,
    producer_path: str | None = None,
    check_mode: bool = True,
    kind: str = "",
) -> list[str]:
    """Every reason why the norm ``src`` cannot be folded exactly into ``producer``.

    Args:
        src: the norm as a source (``None`` for a module that is not a BatchNorm source).
        producer: the conv/linear layer whose output the norm normalizes (``None`` when
            tracing found none; ``facts`` says why).
        facts: what tracing showed (calls, producer, other uses, ranks); ``None`` checks the
            modules only.
        owners: :func:`parameter_owners` of the model, to refuse tied producer parameters.
        producer_path: the producer's path, named in messages.
        check_mode: also require eval mode (folding uses running statistics); tracing reports
            the graph as it is and leaves the mode to the caller.
        kind: the norm's class name, when ``src`` is ``None``.

    Returns:
        Human-readable problems, each naming its fix where there is one (empty: it folds).

    Example:
        >>> from normswap.sources import describe_source
        >>> fold_problems(describe_source(nn.BatchNorm2d(8)), nn.Conv2d(3, 8, 3))
        ['BatchNorm2d is in training mode: call model.eval() first: ...']
        >>> fold_problems(describe_source(nn.BatchNorm2d(8).eval()), nn.Conv2d(3, 8, 3))
        []
    """
    problems = norm_fold_problems(src, kind or (src.kind if src else "module"), check_mode)
    if facts is not None:
        problems += _graph_problems(facts, producer)
    if producer is None:
        return problems if facts is not None else [*problems, "no producing conv/linear layer"]
    problems += _producer_problems(producer, src)
    if owners is not None:
        problems += _tied_problems(producer, producer_path or "producer", owners)
    return list(dict.fromkeys(problems))


def statistics_problem(
    layer: str,
    src: SourceNorm,
    rank: int | None,
    spatial: int | None,
    *,
    channels: int | None = None,
    positions: bool = True,
) -> tuple[str | None, str | None]:
    """Refuse a norm whose statistics would span a single value: ``(problem, note)``.

    A norm normalizes over ``channels`` channels (1 for InstanceNorm, C/G for GroupNorm, C for
    LayerNorm) times the spatial positions when ``positions`` (LayerNorm2d: one position), and
    over a single value its output is the constant bias. Where tracing told the input's rank or
    spatial size, such a norm is refused; where it did not and the BatchNorm's class allows
    ``(N, C)`` input, a note says so (the layer refuses such input when it runs).

    Args:
        layer: the new layer's class name, for messages.
        src: the source norm.
        rank: its input rank when traced (or implied by its class), else ``None``.
        spatial: the fewest spatial positions of its traced inputs, else ``None``.
        channels: channels per normalization group; ``None`` for instance statistics (one
            channel over the positions).
        positions: whether the statistics also span the spatial positions.

    Example:
        >>> from normswap.sources import describe_source
        >>> bn = describe_source(nn.BatchNorm1d(4))
        >>> statistics_problem("InstanceNorm", bn, 2, None)[0][:40]
        'InstanceNorm needs spatial dims, but thi'
        >>> statistics_problem("LayerNorm2d", describe_source(nn.BatchNorm2d(1)), 4, 9,
        ...                    channels=1, positions=False)[0][:44]
        'LayerNorm2d would normalize a single value ('
    """
    instance = channels is None
    channels = 1 if channels is None else channels
    positions_known = 1 if rank == 2 else spatial
    if not positions:
        values = channels
    elif positions_known is not None:
        values = channels * positions_known
    else:
        values = None
    if values == 1:
        if instance and rank == 2:
            return (
                f"{layer} needs spatial dims, but this {src.kind} normalizes (N, C) inputs "
                f"(instance statistics over one value are undefined); exclude it or use 'ln'",
                None,
            )
        if instance:
            return (
                f"{layer} needs more than one spatial position, but this {src.kind} sees inputs "
                f"with a single one (e.g. after global pooling), where instance statistics are "
                f"undefined; exclude it or use 'ln'/'gn'",
                None,
            )
        where = (
            f"{channels} channel(s) at each position"
            if not positions
            else f"{channels} channel(s) per group over {positions_known} position(s)"
        )
        return (
            f"{layer} would normalize a single value ({where} of this {src.kind}), so its "
            "output would be the constant bias; exclude it, or use a norm whose statistics span "
            "more values",
            None,
        )
    if values is None and channels == 1 and (src.ranks is None or 2 in src.ranks):
        return None, (
            "input rank unknown: pass example_inputs to check; an (N, C) input is refused "
            "at run time"
        )
    return None, None
