"""Structure checks between a converted model and its reference (the model before the swap)."""

from __future__ import annotations

from torch import nn

from normswap.errors import CalibrationError
from normswap.norms import AfterNorm
from normswap.sources import source_kind

__all__ = ["converted_layers", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of a DistributedDataParallel/DataParallel wrapper (else ``model``).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> unwrap(nn.DataParallel(net)) is net
        True
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _param_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
    # A parametrized weight (weight norm, standardization) lives under ``parametrizations``;
    # its effective shape is what the reference's plain weight has.
    for name in getattr(module, "parametrizations", {}):
        shapes[name] = tuple(getattr(module, name).shape)
    return shapes


def converted_layers(model: nn.Module, reference: nn.Module) -> dict[str, nn.Module]:
    """The converted norm layers of ``model``: ``{path: layer}`` where ``reference`` has a BN.

    Checks first that ``reference`` is ``model`` before its swap: the same module paths and
    classes outside the converted norms (parametrized layers count as their class), with the
    same parameter shapes. Norms that were excluded from the swap (still BatchNorm), folded or
    removed (``Identity``) are left out.

    Args:
        model: the converted model.
        reference: the model before the swap (an unmodified copy).

    Returns:
        ``{canonical path: converted layer}`` in module order.

    Raises:
        CalibrationError: the structures differ (naming the first differences) or ``reference``
            is ``model`` itself.

    Example:
        >>> import copy, normswap
        >>> ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> model = copy.deepcopy(ref)
        >>> _ = normswap.swap(model, "gn", num_groups=2)
        >>> list(converted_layers(model, ref))
        ['1']
    """
    model, reference = unwrap(model), unwrap(reference)
    if model is reference:
        raise CalibrationError(
            "reference is the model itself: pass a copy made before the swap "
            "(reference = copy.deepcopy(model); normswap.swap(model, ...))"
        )
    problems: list[str] = []
    model_modules = dict(model.named_modules(remove_duplicate=False))
    converted: dict[str, nn.Module] = {}
    norm_prefixes: list[str] = []
    seen: set[int] = set()
    for path, ref_mod in reference.named_modules(remove_duplicate=False):
        mod = model_modules.get(path)
        if mod is None:
            problems.append(f"{path!r} ({type(ref_mod).__name__}) is missing from the model")
            continue
        if source_kind(ref_mod) is not None:
            norm_prefixes.append(path + ".")
            if mod is ref_mod:
                problems.append(
                    f"{path!r}: model and reference share the same module object; the "
                    "reference must be a copy made before the swap (copy.deepcopy)"
                )
            elif (
                type(mod) is not type(ref_mod)  # converted (an excluded norm keeps its class)
                and not isinstance(mod, nn.Identity | AfterNorm)  # folded or removed
                and id(mod) not in seen
            ):
                seen.add(id(mod))
                converted[path] = mod
            continue
        if any(path.startswith(p) for p in norm_prefixes):
            continue
        if not isinstance(mod, type(ref_mod)):
            problems.append(
                f"{path!r} is a {type(mod).__name__} in the model but a {type(ref_mod).__name__} "
                "in the reference"
            )
        else:
            shapes, ref_shapes = _param_shapes(mod), _param_shapes(ref_mod)
            # Folding a BatchNorm gives a bias-free conv a bias; nothing else may appear.
            extra = set(shapes) - set(ref_shapes) - {"bias"}
            if extra or any(shapes.get(n) != s for n, s in ref_shapes.items()):
                problems.append(f"{path!r} has parameters of other shapes than in the reference")
    ref_paths = {p for p, _ in reference.named_modules(remove_duplicate=False)}
    for path, mod in model_modules.items():
        if path in ref_paths or any(path.startswith(p) for p in norm_prefixes):
            continue
        if ".parametrizations" in f".{path}":
            continue
        problems.append(f"{path!r} ({type(mod).__name__}) is not in the reference")
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:8])
        more = f"\n  (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CalibrationError(
            f"reference ({type(reference).__name__}) is not the model before its swap "
            f"({type(model).__name__}): {len(problems)} difference(s):\n{shown}{more}\n"
            "fix: pass the unmodified original as reference, e.g. reference = "
            "copy.deepcopy(model) before normswap.swap(model, ...)"
        )
    return converted
