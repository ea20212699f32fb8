"""
Values worked out once per object and kept by its identity.

A kept policy decision or model resolution hands every request of one
model name the same candidates tuple; what is derived from it (the names,
the models header) need not be derived again.  The object is held beside
its value, so its id cannot be reused by another while the entry lives;
bounded, and cleared whole when full.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class KeptByIdentity(Generic[K, V]):
    """C{make(key)}, kept per C{key} object (at most C{limit} of them)."""

    def __init__(self, make: Callable[[K], V], limit: int = 1024) -> None:
        self._make = make
        self._limit = limit
        self._kept: dict[int, tuple[K, V]] = {}

    def __call__(self, key: K) -> V:
        kept = self._kept.get(id(key))
        if kept is not None and kept[0] is key:
            return kept[1]
        value = self._make(key)
        if len(self._kept) >= self._limit:
            self._kept.clear()
        self._kept[id(key)] = (key, value)
        return value

    def __len__(self) -> int:
        return len(self._kept)
