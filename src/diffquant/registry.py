"""Explicit name → class registries, filled by decorators where the classes are defined.

One registry per kind (recipe stages, quantized layer kinds, quantizer variants); a lookup of an
unknown name is a one-line :class:`~diffquant.errors.ConfigError` listing what is available. Registering the same name twice
is a programming error and raises at import time.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named classes of one kind (``kind`` appears in error messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@STAGES.register("adaround")``; sets ``cls.name``."""
        def decorate(cls: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self._items[name] = cls
            return cls

        return decorate

    def add(self, name: str, item: T) -> T:
        """Register ``item`` under ``name`` (for items that are not classes defined here)."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


__all__ = ["Registry"]
