"""The ids one embedding call reads, grouped by row with ONE stable sort.

A LazyDP step needs the same grouping three times per table: the catch-up draws once per
distinct row, the update sums the clipped gradient per distinct row, and the ghost norm needs to
know whether a bag reads a row twice. ``RowGroups`` sorts the ids once and answers all three
with O(ids) gathers, where ``torch.unique(return_inverse=True)`` + ``index_add_`` (the obvious
way) costs a sort per use and a scattered add (0.56 ms for 40k x 32 values here, against 0.10 ms
for the segment sum below).

Contract:
* ``rows`` are the distinct ids, ascending; ``counts[i]`` how often ``rows[i]`` is read.
* ``positions()`` maps each id to its index in ``rows`` (``rows[positions()] == ids``).
* ``sum_per_row(values)`` (one row of ``values`` per id) equals
  ``zeros(len(rows), d).index_add_(0, inverse, values)`` up to float rounding.
* ``sum_gathered(table, index, w)`` equals ``sum_per_row(w[:, None] * table[index])``
  (``index`` None: ``table``'s row j // ``length`` for id j; length 1: one row per id).
* ``pairs(bag)`` is exact when ``bag`` (the bag of each id) never decreases along the ids,
  as it does for one EmbeddingBag call: the sort is stable, so a row's reads stay in bag order
  and a repeated (bag, row) pair is two neighbours. ``bag`` None: equal bags of ``length``
  ids (id j in bag j // length), without a bag tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from torch.nn import functional as F

from lazydp._cache import ShapeCache

_INT32_ROWS = 1 << 31
_INT32_SORT_MIN = 1 << 14
# Below this many ids torch's own stable sort beats the packed numpy sort inside a step: its
# numpy calls and two from_numpy cost a fixed ~25 us a table there (rmc1, 10 tables, in one
# process against the packed sort: catch-up 1.45-1.52 -> 1.20-1.21 ms a step at 4 ids a table,
# 1.46 -> 1.38 at 256; at 1024 and 2048 ids the packed sort stays ahead, 2.53 vs 2.95 and
# 5.12 vs 5.18-5.50 ms).
_PACKED_SORT_MIN = 1 << 9
# embedding_bag's CPU kernel sums these dtypes; others take index_add_.
_SEGMENT_SUM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _packs(ids: Tensor, num_rows: int) -> bool:
    """Whether (id, position) pairs of ``ids`` fit one int64 key (ids checked < num_rows)."""
    return (
        ids.device.type == "cpu"
        and ids.dtype == torch.int64
        and max(num_rows - 1, 1).bit_length() + max(ids.numel() - 1, 1).bit_length() <= 62
    )


def _packed_sort(ids: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """torch.sort(ids, stable=True) for a few thousand CPU ids, about twice as fast: each key is
    id * 2^k + position, so the keys are distinct and a plain (unstable, values-only) numpy sort
    orders them as a stable sort would (2048 ids: 40-47 against 80-87 us; from ~16k ids torch's
    own parallel sort wins: 40k ids, 1.45 against 0.34-0.41 ms). Keys that fit 32 bits (ids
    below 2^21 with 2048 of them) sort as uint32: 2048 keys in 20 against 37 us."""
    n = ids.numel()
    shift = max(n - 1, 1).bit_length()
    narrow = max(num_rows - 1, 1).bit_length() + shift <= 32
    kind = np.uint32 if narrow else np.int64
    keys: npt.NDArray[np.integer[Any]] = ids.numpy().astype(kind)  # the one temporary
    keys <<= kind(shift)
    keys |= (_positions32 if narrow else _positions)(n)
    keys.sort()
    order = (keys & kind((1 << shift) - 1)).astype(np.int64, copy=False)
    keys >>= kind(shift)
    return torch.from_numpy(keys.astype(np.int64, copy=False)), torch.from_numpy(order)


def _readonly_arange(n: int, dtype: type = np.int64) -> np.ndarray:
    positions: np.ndarray = np.arange(n, dtype=dtype)
    positions.flags.writeable = False
    return positions


#: np.arange(n) as int64 (and as uint32), kept for the next batch of the same size (read only).
_positions: ShapeCache[int, np.ndarray] = ShapeCache(_readonly_arange)
_positions32: ShapeCache[int, np.ndarray] = ShapeCache(lambda n: _readonly_arange(n, np.uint32))


class RowGroups:
    """``ids`` (1-D int64) grouped by row.

    >>> g = RowGroups(torch.tensor([5, 2, 5]))
    >>> g.rows.tolist(), g.counts.tolist()
    ([2, 5], [1, 2])
    >>> g.sum_per_row(torch.tensor([[1.0], [2.0], [3.0]])).view(-1).tolist()
    [2.0, 4.0]
    """

    def __init__(self, ids: Tensor, num_rows: int | None = None) -> None:
        """``num_rows``: a bound the caller has checked (0 <= ids < num_rows), if any."""
        self.ids = ids
        n = ids.numel()
        if (
            num_rows is not None
            and _PACKED_SORT_MIN <= n < _INT32_SORT_MIN
            and _packs(ids, num_rows)
        ):
            self.sorted, self.order = _packed_sort(ids, num_rows)
        elif num_rows is not None and num_rows <= _INT32_ROWS and n >= _INT32_SORT_MIN:
            # int32 keys sort 1.5x faster (163k ids: 0.76 vs 1.20 ms); below ~16k ids the two
            # conversions cost what the sort saves.
            keys, self.order = torch.sort(ids.to(torch.int32), stable=True)
            self.sorted = keys.to(ids.dtype)
        else:
            self.sorted, self.order = torch.sort(ids, stable=True)
        # segment[j]: the index in rows of the j-th sorted id (one more output of the same pass)
        self.rows, self._segment, self.counts = torch.unique_consecutive(
            self.sorted, return_inverse=True, return_counts=True
        )
        self._sorted_like: tuple[Tensor, Tensor] | None = None
        self._equal_bags: tuple[int, Tensor] | None = None

    @property
    def unique(self) -> bool:
        """Whether no id repeats (then ``order`` is a permutation onto ``rows``)."""
        return self.rows.numel() == self.ids.numel()

    def positions(self) -> Tensor:
        """For each id, the index of its row in ``rows`` (``rows[positions()] == ids``)."""
        # order is a permutation: a plain scatter (2-4x cheaper than index_copy_ here).
        return torch.empty_like(self.order).scatter_(0, self.order, self._segment)

    def sum_per_row(self, values: Tensor) -> Tensor:
        """(len(rows), d): the rows of ``values`` summed per distinct id, in ``rows`` order."""
        if self.unique:
            return values.index_select(0, self.order)
        if values.dtype not in _SEGMENT_SUM_DTYPES:
            out = values.new_zeros((self.rows.numel(), values.shape[1]))
            return out.index_add_(0, self._segment, values[self.order])
        # Segment i of the sorted order holds the reads of rows[i]: a sum-mode bag.
        return F.embedding_bag(self.order, values, self._starts(), mode="sum")

    def sum_gathered(
        self,
        table: Tensor,
        index: Tensor | None,
        weights: Tensor | None = None,
        length: int = 1,
    ) -> Tensor:
        """``sum_per_row(w[:, None] * table[index])`` without building ``table[index]``: one
        sum-mode bag per row over ``table`` (w None: weight 1; index None: ``table``'s row
        j // length goes with id j)."""
        if table.dtype not in _SEGMENT_SUM_DTYPES:
            if index is not None:
                rows = table[index]
            else:
                rows = table if length == 1 else table.repeat_interleave(length, 0)
            return self.sum_per_row(rows if weights is None else rows * weights[:, None])
        w = None if weights is None else weights.index_select(0, self.order).to(table.dtype)
        sorted_index = self.bag_in_sorted_order(index, length)
        # One id per row: a gather (and a scale), no segment sums. Not bfloat16: the kernel
        # rounds its halfway products away from zero, mul_ to even (1 ulp apart).
        if self.unique and table.dtype != torch.bfloat16:
            rows = table.index_select(0, sorted_index)
            return rows if w is None else rows.mul_(w[:, None])
        return F.embedding_bag(
            sorted_index, table, self._starts(), mode="sum", per_sample_weights=w
        )

    def _starts(self) -> Tensor:
        """Where each row's segment begins in the sorted order (embedding_bag's offsets)."""
        return self.counts.cumsum(0) - self.counts

    def in_sorted_order(self, t: Tensor) -> Tensor:
        """``t[order]`` (one value per id), remembered for the last ``t`` asked."""
        if self._sorted_like is None or self._sorted_like[0] is not t:
            self._sorted_like = (t, t.index_select(0, self.order))
        return self._sorted_like[1]

    def bag_in_sorted_order(self, bag: Tensor | None, length: int = 1) -> Tensor:
        """The bag of each id in sorted order: ``bag[order]``; for ``bag`` None, equal bags of
        ``length`` ids: ``order // length`` (no bag tensor of the ids' size is built)."""
        if bag is not None:
            return self.in_sorted_order(bag)
        if length == 1:
            return self.order
        if self._equal_bags is None or self._equal_bags[0] != length:
            self._equal_bags = (length, torch.div(self.order, length, rounding_mode="floor"))
        return self._equal_bags[1]

    def pairs(self, bag: Tensor | None, length: int = 1) -> tuple[Tensor, Tensor] | None:
        """None when no bag reads a row twice (``bag`` non-decreasing along the ids; None:
        equal bags of ``length``); else (pair_bag, pair): each distinct (bag, row) pair's bag,
        and for each id in sorted order (``ids[order]``) the index of its pair."""
        if self.unique:
            return None
        same_row = self.sorted[1:] == self.sorted[:-1]
        # Only the reads of a row read more than once can repeat a pair: look at those few
        # neighbours first (about 800 of 41k ids at pooling 20 on 1M rows) and build the
        # ids-sized sorted bags only when one of them does.
        second = same_row.nonzero().squeeze(1) + 1
        a, b = self.order.index_select(0, second - 1), self.order.index_select(0, second)
        if bag is None:
            repeated = torch.div(a, length, rounding_mode="floor") == torch.div(
                b, length, rounding_mode="floor"
            )
        else:
            repeated = bag.index_select(0, a) == bag.index_select(0, b)
        if not bool(repeated.any()):
            return None
        sorted_bag = self.bag_in_sorted_order(bag, length)
        same = same_row & (sorted_bag[1:] == sorted_bag[:-1])
        first = torch.cat([same.new_ones(1), ~same])  # the first read of each pair
        return sorted_bag[first], first.cumsum(0) - 1
