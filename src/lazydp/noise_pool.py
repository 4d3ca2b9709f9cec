"""Standard normals drawn ahead in large batches, each handed out exactly once.

Why: LazyDP's catch-up draws one table's rows at a time (about 2k rows x d per table per step,
26 tables on DLRM). Drawn one by one, each draw is below one generator chunk, so it runs on one
thread and pays the per-call set-up; drawn ahead 4M values at a time, the draw splits over all
threads (benchmarks/RESULTS.md, "Catch-up noise pool").

Contract:

* Every value comes from :class:`~lazydp.noise.GaussianNoise` (same generators, same seeding)
  and is handed out once: the read position only moves forward, and a refill is a new call on
  the stream. So the catch-up noise is exactly i.i.d. N(0, 1), as without a pool.
* A pool owns its stream: nothing else draws from it. If the stream's call counter is not
  where the last refill left it (``load_state_dict`` on the stream restored another state),
  the leftover values are dropped.
* The read position is part of the checkpoint (``state_dict``): a seeded run resumed from a
  checkpoint replays the refill it was in and continues at the same position, so it equals the
  uninterrupted run. An unseeded run cannot replay OS entropy and simply refills afresh.
* Draws larger than half a refill, float64 and GPU draws bypass the pool.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lazydp.errors import PrivacyError
from lazydp.noise import GaussianNoise

#: Values per refill (16 MiB of float32), split over the generator's chunks and threads. Inside
#: a training step fewer, larger refills cost less: on DLRM basic (3.4M catch-up values a step)
#: 2^22 took 7 ms of refills a step against 10 ms for 2^20 (benchmarks/RESULTS.md).
POOL_NUMEL = 1 << 22


class NoisePool:
    """Hands out fresh N(0, 1) float32 values from ``noise``, refilled in large draws.

    >>> pool = NoisePool(GaussianNoise(seed=0))
    >>> a, b = pool.standard(5).clone(), pool.standard(5)
    >>> a.shape, bool((a != b).all())
    (torch.Size([5]), True)
    """

    def __init__(self, noise: GaussianNoise) -> None:
        self.noise = noise
        self._buffer = torch.empty(0)
        self._pos = 0
        self._refill_call = -1  # the stream call that filled the buffer
        self._restore: dict[str, int] | None = None

    def serves(self, n: int) -> bool:
        """Whether a draw of ``n`` values comes from the pool (larger ones bypass it)."""
        return n <= POOL_NUMEL // 2

    def standard(self, n: int) -> Tensor:
        """``n`` fresh samples: a view into the pool, valid until the next call (use it at once)."""
        if not self.serves(n):
            return self.noise.normal_(torch.empty(n))
        if self._restore is not None:
            self._replay(self._restore)
        if self.noise.calls != self._refill_call + 1 or self._pos + n > self._buffer.numel():
            self._refill()
        out = self._buffer[self._pos : self._pos + n]
        self._pos += n
        return out

    def _refill(self) -> None:
        if self._buffer.numel() != POOL_NUMEL:
            self._buffer = torch.empty(POOL_NUMEL)
        self._refill_call = self.noise.calls
        self.noise.normal_(self._buffer)  # the unused tail of the last refill is dropped
        self._pos = 0

    def _replay(self, state: dict[str, int]) -> None:
        """Rebuild a checkpointed refill (seeded streams whose counter is right after it)."""
        self._restore = None
        call, pos = state["call"], state["pos"]
        noise = self.noise
        if call < 0 or not noise.seeded or noise.calls != call + 1:
            # saved before its first refill, unseeded, or the stream moved on (a resumed
            # engine re-keys its streams): the next standard() refills afresh
            return
        if not noise.untouched_since_restore:
            # The counter reached call + 1 by draws made after the restore (a large draw that
            # bypassed the pool, on a re-keyed stream): call ``call`` is one of those, not the
            # saved refill, and replaying it would hand its values out a second time.
            return
        self._buffer = torch.empty(POOL_NUMEL)
        self.noise.replay_(self._buffer, call)
        self._refill_call, self._pos = call, pos

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        if self._restore is not None:  # restored but not used yet: keep what was restored
            return dict(self._restore)
        return {"call": self._refill_call, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Remember where the saved run was; applied at the next draw, once the stream itself
        has been restored (the engine restores the streams after the optimizer)."""
        call, pos = self.check_state(state)
        self._buffer, self._pos, self._refill_call = torch.empty(0), 0, -1
        self._restore = {"call": call, "pos": pos}

    @staticmethod
    def check_state(state: Any) -> tuple[int, int]:
        """(call, pos) of a saved pool state; PrivacyError if it is not one."""
        try:
            call, pos = state["call"], state["pos"]
            for v in (call, pos):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(type(v).__name__)
            if not (-1 <= call and 0 <= pos <= POOL_NUMEL):
                raise ValueError(f"call={call}, pos={pos}")
        except (KeyError, TypeError, ValueError) as e:
            raise PrivacyError(
                f"corrupt noise-pool state in the checkpoint ({e!r}); it must be "
                "{'call': int, 'pos': int}. Use a checkpoint written by lazydp."
            ) from e
        return call, pos
