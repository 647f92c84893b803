"""The test matrix of norm families, derived from the registry: a family registered with
``normswap.register_family`` is covered by every test that parametrizes over it."""

from __future__ import annotations

from typing import Any

import normswap

#: Every registered norm family, by name.
FAMILIES: list[str] = normswap.list_norms()

#: Options some tests need on top of a family's own example, because the test's model cannot
#: be traced (meta device) or is in training mode: folding needs both, so ``wn`` removes BN.
NO_TRACE: dict[str, dict[str, Any]] = {"wn": {"bn": "remove"}}


def options(name: str, *, traced: bool = True, **overrides: Any) -> dict[str, Any]:
    """Spec options for ``name``: its family's example, then ``NO_TRACE`` when the test
    cannot trace, then ``overrides``."""
    out = dict(normswap.get_family(name).example)
    if not traced:
        out.update(NO_TRACE.get(name, {}))
    out.update(overrides)
    return out


def cond_dim(name: str, **overrides: Any) -> int | None:
    """The condition size a converted model needs (``None`` for unconditional families)."""
    spec = normswap.get_spec(name, **options(name, **overrides))
    return getattr(spec, "cond_dim", None)
