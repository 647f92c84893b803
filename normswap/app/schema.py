"""Structured configs: a typed dataclass backs every option of the typed config groups.

Each YAML option of the groups in :data:`SCHEMA_GROUPS` names its schema first in its defaults
list (``defaults: [gn_schema, _self_]``). The schema is built from what the option configures,
so it cannot drift from the code: for a ``_target_`` node, the parameters of that callable
(``build_classifier``, a ``LightningDataModule``, a task, ``pytorch_lightning.Trainer``), typed
by its annotations; for a ``norm`` option, the fields of its spec dataclass
(:class:`normswap.GroupNormSpec`, ...) plus ``include``/``exclude``. Its fields are exactly the
option's keys, so Hydra refuses a misspelled key (``norm.num_group=8``) and a value of the
wrong type (``data.batch_size=big``) when it composes the config, before anything runs, with a
message naming the key.

Annotations OmegaConf can check (``int``, ``float``, ``str``, ``bool``, ``Literal`` of strings,
``Optional`` of those) become field types; anything richer (unions such as Lightning's
``devices: list[int] | str | int``) is ``Any``, left to the callable's own validation.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from importlib import resources
from typing import Any, Literal, Union, get_args, get_origin

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from normswap.specs import spec_class

__all__ = ["NORM_CALLBACK_OPTIONS", "SCHEMA_GROUPS", "register_schemas", "schema_for"]

NORM_CALLBACK_OPTIONS: dict[str, Any] = {
    "include": Any,
    "exclude": Any,
    "replace": Any,
    "calibrate": bool | None,
    "calibrate_batches": int | None,
    "distill_steps": int | None,
    "progressive": Any,
}
"""``norm`` keys that configure the ``NormSwap`` callback rather than the spec, with their types
(``distill_steps``: with ``calibrate``, distill that many steps after calibrating;
``progressive``: a ``BlendSchedule``'s fields, or its end step)."""

SCHEMA_GROUPS: tuple[str, ...] = ("model", "norm", "data", "task")
"""The config groups whose options are backed by a schema. ``trainer`` options are
``pytorch_lightning.Trainer`` keyword arguments, checked by Lightning itself, and stay open so
that ``++trainer.fast_dev_run=true`` can add any of them."""

_PLAIN = (int, float, str, bool)


def _field_type(hint: Any) -> Any:
    """The OmegaConf field type for a Python annotation (``Any`` when OmegaConf cannot check it)."""
    if hint in _PLAIN:
        return hint
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        kinds = {type(a) for a in args}
        return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in _PLAIN else Any
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            inner = _field_type(rest[0])
            if inner is Any:
                return Any
            return inner | None if len(rest) < len(args) else inner
    return Any


def _locate(path: str) -> Callable[..., Any]:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _hints(target: Callable[..., Any]) -> dict[str, Any]:
    fn = target.__init__ if isinstance(target, type) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # annotations that do not resolve at run time: leave them unchecked
        return {}


def _optional_parameters(target: Callable[..., Any]) -> dict[str, Any]:
    """The parameters of ``target`` with a plain default (``MISSING`` for those without one)."""

    out = {}
    for name, param in inspect.signature(target).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = param.default
        if default is param.empty:
            out[name] = MISSING
        elif default is None or isinstance(default, _PLAIN):
            out[name] = default
    return out


def schema_for(group: str, option: str, node: dict[str, Any]) -> type:
    """The dataclass backing one YAML option (``node``: its keys and values).

    Args:
        group: the config group (``"norm"``, ``"model"``, ...).
        option: the option's name (``"gn"``), used to name the dataclass.
        node: the option's YAML content.

    Returns:
        A dataclass with one field per key of ``node`` (default ``MISSING``: the YAML sets it),
        then one per other parameter with a plain default (that default), so
        ``model.weights=...`` works even where the YAML leaves it out.

    Raises:
        TypeError: a key the callable (or the spec) does not take — the YAML drifted from the code.

    Example:
        >>> schema = schema_for("norm", "gn", {"spec": "gn", "num_groups": 32, "include": None})
        >>> [f.name for f in dataclasses.fields(schema)][:4]
        ['spec', 'num_groups', 'include', 'exclude']
    """
    keys = [k for k in node if k != "defaults"]
    if group == "norm":
        spec = node["spec"]
        hints: dict[str, Any] = {"spec": str, **NORM_CALLBACK_OPTIONS}
        defaults: dict[str, Any] = dict.fromkeys(hints)
        known = set(hints)
        if spec != "bn":
            cls = spec_class(spec)
            hints |= typing.get_type_hints(cls)
            known |= {f.name for f in dataclasses.fields(cls)}
            defaults |= {
                f.name: f.default
                for f in dataclasses.fields(cls)
                if f.default is None or isinstance(f.default, _PLAIN)
            }
        else:  # the callback options are accepted and have nothing to act on
            defaults = {"spec": "bn", **dict.fromkeys(NORM_CALLBACK_OPTIONS)}
    else:
        target = _locate(node["_target_"])
        hints = _hints(target) | {"_target_": str, "_partial_": bool}
        defaults = {"_target_": MISSING, "_partial_": False} | _optional_parameters(target)
        known = set(defaults) | set(inspect.signature(target).parameters)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise TypeError(f"conf/{group}/{option}.yaml: {unknown} not accepted by what it configures")
    # The option's keys first (the YAML sets them), then what else may be overridden.
    fields = [(k, _field_type(hints.get(k, Any)), dataclasses.field(default=MISSING)) for k in keys]
    fields += [
        (k, _field_type(hints.get(k, Any)), dataclasses.field(default=v))
        for k, v in defaults.items()
        if k not in keys and v is not MISSING
    ]
    name = f"{group.capitalize()}{option.title().replace('_', '')}Schema"
    return dataclasses.make_dataclass(name, fields)


def register_schemas() -> list[str]:
    """Store every option's schema in Hydra's ConfigStore as ``<group>/<option>_schema``.

    Example:
        >>> "norm/gn_schema" in register_schemas()
        True
    """
    store = ConfigStore.instance()
    stored = []
    for group in SCHEMA_GROUPS:
        folder = resources.files("normswap.conf").joinpath(group)
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if not entry.name.endswith(".yaml"):
                continue
            option = entry.name[: -len(".yaml")]
            node = OmegaConf.to_container(OmegaConf.create(entry.read_text(encoding="utf-8")))
            assert isinstance(node, dict)
            store.store(group=group, name=f"{option}_schema", node=schema_for(group, option, node))
            stored.append(f"{group}/{option}_schema")
    return stored
