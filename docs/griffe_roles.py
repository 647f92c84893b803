"""Griffe extension: the docstrings' Sphinx roles (:func:`x`) become links of the API reference.

normswap's docstrings name other objects with Sphinx roles (``:func:`normswap.swap```,
``:class:`~normswap.norms.BlendNorm```, or a name of the same module: ``:func:`calibrate```).
Each one is resolved in the scope of the docstring's object; when it names an object the
reference renders, it becomes a cross-reference to that object's entry (``[`swap`][normswap.swap]``,
checked by ``mkdocs build --strict``: a link to nothing fails the build); anything else (torch's
objects, private helpers) stays inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)`")
#: Our docstrings head their one example "Example:"; griffe's Google parser reads examples
#: (code, not Markdown) under "Examples:".
EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)

#: Modules whose public members the reference renders under the module's own path
#: (``normswap``'s members are rendered under ``normswap.<name>``, their exported names).
RENDERED_MODULES = (
    "normswap",
    "normswap.callbacks",
    "normswap.app.train",
    "normswap.app.schema",
    "normswap.app.models",
    "normswap.data",
    "normswap.inputs",
    "normswap.zoo",
    "normswap.small",
    "normswap.meta",
    "normswap.progressive",
    "normswap.sources",
    "normswap.norms",
)

#: Exported functions whose name is also their module's (``normswap.plan`` the function and
#: the module): the reference renders them under their full path.
FULL_PATH = ("normswap.plan.plan", "normswap.finalize.finalize")


def _get(root: griffe.Module, path: str) -> griffe.Object | griffe.Alias | None:
    """The object at dotted ``path`` under the package ``root`` (``None`` when absent)."""
    parts = path.split(".")
    if parts[0] != root.name:
        return None
    obj: Any = root
    for part in parts[1:]:
        try:
            obj = obj.members[part]
            if obj.is_alias:
                obj = obj.final_target
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    return obj


class RstRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the package into autorefs cross-references."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "normswap":
            return
        self.root = pkg
        self.rendered = self._rendered_paths()
        self._walk(pkg)

    def _rendered_paths(self) -> dict[str, str]:
        """Canonical path of every rendered object -> the identifier its entry is found by."""
        paths: dict[str, str] = {path: path for path in FULL_PATH}
        self.classes: set[str] = set()
        for module_path in RENDERED_MODULES:
            module = _get(self.root, module_path)
            if module is None:
                continue
            paths.setdefault(module.path, module_path)
            exported = getattr(module, "exports", None)
            names = list(exported) if exported else list(module.members)
            for name in names:
                if name.startswith("_"):
                    continue
                member = _get(self.root, f"{module_path}.{name}")
                # Objects without a docstring are not rendered: nothing to link to.
                if member is None or (member.is_module and module_path != "normswap"):
                    continue
                if member.is_module:  # a module that shadows the exported name: FULL_PATH
                    continue
                if member.docstring:
                    paths.setdefault(member.path, f"{module_path}.{name}")
                    if member.is_class:
                        self.classes.add(member.path)
        return paths

    def _identifier(self, canonical: str) -> str | None:
        """The rendered identifier of ``canonical``, or of its member through its class."""
        if canonical in self.rendered:
            return self.rendered[canonical]
        head, _, tail = canonical.rpartition(".")
        if head in self.classes and not tail.startswith("_"):
            member = _get(self.root, canonical)
            if member is not None and member.docstring:
                return f"{self.rendered[head]}.{tail}"
        return None

    def _resolve(self, obj: griffe.Object, name: str) -> str | None:
        target = _get(self.root, name)
        if target is None:
            first, _, rest = name.partition(".")
            scope = obj if obj.is_module or obj.is_class else obj.parent
            try:
                resolved = scope.resolve(first) if scope is not None else None
            except griffe.NameResolutionError:
                return None
            if resolved is None:
                return None
            target = _get(self.root, f"{resolved}.{rest}" if rest else resolved)
            if target is None:
                return None
        return self._identifier(target.path)

    def _rewrite(self, obj: griffe.Object, text: str) -> str:
        def link(match: re.Match[str]) -> str:
            short, name = match.group(1), match.group(2)
            shown = name.rsplit(".", 1)[-1] if short else name
            identifier = self._resolve(obj, name)
            return f"[`{shown}`][{identifier}]" if identifier else f"`{shown}`"

        return EXAMPLE.sub(r"\1Examples:", ROLE.sub(link, text))

    def _walk(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member)
