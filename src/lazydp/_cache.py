"""A small per-shape cache of constant tensors / arrays (aranges the hot path would rebuild).

Kept per key (batch size, bag length, dtype, ...) and forgotten all at once past ``limit``
keys: Poisson sampling, ragged last batches and evaluation make many shapes, and a cache that
only grew would hold on to all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ShapeCache(Generic[K, V]):
    """``cache(key)`` is ``make(key)``, built once per key (callers must never write to it).

    >>> squares = ShapeCache(lambda n: [i * i for i in range(n)], limit=2)
    >>> squares(3) is squares(3), len(squares._values)
    (True, 1)
    """

    def __init__(self, make: Callable[[K], V], limit: int = 64) -> None:
        self._make, self._limit = make, limit
        self._values: dict[K, V] = {}

    def __call__(self, key: K) -> V:
        value = self._values.get(key)  # one lookup: safe if another thread clears the cache
        if value is None:
            if len(self._values) >= self._limit:
                self._values.clear()
            value = self._values[key] = self._make(key)
        return value
