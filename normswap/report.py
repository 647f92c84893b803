"""The swap report: data first (a sequence of records), a readable table second."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, overload

__all__ = ["SwapRecord", "SwapReport"]

# Actions a record can carry.
REPLACE = "replace"  # a norm replaced by a new norm
FOLD = "fold"  # a BN folded into its producer, replaced by Identity
REMOVE = "remove"  # a BN replaced by Identity
WEIGHT_NORM = "weight_norm"  # a conv/linear weight-normalized
STANDARDIZE = "standardize"  # a conv weight-standardized
CENTER = "center"  # a layer's weights centred / a norm's γ/β folded in (exact LN -> RMSNorm)
UNTIE = "untie"  # a tied weight given its own copy
SKIP = "skip"  # left as it is, for the stated reason


@dataclass(frozen=True)
class SwapRecord:
    """One module's fate in a swap.

    Attributes:
        path: canonical module path (the first path ``named_modules`` yields).
        source: class name before.
        target: class name after (equal to ``source`` when skipped).
        action: ``replace``, ``fold``, ``remove``, ``weight_norm``, ``standardize``,
            ``center`` (weights centred or a norm's γ/β folded in), ``untie`` or ``skip``.
        channels: channel count (C) for norms, ``None`` otherwise.
        groups: the group count chosen, where groups apply.
        eps: the eps of the new norm, where one applies.
        note: a decision worth reading (e.g. "32 groups do not divide 45 channels; using 15").
        reason: why it was skipped, for ``skip``.
        aliases: other paths of the same (shared) module instance.
        frozen: whether the new parameters are frozen (``requires_grad=False``).
        into: for ``fold``, the path of the conv/linear it was folded into.

    Example:
        >>> normswap.swap(nn.Sequential(nn.BatchNorm2d(45)), "gn")[0].note
        '32 groups do not divide 45 channels; using 15'
    """

    path: str
    source: str
    target: str
    action: str
    channels: int | None = None
    groups: int | None = None
    eps: float | None = None
    note: str | None = None
    reason: str | None = None
    aliases: tuple[str, ...] = ()
    frozen: bool = False
    into: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable dictionary of the record.

        Example:
            >>> SwapRecord("bn", "BatchNorm2d", "GroupNorm", "replace").to_dict()["path"]
            'bn'
        """
        data = asdict(self)
        data["aliases"] = list(self.aliases)
        return data


def _count_key(r: SwapRecord) -> str:
    if r.action == SKIP:
        return f"{r.source} (kept)"
    if r.action == FOLD:
        return f"{r.source} -> folded"
    if r.action in (WEIGHT_NORM, STANDARDIZE, CENTER, UNTIE):
        return f"{r.source} + {r.action}"
    return f"{r.source} -> {r.target}"


@dataclass(frozen=True)
class SwapReport(Sequence[SwapRecord]):
    """The result of a swap (or a dry run): one record per affected module.

    It behaves as a sequence of :class:`SwapRecord`; ``str(report)`` is a table.

    Attributes:
        records: the records in module order.
        spec: the spec's dictionary (``{"name": "gn", ...}``).
        dry_run: ``True`` when nothing was modified.
        notes: model-level remarks, e.g. that the model holds no BatchNorm.
        replace: the source kinds that were replaced (``("bn",)`` by default).

    Example:
        >>> import torchvision
        >>> report = normswap.swap(torchvision.models.resnet18(), "gn")
        >>> report.counts(), report[0].path, report[0].groups
        ({'BatchNorm2d -> GroupNorm': 20}, 'bn1', 32)
    """

    records: tuple[SwapRecord, ...]
    spec: dict[str, Any]
    dry_run: bool = False
    notes: tuple[str, ...] = field(default=())
    replace: tuple[str, ...] = ("bn",)

    @overload
    def __getitem__(self, index: int) -> SwapRecord: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[SwapRecord]: ...
    def __getitem__(self, index: int | slice) -> SwapRecord | Sequence[SwapRecord]:
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[SwapRecord]:
        return iter(self.records)

    @property
    def converted(self) -> tuple[SwapRecord, ...]:
        """Records of modules that were (or, in a dry run, would be) changed."""
        return tuple(r for r in self.records if r.action != SKIP)

    @property
    def skipped(self) -> tuple[SwapRecord, ...]:
        """Records of modules left as they were, each with its reason."""
        return tuple(r for r in self.records if r.action == SKIP)

    def counts(self) -> dict[str, int]:
        """Count records per kind of change.

        Keys are ``"source -> target"`` for replaced/removed norms, ``"source -> folded"``,
        ``"source + weight_norm"`` / ``"source + standardize"`` for reparameterized layers and
        ``"source (kept)"`` for skips.

        Example:
            >>> SwapReport((SwapRecord("a", "BatchNorm2d", "GroupNorm", "replace"),), {}).counts()
            {'BatchNorm2d -> GroupNorm': 1}
        """
        return dict(Counter(_count_key(r) for r in self.records))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable dictionary of the whole report.

        Example:
            >>> SwapReport((), {"name": "gn"}).to_dict()["records"]
            []
        """
        return {
            "spec": dict(self.spec),
            "replace": list(self.replace),
            "dry_run": self.dry_run,
            "notes": list(self.notes),
            "counts": self.counts(),
            "records": [r.to_dict() for r in self.records],
        }

    def __str__(self) -> str:
        settings = {**self.spec, **({} if self.replace == ("bn",) else {"replace": self.replace})}
        title = f"normswap {'plan (dry run)' if self.dry_run else 'report'}: " + ", ".join(
            f"{k}={v}" for k, v in settings.items()
        )
        lines = [title]
        lines += [f"  note: {n}" for n in self.notes]
        if self.records:
            header = ("path", "action", "source", "target", "C", "groups", "eps", "note")
            rows = [
                (
                    r.path + (f" (+{len(r.aliases)} alias)" if r.aliases else ""),
                    r.action + (" (frozen)" if r.frozen else ""),
                    r.source,
                    r.target,
                    "" if r.channels is None else str(r.channels),
                    "" if r.groups is None else str(r.groups),
                    "" if r.eps is None else f"{r.eps:g}",
                    " ".join(x for x in (r.reason, r.note, r.into and f"into {r.into}") if x),
                )
                for r in self.records
            ]
            widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
            fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
            lines.append(fmt.format(*header).rstrip())
            lines.append(fmt.format(*("-" * w for w in widths[:-1]), "-" * 4))
            lines += [fmt.format(*row).rstrip() for row in rows]
        summary = ", ".join(f"{k}: {v}" for k, v in self.counts().items()) or "nothing to do"
        lines.append(f"summary: {summary}")
        return "\n".join(lines)
