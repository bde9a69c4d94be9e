"""`Lru`: a mapping bounded by entry count that drops the least recently used entry
first, for the caches that hold an entry per inode (issue 14: memory)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A mapping bounded to `maxsize` entries that drops the least recently used
    first (`get` and setting count as use): cachetools' LRUCache without its second
    dict, ~50 bytes an entry less."""

    __slots__ = ("_d", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._d: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def get(self, key: K, default: V | None = None) -> V | None:
        d = self._d
        try:
            d.move_to_end(key)
        except KeyError:
            return default
        return d[key]

    def __setitem__(self, key: K, value: V) -> None:
        d = self._d
        if key in d:
            d.move_to_end(key)
        elif self.maxsize <= 0:
            return
        else:
            while len(d) >= self.maxsize:
                d.popitem(last=False)
        d[key] = value

    def pop(self, key: K, default: V | None = None) -> V | None:
        return self._d.pop(key, default)

    def __delitem__(self, key: K) -> None:
        del self._d[key]

    def items(self) -> Iterator[tuple[K, V]]:
        return iter(self._d.items())
