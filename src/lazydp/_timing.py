"""Phase timers for the latency breakdown (the benchmark harness turns them on; off costs nothing)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

# One shared no-op context: a disabled timer allocates nothing per phase.
_OFF = nullcontext()


class _Timed:
    """Adds the wall time of its ``with`` block to ``totals[name]``: a plain class, about 4x
    cheaper than a generator context manager (~0.4 against 1.6 us a phase), which the timed
    DP modes would otherwise pay some 100 times a step and sgd (untimed) never."""

    __slots__ = ("name", "start", "sync", "totals")

    def __init__(
        self, totals: dict[str, float], name: str, sync: Callable[[], None] | None = None
    ) -> None:
        self.totals, self.name, self.start, self.sync = totals, name, 0.0, sync

    def __enter__(self) -> None:
        if self.sync is not None:
            self.sync()
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        if self.sync is not None:
            self.sync()
        self.totals[self.name] += time.perf_counter() - self.start


class PhaseTimer:
    """Accumulates wall time per phase name; ``phase(name)`` is a no-op while disabled."""

    def __init__(self) -> None:
        self.enabled = False
        self.totals: dict[str, float] = defaultdict(float)
        # Waits for queued device work (torch.cuda.synchronize) at each phase's edges, so that
        # a phase on a GPU is charged its kernels' time, not only their launches (benchmark).
        self.sync: Callable[[], None] | None = None

    def phase(self, name: str) -> AbstractContextManager[None]:
        return _Timed(self.totals, name, self.sync) if self.enabled else _OFF

    def reset(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out
