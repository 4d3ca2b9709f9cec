"""Phase timers for the latency breakdown (the benchmark harness turns them on; off costs nothing)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext


class PhaseTimer:
    """Accumulates wall time per phase name; ``phase(name)`` is a no-op while disabled."""

    def __init__(self) -> None:
        self.enabled = False
        self.totals: dict[str, float] = defaultdict(float)

    def phase(self, name: str) -> AbstractContextManager[None]:
        return self._timed(name) if self.enabled else nullcontext()

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - start

    def reset(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out
