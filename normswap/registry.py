"""The one registry implementation behind every registry of normswap.

One convention everywhere: keys are used exactly as given (no lowercasing), registering a key
that is taken is refused with an error naming what holds it, and asking for an unknown key
lists the valid ones. :class:`Registry` maps names to values (norm families);
:class:`TypeRegistry` maps classes to values and looks a module up along its class hierarchy
(MRO), so subclasses are found through their base and the most specific registration wins
(sources, fitters, monitor families).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from normswap.errors import SpecError

__all__ = ["Registry", "TypeRegistry"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _show(key: object) -> str:
    return key.__qualname__ if isinstance(key, type) else repr(key)


def _name(key: object) -> str:
    return key.__qualname__ if isinstance(key, type) else str(key)


class Registry(Generic[K, V]):
    """Keys to values; duplicates refused, unknown keys answered with the valid ones.

    Args:
        what: what a key names, for messages (``"norm"``, ``"calibration fitter"``).

    Example:
        >>> colors = Registry[str, int]("color")
        >>> colors.register("red", 1)
        1
        >>> colors.get("blue")
        Traceback (most recent call last):
        ...
        normswap.errors.SpecError: unknown color 'blue'; choose one of: red
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[K, V] = {}

    def register(self, key: K, value: V) -> V:
        """Add ``key -> value``; refuses a key that is already registered.

        Returns:
            ``value`` (so registration can be written as an expression).

        Raises:
            SpecError: ``key`` is taken (the message names what holds it).

        Example:
            >>> r = Registry[str, str]("thing"); _ = r.register("a", "x")
            >>> r.register("a", "y")
            Traceback (most recent call last):
            ...
            normswap.errors.SpecError: thing 'a' is already registered (by 'x'); pick another ...
        """
        self.check_free(key)
        self._items[key] = value
        return value

    def check_free(self, key: K) -> None:
        """Raise the error :meth:`register` would raise for ``key``; do nothing if it is free.

        Example:
            >>> Registry[str, int]("thing").check_free("a")
        """
        self._check_key(key)
        if key in self._items:
            holder = self._items[key]
            raise SpecError(
                f"{self.what} {_show(key)} is already registered (by {_show(holder)}); pick "
                f"another {'class' if isinstance(key, type) else 'name'} or unregister it first"
            )

    def unregister(self, key: K) -> V:
        """Remove ``key`` and return what it held.

        Example:
            >>> r = Registry[str, int]("thing"); _ = r.register("a", 1); r.unregister("a")
            1
        """
        self.get(key)
        return self._items.pop(key)

    def get(self, key: K) -> V:
        """The value registered under ``key``.

        Raises:
            SpecError: an unknown key; the message lists the registered ones.

        Example:
            >>> r = Registry[str, int]("thing"); _ = r.register("a", 1); r.get("a")
            1
        """
        try:
            return self._items[key]
        except (KeyError, TypeError):
            valid = ", ".join(sorted(map(_name, self._items))) or "(none registered)"
            raise SpecError(f"unknown {self.what} {_show(key)}; choose one of: {valid}") from None

    def find(self, key: K) -> V | None:
        """The value under ``key``, or ``None``.

        Example:
            >>> Registry[str, int]("thing").find("a") is None
            True
        """
        return self._items.get(key)

    def _check_key(self, key: K) -> None:
        if not isinstance(key, str) or not key:
            raise SpecError(f"a {self.what} name must be a non-empty string, got {key!r}")

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[K, V]]:
        """The ``(key, value)`` pairs in registration order.

        Example:
            >>> r = Registry[str, int]("thing"); _ = r.register("a", 1); r.items()
            [('a', 1)]
        """
        return list(self._items.items())


class TypeRegistry(Registry[type, V]):
    """A registry keyed by class, looked up along a class hierarchy (most specific wins).

    Example:
        >>> from torch import nn
        >>> kinds = TypeRegistry[str]("layer kind")
        >>> _ = kinds.register(nn.modules.conv._ConvNd, "conv")
        >>> kinds.lookup(nn.Conv2d(1, 1, 1)), kinds.lookup(nn.ReLU())
        ('conv', None)
    """

    def _check_key(self, key: type) -> None:
        if not isinstance(key, type):
            raise SpecError(f"a {self.what} must be registered for a class, got {key!r}")

    def match(self, obj: object) -> tuple[type, V] | None:
        """``(registered class, value)`` for the most specific class of ``obj``'s MRO.

        ``obj`` may be an instance or a class.

        Example:
            >>> from torch import nn
            >>> r = TypeRegistry[int]("x"); _ = r.register(nn.Module, 1)
            >>> r.match(nn.ReLU)[0].__name__
            'Module'
        """
        cls = obj if isinstance(obj, type) else type(obj)
        for base in cls.__mro__:
            if base in self._items:
                return base, self._items[base]
        return None

    def lookup(self, obj: object) -> V | None:
        """The value for the most specific registered class of ``obj``, or ``None``.

        Example:
            >>> TypeRegistry[int]("x").lookup(3) is None
            True
        """
        found = self.match(obj)
        return None if found is None else found[1]

    def classes(self) -> tuple[type, ...]:
        """The registered classes, in registration order.

        Example:
            >>> TypeRegistry[int]("x").classes()
            ()
        """
        return tuple(self._items)
