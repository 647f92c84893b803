"""What tracing learns about a model's norm layers: :class:`NormFacts` per norm, in a
:class:`GraphFacts` mapping. Both tracers (:func:`normswap.graph.record.trace` and
:func:`normswap.graph.fx.trace_fx`) fill these records, and both judge foldability with the same
rule, :func:`normswap.graph.rules.fold_problems`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

__all__ = ["GraphFacts", "NormFacts"]


@dataclass(frozen=True)
class NormFacts:
    """What one forward pass showed about one norm module.

    Attributes:
        path: canonical path of the module (the first of ``paths``).
        paths: every path at which this module object is registered (shared modules have several).
        kind: the module's class name, e.g. ``"BatchNorm2d"``.
        calls: how many times the module ran during the forward.
        input_shapes: the shape of its input, one per call.
        input_rank: the number of dimensions of its input when every call agrees, else ``None``.
        producer: canonical path of the conv/linear module whose output tensor is exactly this
            norm's input (the same producer in every call), or ``None``.
        producer_kind: the producer's class name, or ``None``.
        foldable: whether the graph and the modules allow folding the norm exactly into
            ``producer`` (:func:`normswap.graph.rules.fold_problems`; the norm's train/eval mode
            is not part of it: folding needs eval mode, tracing takes the model as it is).
        reason: why it is not foldable (``None`` when it is).
        producer_calls: how many times the producer ran during the forward.
        producer_paths: every path at which the producer module is registered.
        other_uses: the uses of the producer's output besides this norm, described (``None``:
            none seen).
        origin: where the norm's input came from when no single conv/linear produced it.
        input_dtype: the dtype of its input (``None`` when not recorded).

    Example:
        >>> from normswap.graph.record import trace
        >>> facts = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval(),
        ...               torch.randn(1, 3, 8, 8))
        >>> facts["1"].producer, facts["1"].input_rank, facts["1"].foldable
        ('0', 4, True)
    """

    path: str
    paths: tuple[str, ...]
    kind: str
    calls: int
    input_shapes: tuple[tuple[int, ...], ...]
    input_rank: int | None
    producer: str | None
    producer_kind: str | None
    foldable: bool
    reason: str | None
    producer_calls: int = 0
    producer_paths: tuple[str, ...] = ()
    other_uses: str | None = None
    origin: str | None = None
    input_dtype: torch.dtype | None = None


@dataclass(frozen=True, eq=False)
class GraphFacts(Mapping[str, NormFacts]):
    """Per-norm facts of one traced forward pass, keyed by canonical module path.

    A read-only mapping ``path -> NormFacts`` in ``model.named_modules()`` order. Looking up any
    path of a shared module (``facts["alias.path"]``) returns the facts of its canonical path;
    iteration yields canonical paths only.

    Attributes:
        model: the traced model's class name.
        norms: the facts, keyed by canonical path.
        aliases: every path of every traced norm, mapped to its canonical path.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
        >>> from normswap.graph.record import trace
        >>> facts = trace(model, torch.randn(1, 3, 8, 8))
        >>> facts.producers(), facts.ranks()
        ({'1': '0'}, {'1': 4})
    """

    model: str
    norms: Mapping[str, NormFacts]
    aliases: Mapping[str, str]

    def __getitem__(self, path: str) -> NormFacts:
        """Return the facts of the norm registered at ``path`` (any of its paths)."""
        return self.norms[self.aliases.get(path, path)]

    def __iter__(self) -> Iterator[str]:
        """Iterate over canonical norm paths."""
        return iter(self.norms)

    def __len__(self) -> int:
        """Return the number of distinct norm modules."""
        return len(self.norms)

    def ranks(self) -> dict[str, int]:
        """Return ``{path: input rank}`` for every norm whose calls agree on one rank.

        Norms that did not run, or ran with inputs of different ranks, are left out.

        Example:
            >>> from normswap.graph.record import trace
            >>> trace(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).eval(),
            ...       torch.randn(2, 4)).ranks()
            {'1': 2}
        """
        return {p: f.input_rank for p, f in self.norms.items() if f.input_rank is not None}

    def producers(self) -> dict[str, str | None]:
        """Return ``{path: producer path or None}`` for every norm.

        Example:
            >>> from normswap.graph.record import trace
            >>> trace(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).eval(),
            ...       torch.randn(2, 4)).producers()
            {'1': '0'}
        """
        return {p: f.producer for p, f in self.norms.items()}

    def foldable_pairs(self) -> list[tuple[str, str]]:
        """Return ``(norm path, producer path)`` for every foldable norm.

        Example:
            >>> from normswap.graph.record import trace
            >>> trace(nn.Sequential(nn.Conv1d(2, 4, 1), nn.BatchNorm1d(4)).eval(),
            ...       torch.randn(2, 2, 5)).foldable_pairs()
            [('1', '0')]
        """
        return [(p, f.producer) for p, f in self.norms.items() if f.foldable and f.producer]

    def __str__(self) -> str:
        """Render the facts as a table, one row per norm."""
        header = ("path", "type", "calls", "rank", "producer", "foldable", "reason")
        rows = [
            (
                f.path + (f" (also {', '.join(f.paths[1:])})" if len(f.paths) > 1 else ""),
                f.kind,
                str(f.calls),
                "-" if f.input_rank is None else str(f.input_rank),
                f.producer if f.producer is not None else "-",
                "yes" if f.foldable else "no",
                f.reason or "",
            )
            for f in self.norms.values()
        ]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
        n_fold = sum(f.foldable for f in self.norms.values())
        lines = [f"GraphFacts of {self.model}: {len(self.norms)} norms, {n_fold} foldable"]
        for row in (header, *rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return "\n".join(lines)
