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

Contract: ``window(a, t)[i] == sum of the terms of steps [a[i], t)`` to a relative 1e-9 (and
exactly 0 for an empty window or all-zero terms).
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
    """S[t] = sum of the terms appended before step t (S[0] = 0), as hi + lo float64 arrays."""

    def __init__(self, capacity: int = 1024) -> None:
        self.hi = torch.zeros(capacity, dtype=torch.float64)
        self.lo = torch.zeros(capacity, dtype=torch.float64)
        self.last: Pair = (0.0, 0.0)  # S at the newest step, as Python floats (no tensor read)
        self.smallest = float("inf")  # the smallest nonzero term since the last restart

    def set(self, t: int, value: Pair) -> None:
        """S[t] = value (the arrays grow as needed); the newest step's value is ``last``."""
        if t >= self.hi.numel():  # amortised O(1) growth
            grow = max(t + 1, 2 * self.hi.numel()) - self.hi.numel()
            self.hi = torch.cat([self.hi, self.hi.new_zeros(grow)])
            self.lo = torch.cat([self.lo, self.lo.new_zeros(grow)])
        self.hi[t], self.lo[t] = value
        self.last = value

    def append(self, t: int, term: float) -> None:
        """S[t + 1] = S[t] + term, with S[t] the newest step."""
        if term != 0.0:
            self.smallest = min(self.smallest, term)
        self.set(t + 1, add_pair(self.last, term))

    def restart(self, t: int) -> None:
        """S[t] = 0: windows may start at t or later only (a rebase)."""
        self.smallest = float("inf")
        self.set(t, (0.0, 0.0))

    def at(self, t: int) -> Pair:
        return float(self.hi[t]), float(self.lo[t])

    def window(self, applied: Tensor, at: Pair) -> Tensor:
        """S[t] - S[applied] per row, with ``at`` = S[t] (float64 tensor)."""
        d = torch.rsub(self.hi.index_select(0, applied), at[0])
        if at[0] > CANCEL_MARGIN * self.smallest:  # a window may be swamped: add the lo parts
            d.sub_(self.lo.index_select(0, applied)).add_(at[1])
        return d

    def state(self, n: int) -> tuple[Tensor, Tensor]:
        return self.hi[:n].clone(), self.lo[:n].clone()

    def load(self, hi: Tensor, lo: Tensor | None, base: int) -> None:
        """Restore S[0..n) (lo None: a checkpoint from before the compensated sums, lo = 0)."""
        n = hi.numel()
        cap = max(1024, 2 * n)
        self.hi = torch.zeros(cap, dtype=torch.float64)
        self.lo = torch.zeros(cap, dtype=torch.float64)
        self.hi[:n] = hi
        if lo is not None:
            self.lo[:n] = lo
        self.last = self.at(n - 1)
        # The terms since the rebase, recovered from the sums (a swamped one shows in lo).
        terms = (self.hi[base + 1 : n] - self.hi[base : n - 1]) + (
            self.lo[base + 1 : n] - self.lo[base : n - 1]
        )
        nonzero = terms[terms > 0]
        self.smallest = float(nonzero.min()) if nonzero.numel() else float("inf")
