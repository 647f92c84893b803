"""Record a swap as plain data, and replay it on a freshly built model.

A converted model's state dict only loads into a model with the same structure. The
*surgery record* (spec, include/exclude, the report) travels with the weights — in a
Lightning checkpoint (the ``NormSwap`` callback's state) or a ``normswap convert`` file —
and :func:`restore` re-applies it to a fresh model before loading the weights, so a
converted model can be rebuilt anywhere, without Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from normswap.errors import NormSwapError, SwapError
from normswap.families import get_family
from normswap.finalize import finalize
from normswap.journal import Journal
from normswap.modes import restore_training_flags, training_flags
from normswap.progressive import swap_progressive
from normswap.report import SwapReport
from normswap.specs import NormSpec, spec_from_dict
from normswap.surgery import swap

__all__ = [
    "RECORD_FORMAT",
    "find_record",
    "replay",
    "restore",
    "surgery_record",
    "swap_for_training",
]

RECORD_FORMAT = "normswap.surgery/1"


def surgery_record(
    report: SwapReport,
    include: str | list[str] | tuple[str, ...] | None = None,
    exclude: str | list[str] | tuple[str, ...] | None = None,
    progressive: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The plain-data record of a swap (safe for ``torch.load(..., weights_only=True)``).

    ``progressive`` (a progressive conversion's schedule and whether it ``finished``) says
    that the model holds :class:`~normswap.norms.BlendNorm` layers until it finished;
    :func:`replay` then rebuilds the blends.

    Example:
        >>> import torchvision, normswap
        >>> model = torchvision.models.resnet18()
        >>> record = surgery_record(normswap.swap(model, "gn"))
        >>> record["spec"]["name"]
        'gn'
    """

    def _list(value: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
        if value is None:
            return None
        return [value] if isinstance(value, str) else list(value)

    record = {
        "format": RECORD_FORMAT,
        "spec": dict(report.spec),
        "include": _list(include),
        "exclude": _list(exclude),
        "report": report.to_dict(),
    }
    if report.replace != ("bn",):  # a record without it replaced BatchNorm (older records too)
        record["replace"] = list(report.replace)
    if progressive is not None:
        record["progressive"] = dict(progressive)
    return record


def find_record(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Find the surgery record in a checkpoint dictionary.

    Looks at the checkpoint itself, its ``"normswap"`` entry (``normswap convert`` files),
    and its Lightning callback states (``checkpoint["callbacks"]["NormSwap..."]``).

    Raises:
        NormSwapError: no record, or several (say which keys; pass the one to use).

    Example:
        >>> find_record({"normswap": {"format": RECORD_FORMAT, "spec": {"name": "gn"}}})["spec"]
        {'name': 'gn'}
    """
    if checkpoint.get("format") == RECORD_FORMAT:
        return dict(checkpoint)
    if isinstance(checkpoint.get("normswap"), Mapping):
        return dict(checkpoint["normswap"])
    callbacks = checkpoint.get("callbacks") or {}
    found = {
        key: state
        for key, state in callbacks.items()
        if isinstance(state, Mapping) and state.get("format") == RECORD_FORMAT
    }
    if len(found) == 1:
        return dict(next(iter(found.values())))
    if len(found) > 1:
        raise NormSwapError(
            f"the checkpoint holds {len(found)} normswap records ({', '.join(map(str, found))}); "
            "pass the one to use: restore(model, checkpoint['callbacks'][KEY] | {...})"
        )
    raise NormSwapError(
        "no normswap surgery record in this checkpoint: it was not written by the NormSwap "
        "callback or `normswap convert` (load it with model.load_state_dict instead)"
    )


def swap_for_training(
    model: nn.Module,
    spec: NormSpec,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    example_inputs: Any = None,
    strict: bool = False,
    replace: str | Iterable[str] | None = None,
) -> SwapReport:
    """:func:`~normswap.swap` for a model in training mode.

    Where the family needs it (folding uses running statistics: ``wn`` with ``bn="fold"``),
    the model is put in eval mode for the swap and every module's training flag is restored
    afterwards.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18()  # training mode
        >>> swap_for_training(model, normswap.get_spec("wn")).counts()["BatchNorm2d -> folded"]
        20
    """
    flags = training_flags(model)
    if get_family(spec.name).target.needs_eval_mode(spec):
        model.eval()
    try:
        return swap(
            model,
            spec,
            include=include,
            exclude=exclude,
            example_inputs=example_inputs,
            strict=strict,
            replace=replace,
        )
    finally:
        restore_training_flags(model, flags)


def replay(
    model: nn.Module, record: Mapping[str, Any], *, example_inputs: Any = None
) -> SwapReport:
    """Re-apply the recorded swap to ``model`` and check it does the same thing.

    Uses :func:`swap_for_training`, so a model in training mode can be restored (folded
    values themselves come from the weights loaded next). A record of an unfinished
    progressive conversion rebuilds its blends (:func:`normswap.swap_progressive`; finish them
    with :func:`normswap.finish_blend`).

    Raises:
        SwapError: the model differs from the one recorded (first differing path named).

    Example:
        >>> import torchvision, normswap
        >>> record = surgery_record(normswap.swap(torchvision.models.resnet18(), "gn"))
        >>> len(replay(torchvision.models.resnet18(), record))
        20
    """
    progressive = record.get("progressive")
    blended = isinstance(progressive, Mapping) and not progressive.get("finished", False)
    convert = swap_progressive if blended else swap_for_training
    report = convert(
        model,
        spec_from_dict(record["spec"]),
        include=record.get("include"),
        exclude=record.get("exclude"),
        example_inputs=example_inputs,
        replace=record.get("replace"),
    )
    recorded = record.get("report", {}).get("records")
    if recorded is not None:
        want = [(r["path"], r["action"], r["target"]) for r in recorded]
        got = [(r.path, r.action, r.target) for r in report]
        if want != got:
            diff = next(
                (f"{w} != {g}" for w, g in zip(want, got, strict=False) if w != g),
                f"{len(want)} recorded steps, {len(got)} now",
            )
            raise SwapError(
                "the model differs from the one the record was made on: "
                f"(path, action, target) {diff}; build the same architecture before restoring"
            )
    return report


def restore(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    *,
    strict: bool = True,
    example_inputs: Any = None,
) -> SwapReport:
    """Rebuild a converted model: replay the recorded surgery, then load the weights.

    Works with Lightning checkpoints written with the ``NormSwap`` callback (pass a freshly
    built LightningModule, or the inner model with ``checkpoint["state_dict"]`` keys that
    match it) and with ``normswap convert`` files (``--finalize`` ones are finalized again
    before loading; call ``model.eval()`` before using them). Files are loaded with
    ``weights_only=True``: nothing but tensors and plain data is unpickled.

    Args:
        model: a freshly built model of the same architecture (not yet converted).
        checkpoint: a path or an already loaded checkpoint dictionary.
        strict: passed to ``load_state_dict``.
        example_inputs: inputs for tracing, when the recorded swap needed them.

    Returns:
        The report of the replayed swap.

    Example:
        >>> import tempfile, torchvision
        >>> model = torchvision.models.resnet18()
        >>> record = surgery_record(normswap.swap(model, "gn"))
        >>> path = tempfile.mkdtemp() + "/resnet18_gn.pt"
        >>> torch.save({"normswap": record, "state_dict": model.state_dict()}, path)
        >>> len(restore(torchvision.models.resnet18(), path))
        20
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    record = find_record(checkpoint)
    state = checkpoint.get("state_dict")
    if state is None:
        raise NormSwapError("the checkpoint has no 'state_dict' to load")
    journal = Journal(model)
    try:
        report = replay(model, record, example_inputs=example_inputs)
        if record.get("finalized"):  # saved in its inference form (normswap.finalize)
            flags = training_flags(model)
            model.eval()
            finalize(model)
            restore_training_flags(model, flags)
        _check_fits(model, state, strict)
    except BaseException:
        journal.rollback()  # the model is as it was: not half restored
        raise
    model.load_state_dict(state, strict=strict)
    return report


def _check_fits(model: nn.Module, state: Mapping[str, Any], strict: bool) -> None:
    """Refuse a state dict that does not load into ``model`` (before anything is loaded)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state] if strict else []
    unexpected = [k for k in state if k not in own] if strict else []
    shapes = [
        k
        for k, v in state.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("other shapes", shapes),
            )
            if keys
        ]
        raise NormSwapError(
            f"the checkpoint's weights do not fit the model after the recorded surgery ("
            f"{'; '.join(parts)}): restore into a freshly built, unconverted model of the same "
            "architecture; nothing was modified"
        )
