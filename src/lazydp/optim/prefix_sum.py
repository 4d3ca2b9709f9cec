"""A prefix sum over training steps whose window sums keep their small terms.

LazyDP draws a row's pending noise with variance ``S[t] - S[a]``, S the prefix sum of lr^2
(optim/lazy.py). In one float64 that difference loses every term below ~1e-16 * S[t]: after
10k steps at lr 1, five steps at lr 1e-7 (the tail of a cosine schedule) got a variance of
exactly 0 while their gradient was applied in full. So each prefix is an unevaluated pair
hi + lo (compensated summation, Knuth's TwoSum): lo carries the rounding error of every
addition, and ``(hi[t] - hi[a]) - lo[a] + lo[t]`` is right to ~1e-32 * S[t].

Reading lo costs a second gather per catch-up (about 2x the window's cost: 5 -> 11 us for 2048
rows, 0.1 -> 0.3 ms for 41k). It is skipped while no window can need it: when the smallest
nonzero term since the last restart is above ``hi[t] / CANCEL_MARGIN``, the hi-only
difference is within 1e-9 (relative) of every nonzero window -- for a constant lr, the first
~4.5M steps.

Contract: ``window_at(index_of(a), S[t])[i] == sum of the terms of steps [a[i], t)`` to a
relative 1e-9 (and exactly 0 for an empty window or all-zero terms).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: hi-only windows are used while every nonzero term exceeds hi[t] / CANCEL_MARGIN: their
#: error, at most 2^-52 hi[t] (two lo's), is then below 1e-9 of the smallest window.
CANCEL_MARGIN = 1e-9 * 2.0**52

Pair = tuple[float, float]


def add_pair(total: Pair, x: float) -> Pair:
    """``total + x`` as a compensated pair (TwoSum, then renormalised to |lo| <= ulp(hi)/2).

    >>> add_pair(add_pair((0.0, 0.0), 1.0), 1e-20)
    (1.0, 1e-20)
    """
    hi, lo = total
    s = hi + x
    back = s - hi
    lo += (hi - (s - back)) + (x - back)
    hi = s + lo
    return hi, lo - (hi - s)


class PrefixSum:
    """S[t] = sum of the terms appended before step t (S[0] = 0), as hi + lo float64 arrays.

    The arrays hold S from ``offset`` on (the last restart): no window starts before it, and a
    run of millions of steps kept 16 bytes per step of every step it ever took (and wrote them
    all into every checkpoint) where one epoch's worth is needed."""

    def __init__(self, capacity: int = 1024) -> None:
        self.hi = torch.zeros(capacity, dtype=torch.float64)
        self.lo = torch.zeros(capacity, dtype=torch.float64)
        self.offset = 0  # the step of hi[0] and lo[0]
        self.last: Pair = (0.0, 0.0)  # S at the newest step, as Python floats (no tensor read)
        self.smallest = float("inf")  # the smallest nonzero term since the last restart

    def set(self, t: int, value: Pair) -> None:
        """S[t] = value (the arrays grow as needed); the newest step's value is ``last``."""
        i = t - self.offset
        if i >= self.hi.numel():  # amortised O(1) growth
            grow = max(i + 1, 2 * self.hi.numel()) - self.hi.numel()
            self.hi = torch.cat([self.hi, self.hi.new_zeros(grow)])
            self.lo = torch.cat([self.lo, self.lo.new_zeros(grow)])
        self.hi[i], self.lo[i] = value
        self.last = value

    def append(self, t: int, term: float) -> None:
        """S[t + 1] = S[t] + term, with S[t] the newest step."""
        if term != 0.0:
            self.smallest = min(self.smallest, term)
        self.set(t + 1, add_pair(self.last, term))

    def restart(self, t: int) -> None:
        """S[t] = 0, with t the newest step: windows may start at t or later only (a rebase),
        so the sums before it are dropped."""
        self.smallest = float("inf")
        # A flush under torch.inference_mode() (state_dict there) restarts too: inference
        # tensors could not be written by the steps that follow.
        with torch.inference_mode(False):
            self.hi, self.lo = self.hi.new_zeros(1024), self.lo.new_zeros(1024)
        self.offset = t
        self.set(t, (0.0, 0.0))

    def at(self, t: int) -> Pair:
        return float(self.hi[t - self.offset]), float(self.lo[t - self.offset])

    def index_of(self, applied: Tensor) -> Tensor:
        """Where steps ``applied`` sit in the arrays (``applied`` itself before any restart)."""
        return applied - self.offset if self.offset else applied

    def window_at(self, index: Tensor, at: Pair) -> Tensor:
        """S[t] - S[applied] per row, with ``at`` = S[t] and ``index`` = index_of(applied)
        (float64 tensor). The caller locates the rows: sums restarted together share one
        index, one subtraction per catch-up rather than one per array."""
        d = torch.rsub(self.hi.index_select(0, index), at[0])
        if at[0] > CANCEL_MARGIN * self.smallest:  # a window may be swamped: add the lo parts
            d.sub_(self.lo.index_select(0, index)).add_(at[1])
        return d

    def state(self, n: int) -> tuple[Tensor, Tensor]:
        """S[offset..n) (hi, lo)."""
        return self.hi[: n - self.offset].clone(), self.lo[: n - self.offset].clone()

    def load(self, hi: Tensor, lo: Tensor | None, base: int, offset: int = 0) -> None:
        """Restore S[offset..offset + n) (lo None: a checkpoint from before the compensated
        sums, lo = 0); ``base`` is the last restart (>= offset)."""
        n = hi.numel()
        cap = max(1024, 2 * n)
        self.offset = offset
        self.hi = torch.zeros(cap, dtype=torch.float64)
        self.lo = torch.zeros(cap, dtype=torch.float64)
        self.hi[:n] = hi
        if lo is not None:
            self.lo[:n] = lo
        self.last = self.at(offset + n - 1)
        # The terms since the rebase, recovered from the sums (a swamped one shows in lo).
        b = base - offset
        terms = (self.hi[b + 1 : n] - self.hi[b : n - 1]) + (
            self.lo[b + 1 : n] - self.lo[b : n - 1]
        )
        nonzero = terms[terms > 0]
        self.smallest = float(nonzero.min()) if nonzero.numel() else float("inf")
